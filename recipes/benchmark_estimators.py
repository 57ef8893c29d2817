"""Does SURGE win? Distil W1A1 students once per gradient surrogate, same teacher, data and budget.

The benchmark is configuration (`recipes/estimators.yaml`): the recipe profiles and overrides every
run shares, named variants (SurgeConfig fields laid over the recipe's stage), and suites (variants x
tasks x seeds). A run is (task, variant, seed); its result lands in
`<output>/<task>/<variant>/seed<k>/result.json` and is never redone, so an interrupted benchmark
continues where it stopped and suites share their common runs.

    # the runs (one after another; `--teachers runs/cpu` reuses the teachers of `surge-nlp glue --profile cpu`)
    SURGE_NLP_GLUE_DATASET=../shared/data/glue python recipes/benchmark_estimators.py run \\
        --suite estimators --suite eta --suite rank --output runs/estimators [--teachers runs/cpu]
    # the tables (markdown on stdout, JSON beside it), optionally with the training-step benchmark's ratios
    python recipes/benchmark_estimators.py table --output runs/estimators \\
        --step-benchmark recipes/results/training_step_cpu.json --json recipes/results/estimators_cpu.json

Per suite the table gives each variant's dev metric per task (task main metric x 100, mean +- sample
std over the seeds, n), the average over tasks, the measured seconds per optimizer step relative to
clipped STE (timed inside the runs, same tasks and seeds), and, from the training-step benchmark,
step time and peak memory relative to clipped STE at batch 32, sequence 128. Runs whose variant has
a DPGC branch also report lambda and the cosine between the binary and auxiliary input gradients.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

import numpy as np
import torch

from surge_nlp.config import SurgeConfig
from surge_nlp.distill import hidden_states_loss, logits_loss, train
from surge_nlp.distill.setup import model_inputs
from surge_nlp.glue import compute_metrics, get_task, make_dataloader
from surge_nlp.atomic import write_json_atomically
from surge_nlp.pipeline import build_student, finetune_teacher, load_data, validation_metrics
from surge_nlp.recipe import Recipe, Stage, load_recipe

BENCHMARK_KEYS = ("profiles", "overrides", "protocols", "variants", "suites")
SUITE_KEYS = ("variants", "tasks", "seeds", "task_seeds", "protocol")
PROTOCOL_KEYS = ("profiles", "overrides")
BASELINE = "clipped_ste"


class BenchmarkError(ValueError):
    """The benchmark file holds an invalid value, or a run's inputs are missing."""


