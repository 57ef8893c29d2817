"""recipes/benchmark_estimators.py: the shipped benchmark file, run bookkeeping (resumable, shared
runs), the tables' statistics recomputed from the run files, and the errors a user can hit."""

from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml

from .conftest import REPO

spec = importlib.util.spec_from_file_location("benchmark_estimators", REPO / "recipes" / "benchmark_estimators.py")
bench_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench_module)

STAGE = {"name": "w1a1", "quantization": {"activation_bits": 1, "estimator": "surge", "binarize_attention": True}}


def test_shipped_benchmark_covers_the_issue_grid():
    bench = bench_module.load_benchmark(REPO / "recipes" / "estimators.yaml")
    main = bench["suites"]["estimators"]
    assert main["variants"] == ["ste", "clipped_ste", "approx_sign", "ede", "dpgc", "surge"]
    assert sorted(main["tasks"]) == ["cola", "mrpc", "rte", "sst2", "stsb"]
    for task in ("cola", "mrpc", "stsb", "rte"):
        assert len(main.get("task_seeds", {}).get(task, main["seeds"])) >= 3
    assert bench["variants"]["dpgc"] == {"estimator": "dpgc"} and bench["variants"]["surge"] == {"estimator": "surge"}
    ranks = [bench["variants"][v].get("aux_rank") for v in bench["suites"]["rank"]["variants"]]
    assert [r for r in ranks if r] == [8, 32, 128] and "surge" in bench["suites"]["rank"]["variants"]
    # Every estimator runs the same recipe: a variant sets the estimator and, in the sweeps, eta, rank
    # or attention compensation only.
    assert all(set(fields) <= {"estimator", "eta", "aux_rank", "compensate_attention"} for fields in bench["variants"].values())
    # Issue 11's grid on cpu-full.
    full = bench["suites"]["cpu_full_estimators"]
    assert full["protocol"] == "cpu_full" and bench["protocols"]["cpu_full"]["profiles"] == ["cpu-full"]
    assert full["variants"] == ["clipped_ste", "approx_sign", "ede", "dpgc", "surge"] and full["seeds"] == [1, 2, 3]
    assert sorted(full["tasks"]) == ["cola", "mrpc", "rte", "stsb"]
    etas = [bench["variants"][v].get("eta", 0.5) for v in bench["suites"]["cpu_full_eta"]["variants"]]
    assert etas == [0.05, 0.1, 0.25, 0.5, 1.0] and bench["suites"]["cpu_full_eta"]["seeds"] == [1, 2]
    assert bench["variants"]["surge_attention"] == {"estimator": "surge", "compensate_attention": True}
    recipe = bench_module.student_recipe(bench, "stsb", "cpu_full")
    assert recipe.stages[0].quantization.ffn_activation == "relu" and recipe.stages[0].training.eval_every == "epoch"


def test_runs_go_seed_by_seed_and_honour_task_seeds():
    suite = {"variants": ["a", "b"], "tasks": ["rte", "sst2"], "seeds": [1, 2], "task_seeds": {"sst2": [1]}}
    assert bench_module.suite_runs(suite) == [("rte", "a", 1), ("rte", "b", 1), ("sst2", "a", 1), ("sst2", "b", 1),
                                              ("rte", "a", 2), ("rte", "b", 2)]


def _write(path: Path, data) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("change, message", [
    ({"suites": {"s": {"variants": ["adam"], "tasks": ["rte"], "seeds": [1]}}}, "undefined variant(s) ['adam']"),
    ({"variants": {"bad": {"estimator": "sgd"}}}, "SurgeConfig.estimator='sgd' is invalid; allowed values"),
    ({"variants": {"bad": {"estimator": "ste", "aux_rank": 8}}}, "SurgeConfig.aux_rank=8 only applies with estimator in"),
    ({"suites": {"s": {"variants": ["surge"], "tasks": ["rte"], "seeds": []}}}, "seeds must be non-empty lists"),
    ({"suites": {"s": {"variants": ["surge"], "tasks": ["rte"]}}}, "suite 's' needs `variants`, `tasks`, `seeds`"),
    ({"suites": {"s": {"variants": ["surge"], "tasks": ["glue9"], "seeds": [1]}}}, "glue9"),
    ({"budget": 3}, "must be a mapping with keys"),
])
def test_invalid_benchmark_files_name_the_field(tmp_path, change, message):
    data = {"variants": {"surge": {"estimator": "surge"}},
            "suites": {"s": {"variants": ["surge"], "tasks": ["rte"], "seeds": [1]}}}
    data.update(change)
    if "variants" in change and "suites" not in change:
        data["suites"] = {"s": {"variants": list(change["variants"]), "tasks": ["rte"], "seeds": [1]}}
    with pytest.raises(ValueError) as info:
        bench_module.load_benchmark(_write(tmp_path / "b.yaml", data))
    assert message in str(info.value)


