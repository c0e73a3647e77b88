"""Per-task training cost: Dynamic ConPET's stays flat while Limitless grows with the number of tasks.

One run of each on the packaged MiniLM (FewRel, capped). Reported as ratios of the last task's training time and
steps to task 2's, measured within each run, so the machine's speed cancels out. Targets: Dynamic ConPET's ratio
stays near 1 (a fixed budget per task), Limitless's grows with the history (about tasks/2 in steps).
"""

from __future__ import annotations

from typing import Any

from bench.common import run_experiment, write_result

TASKS = 6
COMMON = (
    f"data.num_tasks={TASKS}",
    "data.max_train_per_class=16",
    "data.max_valid_per_class=4",
    "data.max_test_per_class=4",
    "train.epochs=1",
    "callbacks.replay.batch_limit=20",
)
#: Dynamic ConPET's last-task/task-2 training-time ratio must stay below this.
DYNAMIC_MAX_RATIO = 1.3
#: Limitless's last-task/task-2 step ratio must reach at least this (its epochs cover the growing history).
LIMITLESS_MIN_STEP_RATIO = 2.0


def ratios(metrics: dict[str, Any]) -> dict[str, Any]:
    """Training seconds and steps per task, and last/second-task ratios."""
    per_task = metrics["per_task"]
    seconds = [t["train_seconds"] for t in per_task]
    steps = [t["train_steps"] for t in per_task]
    return {
        "train_seconds": seconds,
        "train_steps": steps,
        "seconds_ratio_last_vs_task2": round(seconds[-1] / seconds[1], 3),
        "steps_ratio_last_vs_task2": round(steps[-1] / steps[1], 3),
    }


def main() -> dict[str, Any]:
    """Run both experiments and write bench/results/task_cost.json."""
    dynamic = ratios(run_experiment("dynamic_conpet", *COMMON))
    limitless = ratios(run_experiment("limitless", *COMMON))
    result = {
        "tasks": TASKS,
        "dynamic_conpet": dynamic,
        "limitless": limitless,
        "targets": {
            "dynamic_seconds_ratio_max": DYNAMIC_MAX_RATIO,
            "limitless_steps_ratio_min": LIMITLESS_MIN_STEP_RATIO,
        },
        "pass": dynamic["seconds_ratio_last_vs_task2"] <= DYNAMIC_MAX_RATIO
        and dynamic["steps_ratio_last_vs_task2"] == 1.0
        and limitless["steps_ratio_last_vs_task2"] >= LIMITLESS_MIN_STEP_RATIO,
    }
    write_result("task_cost", result)
    return result


if __name__ == "__main__":
    print(main())