def load_benchmark(path: str | Path) -> dict[str, Any]:
    """Read and validate the benchmark file; every error names the field and what is allowed."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise BenchmarkError(f"cannot read benchmark file {path}: {err}") from None
    if not isinstance(data, dict) or set(data) - set(BENCHMARK_KEYS):
        raise BenchmarkError(f"{path}: must be a mapping with keys {list(BENCHMARK_KEYS)}")
    data.setdefault("profiles", [])
    data.setdefault("overrides", {})
    protocols = data.setdefault("protocols", {})
    if not isinstance(protocols, dict) or not all(isinstance(p, dict) and not set(p) - set(PROTOCOL_KEYS)
                                                  for p in protocols.values()):
        raise BenchmarkError(f"{path}: `protocols` must map names to {{profiles, overrides}}")
    variants = data.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise BenchmarkError(f"{path}: `variants` must map names to SurgeConfig fields")
    for name, fields_ in variants.items():
        try:
            SurgeConfig(**(fields_ or {}))
        except (TypeError, ValueError) as err:
            raise BenchmarkError(f"{path}: variant {name!r}: {err}") from None
    suites = data.get("suites")
    if not isinstance(suites, dict) or not suites:
        raise BenchmarkError(f"{path}: `suites` must map names to {{variants, tasks, seeds}}")
    for name, suite in suites.items():
        if not isinstance(suite, dict) or set(suite) - set(SUITE_KEYS) or not {"variants", "tasks", "seeds"} <= set(suite):
            raise BenchmarkError(f"{path}: suite {name!r} needs `variants`, `tasks`, `seeds` (optional `task_seeds`)")
        if suite.get("protocol") is not None and suite["protocol"] not in protocols:
            raise BenchmarkError(f"{path}: suite {name!r} uses undefined protocol {suite['protocol']!r}; defined: {list(protocols)}")
        unknown = [v for v in suite["variants"] if v not in variants]
        if unknown:
            raise BenchmarkError(f"{path}: suite {name!r} uses undefined variant(s) {unknown}; defined: {list(variants)}")
        for task in suite["tasks"]:
            get_task(task)
        seeds = [suite["seeds"], *(suite.get("task_seeds") or {}).values()]
        if not all(isinstance(s, list) and s and all(isinstance(x, int) and x >= 0 for x in s) for s in seeds):
            raise BenchmarkError(f"{path}: suite {name!r}: seeds must be non-empty lists of integers >= 0")
    return data


def suite_runs(suite: dict[str, Any]) -> list[tuple[str, str, int]]:
    """(task, variant, seed) in execution order: seed by seed, so a stopped benchmark has whole seeds."""
    task_seeds = suite.get("task_seeds") or {}
    seeds = sorted({seed for task in suite["tasks"] for seed in task_seeds.get(task, suite["seeds"])})
    return [(task, variant, seed) for seed in seeds for task in suite["tasks"]
            if seed in task_seeds.get(task, suite["seeds"]) for variant in suite["variants"]]


def protocol_settings(bench: dict[str, Any], protocol: str | None) -> tuple[list[str], dict[str, Any]]:
    """(profiles, overrides) of a protocol; None is the file's top-level ones."""
    if protocol is None:
        return bench["profiles"], bench["overrides"]
    settings = bench["protocols"][protocol]
    return settings.get("profiles", []), settings.get("overrides", {})


def run_root(output: Path, protocol: str | None) -> Path:
    """Where a protocol's runs live: `<output>` for the top-level protocol, else `<output>/<protocol>`."""
    return output if protocol is None else output / protocol


def run_dir(output: Path, protocol: str | None, task: str, variant: str, seed: int) -> Path:
    return run_root(output, protocol) / task / variant / f"seed{seed}"


def student_recipe(bench: dict[str, Any], task: str, protocol: str | None = None) -> Recipe:
    profiles, overrides = protocol_settings(bench, protocol)
    return load_recipe(task, profiles=profiles, overrides=overrides)


class TaskContext:
    """A task's teacher, tokenizer, data and teacher metrics, loaded once for all its runs."""

    def __init__(self, bench: dict[str, Any], task: str, output: Path, teachers: Path | None,
                 protocol: str | None = None) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.protocol = protocol
        self.recipe = student_recipe(bench, task, protocol)
        profiles, _ = protocol_settings(bench, protocol)
        if teachers is not None:
            self.teacher_dir = teachers / task / "teacher"
            if not (self.teacher_dir / "config.json").is_file():
                raise BenchmarkError(f"no fine-tuned teacher at {self.teacher_dir}; run `surge-nlp glue {task} "
                                     f"--output {teachers / task}` first, or leave out --teachers")
        else:  # fine-tune it with the profiles (not the benchmark's student-budget overrides)
            teacher_recipe = load_recipe(task, profiles=profiles)
            finetune_teacher(teacher_recipe, output / "teachers" / task, resume=True)
            self.teacher_dir = output / "teachers" / task / "teacher"
        self.teacher = AutoModelForSequenceClassification.from_pretrained(self.teacher_dir).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(self.teacher_dir)
        self.data = load_data(self.recipe, self.tokenizer)
        metrics_path = run_root(output, protocol) / task / "teacher.json"
        if not metrics_path.is_file():  # on the benchmark's dev slice, once
            metrics_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomically(metrics_path, {"teacher_dir": str(self.teacher_dir),
                                       "metrics": validation_metrics(self.recipe, self.teacher, self.data, self.tokenizer)})
        self.teacher_metrics = json.loads(metrics_path.read_text())["metrics"]


