"""The accuracy ladder: FP teacher and W1A1 / W1A2 / W1A4 / multi-step students on `cpu-full`.

The ladder is configuration (`recipes/ladder.yaml`): the profiles every run shares, the tasks, and
named rows (changes laid over the profile's stage). A run is (row, task): the whole `surge-nlp
glue` pipeline with the task's teacher reused, in `<output>/<row>/<task>/`, resumable (an
interrupted run continues from its last trainer checkpoint; a finished one is never redone).

    # teachers first (once per task), then rows; one job at a time on two cores
    SURGE_NLP_GLUE_DATASET=../shared/data/glue python recipes/benchmark_ladder.py run \\
        --output runs/ladder --teachers runs/cpu-full [--row w1a1 ...] [--task stsb ...]
    # the majority-class floor of each task (also written by `run`), beside the teachers
    SURGE_NLP_GLUE_DATASET=../shared/data/glue python recipes/benchmark_ladder.py baseline --teachers runs/cpu-full
    # the table (markdown on stdout) and recipes/results/glue_cpu_full.json
    python recipes/benchmark_ladder.py table --output runs/ladder --teachers runs/cpu-full \\
        --json recipes/results/glue_cpu_full.json
    # ... pairing each ablation with a rerun of its reference at the ablation's own commit where there is one
    python recipes/benchmark_ladder.py table ... --reruns runs/reruns   # <reruns>/<commit>/<row>/<task>
    # the record of the finished runs (no models) into the committed layout, which `table --output` reads alike
    python recipes/benchmark_ladder.py collect --output runs/ladder --into recipes/results/cpu_full/ladder [--row ...] [--task ...]

Metrics are the dev metric x 100 that the binarized-BERT papers report: MRPC F1, STS-B Pearson,
CoLA Matthews correlation, accuracy otherwise. Each student's number is its best dev evaluation (the
pipeline keeps it; `selected` says "best" or "last"); `metrics_last` and the "avg at last eval" column
give the same from each run's last evaluation, without that selection.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import datasets
import yaml

from surge_nlp.glue import HELD_OUT, get_task, majority_class_metrics, resolve_dataset
from surge_nlp.atomic import atomic_write, write_json_atomically
from surge_nlp.pipeline import finetune_teacher, run_glue
from surge_nlp.plots import plot_run, read_log
from surge_nlp.recipe import Recipe, RecipeError, load_recipe, merge

LADDER_KEYS = ("profiles", "tasks", "rows", "ablations")
ABLATION_KEYS = ("row", "against", "off")
ROW_KEYS = ("recipe", "quantization", "training", "stages", "tasks")
STAGE_KEYS = ("name", "quantization", "training", "keep_shifts", "share")
# The number each paper's GLUE table reports per task (METHOD.md section 3).
REPORTED_METRIC = {"mrpc": "f1", "stsb": "pearson", "cola": "matthews_correlation", "qqp": "f1"}
RESULT = "results.json"
WALL = "wall.json"
PROVENANCE = "run.json"
# wall.json is rewritten this often while a run works, so that a killed call still counts its time.
HEARTBEAT_S = 60.0
BASELINE = "majority_class.json"


class LadderError(ValueError):
    """The ladder file holds an invalid value, or a run's inputs are missing."""


def reported_metric(task: str) -> str:
    return REPORTED_METRIC.get(task, "accuracy")


def reported_value(info: dict[str, Any], task: str) -> float:
    """The task's reported dev metric x 100 from anything that records `metrics.validation`: a student
    run's stage, the teacher's metrics, the majority-class floor."""
    return 100 * info["metrics"]["validation"][reported_metric(task)]


