"""Run every benchmark in bench/ and print a one-line verdict each (results in bench/results/*.json)."""

from __future__ import annotations

import importlib
import sys

BENCHMARKS = ("task_cost", "skip_frozen")


def main() -> int:
    """Run the benchmarks in order; the exit code is 1 if any missed its target."""
    failed = []
    for name in BENCHMARKS:
        result = importlib.import_module(f"bench.{name}").main()
        verdict = "pass" if result["pass"] else "MISS"
        print(f"[bench] {name}: {verdict}  ->  bench/results/{name}.json", flush=True)
        if not result["pass"]:
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