@torch.no_grad()
def dev_evaluation(student: torch.nn.Module, context: "TaskContext", temperature: float) -> dict[str, Any]:
    """One pass over the dev slice with student and teacher: the GLUE metrics, the distillation
    losses (the training objective's logits and hidden-state terms, held out) and the teacher
    agreement (same argmax; Pearson of the scores x 100 for regression). Dev accuracy of a student
    stuck on the majority class says nothing about its gradients; the held-out losses still do."""
    task = get_task(context.recipe.task)
    split = context.data.validation["validation"]
    loader = make_dataloader(split, context.tokenizer, batch_size=64, shuffle=False)
    was_training = student.training
    student.eval()
    totals = {"logits": 0.0, "hidden": 0.0}
    student_logits, teacher_logits = [], []
    for batch in loader:
        inputs = model_inputs(batch)
        s_out = student(**inputs, output_hidden_states=True)
        t_out = context.teacher(**inputs, output_hidden_states=True)
        count = inputs["input_ids"].shape[0]
        totals["logits"] += count * float(logits_loss(s_out.logits, t_out.logits, temperature))
        totals["hidden"] += count * float(hidden_states_loss(s_out.hidden_states, t_out.hidden_states, inputs.get("attention_mask")))
        student_logits.append(s_out.logits.float())
        teacher_logits.append(t_out.logits.float())
    student.train(was_training)
    s_logits, t_logits = torch.cat(student_logits).numpy(), torch.cat(teacher_logits).numpy()
    if task.is_regression:
        predictions = s_logits[:, 0]
        agreement = 100 * float(np.corrcoef(predictions, t_logits[:, 0])[0, 1]) if predictions.std() > 0 else 0.0
    else:
        predictions = s_logits.argmax(-1)
        agreement = 100 * float((predictions == t_logits.argmax(-1)).mean())
    return {"metrics": compute_metrics(task, predictions, np.asarray(split["labels"])),
            "dev_loss": {name: value / len(split) for name, value in totals.items()}, "teacher_agreement": agreement}


def run_one(bench: dict[str, Any], context: TaskContext, variant: str, seed: int, run_dir: Path) -> dict[str, Any]:
    """Distil one student; returns (and writes) its result record."""
    recipe = context.recipe
    if len(recipe.stages) != 1:
        raise BenchmarkError(f"the benchmark distils one stage; the recipe of {recipe.task} has {len(recipe.stages)}")
    stage = recipe.stages[0]
    quantization = SurgeConfig.from_dict({**stage.quantization.to_dict(), **(bench["variants"][variant] or {})})
    training = replace(stage.training, seed=seed)
    student = build_student(context.teacher_dir, Stage(stage.name, quantization, training), None)
    loader = make_dataloader(context.data.train, context.tokenizer, batch_size=training.batch_size, shuffle=True, seed=seed)
    log_times: list[tuple[int, float]] = []

    def on_log(record: dict[str, float]) -> None:
        if "loss" in record:
            log_times.append((int(record["step"]), time.perf_counter()))

    train_dir = run_dir / "train"
    task = get_task(recipe.task)
    eval_kwargs: dict[str, Any] = {}
    if training.eval_every is not None:  # the recipe evaluates while training: best dev epoch kept
        eval_kwargs = {"eval_loader": make_dataloader(context.data.validation["validation"], context.tokenizer, batch_size=64),
                       "metric_fn": lambda p, r: compute_metrics(task, p, r), "best_metric": task.main_metric}
    # An interrupted run resumes from its last trainer checkpoint (same config, same numbers).
    started = time.perf_counter()
    result = train(student, loader, training, teacher=context.teacher, output_dir=train_dir, progress=False, on_log=on_log,
                   resume=True, **eval_kwargs)
    shutil.rmtree(train_dir / "checkpoints", ignore_errors=True)  # the benchmark keeps numbers, not weights
    shutil.rmtree(train_dir / "best", ignore_errors=True)
    dev = dev_evaluation(student, context, training.temperature)
    (first_step, first_time), (last_step, last_time) = log_times[0], log_times[-1]
    record = {
        "task": task.name, "variant": variant, "seed": seed, "protocol": context.protocol,
        "quantization": quantization.to_dict(), "training": training.to_dict(), "steps": result.steps,
        "train_wall_s": result.wall_time_s, "wall_s": time.perf_counter() - started,
        "selected": result.selected, "best_step": result.best_step,
        # Between the first and the last logged step: no set-up, no checkpoint writing.
        "s_per_step": (last_time - first_time) / (last_step - first_step) if last_step > first_step else None,
        **dev, "main": 100 * dev["metrics"][task.main_metric],
        "dev_distill_loss": dev["dev_loss"]["logits"] + dev["dev_loss"]["hidden"],
        "teacher_main": 100 * context.teacher_metrics["validation"][task.main_metric],
        "log_history": result.log_history,
    }
    write_json_atomically(run_dir / "result.json", record)
    return record