def load_ladder(path: str | Path) -> dict[str, Any]:
    """Read and validate the ladder file; every error names the field and what is allowed."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise LadderError(f"cannot read ladder file {path}: {err}") from None
    if not isinstance(data, dict) or set(data) - set(LADDER_KEYS) or "rows" not in data:
        raise LadderError(f"{path}: must be a mapping with `rows` and optional `profiles`, `tasks`")
    data.setdefault("profiles", [])
    data.setdefault("tasks", ["stsb", "mrpc", "rte", "cola", "sst2"])
    rows = data["rows"]
    if not isinstance(rows, dict) or not rows:
        raise LadderError(f"{path}: `rows` must map names to {{recipe, quantization, training, stages, tasks}}")
    for task in data["tasks"]:
        _check_task(path, "tasks", task)
    for name, row in rows.items():
        row = rows[name] = row or {}
        if not isinstance(row, dict) or set(row) - set(ROW_KEYS):
            raise LadderError(f"{path}: row {name!r} must be a mapping with keys among {list(ROW_KEYS)}")
        for task in row.get("tasks", []):
            _check_task(path, f"rows.{name}.tasks", task)
        if not isinstance(row.get("recipe", {}), dict) or "stages" in row.get("recipe", {}):
            raise LadderError(f"{path}: rows.{name}.recipe must be a mapping of recipe fields (stages go in rows.{name}.stages)")
        stages = row.get("stages")
        if stages is not None and (not isinstance(stages, list) or not stages or
                                   not all(isinstance(s, dict) and not set(s) - set(STAGE_KEYS) for s in stages)):
            raise LadderError(f"{path}: rows.{name}.stages must be a non-empty list of mappings with keys among {list(STAGE_KEYS)}")
        for task in row.get("tasks", data["tasks"]):  # builds every recipe once: invalid values fail here
            try:
                row_recipe(data, name, task)
            except RecipeError as err:
                raise LadderError(f"{path}: row {name!r}, task {task}: {err}") from None
    data.setdefault("ablations", [])
    for index, ablation in enumerate(data["ablations"]):
        if not isinstance(ablation, dict) or set(ablation) != set(ABLATION_KEYS):
            raise LadderError(f"{path}: ablations[{index}] must be a mapping with keys {list(ABLATION_KEYS)}")
        for key in ("row", "against"):
            if ablation[key] not in rows:
                raise LadderError(f"{path}: ablations[{index}].{key}={ablation[key]!r} is not a row; rows: {', '.join(rows)}")
    return data


def ablation_rows(ladder: dict[str, Any]) -> set[str]:
    """Rows that belong to the ablation table (its own protocol) rather than the ladder."""
    return {name for ablation in ladder["ablations"] for name in (ablation["row"], ablation["against"])}


def _check_task(path: str | Path, field: str, task: Any) -> None:
    try:
        get_task(task)
    except ValueError as err:
        raise LadderError(f"{path}: {field}: {err}") from None


def row_recipe(ladder: dict[str, Any], row_name: str, task: str, seed: int | None = None) -> Recipe:
    """The recipe of one run: the task's recipe with the ladder's profiles, the row laid over its
    stage; `seed` (a repeat of the row) replaces every stage's training seed."""
    base = load_recipe(task, profiles=ladder["profiles"])
    if len(base.stages) != 1:
        raise LadderError(f"the ladder's rows start from one stage; the profiles give {task} {len(base.stages)}")
    stage = base.stages[0]
    base_stage = {"name": stage.name, "quantization": stage.quantization.to_dict(), "training": stage.training.to_dict()}
    row = ladder["rows"][row_name]
    shared = {key: row[key] for key in ("quantization", "training") if key in row}
    changes = row.get("stages", [{}])
    stages = [merge(merge(base_stage, shared), {k: v for k, v in change.items() if k != "share"}) for change in changes]
    for index, (stage, change) in enumerate(zip(stages, changes)):
        if "share" in change:
            _take_share(stage["training"], change.get("training", {}), change["share"], f"rows.{row_name}.stages[{index}].share", task)
        if seed is not None:
            stage["training"]["seed"] = seed
        if "name" not in change:  # named by its bits, e.g. "w1e1a4"
            q = stage["quantization"]
            stage["name"] = f"w{q.get('weight_bits', 1)}e{q.get('embedding_bits', 32)}a{q.get('activation_bits', 1)}"
    return load_recipe(task, profiles=ladder["profiles"], overrides={**row.get("recipe", {}), "stages": stages})


def _take_share(training: dict[str, Any], stage_training: dict[str, Any], share: Any, field: str, task: str) -> None:
    """Give a stage `share` of the one-step schedule: its step cap where the task has one (SST-2's
    3,750 steps), else its epochs; so a multi-step row trains as long as the one-step row on every task."""
    if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1:
        raise LadderError(f"{field}={share!r} is invalid; allowed: a fraction in (0, 1]")
    own_schedule = sorted(set(stage_training) & {"num_epochs", "max_steps"})
    if own_schedule:
        raise LadderError(f"{field} takes a share of the one-step schedule; the stage also sets "
                          f"{' and '.join(own_schedule)}: set one or the other")
    key = "max_steps" if training.get("max_steps") is not None else "num_epochs"
    scaled = training[key] * share
    if scaled < 1 or abs(scaled - round(scaled)) > 1e-9:
        raise LadderError(f"{field}={share!r} gives {task} {scaled:g} {key.replace('_', ' ')} of {training[key]}; "
                          f"allowed: a share that leaves a whole number >= 1")
    training[key] = round(scaled)


