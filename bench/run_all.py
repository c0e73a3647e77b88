"""``make bench``: every benchmark in one run, one ``bench/results/<timestamp>.json`` and one printed table of ratios.

Each ratio is measured side by side within this run (see ``bench/common.py``) and printed with its target and
whether it holds. The exit status is non-zero only when a benchmark fails with an error, never on a missed target.

    python -m bench.run_all [--size small|tiny] [--threads N] [--only NAME,...] [--no-profile] [--note TEXT]
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bench.common import RESULTS, machine_conditions

#: Benchmark modules in run order; each has ``run(size, threads) -> list of ratio entries``.
BENCHMARKS = ("eval_padding", "framework_overhead", "routed_inference", "skip_frozen", "task_cost")


def table(entries: list[dict[str, Any]]) -> str:
    """The ratios as an aligned text table."""
    rows = [("ratio", "value", "target", "verdict")]
    rows += [(e["name"], f"{e['ratio']:.3f}", e["target"], e["verdict"]) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def profile_table(profile: dict[str, Any]) -> str:
    """The profile's grouped breakdown as text."""
    wall = profile.get("wall_seconds_in_process") or 1.0
    lines = [f"profile of a reduced make run ({' '.join(profile['conditions']['overrides'])}): {wall:.0f} s"]
    for key, secs in profile["groups"].items():
        lines.append(f"  {key:<28} {secs:8.1f} s  {100 * secs / wall:5.1f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, write the results file, print the table; 1 if any benchmark raised."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small", choices=("small", "tiny"))
    parser.add_argument("--threads", type=int, default=2, help="torch threads on both sides of every ratio")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--no-profile", action="store_true", help="skip the profile of a reduced make run")
    parser.add_argument("--profile-tasks", type=int, default=None, help="tasks of the profiled run (default 3)")
    parser.add_argument("--note", default="", help="free text stored in the conditions (e.g. 'machine shared')")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder of the results file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    names = [n for n in args.only.split(",") if n] or list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    before = machine_conditions()
    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    entries: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    seconds: dict[str, float] = {}
    for name in names:
        t = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        try:
            entries += importlib.import_module(f"bench.{name}").run(size=args.size, threads=args.threads)
        except Exception as err:  # recorded and reported; the other benchmarks still run
            errors.append({"benchmark": name, "error": repr(err), "traceback": traceback.format_exc()})
            print(f"[bench] {name} FAILED: {err!r}", file=sys.stderr, flush=True)
        seconds[name] = round(time.perf_counter() - t, 1)
        out.write_text(json.dumps({"conditions": {**before, "partial": True}, "ratios": entries, "errors": errors}))
    profile: dict[str, Any] | None = None
    if not args.no_profile:
        t = time.perf_counter()
        print("[bench] profile_run ...", flush=True)
        try:
            from bench import profile_run

            profile = profile_run.run(size=args.size, threads=args.threads, tasks=args.profile_tasks)
        except Exception as err:
            errors.append({"benchmark": "profile_run", "error": repr(err), "traceback": traceback.format_exc()})
            print(f"[bench] profile_run FAILED: {err!r}", file=sys.stderr, flush=True)
        seconds["profile_run"] = round(time.perf_counter() - t, 1)
    after = machine_conditions()
    loads = before["load_average_1_5_15"][:1] + after["load_average_1_5_15"][:2]
    conditions = {
        **before,
        "size": args.size,
        "torch_threads": args.threads,
        "load_average_after": after["load_average_1_5_15"],
        "busy": max(loads) > 0.5 * (before["cpu_count"] or 1),
        "note": args.note or "",
        "bench_seconds": seconds,
        "total_seconds": round(time.perf_counter() - start, 1),
    }
    result = {"conditions": conditions, "ratios": entries, "profile": profile, "errors": errors}
    out.write_text(json.dumps(result, indent=2))
    print()
    print(table(entries))
    if profile is not None:
        print()
        print(profile_table(profile))
    busy = " (machine busy: load average above half the cores; ratios are noisier)" if conditions["busy"] else ""
    print(f"\n[bench] {len(entries)} ratios, {len(errors)} errors, {conditions['total_seconds']:.0f} s{busy} -> {out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