def command_run(args: argparse.Namespace) -> None:
    bench = load_benchmark(args.benchmark)
    output = Path(args.output)
    teachers = Path(args.teachers) if args.teachers else None
    runs: list[tuple[str | None, str, str, int]] = []
    for name in args.suite or list(bench["suites"]):
        if name not in bench["suites"]:
            raise BenchmarkError(f"no suite {name!r}; defined: {list(bench['suites'])}")
        protocol = bench["suites"][name].get("protocol")
        runs += [(protocol, *run) for run in suite_runs(bench["suites"][name]) if (protocol, *run) not in runs]
    pending = [run for run in runs if not (run_dir(output, *run) / "result.json").is_file()]
    print(f"{len(runs)} runs, {len(runs) - len(pending)} already done", flush=True)
    context: TaskContext | None = None  # one task's models in memory at a time
    for index, (protocol, task, variant, seed) in enumerate(pending, 1):
        if context is None or (context.protocol, context.recipe.task) != (protocol, task):
            context = TaskContext(bench, task, output, teachers, protocol)
        started = time.perf_counter()
        record = run_one(bench, context, variant, seed, run_dir(output, protocol, task, variant, seed))
        print(f"[{index}/{len(pending)}] {task} {variant} seed {seed}: {record['main']:.1f} "
              f"(teacher {record['teacher_main']:.1f}), dev distillation loss {record['dev_distill_loss']:.4f}, "
              f"teacher agreement {record['teacher_agreement']:.1f} in {time.perf_counter() - started:.0f} s", flush=True)


# --------------------------------------------------------------------------------------------
# Tables


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def _paired_ratio(records: dict[tuple[str, str], list[dict[str, Any]]], tasks: list[str], variant: str, key: str) -> float | None:
    ratios = []
    for task in tasks:
        base = {r["seed"]: r[key] for r in records.get((task, BASELINE), [])}
        ratios += [r[key] / base[r["seed"]] for r in records.get((task, variant), []) if base.get(r["seed"]) and r[key]]
    return statistics.fmean(ratios) if ratios else None


def final_monitoring(record: dict[str, Any]) -> dict[str, Any] | None:
    """lambda and binary/auxiliary gradient cosine per layer at the first and last logged step."""
    logged = [r for r in record["log_history"] if "lambda/mean" in r]
    if not logged:
        return None
    layers = sorted({int(k.split("/")[1].split("_")[1]) for k in logged[0] if k.startswith("lambda/layer_")})

    def at(r: dict[str, Any]) -> dict[str, Any]:
        return {"step": r["step"], "lambda_mean": r["lambda/mean"], "alignment_mean": r.get("alignment/mean"),
                "layers": {layer: {"lambda_mean": r[f"lambda/layer_{layer}/mean"], "lambda_min": r[f"lambda/layer_{layer}/min"],
                                   "lambda_max": r[f"lambda/layer_{layer}/max"],
                                   "alignment": r.get(f"alignment/layer_{layer}/mean")} for layer in layers}}

    return {"first": at(logged[0]), "last": at(logged[-1])}