def row_tasks(ladder: dict[str, Any], row_name: str) -> list[str]:
    return list(ladder["rows"][row_name].get("tasks", ladder["tasks"]))


def teacher_dir(teachers: Path, task: str) -> Path:
    return teachers / task / "teacher"


def ensure_teacher(ladder: dict[str, Any], task: str, teachers: Path) -> dict[str, Any]:
    """The task's fine-tuned teacher under `teachers/<task>` (fine-tuned with the profiles if missing)."""
    metrics_path = teacher_dir(teachers, task) / "teacher_metrics.json"
    if not metrics_path.is_file():
        finetune_teacher(load_recipe(task, profiles=ladder["profiles"]), teachers / task, resume=True)
    return json.loads(metrics_path.read_text())


def baseline_path(teachers: Path, task: str) -> Path:
    return teachers / task / BASELINE


def ensure_baseline(task: str, teachers: Path) -> dict[str, Any]:
    """The majority-class floor of the task's dev metrics (`surge_nlp.glue.majority_class_metrics`),
    written beside the teacher once; a student's number means something only above it."""
    path = baseline_path(teachers, task)
    if not path.is_file():
        splits = datasets.load_dataset(resolve_dataset(), task)
        metrics = majority_class_metrics(task, splits["train"]["label"], splits["validation"]["label"])
        write_json_atomically(path, {"task": task, "dataset": resolve_dataset(), "metrics": {"validation": metrics}})
    return json.loads(path.read_text())


def run_dir_of(output: Path, row_name: str, task: str, seed: int | None = None) -> Path:
    """`<output>/<row>/<task>` for the recipe's seed, `<output>/<row>@seed<N>/<task>` for a repeat."""
    return output / (row_name if seed is None else f"{row_name}@seed{seed}") / task


def row_and_seed(folder_name: str) -> tuple[str, int | None]:
    """The inverse of `run_dir_of`'s row folder: `"w1a1@seed7"` -> `("w1a1", 7)`, `"w1a1"` -> `("w1a1", None)`.

    >>> row_and_seed("w1a1@seed7"), row_and_seed("w1a1")
    (('w1a1', 7), ('w1a1', None))
    """
    row, _, seed = folder_name.partition("@seed")
    return row, int(seed) if re.fullmatch(r"-?[0-9]+", seed) else None


def last_eval_value(run_dir: Path, stage: dict[str, Any], task: str) -> float | None:
    """The task's dev metric x 100 at the stage's last step, whichever checkpoint it kept; None when
    nothing recorded says. Read from, in turn: the stage's own metric when it kept the last weights
    (or its best was the last step), its `eval_history` (runs since 398ed7a keep every metric there),
    its log (`stages/<name>/log_history.jsonl` of a run, `log_history_<name>.jsonl` once collected;
    a teacher's record has no stage name and no such log). A stage that selected on held-out training
    rows (`selected_on`) evaluated dev only at its end: None unless it kept its last step.

    A kept best is the maximum of a noisy dev curve and reads high where the curve falls after its
    peak; this is the number without that selection. For a multi-stage run it is the last stage's:
    an earlier stage's kept best still chose where the last one started."""
    if stage.get("selected", "last") == "last" or stage.get("best_step") == stage["steps"]:
        return reported_value(stage, task)
    if stage.get("selected_on") == HELD_OUT:  # its evaluations measured held-out training rows, not dev
        return None
    metric = reported_metric(task)
    # a student's stage has a name and a log under it; a teacher's record (no name) has neither
    name = stage.get("name")
    logs = [run_dir / "stages" / name / "log_history.jsonl", run_dir / f"log_history_{name}.jsonl"] if name else []
    sources = [(stage.get("eval_history") or [], metric)] + [(read_log(log), f"eval/{metric}") for log in logs if log.is_file()]
    for records, key in sources:
        evals = [record for record in records if key in record]
        if evals and evals[-1]["step"] == stage["steps"]:
            return 100 * evals[-1][key]
    return None


def seeds_run(output: Path, row_name: str, task: str) -> list[tuple[int | None, Path]]:
    """The finished runs of (row, task): the recipe's seed first, then the repeats by seed."""
    repeats = sorted((seed, path / task) for path in output.glob(f"{row_name}@seed*")
                     for row, seed in [row_and_seed(path.name)] if row == row_name and seed is not None)
    return [(seed, path) for seed, path in [(None, output / row_name / task), *repeats] if (path / RESULT).is_file()]


