"""Turn the `results.json` files of `surge-nlp glue` runs into the results table (markdown + JSON).

    python recipes/glue_table.py runs/cpu          # reads runs/cpu/<task>/results.json

Per task: the task's GLUE metrics (x100) for the FP teacher and the final student, the task's main
metric (the mean of the two for MRPC and STS-B, as the GLUE leaderboard), the run's wall time
(from wall_times.txt when present) and seed. The averages are over the main metrics.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from surge_nlp.atomic import write_json_atomically
from surge_nlp.glue import get_task


def _fmt(metrics: dict[str, float], names: tuple[str, ...]) -> str:
    return "/".join(f"{100 * metrics[name]:.1f}" for name in names)


def main(root: str) -> None:
    root_path = Path(root)
    walls = {}
    if (root_path / "wall_times.txt").is_file():
        for line in (root_path / "wall_times.txt").read_text().splitlines():
            task, _, seconds, _ = line.split()
            walls[task] = int(seconds)
    rows, teacher_main, student_main = [], [], []
    for path in sorted(root_path.glob("*/results.json")):
        result = json.loads(path.read_text())
        task = get_task(result["task"])
        teacher = result["teacher"]["metrics"]["validation"]
        student = result["stages"][-1]["metrics"]["validation"]
        teacher_main.append(100 * teacher[task.main_metric])
        student_main.append(100 * student[task.main_metric])
        rows.append({
            "task": task.name, "metrics": "/".join(task.metrics), "teacher": _fmt(teacher, task.metrics),
            "student": _fmt(student, task.metrics), "teacher_main": teacher_main[-1], "student_main": student_main[-1],
            "bits": result["stages"][-1]["bits"], "estimator": result["stages"][-1]["estimator"],
            "seed": result["stages"][-1]["seed"], "wall_s": walls.get(task.name),
            "student_steps": result["stages"][-1]["steps"], "teacher_steps": result["teacher"].get("steps"),
        })
    if not rows:
        sys.exit(f"no */results.json under {root}")
    students = sorted({f"{row['bits']} {row['estimator']}" for row in rows})  # W-E-A and estimator of each run
    print(f"| task | metric | FP teacher | student ({', '.join(students)}) | student/teacher | W-E-A | seed | wall (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['metrics']} | {row['teacher']} | {row['student']} | "
              f"{100 * row['student_main'] / row['teacher_main']:.0f}% | {row['bits']} | {row['seed']} | {row['wall_s']} |")
    t_avg, s_avg = sum(teacher_main) / len(rows), sum(student_main) / len(rows)
    print(f"| **average** (main metric) | | {t_avg:.1f} | {s_avg:.1f} | {100 * s_avg / t_avg:.1f}% | | | |")
    summary = {"rows": rows, "teacher_avg": t_avg, "student_avg": s_avg, "student_over_teacher": s_avg / t_avg}
    write_json_atomically(root_path / "table.json", summary)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/cpu")