def suite_table(bench: dict[str, Any], name: str, output: Path, step_benchmark: dict[str, Any] | None) -> dict[str, Any]:
    suite = bench["suites"][name]
    task_seeds = suite.get("task_seeds") or {}
    records: dict[tuple[str, str], list[dict[str, Any]]] = {}
    # The suite's runs, plus clipped STE's on the same tasks and seeds (the reference of the ratios).
    wanted = suite_runs(suite)
    wanted += sorted({(task, BASELINE, seed) for task, _, seed in wanted} - set(wanted))
    for task, variant, seed in wanted:
        path = run_dir(output, suite.get("protocol"), task, variant, seed) / "result.json"
        if path.is_file():
            records.setdefault((task, variant), []).append(json.loads(path.read_text()))
    rows = []
    for variant in suite["variants"]:
        row: dict[str, Any] = {"variant": variant, "tasks": {}, "complete": True}
        for task in suite["tasks"]:
            found = records.get((task, variant), [])
            expected = len(task_seeds.get(task, suite["seeds"]))
            row["complete"] &= len(found) == expected
            if found:
                mean, std = _mean_std([r["main"] for r in found])
                loss_mean, loss_std = _mean_std([r["dev_distill_loss"] for r in found])
                agree_mean, agree_std = _mean_std([r["teacher_agreement"] for r in found])
                row["tasks"][task] = {"mean": mean, "std": std, "n": len(found), "seeds": [r["seed"] for r in found],
                                      "teacher": found[0]["teacher_main"],
                                      "dev_distill_loss": {"mean": loss_mean, "std": loss_std, "n": len(found)},
                                      "teacher_agreement": {"mean": agree_mean, "std": agree_std, "n": len(found)}}
        whole = len(row["tasks"]) == len(suite["tasks"])
        row["average"] = statistics.fmean(t["mean"] for t in row["tasks"].values()) if whole else None
        row["agreement_average"] = statistics.fmean(t["teacher_agreement"]["mean"] for t in row["tasks"].values()) if whole else None
        # Relative to clipped STE over the (task, seed) pairs both ran: step time inside the runs, and
        # the held-out distillation loss (its scale differs per task, the ratio does not).
        row["run_step_time_vs_clipped_ste"] = _paired_ratio(records, suite["tasks"], variant, "s_per_step")
        row["dev_loss_vs_clipped_ste"] = _paired_ratio(records, suite["tasks"], variant, "dev_distill_loss")
        if step_benchmark and variant in step_benchmark and BASELINE in step_benchmark:
            bench_row, base_row = step_benchmark[variant], step_benchmark[BASELINE]
            row["step_time_vs_clipped_ste"] = bench_row["step_s_median"] / base_row["step_s_median"]
            row["memory_vs_clipped_ste"] = bench_row["peak_bytes"] / base_row["peak_bytes"]
        monitored = [final_monitoring(r) for t in suite["tasks"] for r in records.get((t, variant), [])]
        monitored = [m["last"] for m in monitored if m]
        if monitored:
            row["alignment_last_mean"] = statistics.fmean(m["alignment_mean"] for m in monitored)
            row["lambda_last_mean"] = statistics.fmean(m["lambda_mean"] for m in monitored)
        rows.append(row)
    teacher = {task: next((t["tasks"][task]["teacher"] for t in rows if task in t["tasks"]), None) for task in suite["tasks"]}
    records = {f"{task}/{variant}": found for (task, variant), found in records.items() if variant in suite["variants"]}
    return {"suite": name, "protocol": suite.get("protocol"), "tasks": suite["tasks"], "rows": rows, "teacher": teacher,
            "records": records}