def checkout_commit() -> str | None:
    """The commit of the checkout this script runs from (the experiment worktree), if it is one."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class WallClock:
    """The wall time of every call that worked on a run, in `wall.json` (seconds, one entry per call).

    The current call's entry is rewritten every `HEARTBEAT_S` seconds and at the end, so a call that is
    killed midway still counts up to its last beat; work redone after such a stop is counted again,
    as it was spent. Time while the process was stopped (SIGSTOP) counts too."""

    def __init__(self, path: Path, heartbeat_s: float | None = None):
        self.path, self.heartbeat_s = path, HEARTBEAT_S if heartbeat_s is None else heartbeat_s
        self.before = json.loads(path.read_text()) if path.is_file() else []
        self.started = time.perf_counter()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._run, name="ladder-wall-clock", daemon=True)

    def write(self) -> None:
        write_json_atomically(self.path, self.before + [time.perf_counter() - self.started])

    def _run(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            self.write()

    def __enter__(self) -> "WallClock":
        self.write()
        self._beat.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._beat.join()
        self.write()


def provenance(row_name: str, task: str, output: Path, teachers: Path, seed: int | None) -> dict[str, Any]:
    """What produced a run: the command (paths as given, from the directory it ran in), that directory, the commit."""
    return {"row": row_name, "task": task, "seed": seed, "command": command(row_name, task, output, teachers, seed),
            "cwd": os.getcwd(), "commit": checkout_commit()}


def run_one(ladder: dict[str, Any], row_name: str, task: str, output: Path, teachers: Path, seed: int | None = None) -> dict[str, Any]:
    """One (row, task[, seed]) run, resumed where it stopped; its results.json once finished.

    Beside it: `wall.json` (`WallClock`) and `run.json`, the command and commit of each call that worked on it."""
    run_dir = run_dir_of(output, row_name, task, seed)
    if (run_dir / RESULT).is_file():
        return json.loads((run_dir / RESULT).read_text())
    ensure_teacher(ladder, task, teachers)
    ensure_baseline(task, teachers)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomically(run_dir / PROVENANCE, {"calls": provenance_calls(run_dir) + [provenance(row_name, task, output, teachers, seed)]})
    with WallClock(run_dir / WALL):
        run_glue(row_recipe(ladder, row_name, task, seed), run_dir, teacher_path=str(teacher_dir(teachers, task)), resume=True)
    return json.loads((run_dir / RESULT).read_text())


def collect(output: Path, into: Path, rows: list[str] | None = None, tasks: list[str] | None = None) -> list[Path]:
    """Copy the record of every finished run under `output` (`<row>[@seed<N>]/<task>` with a results.json)
    into the same place under `into`: results.json, wall.json, run.json, each stage's log as
    `log_history_<stage>.jsonl` and the plots drawn from them. Models and checkpoints stay behind.
    `rows`/`tasks` restrict it; each file is written atomically. Returns the run folders written.

    >>> collect(Path("runs/ladder"), Path("recipes/results/cpu_full/ladder"), rows=["w1a4"])  # doctest: +SKIP
    """
    written = []
    for run_dir in sorted(output.glob(f"*/*/{RESULT}")):
        run_dir = run_dir.parent
        row, task = row_and_seed(run_dir.parent.name)[0], run_dir.name
        if (rows and row not in rows) or (tasks and task not in tasks):
            continue
        dest = into / run_dir.relative_to(output)
        copies = {run_dir / name: dest / name for name in (RESULT, WALL, PROVENANCE) if (run_dir / name).is_file()}
        logs = sorted(run_dir.glob("stages/*/log_history.jsonl"))
        for log in logs:
            copies[log] = dest / f"log_history_{log.parent.name}.jsonl"
        if logs:  # plot_run refuses a run without logs
            for plot in plot_run(run_dir):
                copies[plot] = dest / "plots" / plot.name
        for source, target in copies.items():
            with atomic_write(target) as temporary:
                shutil.copyfile(source, temporary)
        written.append(dest)
    return written


def command(row_name: str, task: str, output: Path, teachers: Path, seed: int | None = None) -> str:
    return (f"SURGE_NLP_GLUE_DATASET=../shared/data/glue python recipes/benchmark_ladder.py run "
            f"--row {row_name} --task {task} --output {shlex.quote(str(output))} --teachers {shlex.quote(str(teachers))}"
            + (f" --seed {seed}" if seed is not None else ""))


def provenance_calls(run_dir: Path) -> list[dict[str, Any]]:
    """The calls that worked on a run, from its `run.json` (none for runs made before it was written)."""
    path = run_dir / PROVENANCE
    return json.loads(path.read_text())["calls"] if path.is_file() else []


def recorded_command(calls: list[dict[str, Any]], fallback: str) -> str:
    """The command that produced a run, from its `provenance_calls` (the last one's); `fallback` for a run without any."""
    return calls[-1]["command"] if calls else fallback


def run_commit(calls: list[dict[str, Any]]) -> str | None:
    """The commit a run was trained at: the one its `provenance_calls` share; None when unknown or mixed."""
    commits = {call.get("commit") for call in calls}
    return commits.pop() if len(commits) == 1 else None


def reruns_of(reruns: Path | None, row_name: str, task: str) -> list[dict[str, Any]]:
    """Repeats of (row, task) kept as references at other commits, `<reruns>/<commit>/<row>[@seed<N>]/<task>`:
    seed, the commit their `run.json` records (never the folder's name) and the dev metric x 100."""
    found = []
    for commit_dir in sorted(p for p in reruns.iterdir() if p.is_dir()) if reruns and reruns.is_dir() else []:
        for seed, run_dir in seeds_run(commit_dir, row_name, task):
            result = json.loads((run_dir / RESULT).read_text())
            found.append({"seed": seed if seed is not None else result["stages"][-1].get("seed"),
                          "commit": run_commit(provenance_calls(run_dir)), "path": str(run_dir),
                          "value": reported_value(result["stages"][-1], task)})
    return found


def table(ladder: dict[str, Any], output: Path, teachers: Path, reruns: Path | None = None) -> dict[str, Any]:
    """The ladder's rows from the finished runs (teacher first): metrics x 100, averages, walls.

    Each row also names the commit of each seed's run (`commit_by_seed`) and lists its `reruns` (see
    `reruns_of`): they are not averaged into the row; `ablation_table` pairs a run with them by commit."""
    teacher: dict[str, float] = {}
    teacher_walls: dict[str, float] = {}
    teacher_last: dict[str, float | None] = {}
    baseline: dict[str, float] = {}
    for task in ladder["tasks"]:
        path = teacher_dir(teachers, task) / "teacher_metrics.json"
        if path.is_file():
            info = json.loads(path.read_text())
            teacher[task] = reported_value(info, task)
            teacher_last[task] = last_eval_value(path.parent, info, task)
            teacher_walls[task] = info.get("wall_time_s")
        path = baseline_path(teachers, task)
        if path.is_file():
            baseline[task] = reported_value(json.loads(path.read_text()), task)
    rows = []
    for name in ladder["rows"]:  # the ladder's rows and the ablation rows alike; split by `markdown`
        metrics, per_seed, walls, selected, schedule, commands, commits, bits, multistep = {}, {}, {}, {}, {}, {}, {}, None, False
        metrics_last, last_by_seed = {}, {}
        recipe, commit_by_seed = None, {}
        for task in row_tasks(ladder, name):
            runs = seeds_run(output, name, task)
            if not runs:
                continue
            recipe = row_recipe(ladder, name, task)
            per_seed[task], walls[task], selected[task], commands[task], commit_by_seed[task] = {}, 0.0, [], [], {}
            last_by_seed[task] = {}
            for seed, run_dir in runs:
                result = json.loads((run_dir / RESULT).read_text())
                last = result["stages"][-1]
                seed_value = seed if seed is not None else recipe.stages[-1].training.seed
                per_seed[task][seed_value] = reported_value(last, task)
                last_by_seed[task][seed_value] = last_eval_value(run_dir, last, task)
                wall_path = run_dir / WALL
                walls[task] += sum(json.loads(wall_path.read_text())) if wall_path.is_file() else 0.0
                selected[task] += [f"seed {seed_value}, {s['name']}: {s.get('selected', 'last')}"
                                   f"{' on held-out train' if s.get('selected_on') == HELD_OUT else ''}"
                                   f" (step {s.get('best_step') or s['steps']} of {s['steps']})" for s in result["stages"]]
                schedule[task] = [f"{s['name']}: {s['steps']} steps" for s in result["stages"]]
                calls = provenance_calls(run_dir)
                commands[task].append(recorded_command(calls, command(name, task, output, teachers, seed)))
                commits[task] = sorted(set(commits.get(task, [])) | {call["commit"] for call in calls if call["commit"]})
                commit_by_seed[task][seed_value] = run_commit(calls)
                bits, multistep = last["bits"], len(result["stages"]) > 1
            metrics[task] = sum(per_seed[task].values()) / len(per_seed[task])  # the mean over the seeds run
            # None where a seed's run has no last evaluation on record (the mean would be another seeds' mean)
            values = list(last_by_seed[task].values())
            metrics_last[task] = None if None in values else sum(values) / len(values)
        if not metrics:
            continue
        rows.append({
            "name": name, "bits": bits, "activation_bits": recipe.stages[-1].quantization.activation_bits,
            "multistep": multistep, "stages": [s.name for s in recipe.stages],
            "quantization": recipe.stages[-1].quantization.to_dict(), "metrics": metrics, "metrics_by_seed": per_seed,
            "metrics_last": metrics_last,
            "wall_s": walls, "selected": selected, "schedule": schedule,
            "seed": sorted({seed for values in per_seed.values() for seed in values}),
            "command": {task: " ; ".join(lines) for task, lines in commands.items()},
            "commit": commits, "commit_by_seed": commit_by_seed,
            "reruns": {task: found for task in metrics if (found := reruns_of(reruns, name, task))},
        })
    return {"protocol": "cpu-full", "profiles": ladder["profiles"], "metric": {t: reported_metric(t) for t in ladder["tasks"]},
            "teacher": teacher, "teacher_last": teacher_last, "teacher_wall_s": teacher_walls, "majority_class": baseline, "rows": rows}


def _average(values: dict[str, float], tasks: list[str]) -> float | None:
    return sum(values[t] for t in tasks) / len(tasks) if tasks and all(t in values for t in tasks) else None


def ablation_table(ladder: dict[str, Any], result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each ablation against its reference row, per task: both means over the seeds they share, and
    the difference (ablation minus reference) paired by seed, its mean and each seed's.

    Runs differ by about a point between commits, so a run is paired with the reference's run of the
    same seed at the same commit where there is one (the row's own or one of its `reruns`), and with
    the row's own run of that seed otherwise; `commits_by_seed` says which (ablation, reference)."""
    by_name = {row["name"]: row for row in result["rows"]}
    table_rows = []
    for ablation in ladder["ablations"]:
        row, against = by_name.get(ablation["row"]), by_name.get(ablation["against"])
        mine = _own_runs(row) if row else {}
        theirs = _reference_runs(against) if against else {}
        metrics, reference, delta, paired, commits = {}, {}, {}, {}, {}
        for task, runs in mine.items():
            pairs = {}
            for seed, (value, commit) in runs.items():
                candidates = theirs.get(task, {}).get(seed, [])
                same = [c for c in candidates if commit is not None and c[1] == commit]
                if same or candidates:
                    pairs[seed] = (value, commit, *(same or candidates)[0])
            if not pairs:
                continue
            paired[task] = {seed: value - ref for seed, (value, _, ref, _) in pairs.items()}
            commits[task] = {seed: [commit, ref_commit] for seed, (_, commit, _, ref_commit) in pairs.items()}
            metrics[task] = sum(p[0] for p in pairs.values()) / len(pairs)
            reference[task] = sum(p[2] for p in pairs.values()) / len(pairs)
            delta[task] = sum(paired[task].values()) / len(pairs)
        table_rows.append({**ablation, "metrics": metrics, "reference": reference, "delta": delta,
                           "delta_by_seed": paired, "commits_by_seed": commits, "wall_s": row["wall_s"] if row else {}})
    return table_rows


def _own_runs(row: dict[str, Any]) -> dict[str, dict[Any, tuple[float, str | None]]]:
    """{task: {seed: (value, commit)}} of a row's own runs. Rows from `table` carry metrics_by_seed and
    commit_by_seed; a row without them has one (unnamed) seed at an unknown commit."""
    by_seed = row.get("metrics_by_seed") or {task: {None: value} for task, value in row["metrics"].items()}
    commits = row.get("commit_by_seed", {})
    return {task: {seed: (value, commits.get(task, {}).get(seed)) for seed, value in values.items()}
            for task, values in by_seed.items()}


def _reference_runs(row: dict[str, Any]) -> dict[str, dict[Any, list[tuple[float, str | None]]]]:
    """{task: {seed: [(value, commit), ...]}}: a reference row's own run of each seed first, then its reruns."""
    runs = {task: {seed: [run] for seed, run in values.items()} for task, values in _own_runs(row).items()}
    for task, found in row.get("reruns", {}).items():
        for rerun in found:
            runs.setdefault(task, {}).setdefault(rerun["seed"], []).append((rerun["value"], rerun["commit"]))
    return runs


def ablation_markdown(ablations: list[dict[str, Any]], tasks: list[str], metric: dict[str, str]) -> str:
    head = ("| switched off | against | " + " | ".join(f"{t} ({metric[t]}): off / on (delta)" for t in tasks)
            + " | commits (off / on) |")
    lines = [head, "|" + "---|" * (len(tasks) + 3)]
    for a in ablations:
        cells = []
        for t in tasks:
            if t in a["delta"]:
                seeds = len(a.get("delta_by_seed", {}).get(t, {None: 0}))
                per_seed = f", {seeds} seeds: " + " ".join(f"{d:+.1f}" for d in a["delta_by_seed"][t].values()) if seeds > 1 else ""
                cells.append(f"{a['metrics'][t]:.1f} / {a['reference'][t]:.1f} ({a['delta'][t]:+.1f}{per_seed})")
            else:
                cells.append("")
        lines.append(f"| {a['off']} | {a['against']} | " + " | ".join(cells) + f" | {_commit_pairs(a)} |")
    return "\n".join(lines)


def _commit_pairs(ablation: dict[str, Any]) -> str:
    # "?" for a run made before run.json recorded its commit
    pairs = {tuple(pair) for by_seed in ablation.get("commits_by_seed", {}).values() for pair in by_seed.values()}
    return ", ".join(f"{mine or '?'} / {theirs or '?'}" for mine, theirs in sorted(pairs, key=lambda p: (p[0] or "", p[1] or "")))


def markdown(result: dict[str, Any], tasks: list[str]) -> str:
    # "at last eval": the same average from each run's last evaluation, free of the best-epoch selection
    head = ("| row | W-E-A | " + " | ".join(f"{t} ({result['metric'][t]})" for t in tasks)
            + " | avg | % of teacher | avg at last eval (% of teacher) | wall (min) |")
    lines = [head, "|" + "---|" * (len(tasks) + 6)]
    teacher = result["teacher"]
    walls = [w for w in result["teacher_wall_s"].values() if w]
    lines.append("| FP teacher | 32-32-32 | " + " | ".join(f"{teacher[t]:.1f}" if t in teacher else "" for t in tasks)
                 + f" | {_avg_cell(teacher, tasks)} | 100% | {_last_cell(result.get('teacher_last', {}), tasks, teacher)} | {sum(walls) / 60:.0f} |")
    baseline = result.get("majority_class") or {}
    if baseline:  # the floor: a model that predicts the most frequent training label for everything
        b_avg = _average(baseline, tasks)
        lines.append("| majority class | - | " + " | ".join(f"{baseline[t]:.1f}" if t in baseline else "" for t in tasks)
                     + f" | {f'{b_avg:.1f}' if b_avg is not None else ''} |  |  |  |")
    for row in result["rows"]:
        m = row["metrics"]
        done = [t for t in tasks if t in m]
        partial = _average(m, done)
        teacher_avg = _average(teacher, done)
        pct = f"{100 * partial / teacher_avg:.0f}%" if teacher_avg else ""
        wall = sum(w for w in row["wall_s"].values() if w) / 60
        cells = " | ".join(f"{m[t]:.1f}" if t in m else "" for t in tasks)
        last_cell = _last_cell(row.get("metrics_last", {}), tasks, teacher)
        lines.append(f"| {row['name']} | {row['bits']} | {cells} | {_avg_cell(m, tasks)} | {pct} | {last_cell} | {wall:.0f} |")
    return "\n".join(lines)


def _avg_cell(values: dict[str, float], tasks: list[str]) -> str:
    """An average cell: over all `tasks`, "(x over n)" over the n of them done so far, "" over none."""
    done = [t for t in tasks if t in values]
    if not done:
        return ""
    value = _average(values, done)
    return f"{value:.1f}" if len(done) == len(tasks) else f"({value:.1f} over {len(done)})"


def _last_cell(last: dict[str, float | None], tasks: list[str], teacher: dict[str, float]) -> str:
    """The "avg at last eval (% of teacher)" cell over `tasks`; "n/a" when a run has no last evaluation on record."""
    done = [t for t in tasks if t in last]
    if any(last[t] is None for t in done):
        return "n/a"
    teacher_avg = _average(teacher, done)
    return _avg_cell(last, tasks) + (f" ({100 * _average(last, done) / teacher_avg:.0f}%)" if done and teacher_avg else "")


def plot_table(result: dict[str, Any], tasks: list[str], path: Path) -> Path:
    """The ladder as grouped bars: one group per task, one bar per row (the FP teacher and the majority class first)."""
    from surge_nlp.plots import bar_chart

    series = {"FP teacher": [result["teacher"].get(t) for t in tasks]}
    if result.get("majority_class"):
        series["majority class"] = [result["majority_class"].get(t) for t in tasks]
    series.update({row["name"]: [row["metrics"].get(t) for t in tasks] for row in result["rows"]})
    labels = [f"{t}\n({result['metric'][t]})" for t in tasks]
    return bar_chart(labels, series, path, ylabel="dev metric (x100)", title="cpu-full ladder: MiniLM teacher and binary students")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["run", "table", "baseline", "collect"])
    parser.add_argument("--ladder", default=str(Path(__file__).with_name("ladder.yaml")))
    parser.add_argument("--output", default="runs/ladder")
    parser.add_argument("--teachers", default="runs/cpu-full")
    parser.add_argument("--row", action="append", help="rows to run (default: all, in the file's order)")
    parser.add_argument("--task", action="append", help="tasks to run (default: each row's)")
    parser.add_argument("--seed", type=int, help="run: a repeat of the rows with this training seed (<row>@seed<N>/) "
                                                 "(table averages every seed it finds)")
    parser.add_argument("--reruns", help="table: repeats of rows at other commits, <RERUNS>/<commit>/<row>/<task>; an "
                                         "ablation is compared with its reference at its own commit where there is one")
    parser.add_argument("--into", help="collect: where the record of each finished run goes (the same <row>/<task> layout)")
    parser.add_argument("--json", help="table: also write the JSON here")
    parser.add_argument("--plot", help="table: also draw it as a bar chart (PNG) at this path")
    args = parser.parse_args(argv)
    try:
        ladder = load_ladder(args.ladder)
        output, teachers = Path(args.output), Path(args.teachers)
        # A filter an action does not apply would be ignored silently: refuse it.
        unused = [flag for flag, value, applies in (("--row", args.row, ("run", "collect")),
                                                    ("--task", args.task, ("run", "collect", "baseline")),
                                                    ("--seed", args.seed, ("run",))) if value is not None and args.action not in applies]
        if unused:
            raise LadderError(f"{' and '.join(unused)} do(es) not apply to {args.action} (table reads every row, task and "
                              "seed; --row: run, collect; --task: run, collect, baseline; --seed: run)")
        for name in args.row or []:
            if name not in ladder["rows"]:
                raise LadderError(f"--row {name!r} is not in {args.ladder}; rows: {', '.join(ladder['rows'])}")
        if args.action == "run":
            for name in args.row or list(ladder["rows"]):
                for task in row_tasks(ladder, name):
                    if args.task and task not in args.task:
                        continue
                    result = run_one(ladder, name, task, output, teachers, args.seed)
                    print(f"{name} {task}: {reported_metric(task)}={reported_value(result['stages'][-1], task):.2f}", flush=True)
        elif args.action == "collect":
            if not args.into:
                raise LadderError("collect needs --into, the folder the runs' records go to (e.g. recipes/results/cpu_full/ladder)")
            for dest in collect(output, Path(args.into), args.row, args.task):
                print(f"collected {dest}")
        elif args.action == "baseline":
            for task in args.task or ladder["tasks"]:
                print(f"majority class {task}: {reported_metric(task)}={reported_value(ensure_baseline(task, teachers), task):.2f}")
        else:
            result = table(ladder, output, teachers, Path(args.reruns) if args.reruns else None)
            in_ablations = ablation_rows(ladder)
            ladder_result = {**result, "rows": [row for row in result["rows"] if row["name"] not in in_ablations]}
            print(markdown(ladder_result, ladder["tasks"]))
            if ladder["ablations"]:
                ablations = ablation_table(ladder, result)
                tasks = sorted({t for a in ladder["ablations"] for t in row_tasks(ladder, a["row"])}, key=ladder["tasks"].index)
                print("\nAblations (each against the row it switches one ingredient off in):\n")
                print(ablation_markdown(ablations, tasks, result["metric"]))
                result = {**ladder_result, "ablations": ablations,
                          "ablation_rows": [row for row in result["rows"] if row["name"] in in_ablations]}
            else:
                result = ladder_result
            if args.json:
                write_json_atomically(Path(args.json), result)
            if args.plot:
                print(f"\nbar chart: {plot_table(result, ladder['tasks'], Path(args.plot))}")
    except (LadderError, RecipeError) as err:
        sys.exit(f"benchmark_ladder: error: {err}")


if __name__ == "__main__":
    main()