def _tiny_teacher_profile(root: Path, minilm_path: Path) -> Path:
    """A tiny random RTE teacher under root/teachers/rte/teacher (MiniLM's tokenizer) and a profile using it."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    teacher_dir = root / "teachers" / "rte" / "teacher"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, intermediate_size=64, num_labels=2)).save_pretrained(teacher_dir)
    tokenizer.save_pretrained(teacher_dir)
    return _write(root / "tiny.yaml", {"model": str(teacher_dir), "max_seq_length": 32, "stages": [STAGE]})


@pytest.fixture(scope="module")
def tiny_benchmark(tmp_path_factory, minilm_path, glue_mirror):
    """Two variants x two seeds on a 16-example slice of real RTE with a tiny random teacher."""
    root = tmp_path_factory.mktemp("bench")
    profile = _tiny_teacher_profile(root, minilm_path)
    benchmark = _write(root / "bench.yaml", {
        "profiles": [str(profile)],
        "overrides": {"max_train_samples": 16, "max_eval_samples": 16,
                      "distill": {"num_epochs": 1, "batch_size": 8, "log_every": 1, "learning_rate": 1e-3}},
        "variants": {"clipped_ste": {"estimator": "clipped_ste"}, "surge": {"estimator": "surge"}},
        "suites": {"s": {"variants": ["clipped_ste", "surge"], "tasks": ["rte"], "seeds": [1, 2]}},
    })
    output = root / "out"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))
        bench_module.main(["--benchmark", str(benchmark), "run", "--output", str(output), "--teachers", str(root / "teachers")])
    return benchmark, output, root


def test_benchmark_runs_record_metrics_timing_and_monitoring(tiny_benchmark):
    _, output, _ = tiny_benchmark
    records = {(p.parent.parent.name, p.parent.name): json.loads(p.read_text()) for p in output.glob("rte/*/seed*/result.json")}
    assert sorted(records) == [("clipped_ste", "seed1"), ("clipped_ste", "seed2"), ("surge", "seed1"), ("surge", "seed2")]
    for (variant, _), record in records.items():
        assert record["steps"] == 2 and record["s_per_step"] > 0 and record["quantization"]["estimator"] == variant
        assert record["main"] == pytest.approx(100 * record["metrics"]["accuracy"])
        assert record["dev_distill_loss"] == pytest.approx(record["dev_loss"]["logits"] + record["dev_loss"]["hidden"])
        assert not (output / "rte" / variant / f"seed{record['seed']}" / "train" / "checkpoints").exists()
        has_lambda = any("lambda/mean" in r for r in record["log_history"])
        assert has_lambda == (variant == "surge")
    assert records[("surge", "seed1")]["training"]["seed"] == 1 and records[("surge", "seed2")]["training"]["seed"] == 2
    # The teacher was evaluated on the 16 dev pairs of the slice: its accuracy is a count out of 16.
    teacher_accuracy = json.loads((output / "rte" / "teacher.json").read_text())["metrics"]["validation"]["accuracy"]
    assert 0 <= teacher_accuracy <= 1 and teacher_accuracy * 16 == pytest.approx(round(teacher_accuracy * 16))


def test_dev_evaluation_matches_the_pipeline_metric_and_measures_fidelity(tiny_benchmark, monkeypatch, glue_mirror):
    from surge_nlp.pipeline import build_student, validation_metrics

    benchmark, output, root = tiny_benchmark
    monkeypatch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))
    bench = bench_module.load_benchmark(benchmark)
    context = bench_module.TaskContext(bench, "rte", output, root / "teachers")
    stage = context.recipe.stages[0]
    student = build_student(context.teacher_dir, stage, None)
    dev = bench_module.dev_evaluation(student, context, temperature=1.0)
    assert dev["metrics"] == pytest.approx(validation_metrics(context.recipe, student, context.data, context.tokenizer)["validation"])
    assert dev["dev_loss"]["hidden"] > 0 and 0 <= dev["teacher_agreement"] <= 100
    # The teacher against itself: identical hidden states and predictions (the soft cross-entropy of
    # a distribution with itself is its entropy, not 0).
    itself = bench_module.dev_evaluation(context.teacher, context, temperature=1.0)
    assert itself["dev_loss"]["hidden"] == pytest.approx(0.0, abs=1e-10) and itself["teacher_agreement"] == 100.0
    assert itself["dev_loss"]["logits"] <= dev["dev_loss"]["logits"] + 1e-6  # Gibbs: CE(p, q) >= H(p)


def test_benchmark_rerun_skips_finished_runs(tiny_benchmark, capsys, monkeypatch, glue_mirror):
    benchmark, output, root = tiny_benchmark
    before = {p: p.stat().st_mtime_ns for p in output.glob("rte/*/seed*/result.json")}
    monkeypatch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))
    bench_module.main(["--benchmark", str(benchmark), "run", "--output", str(output), "--teachers", str(root / "teachers")])
    assert "4 runs, 4 already done" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in output.glob("rte/*/seed*/result.json")} == before


def test_benchmark_table_statistics_match_the_run_files(tiny_benchmark, tmp_path, capsys):
    benchmark, output, _ = tiny_benchmark
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps({"clipped_ste": {"step_s_median": 2.0, "peak_bytes": 100},
                                 "surge": {"step_s_median": 3.0, "peak_bytes": 130}}))
    report_path = tmp_path / "table.json"
    bench_module.main(["--benchmark", str(benchmark), "table", "--output", str(output), "--step-benchmark", str(steps),
                       "--json", str(report_path), "--plot", str(tmp_path / "plots")])
    printed = capsys.readouterr().out
    charts = sorted((tmp_path / "plots").glob("estimators_*.png"))
    assert charts and all(chart.stat().st_size > 5000 for chart in charts)
    report = json.loads(report_path.read_text())
    rows = {row["variant"]: row for row in report["suites"][0]["rows"]}
    for variant, row in rows.items():
        records = [json.loads((output / "rte" / variant / f"seed{s}" / "result.json").read_text()) for s in (1, 2)]
        mains = [r["main"] for r in records]
        cell = row["tasks"]["rte"]
        assert cell["mean"] == pytest.approx(statistics.fmean(mains)) and cell["n"] == 2
        assert cell["std"] == pytest.approx(statistics.stdev(mains))
        assert row["average"] == pytest.approx(cell["mean"]) and row["complete"]
        base = [json.loads((output / "rte" / "clipped_ste" / f"seed{s}" / "result.json").read_text())["s_per_step"] for s in (1, 2)]
        ratio = statistics.fmean(r["s_per_step"] / b for r, b in zip(records, base))
        assert row["run_step_time_vs_clipped_ste"] == pytest.approx(ratio)
        base_loss = [json.loads((output / "rte" / "clipped_ste" / f"seed{s}" / "result.json").read_text())["dev_distill_loss"] for s in (1, 2)]
        loss_ratio = statistics.fmean(r["dev_distill_loss"] / b for r, b in zip(records, base_loss))
        assert row["dev_loss_vs_clipped_ste"] == pytest.approx(loss_ratio)
        assert cell["dev_distill_loss"]["mean"] == pytest.approx(statistics.fmean(r["dev_distill_loss"] for r in records))
        assert row["agreement_average"] == pytest.approx(statistics.fmean(r["teacher_agreement"] for r in records))
    assert rows["surge"]["step_time_vs_clipped_ste"] == pytest.approx(1.5)
    assert rows["surge"]["memory_vs_clipped_ste"] == pytest.approx(1.3)
    assert -1 <= rows["surge"]["alignment_last_mean"] <= 1 and rows["surge"]["lambda_last_mean"] > 0
    assert "alignment_last_mean" not in rows["clipped_ste"]
    gap = report["suites"][0]["surge_minus_best_other"]
    assert gap["best_other"] == "clipped_ste"
    assert gap["points"] == pytest.approx(rows["surge"]["average"] - rows["clipped_ste"]["average"])
    assert "| surge |" in printed and report["best_surge_run"]["task"] == "rte"
    assert sorted(report["best_surge_run"]["last"]["layers"]) == ["0", "1"]


def test_benchmark_errors_are_one_line(tiny_benchmark, tmp_path, capsys):
    benchmark, output, _ = tiny_benchmark
    with pytest.raises(SystemExit, match="no suite 'nope'; defined: \\['s'\\]"):
        bench_module.main(["--benchmark", str(benchmark), "run", "--suite", "nope", "--output", str(output)])
    with pytest.raises(SystemExit, match="no fine-tuned teacher at .*missing/rte/teacher"):
        bench_module.main(["--benchmark", str(benchmark), "run", "--output", str(tmp_path / "o"),
                           "--teachers", str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="cannot read the training-step benchmark"):
        bench_module.main(["--benchmark", str(benchmark), "table", "--output", str(output),
                           "--step-benchmark", str(tmp_path / "absent.json")])
    with pytest.raises(SystemExit, match="cannot read benchmark file"):
        bench_module.main(["--benchmark", str(tmp_path / "absent.yaml"), "table", "--output", str(output)])


def test_paired_differences_against_a_hand_computation():
    records = {"rte/surge": [{"seed": 1, "main": 60.0}, {"seed": 2, "main": 58.0}],
               "stsb/surge": [{"seed": 1, "main": 40.0}, {"seed": 2, "main": 44.0}],
               "rte/clipped_ste": [{"seed": 1, "main": 57.0}, {"seed": 2, "main": 58.0}],
               "stsb/clipped_ste": [{"seed": 1, "main": 41.0}, {"seed": 3, "main": 50.0}]}
    paired = bench_module.paired_differences(records, ["rte", "stsb"], "surge")
    stats = paired["clipped_ste"]
    differences = [3.0, 0.0, -1.0]  # (rte, 1), (rte, 2), (stsb, 1); (stsb, 2) and (stsb, 3) have no partner
    mean = sum(differences) / 3
    sd = statistics.stdev(differences)
    half = 4.302652729911275 * sd / 3 ** 0.5  # t(0.975, 2 degrees of freedom)
    assert stats["pairs"] == 3 and stats["mean"] == pytest.approx(mean)
    assert stats["t_interval"] == pytest.approx([mean - half, mean + half])
    low, high = stats["bootstrap_interval"]
    assert min(differences) <= low <= mean <= high <= max(differences)


def test_a_protocol_suite_runs_under_its_own_folder_with_eval_every(tmp_path, minilm_path, glue_mirror, monkeypatch, capsys):
    profile = _tiny_teacher_profile(tmp_path, minilm_path)
    benchmark = _write(tmp_path / "bench.yaml", {
        "protocols": {"evaluating": {"profiles": [str(profile)], "overrides": {
            "max_train_samples": 16, "max_eval_samples": 16,
            "distill": {"num_epochs": 2, "batch_size": 8, "log_every": 1, "eval_every": 1, "learning_rate": 1e-3}}}},
        "variants": {"clipped_ste": {"estimator": "clipped_ste"}, "surge": {"estimator": "surge"},
                     "surge_attention": {"estimator": "surge", "compensate_attention": True}},
        "suites": {"p": {"protocol": "evaluating", "variants": ["clipped_ste", "surge", "surge_attention"],
                         "tasks": ["rte"], "seeds": [1]}},
    })
    monkeypatch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))
    output = tmp_path / "out"
    bench_module.main(["--benchmark", str(benchmark), "run", "--output", str(output), "--teachers", str(tmp_path / "teachers")])
    record = json.loads((output / "evaluating" / "rte" / "surge_attention" / "seed1" / "result.json").read_text())
    assert record["protocol"] == "evaluating" and record["quantization"]["compensate_attention"] is True
    assert record["selected"] == "best" and record["best_step"] in (1, 2, 3, 4) and record["wall_s"] > 0
    evaluations = [r for r in record["log_history"] if "eval/accuracy" in r]
    assert [r["step"] for r in evaluations] == [1, 2, 3, 4]
    assert any(k.startswith("attention_lambda/") for r in record["log_history"] for k in r)
    assert not (output / "rte").exists()  # the top-level protocol's folder is untouched
    runs_json = tmp_path / "runs.json"
    bench_module.main(["--benchmark", str(benchmark), "table", "--output", str(output), "--runs-json", str(runs_json),
                       "--json", str(tmp_path / "report.json")])
    runs = json.loads(runs_json.read_text())["runs"]
    assert sorted(r["variant"] for r in runs) == ["clipped_ste", "surge", "surge_attention"]
    assert all(set(r) >= {"task", "estimator", "variant", "seed", "metric", "wall_s"} for r in runs)
    report = json.loads((tmp_path / "report.json").read_text())
    assert set(report["suites"][0]["surge_minus_each_other"]) == {"clipped_ste", "surge_attention"}
    assert "SURGE minus each estimator" in capsys.readouterr().out


def test_a_suite_naming_an_undefined_protocol_is_an_error(tmp_path):
    data = {"variants": {"surge": {"estimator": "surge"}},
            "suites": {"s": {"protocol": "gpu", "variants": ["surge"], "tasks": ["rte"], "seeds": [1]}}}
    with pytest.raises(ValueError, match="undefined protocol 'gpu'"):
        bench_module.load_benchmark(_write(tmp_path / "b.yaml", data))