def paired_differences(records: dict[str, list[dict[str, Any]]], tasks: list[str], variant: str,
                       resamples: int = 10000) -> dict[str, dict[str, Any]]:
    """`variant` minus each other variant of the suite, paired by (task, seed) on the dev main metric:
    the mean difference, a 95% t interval over the pairs and a 95% paired bootstrap interval
    (resampling the pairs, fixed seed)."""
    from scipy import stats

    def by_pair(name: str) -> dict[tuple[str, int], float]:
        return {(task, r["seed"]): r["main"] for task in tasks for r in records.get(f"{task}/{name}", [])}

    ours = by_pair(variant)
    if not ours:
        return {}
    others = sorted({key.split("/", 1)[1] for key in records} - {variant})
    result = {}
    generator = np.random.default_rng(0)
    for other in others:
        theirs = by_pair(other)
        pairs = sorted(set(ours) & set(theirs))
        if not pairs:
            continue
        differences = np.array([ours[p] - theirs[p] for p in pairs])
        mean = float(differences.mean())
        t_interval = None
        if len(differences) > 1:
            half = float(stats.t.ppf(0.975, len(differences) - 1) * differences.std(ddof=1) / np.sqrt(len(differences)))
            t_interval = [mean - half, mean + half]
        means = differences[generator.integers(0, len(differences), (resamples, len(differences)))].mean(axis=1)
        result[other] = {"pairs": len(pairs), "mean": mean, "t_interval": t_interval,
                         "bootstrap_interval": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]}
    return result


def best_run_monitoring(output: Path, bench: dict[str, Any], tasks: list[str]) -> dict[str, Any] | None:
    # `output`: the run root of one protocol (see run_root).
    """Per-layer lambda / gradient cosine of the best AGS run: among the runs of every variant with
    estimator "surge", the one whose held-out distillation loss is lowest relative to clipped STE's
    on the same task and seed (dev metrics tie too often at this budget to rank runs)."""
    best = None
    for variant, fields_ in bench["variants"].items():
        if (fields_ or {}).get("estimator") != "surge":
            continue
        for task in tasks:
            for path in sorted((output / task / variant).glob("seed*/result.json")):
                record = json.loads(path.read_text())
                base_path = output / task / BASELINE / f"seed{record['seed']}" / "result.json"
                monitoring = final_monitoring(record)
                if not base_path.is_file() or not monitoring:
                    continue
                ratio = record["dev_distill_loss"] / json.loads(base_path.read_text())["dev_distill_loss"]
                if best is None or ratio < best[0]:
                    best = (ratio, record, monitoring)
    if best is None:
        return None
    ratio, record, monitoring = best
    return {"task": record["task"], "variant": record["variant"], "seed": record["seed"], "main": record["main"],
            "teacher_main": record["teacher_main"], "dev_loss_vs_clipped_ste": ratio, **monitoring}


def _cell(entry: dict[str, Any] | None, digits: int = 1) -> str:
    if entry is None:
        return "-"
    std = "" if entry["std"] is None else f" ± {entry['std']:.{digits}f}"
    return f"{entry['mean']:.{digits}f}{std} ({entry['n']})"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown(table: dict[str, Any]) -> str:
    tasks = table["tasks"]
    lines = [f"### Suite `{table['suite']}`: dev metric (x100, mean ± std (seeds))", "",
             "| variant | " + " | ".join(tasks) + " | average | s/step vs clipped STE (runs) | step time (b32 s128) | peak memory | cos(g_b, g_a) at end | lambda at end |",
             "|---|" + "---|" * (len(tasks) + 6)]
    teacher = table["teacher"]
    lines.append("| FP teacher | " + " | ".join("-" if teacher[t] is None else f"{teacher[t]:.1f}" for t in tasks) + " | "
                 + ("-" if None in teacher.values() else f"{statistics.fmean(teacher.values()):.1f}") + " | | | | | |")
    for row in table["rows"]:
        avg = "-" if row["average"] is None else f"{row['average']:.1f}"
        if not row["complete"]:
            avg += " (incomplete)"
        align = row.get("alignment_last_mean")
        lam = row.get("lambda_last_mean")
        lines.append(f"| {row['variant']} | " + " | ".join(_cell(row["tasks"].get(t)) for t in tasks) + f" | {avg} | "
                     f"{_ratio(row['run_step_time_vs_clipped_ste'])} | {_ratio(row.get('step_time_vs_clipped_ste'))} | "
                     f"{_ratio(row.get('memory_vs_clipped_ste'))} | {'-' if align is None else f'{align:.3f}'} | "
                     f"{'-' if lam is None else f'{lam:.3f}'} |")
    lines += ["", f"Suite `{table['suite']}`: held-out distillation loss (logits + hidden states, lower is better) and "
              "teacher agreement (% same prediction; STS-B: Pearson x 100 with the teacher's scores)", "",
              "| variant | " + " | ".join(f"{t} loss" for t in tasks) + " | loss vs clipped STE | "
              + " | ".join(f"{t} agreement" for t in tasks) + " | agreement average |",
              "|---|" + "---|" * (2 * len(tasks) + 2)]
    for row in table["rows"]:
        cells = [row["tasks"].get(t) for t in tasks]
        agreement = "-" if row["agreement_average"] is None else f"{row['agreement_average']:.1f}"
        lines.append(f"| {row['variant']} | " + " | ".join(_cell(c and c["dev_distill_loss"], 3) for c in cells)
                     + f" | {_ratio(row['dev_loss_vs_clipped_ste'])} | "
                     + " | ".join(_cell(c and c["teacher_agreement"]) for c in cells) + f" | {agreement} |")
    return "\n".join(lines)


def command_table(args: argparse.Namespace) -> None:
    bench = load_benchmark(args.benchmark)
    output = Path(args.output)
    step_benchmark = None
    if args.step_benchmark:
        try:
            step_benchmark = json.loads(Path(args.step_benchmark).read_text())
        except (OSError, ValueError) as err:
            raise BenchmarkError(f"cannot read the training-step benchmark {args.step_benchmark}: {err}") from None
    tables = [suite_table(bench, name, output, step_benchmark) for name in (args.suite or list(bench["suites"]))]
    report: dict[str, Any] = {"benchmark": str(args.benchmark), "profiles": bench["profiles"], "overrides": bench["overrides"],
                              "suites": tables}
    print("\n\n".join(markdown(table) for table in tables))
    for table in tables:
        averages = {row["variant"]: row["average"] for row in table["rows"] if row["average"] is not None and row["complete"]}
        if "surge" in averages and len(averages) > 1:
            others = {k: v for k, v in averages.items() if not k.startswith("surge")}
            if others:
                best = max(others, key=others.get)
                table["surge_minus_best_other"] = {"best_other": best, "points": averages["surge"] - others[best]}
                print(f"\n{table['suite']}: SURGE average {averages['surge']:.2f} vs best other ({best}) "
                      f"{others[best]:.2f}: {averages['surge'] - others[best]:+.2f} points")
            if BASELINE in averages:
                gain = averages["surge"] - averages[BASELINE]
                table["gain_retained"] = {k: (v - averages[BASELINE]) / gain if gain > 0 else None
                                          for k, v in averages.items() if k.startswith("surge") and k != "surge"}
                print(f"{table['suite']}: SURGE gain over clipped STE {gain:+.2f} points" +
                      ("".join(f"; {k} keeps {100 * r:.0f}%" for k, r in table["gain_retained"].items() if r is not None)
                       if gain > 0 else " (no gain to retain)"))
    for table in tables:
        paired = paired_differences(table["records"], table["tasks"], "surge")
        if paired:
            table["surge_minus_each_other"] = paired
            print(f"\n{table['suite']}: SURGE minus each estimator, paired by task and seed (dev main metric x100):")
            print("| estimator | pairs | mean difference | 95% t interval | 95% bootstrap interval |")
            print("|---|---|---|---|---|")
            for other, stats in paired.items():
                t_low, t_high = stats["t_interval"] if stats["t_interval"] else (float("nan"), float("nan"))
                b_low, b_high = stats["bootstrap_interval"]
                print(f"| {other} | {stats['pairs']} | {stats['mean']:+.2f} | [{t_low:+.2f}, {t_high:+.2f}] | [{b_low:+.2f}, {b_high:+.2f}] |")
    if args.runs_json:
        runs = [{"task": r["task"], "estimator": r["quantization"]["estimator"], "variant": r["variant"], "seed": r["seed"],
                 "metric": r["main"], "wall_s": r.get("wall_s", r.get("train_wall_s")), "suite": table["suite"],
                 "protocol": r.get("protocol"), "dev_distill_loss": r["dev_distill_loss"], "selected": r.get("selected")}
                for table in tables for rs in table["records"].values() for r in rs]
        write_json_atomically(Path(args.runs_json), {"runs": runs})
    for table in tables:
        del table["records"]  # the run files themselves are not part of the report
    surge_tasks = sorted({t for table in tables for t in table["tasks"]})
    first_protocol = bench["suites"][tables[0]["suite"]].get("protocol") if tables else None
    report["best_surge_run"] = best_run_monitoring(run_root(output, first_protocol), bench, surge_tasks)
    best = report["best_surge_run"]
    if best:
        print(f"\nBest AGS run (held-out distillation loss {best['dev_loss_vs_clipped_ste']:.3f}x clipped STE's): "
              f"{best['variant']} on {best['task']} seed {best['seed']} (dev {best['main']:.1f}, teacher "
              f"{best['teacher_main']:.1f}); per layer, step {best['first']['step']} -> {best['last']['step']}:")
        print("| layer | lambda mean | lambda min | lambda max | cos(g_b, g_a) |")
        print("|---|---|---|---|---|")
        for layer, last in best["last"]["layers"].items():
            first = best["first"]["layers"][layer]
            print(f"| {layer} | {first['lambda_mean']:.3f} -> {last['lambda_mean']:.3f} | {first['lambda_min']:.3f} -> "
                  f"{last['lambda_min']:.3f} | {first['lambda_max']:.3f} -> {last['lambda_max']:.3f} | "
                  f"{first['alignment']:.3f} -> {last['alignment']:.3f} |")
    if args.json:
        write_json_atomically(Path(args.json), report)
    if args.plot:
        for table in tables:
            print(f"bar chart: {plot_table(table, Path(args.plot))}")


def plot_table(table: dict[str, Any], directory: Path) -> Path:
    """A suite's dev metrics as grouped bars (tasks, then the average), mean +- std over the seeds."""
    from surge_nlp.plots import bar_chart

    groups = table["tasks"] + ["average"]
    series, errors = {}, {}
    for row in table["rows"]:
        cells = [row["tasks"].get(task) for task in table["tasks"]]
        series[row["variant"]] = [c["mean"] if c else None for c in cells] + [row["average"]]
        errors[row["variant"]] = [c["std"] if c else None for c in cells] + [None]
    return bar_chart(groups, series, directory / f"estimators_{table['suite']}.png", errors=errors,
                     ylabel="dev metric (x100, main metric)", title=f"estimator benchmark, suite {table['suite']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--benchmark", default=str(Path(__file__).with_name("estimators.yaml")), help="benchmark file")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the suites' missing runs")
    run.add_argument("--suite", action="append", help="suite to run (repeatable; default: all)")
    run.add_argument("--output", required=True)
    run.add_argument("--teachers", help="directory of `surge-nlp glue` outputs whose <task>/teacher to reuse")
    table = sub.add_parser("table", help="print the suites' tables")
    table.add_argument("--suite", action="append")
    table.add_argument("--output", required=True)
    table.add_argument("--step-benchmark", help="JSON written by benchmark_training_step.py --json")
    table.add_argument("--json", help="also write the tables as JSON here")
    table.add_argument("--plot", help="also draw each suite's table as a bar chart (PNG) into this directory")
    table.add_argument("--runs-json", help="also write one record per run (task, estimator, variant, seed, metric, wall_s) here")
    args = parser.parse_args(argv)
    try:
        (command_run if args.command == "run" else command_table)(args)
    except BenchmarkError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
