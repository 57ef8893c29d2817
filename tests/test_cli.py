"""The `surge-nlp` CLI end to end on small slices of real GLUE data (local mirror), the recipe
layering, and every error a user can provoke (one line, exit code 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from surge_nlp.cli import main
from surge_nlp.recipe import RecipeError, load_recipe, merge

from .conftest import REPO

STAGE = {"name": "w1a1", "quantization": {"activation_bits": 1, "estimator": "surge", "binarize_attention": True}}


def write_recipe(path: Path, task: str, model: Path, stages=(STAGE,), **extra) -> Path:
    recipe = {"task": task, "model": str(model), "max_train_samples": 32, "max_eval_samples": 24,
              "teacher": {"learning_rate": 1e-3, "num_epochs": 1, "batch_size": 8, "ground_truth_weight": 1.0,
                          "logits_weight": 0.0, "hidden_weight": 0.0},
              "distill": {"learning_rate": 1e-3, "num_epochs": 1, "batch_size": 8, "checkpoint_every": 2},
              "stages": list(stages), **extra}
    path.write_text(yaml.safe_dump(recipe))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def local_glue(monkeypatch, glue_mirror):
    monkeypatch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))


@pytest.fixture(scope="module")
def rte_run(tmp_path_factory, tiny_base, glue_mirror):
    """One `surge-nlp glue rte` run shared by the tests that inspect its outputs."""
    import os

    os.environ["SURGE_NLP_GLUE_DATASET"] = str(glue_mirror)
    tmp = tmp_path_factory.mktemp("rte")
    recipe = write_recipe(tmp / "rte.yaml", "rte", tiny_base)
    assert main(["glue", "rte", "--recipe", str(recipe), "--output", str(tmp / "out")]) == 0
    return tmp / "out", recipe


def test_glue_pipeline_end_to_end_on_real_rte(rte_run, capsys):
    out, _ = rte_run
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "rte"
    assert set(results["teacher"]["metrics"]["validation"]) == {"accuracy"}
    assert results["stages"][0]["bits"] == "1-32-1" and results["stages"][0]["steps"] == 4
    config = json.loads((out / "student" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "surge" and config["checkpoint_format"] == "packed"
    # The packed student reloads through the CLI and scores what the pipeline measured.
    code, stdout, _ = run(capsys, "evaluate", out / "student", "--task", "rte", "--max-eval-samples", 24)
    assert code == 0
    assert json.loads(stdout)["validation"]["accuracy"] == pytest.approx(results["stages"][0]["metrics"]["validation"]["accuracy"])
    log = [json.loads(line) for line in (out / "stages" / "w1a1" / "log_history.jsonl").read_text().splitlines()]
    assert log and all("loss" in record or "eval" in str(record) for record in log)


def test_predict_writes_a_glue_submission(rte_run, capsys, tmp_path):
    out, _ = rte_run
    code, stdout, err = run(capsys, "predict", out / "student", "--task", "rte", "--max-eval-samples", 10, "--output", tmp_path)
    assert code == 0 and "kept only the first test rows" in err and "not a submission" in err
    lines = (tmp_path / "RTE.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 11
    assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}


def test_evaluate_and_predict_cut_where_the_student_was_trained(tmp_path, tiny_base, capsys, monkeypatch):
    # Before: they cut every input at the task's default (128 for RTE) whatever length the student trained
    # at (the cpu profile trains at 64), so `evaluate` did not reproduce results.json and `predict`
    # submitted inputs the student never saw.
    import surge_nlp.glue
    from transformers import AutoTokenizer

    recipe = write_recipe(tmp_path / "rte.yaml", "rte", tiny_base, max_seq_length=16)
    assert main(["glue", "rte", "--recipe", str(recipe), "--output", str(tmp_path / "out")]) == 0
    student = tmp_path / "out" / "student"
    assert AutoTokenizer.from_pretrained(student).model_max_length == 16  # saved beside the student
    lengths = []
    load_glue = surge_nlp.glue.load_glue

    def spy(*args, **kwargs):
        lengths.append(kwargs.get("max_seq_length"))
        return load_glue(*args, **kwargs)

    monkeypatch.setattr(surge_nlp.glue, "load_glue", spy)
    capsys.readouterr()
    code, stdout, _ = run(capsys, "evaluate", student, "--task", "rte", "--max-eval-samples", 24)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 0 and json.loads(stdout) == results["shipped"]["packed"]
    assert run(capsys, "predict", student, "--task", "rte", "--max-eval-samples", 4, "--output", tmp_path / "sub")[0] == 0
    # Longer on request, up to the model's positions; the teacher (saved as before) keeps the task's default.
    assert run(capsys, "evaluate", student, "--task", "rte", "--max-eval-samples", 4, "--max-seq-length", 48)[0] == 0
    assert run(capsys, "evaluate", tmp_path / "out" / "teacher", "--task", "rte", "--max-eval-samples", 4)[0] == 0
    assert lengths == [16, 16, 48, 128]
    code, _, err = run(capsys, "evaluate", student, "--task", "rte", "--max-seq-length", 129)
    assert code == 2 and "--max-seq-length 129 is invalid; allowed values: 1 to the model's max_position_embeddings (128)" in err


def test_summary_loads_the_checkpoints_own_class_and_names_a_missing_folder(rte_run, capsys, monkeypatch, tmp_path):
    # Before: AutoModel dropped the classifier (reported UNEXPECTED), so the totals differed from the
    # summary glue prints; a missing folder got the Hub's "Repo id must be in the form ..." message.
    import importlib

    module = importlib.import_module("surge_nlp.summary")  # the package's `summary` attribute is the function
    out, _ = rte_run
    summarized, summary = [], module.summary
    monkeypatch.setattr(module, "summary", lambda model, **kw: summarized.append(model) or summary(model, **kw))
    code, stdout, err = run(capsys, "summary", out / "student")
    assert code == 0 and type(summarized[0]).__name__ == "BertForSequenceClassification"
    assert "UNEXPECTED" not in stdout + err
    results = json.loads((out / "results.json").read_text())
    totals = summary(summarized[0], print_fn=None).totals
    assert totals["params_32bit"] == results["summary"]["params_32bit"]
    for missing in (tmp_path / "no-such-model", "runs/rte/no-such-student"):
        code, _, err = run(capsys, "summary", missing)
        assert code == 2 and f"{missing}: no such model folder" in err
    (tmp_path / "a-file").write_text("")
    code, _, err = run(capsys, "evaluate", tmp_path / "a-file", "--task", "rte")
    assert code == 2 and "is a file; a model is a folder" in err


def test_evaluate_and_predict_run_on_the_chosen_device(rte_run, capsys, monkeypatch):
    # Before: always the CPU, whatever the machine had (hours for QQP or MNLI test sets).
    import argparse

    import torch

    from surge_nlp.cli import _device

    out, _ = rte_run
    default = run(capsys, "evaluate", out / "student", "--task", "rte", "--max-eval-samples", 8)
    on_cpu = run(capsys, "evaluate", out / "student", "--task", "rte", "--max-eval-samples", 8, "--device", "cpu")
    assert default[0] == on_cpu[0] == 0 and json.loads(on_cpu[1]) == json.loads(default[1])  # stdout: the metrics
    code, _, err = run(capsys, "predict", out / "student", "--task", "rte", "--output", out / "sub", "--device", "gpu0")
    assert code == 2 and "--device 'gpu0' is invalid; allowed values: cpu, cuda" in err
    if not torch.cuda.is_available():
        code, _, err = run(capsys, "evaluate", out / "student", "--task", "rte", "--device", "cuda")
        assert code == 2 and "no CUDA GPU is available here; use --device cpu" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert _device(argparse.Namespace(device=None)) == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _device(argparse.Namespace(device=None)) == torch.device("cpu")


def test_evaluate_prints_valid_json_when_a_metric_is_undefined(rte_run, capsys, monkeypatch):
    # Before: json.dumps wrote NaN (a constant predictor's correlation), which JSON readers refuse.
    import surge_nlp.glue

    out, _ = rte_run
    monkeypatch.setattr(surge_nlp.glue, "metrics_of", lambda *args: {"validation": {"accuracy": 0.5, "f1": float("nan")}})
    code, stdout, err = run(capsys, "evaluate", out / "student", "--task", "rte", "--max-eval-samples", 4)
    assert code == 0 and json.loads(stdout) == {"validation": {"accuracy": 0.5, "f1": None}}
    assert "NaN" not in stdout and "a metric is nan" in err and "printed as null" in err


def test_summary_command(rte_run, capsys):
    out, _ = rte_run
    code, stdout, _ = run(capsys, "summary", out / "student")
    assert code == 0 and "binarized layers:          12" in stdout and "compression ratio" in stdout


def test_resume_skips_finished_work_and_keeps_the_numbers(rte_run, capsys, monkeypatch):
    out, recipe = rte_run
    before = json.loads((out / "results.json").read_text())

    def no_training(*args, **kwargs):
        raise AssertionError("a resumed finished run must not train again")

    monkeypatch.setattr("surge_nlp.pipeline.train", no_training)  # the teacher and every stage train through it
    code, _, _ = run(capsys, "glue", "rte", "--recipe", recipe, "--output", out, "--resume")
    assert code == 0
    after = json.loads((out / "results.json").read_text())
    assert after["teacher"]["metrics"] == before["teacher"]["metrics"]
    assert after["stages"][0]["metrics"] == before["stages"][0]["metrics"]

    # Work made under other settings is neither reused nor continued (before: silently reused, and
    # results.json named the new recipe). Nothing is written by a refused resume.
    stage_settings = (out / "stages" / before["stages"][0]["name"] / "settings.json").read_text()
    message = _one_line_error(capsys, "glue", "rte", "--recipe", recipe, "--output", out, "--resume",
                              "--set", "stages.0.quantization.eta=1.0")
    assert f"the stage '{before['stages'][0]['name']}' in {out / 'stages'}" in message and "(differing: quantization;" in message
    assert (out / "stages" / before["stages"][0]["name"] / "settings.json").read_text() == stage_settings
    # Forgetting --resume once (refused: checkpoints exist) does not overwrite the record the next --resume checks.
    import surge_nlp.distill

    monkeypatch.setattr("surge_nlp.pipeline.train", surge_nlp.distill.train)  # it refuses before any step
    assert "holds checkpoints of an earlier run" in _one_line_error(capsys, "glue", "rte", "--recipe", recipe, "--output", out,
                                                                    "--set", "stages.0.quantization.eta=1.0")
    assert (out / "stages" / before["stages"][0]["name"] / "settings.json").read_text() == stage_settings
    assert "(differing: quantization;" in _one_line_error(capsys, "glue", "rte", "--recipe", recipe, "--output", out, "--resume",
                                                          "--set", "stages.0.quantization.eta=1.0")
    message = _one_line_error(capsys, "glue", "rte", "--recipe", recipe, "--output", out, "--resume",
                              "--set", "teacher.learning_rate=0.002")
    assert f"the teacher in {out / 'teacher_training'} was made with other settings" in message and "(differing: training;" in message
    message = _one_line_error(capsys, "glue", "rte", "--recipe", recipe, "--output", out, "--resume",
                              "--set", "max_train_samples=16")
    assert "the teacher in" in message and "(differing: max_train_samples;" in message


def test_stsb_finetune_then_distill_two_stages(tmp_path, tiny_base, capsys):
    stages = [{"name": "w1a4", "quantization": {"activation_bits": 4, "estimator": "surge"}},
              {"name": "w1a1", "quantization": {"activation_bits": 1, "estimator": "surge"}}]
    recipe = write_recipe(tmp_path / "stsb.yaml", "stsb", tiny_base, stages=stages)
    code, stdout, err = run(capsys, "finetune", "stsb", "--recipe", recipe, "--output", tmp_path / "ft")
    assert code == 0, err
    assert set(json.loads(stdout.rsplit("}", 1)[0] + "}")["validation"]) >= {"pearson", "spearmanr"}
    code, stdout, err = run(capsys, "distill", "stsb", "--recipe", recipe, "--teacher", tmp_path / "ft" / "teacher",
                            "--output", tmp_path / "d")
    assert code == 0, err
    assert "student w1a4" in stdout and "student w1a1" in stdout
    for stage, bits in (("w1a4", 4), ("w1a1", 1)):
        config = json.loads((tmp_path / "d" / "stages" / stage / "final" / "config.json").read_text())
        assert config["quantization_config"]["activation_bits"] == bits
        assert config["quantization_config"]["checkpoint_format"] == "training"
    # distill writes results.json as glue does: the stages, and what is shipped measured on the packed student.
    results = json.loads((tmp_path / "d" / "results.json").read_text())
    assert [stage["name"] for stage in results["stages"]] == ["w1a4", "w1a1"]
    assert load_recipe(str(recipe)).to_dict() == results["resolved_recipe"]  # every setting the run used
    assert results["shipped"]["packed"] == results["stages"][-1]["metrics"]
    assert results["teacher"]["model"] == str(tmp_path / "ft" / "teacher") and results["summary"]["binarized_layers"] > 0
    # A resume with another teacher is refused: the stages were distilled from the first one.
    # The teacher is known by its files, not by the path as typed; settings that change nothing here
    # (evaluation size for stages that do not evaluate while training) do not block the reuse.
    import shutil

    code, _, err = run(capsys, "distill", "stsb", "--recipe", recipe, "--teacher", tmp_path / "ft" / ".." / "ft" / "teacher",
                       "--output", tmp_path / "d", "--resume", "--max-eval-samples", 20, "--set", "distill.log_every=3")
    assert code == 0, err
    shutil.copytree(tmp_path / "ft" / "teacher", tmp_path / "same_teacher")
    assert run(capsys, "distill", "stsb", "--recipe", recipe, "--teacher", tmp_path / "same_teacher", "--output",
               tmp_path / "d", "--resume")[0] == 0
    # Another teacher is refused: the stages were distilled from the first one.
    shutil.copytree(tmp_path / "ft" / "teacher", tmp_path / "other_teacher")
    config_path = tmp_path / "other_teacher" / "config.json"
    config_path.write_text(config_path.read_text().replace('"similarity"', '"similarity score"'))
    message = _one_line_error(capsys, "distill", "stsb", "--recipe", recipe, "--teacher", tmp_path / "other_teacher",
                              "--output", tmp_path / "d", "--resume")
    assert "the stage 'w1a4'" in message and "(differing: teacher;" in message


# ---- recipes -------------------------------------------------------------------------------------

def test_shipped_recipes_all_load():
    for task in ("cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"):
        recipe = load_recipe(task)
        assert recipe.task == task and recipe.model == "bert-base-uncased"
        assert recipe.stages[0].quantization.bits_label == "1-1-1"
        assert recipe.stages[0].training.scale_learning_rate == pytest.approx(1e-4)
    bit = {"cola": (5e-4, 50, 16), "sst2": (1e-4, 10, 8), "rte": (5e-4, 20, 8), "qqp": (2e-4, 6, 32)}
    for task, (lr, epochs, batch) in bit.items():
        training = load_recipe(task).stages[0].training
        assert (training.learning_rate, training.num_epochs, training.batch_size) == (pytest.approx(lr), epochs, batch)


def test_profiles_overlay_in_order():
    cpu = load_recipe("mrpc", ["cpu"])
    assert cpu.model == "sentence-transformers/all-MiniLM-L6-v2" and cpu.max_train_samples == 1000
    assert cpu.stages[0].quantization.bits_label == "1-32-1"
    assert cpu.stages[0].training.learning_rate == pytest.approx(5e-4)  # profile over task file
    multi = load_recipe("mrpc", ["cpu", "multistep"])
    assert [s.quantization.activation_bits for s in multi.stages] == [4, 2, 1]
    assert multi.max_train_samples == 1000


def test_merge_is_deep_for_mappings_and_replaces_lists():
    assert merge({"a": {"b": 1, "c": 2}, "l": [1, 2]}, {"a": {"c": 3}, "l": [9]}) == {"a": {"b": 1, "c": 3}, "l": [9]}


@pytest.mark.parametrize(
    "content, message",
    [
        ("task: [unclosed", "is not valid YAML"),
        ("- just\n- a list", "must be a mapping"),
        ("task: rte\nmodel: m\nstages: []", "`stages` must be a non-empty list"),
        ("task: rte\nmodel: m\nepochs: 3\nstages: [{quantization: {}}]", "unknown setting(s) ['epochs']"),
        ("task: nope\nmodel: m\nstages: [{quantization: {}}]", "unknown GLUE task 'nope'"),
        ("task: rte\nmodel: m\nstages: [{quantization: {activation_bits: 3}}]", "SurgeConfig.activation_bits=3 is invalid"),
        ("task: rte\nmodel: m\ndistill: {learning_rate: -1}\nstages: [{quantization: {}}]", "TrainingConfig.learning_rate=-1"),
        ("task: rte\nmodel: m\nmax_train_samples: 0\nstages: [{quantization: {}}]", "`max_train_samples` must be null or an integer >= 1"),
        ("task: rte\nmodel: m\nstages: [{name: a, quantization: {}}, {name: a, quantization: {}}]", "stage names must be unique"),
        ("task: rte\nmodel: m\nteacher: [1]\nstages: [{quantization: {}}]", "`teacher` must be a mapping of settings, got [1]"),
        ("task: rte\nmodel: m\ndistill: 3\nstages: [{quantization: {}}]", "`distill` must be a mapping of settings, got 3"),
        ("task: rte\nmodel: m\nstages: [{name: s, quantization: {}, training: [2]}]",
         "stage 1 (s): `training` must be a mapping of settings, got [2]"),
        ("task: rte\nmodel: m\nstages: [{name: s, quantization: 1}]", "stage 1 (s): `quantization` must be a mapping of settings, got 1"),
        ("task: rte\nmodel: m\ndataset: 123\nstages: [{quantization: {}}]", "`dataset` must be null or a non-empty string"),
        # Found before the teacher's fine-tuning, not after it:
        ("task: rte\nmodel: m\nteacher: {logits_weight: 1.0}\nstages: [{quantization: {}}]",
         "`teacher` fine-tunes on the labels: it needs ground_truth_weight > 0 (got 1.0) and logits_weight, hidden_weight, "
         "attention_weight 0 (got 1.0, 0.0, 0.0)"),
        ("task: rte\nmodel: m\ndistill: {logits_weight: 0, hidden_weight: 0, ground_truth_weight: 1}\nstages: [{name: s, quantization: {}}]",
         "stage 's' is distilled from a teacher: set one of its logits_weight, hidden_weight, attention_weight > 0"),
        ("task: rte\nmodel: m\nstages: [{name: a, quantization: {}}, {name: b, quantization: {}, training: {mixed_precision: bf16}}]",
         "mixed_precision must be the same for every training in one process (accelerate fixes it once per process); "
         "got {'stage a': 'no', 'stage b': 'bf16'}"),
        ("task: rte\nmodel: m\nstages: [{name: ../up, quantization: {}}]", "stage 1: `name` '../up' is invalid; it names the folder"),
        ("task: rte\nmodel: m\nselection: {held_out: 0.1}\nstages: [{quantization: {}}]",
         "selection.held_out=0.1 sets training rows aside to pick the kept epoch, but no stage evaluates while training"),
    ],
)
def test_bad_recipes_are_one_clear_error(tmp_path, capsys, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(RecipeError, match=None) as err:
        load_recipe(str(path))
    assert message in str(err.value)
    assert message in _one_line_error(capsys, "glue", "rte", "--recipe", path, "--output", tmp_path / "out")


def test_stage_edits_are_validated_with_the_rest_and_the_teacher_precision_where_it_trains(tmp_path, capsys, tiny_base):
    from surge_nlp.cli import _recipe, build_parser

    def recipe_of(*argv):
        return _recipe(build_parser().parse_args(["glue", "rte", "--output", str(tmp_path), *argv]))

    # Valid only together: the held-out selection needs a stage that evaluates (before: refused half-built).
    recipe = recipe_of("--set", "selection.held_out=0.1", "--set", "stages.0.training.eval_every=epoch")
    assert recipe.selection.held_out == 0.1 and recipe.stages[0].training.eval_every == "epoch"
    # The teacher's precision matters only where it is fine-tuned in the same process as the stages.
    assert recipe_of("--set", "distill.mixed_precision=bf16").stages[0].training.mixed_precision == "bf16"
    path = write_recipe(tmp_path / "rte.yaml", "rte", tiny_base)
    message = _one_line_error(capsys, "glue", "rte", "--recipe", path, "--output", tmp_path / "o", "--set", "distill.mixed_precision=bf16")
    assert "mixed_precision must be the same for every training in one process" in message and "'teacher': 'no'" in message


def test_a_resolved_recipe_round_trips_and_reruns_as_a_file(tmp_path):
    from surge_nlp.recipe import Recipe, recipe_dir

    for path in sorted(recipe_dir().glob("*.yaml")):
        if path.stem == "defaults":
            continue
        for profiles in ([], ["cpu"], ["cpu-full"], ["multistep"]):
            recipe = load_recipe(path.stem, profiles)
            again = Recipe.from_dict(recipe.to_dict())
            assert again.to_dict() == recipe.to_dict() and again.stages == recipe.stages, (path.stem, profiles)
    recipe = load_recipe("mrpc", ["cpu-full"], {"selection": {"held_out": 0.1}})
    (tmp_path / "resolved.yaml").write_text(yaml.safe_dump(recipe.to_dict()))
    assert load_recipe(str(tmp_path / "resolved.yaml")).to_dict() == recipe.to_dict()


def test_a_copied_task_recipe_keeps_the_shipped_defaults(tmp_path):
    # Before, a recipe path without a defaults.yaml beside it lost the defaults: the teacher section
    # fell back to TrainingConfig's (a distilling config), found only when the teacher was trained.
    from surge_nlp.recipe import recipe_dir

    copy = tmp_path / "my_rte.yaml"
    copy.write_text((recipe_dir() / "rte.yaml").read_text())
    mine, shipped = load_recipe(str(copy), ["cpu"]), load_recipe("rte", ["cpu"])
    assert mine.teacher == shipped.teacher and mine.stages == shipped.stages and mine.model == shipped.model
    assert mine.sources[0] == str(recipe_dir() / "defaults.yaml") and mine.sources[1] == str(copy)


# ---- CLI error paths -----------------------------------------------------------------------------

def _one_line_error(capsys, *argv) -> str:
    code, _, err = run(capsys, *argv)
    # Progress bars may precede it (they use carriage returns); the error itself is one line, last.
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("surge-nlp: error: ")]
    assert code == 2 and len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def test_unknown_task(capsys, tmp_path):
    assert "unknown GLUE task 'rtee'" in _one_line_error(capsys, "glue", "rtee", "--output", tmp_path)
    assert "no recipe named 'x'" in _one_line_error(capsys, "glue", "rte", "--recipe", "x", "--output", tmp_path)
    assert "unknown GLUE task 'rtee'" in _one_line_error(capsys, "evaluate", tmp_path, "--task", "rtee")


def test_missing_recipe_file_and_profile(capsys, tmp_path):
    assert "does not exist" in _one_line_error(capsys, "glue", "rte", "--recipe", tmp_path / "none.yaml", "--output", tmp_path)
    assert "no profile named 'gpu'" in _one_line_error(capsys, "glue", "rte", "--profile", "gpu", "--output", tmp_path)


def test_bad_set_override(capsys, tmp_path):
    assert "expected KEY=VALUE" in _one_line_error(capsys, "glue", "rte", "--set", "distill.num_epochs", "--output", tmp_path)
    assert "the recipe has 1 stage(s)" in _one_line_error(capsys, "glue", "rte", "--set", "stages.3.name=x", "--output", tmp_path)


@pytest.mark.parametrize("settings, message", [
    (["stages.first.name=x"], "--set stages.first: the recipe has 1 stage(s); allowed indices: 0 to 0"),
    (["stages.0=x"], "--set stages.0='x': a stage is edited key by key"),
    (["stages=[1]"], "stage 1 must be a mapping with `quantization`"),
    (["distill=1", "distill.num_epochs=2"], "--set 'distill.num_epochs=2' conflicts with an earlier --set distill=..."),
    (["distill.num_epochs=2", "distill=1"], "--set 'distill=1' conflicts with an earlier --set distill.<setting>=..."),
    (["task=mrpc"], "--set gives task 'mrpc', not the task argument 'rte'"),
])
def test_set_overrides_that_cannot_apply_are_one_clear_error(capsys, tmp_path, settings, message):
    argv = [arg for setting in settings for arg in ("--set", setting)]
    assert message in _one_line_error(capsys, "glue", "rte", *argv, "--output", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_summary_sequence_length_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["summary", "any-model", "--seq-len", "0"])
    assert exit_info.value.code == 2
    assert "--seq-len: invalid value '0'; allowed values: an integer >= 1" in capsys.readouterr().err


def test_missing_split(capsys, tmp_path, tiny_base):
    recipe = write_recipe(tmp_path / "qnli.yaml", "qnli", tiny_base)  # the mirror has no QNLI train split
    assert "train" in _one_line_error(capsys, "glue", "qnli", "--recipe", recipe, "--output", tmp_path / "o")


def test_wrong_columns(capsys, tmp_path, tiny_base, glue_mirror):
    import datasets

    from .test_glue import write_mirror

    real = datasets.load_dataset(str(glue_mirror), "rte")
    renamed = {split: real[split].select(range(8)).rename_column("sentence2", "hypothesis") for split in real}
    mirror = write_mirror(tmp_path / "glue", {"rte": renamed})
    recipe = write_recipe(tmp_path / "rte.yaml", "rte", tiny_base)
    err = _one_line_error(capsys, "glue", "rte", "--recipe", recipe, "--dataset", mirror, "--output", tmp_path / "o")
    assert "sentence2" in err


def test_label_count_mismatch(capsys, rte_run, tmp_path, tiny_base):
    out, _ = rte_run
    recipe = write_recipe(tmp_path / "stsb.yaml", "stsb", tiny_base)
    err = _one_line_error(capsys, "distill", "stsb", "--recipe", recipe, "--teacher", out / "teacher", "--output", tmp_path / "o")
    assert "label count mismatch: the teacher has 2 labels, task stsb needs 1" in err


def test_label_order_mismatch(capsys, rte_run, tmp_path):
    from transformers import AutoConfig

    from surge_nlp.pipeline import PipelineError, check_labels

    out, recipe = rte_run
    config = AutoConfig.from_pretrained(out / "teacher")
    assert check_labels(_with_labels(config, {0: "entailment", 1: "not_entailment"}), "rte", "teacher") is None
    assert check_labels(_with_labels(config, {0: "LABEL_0", 1: "LABEL_1"}), "rte", "teacher") is None  # unnamed: passes
    assert check_labels(_with_labels(config, {0: "ENTAILMENT", 1: "NOT_ENTAILMENT"}), "rte", "teacher") is None
    with pytest.raises(PipelineError, match=r"label order mismatch: the teacher's classes by id are \['not_entailment', 'entailment'\]"):
        check_labels(_with_labels(config, {0: "NOT_ENTAILMENT", 1: "ENTAILMENT"}), "rte", "teacher")
    # Through the CLI: a teacher saved with its classes swapped.
    import shutil

    shutil.copytree(out / "teacher", tmp_path / "swapped")
    saved = json.loads((tmp_path / "swapped" / "config.json").read_text())
    saved["id2label"] = {"0": "not_entailment", "1": "entailment"}
    saved["label2id"] = {"not_entailment": 0, "entailment": 1}
    (tmp_path / "swapped" / "config.json").write_text(json.dumps(saved))
    err = _one_line_error(capsys, "distill", "rte", "--recipe", recipe, "--teacher", tmp_path / "swapped", "--output", tmp_path / "o")
    assert "label order mismatch" in err


def _with_labels(config, id2label):
    class Model:  # what check_labels reads: the config
        pass

    model = Model()
    model.config = config.__class__.from_dict({**config.to_dict(), "id2label": id2label,
                                               "label2id": {name: i for i, name in id2label.items()}})
    return model


def test_tokenizer_mismatch(capsys, rte_run, tmp_path):
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    out, recipe = rte_run
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "b"]))
    other = tmp_path / "other"
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(other)
    BertForSequenceClassification(BertConfig(vocab_size=7, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=64)).save_pretrained(other)
    err = _one_line_error(capsys, "distill", "rte", "--recipe", recipe, "--teacher", out / "teacher", "--student", other,
                          "--output", tmp_path / "o")
    assert "tokenizer mismatch" in err


def test_a_teacher_without_tokenizer_files_borrows_only_a_fitting_one(capsys, rte_run, tmp_path, caplog):
    import logging
    import shutil

    from surge_nlp.pipeline import load_teacher

    out, recipe = rte_run
    bare = tmp_path / "bare"
    shutil.copytree(out / "teacher", bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    with caplog.at_level(logging.WARNING):
        _, tokenizer, _ = load_teacher(load_recipe(str(recipe)), str(bare))  # the recipe's model has the same tokenizer
    assert tokenizer.pad_token_id == 0 and "has no tokenizer files; using the recipe model's" in caplog.text
    config = json.loads((bare / "config.json").read_text())
    (bare / "config.json").write_text(json.dumps({**config, "pad_token_id": 1}))  # e.g. a RoBERTa teacher
    err = _one_line_error(capsys, "distill", "rte", "--recipe", recipe, "--teacher", bare, "--output", tmp_path / "o")
    assert "has no tokenizer files, and the recipe model's" in err and "padding id 0 where the teacher's is 1" in err
    # evaluate/predict have no recipe model to borrow from (before: a tokenizer of the special tokens alone, all [UNK]).
    err = _one_line_error(capsys, "evaluate", bare, "--task", "rte", "--max-eval-samples", 8)
    assert f"{bare} has no tokenizer files" in err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "surge-nlp glue rte --profile cpu" in capsys.readouterr().out


def test_the_installed_console_script_runs_the_cli():
    import shutil
    import subprocess
    from importlib.metadata import entry_points

    (script,) = [ep for ep in entry_points(group="console_scripts") if ep.name == "surge-nlp"]
    assert script.load() is main  # the installed entry point is this CLI
    executable = shutil.which("surge-nlp")
    if executable is None:
        pytest.skip("surge-nlp is not on PATH in this environment")
    completed = subprocess.run([executable, "glue", "--help"], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and "--profile" in completed.stdout


def test_set_values_parse_as_yaml_with_exponent_numbers():
    from surge_nlp.recipe import parse_overrides

    parsed = parse_overrides(["distill.learning_rate=3e-5", "teacher.learning_rate=1.0e-4", "distill.eval_every=epoch",
                         "max_train_samples=null", "stages.0.quantization.binarize_attention=false", "model=nan"])
    assert parsed == {"distill": {"learning_rate": 3e-5, "eval_every": "epoch"}, "teacher": {"learning_rate": 1e-4},
                      "max_train_samples": None, "stages": {"0": {"quantization": {"binarize_attention": False}}},
                      "model": "nan"}
    recipe = load_recipe("rte", profiles=["cpu"], overrides={"distill": parsed["distill"]})
    assert recipe.stages[0].training.learning_rate == 3e-5 and recipe.stages[0].training.eval_every == "epoch"


def test_shipped_recipes_are_package_data():
    import surge_nlp
    from surge_nlp.glue import GLUE_TASKS
    from surge_nlp.recipe import recipe_dir

    package = Path(surge_nlp.__file__).parent
    assert recipe_dir() == package / "recipes" / "glue"
    for task in GLUE_TASKS:
        for profiles in ([], ["cpu"], ["cpu-full"], ["cpu", "multistep"]):
            recipe = load_recipe(task, profiles=profiles)
            assert all(Path(source).is_relative_to(package) for source in recipe.sources), recipe.sources
    with pytest.raises(RecipeError, match=r"no profile named 'gpu'; available: cpu, cpu-full, multistep"):
        load_recipe("rte", profiles=["gpu"])


def test_students_carry_the_task_label_names_and_pipeline_prints_them(rte_run):
    from transformers import pipeline

    import surge_nlp  # noqa: F401

    out, _ = rte_run
    config = json.loads((out / "student" / "config.json").read_text())
    assert config["id2label"] == {"0": "entailment", "1": "not_entailment"}
    assert config["label2id"] == {"entailment": 0, "not_entailment": 1}
    teacher = json.loads((out / "teacher" / "config.json").read_text())
    assert teacher["id2label"] == config["id2label"]
    classify = pipeline("text-classification", model=str(out / "student"), device="cpu")
    labels = {result["label"] for result in classify(["A man is eating.", "Nobody is eating."])}
    assert labels <= {"entailment", "not_entailment"} and labels


def test_task_label_names_are_the_datasets_class_names(glue_mirror):
    import datasets

    from surge_nlp.glue import GLUE_TASKS

    for task in ("cola", "sst2", "mrpc", "rte", "wnli", "qnli", "stsb"):
        features = datasets.load_dataset(str(glue_mirror), task, split="validation").features
        expected = tuple(getattr(features["label"], "names", ())) if task != "stsb" else ()
        assert GLUE_TASKS[task].label_names == expected, task
    assert GLUE_TASKS["stsb"].label_config() == {"num_labels": 1, "id2label": {0: "similarity"},
                                                  "label2id": {"similarity": 0}, "problem_type": "regression"}


def test_glue_push_to_hub_card_carries_the_measured_dev_results(tmp_path, tiny_base, intercepted_hub, capsys):
    from huggingface_hub import ModelCard

    recipe = write_recipe(tmp_path / "rte.yaml", "rte", tiny_base)
    code, _, err = run(capsys, "glue", "rte", "--recipe", recipe, "--output", tmp_path / "out", "--push-to-hub", "me-rte-w1a1")
    assert code == 0, err
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    card = ModelCard((intercepted_hub["dir"] / "README.md").read_text())
    measured = results["stages"][-1]["metrics"]["validation"]
    assert {r.metric_type: r.metric_value for r in card.data.eval_results} == measured
    assert all(r.dataset_config == "rte" and r.dataset_split == "validation" for r in card.data.eval_results)
    assert card.data.base_model is None  # a local base model is not a Hub id
    # The tokenizer goes up with the model (before, the repository could not tokenize a sentence).
    from transformers import AutoTokenizer

    pushed = AutoTokenizer.from_pretrained(intercepted_hub["dir"])
    assert pushed("a sentence")["input_ids"] == AutoTokenizer.from_pretrained(tmp_path / "out" / "student")("a sentence")["input_ids"]
    assert "W-E-A bits: 1-32-1" in card.text and "MiB deployed" in card.text
    speed = results["shipped"].get("speed")
    if speed:  # the kernels built here: the card reports the speed the pipeline measured
        assert f"Deployed speed: {speed['speedup']:.2f}x the FP32 model's" in card.text
    else:
        assert "Deployed speed: not measured" in card.text


def test_glue_writes_plots_of_the_run(rte_run):
    out, _ = rte_run
    names = sorted(path.name for path in (out / "plots").glob("*.png"))
    # A SURGE student without eval_every: loss terms and lambda/cosine, no dev curve.
    assert names == ["teacher_training_loss.png", "w1a1_loss.png", "w1a1_surge.png"]


def test_glue_evaluates_what_it_ships(rte_run, capsys):
    from surge_nlp.kernels import ops

    out, _ = rte_run
    results = json.loads((out / "results.json").read_text())
    shipped, stage = results["shipped"], results["stages"][-1]["metrics"]
    assert shipped["packed"] == stage  # the reloaded packed student computes what training measured
    if ops.available():
        # A trained student on real RTE text: the deployed form predicts exactly what the packed one does.
        assert shipped["deployed"] == shipped["packed"] and shipped["agreement"] == {"validation": 1.0}
        code, stdout, _ = run(capsys, "evaluate", out / "student", "--task", "rte", "--max-eval-samples", 24, "--deploy")
        assert code == 0
        both = json.loads(stdout)
        assert both["simulated"] == shipped["packed"] and both["deployed"] == shipped["deployed"]
        assert both["identical_predictions"] == {"validation": 1.0}
        speed = shipped["speed"]  # the deployed form timed against the FP teacher on the same dev batches
        assert speed["speedup"] == pytest.approx(speed["reference_s_per_batch"] / speed["deployed_s_per_batch"])
        assert speed["deployed_s_per_batch"] > 0 and speed["batches"] >= 1
    else:
        assert shipped["deployed"] is None and shipped["deployed_unavailable"]


def test_evaluate_shipped_measures_disagreement_and_says_why_kernels_are_missing(rte_run, monkeypatch):
    import importlib

    from surge_nlp.kernels import ops
    from surge_nlp.recipe import load_recipe
    from surge_nlp.shipped import evaluate_shipped

    deploy_module = importlib.import_module("surge_nlp.deploy")  # the package's `deploy` is the function

    out, recipe_path = rte_run
    recipe = load_recipe(str(recipe_path))
    packed = json.loads((out / "results.json").read_text())["stages"][-1]["metrics"]
    monkeypatch.setattr(ops, "available", lambda: False)
    monkeypatch.setattr(ops, "unavailable_reason", lambda: "no C compiler (test)")
    assert evaluate_shipped(recipe, out / "student") == {"packed": packed, "deployed": None,
                                                          "deployed_unavailable": "no C compiler (test)"}

    class Flipped(torch.nn.Module):  # a "deployed" form that predicts the other class everywhere
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **inputs):
            output = self.inner(**inputs)
            output.logits = -output.logits
            return output

    monkeypatch.setattr(ops, "available", lambda: True)
    monkeypatch.setattr(deploy_module, "deploy", Flipped)
    shipped = evaluate_shipped(recipe, out / "student")
    assert shipped["packed"] == packed and shipped["agreement"] == {"validation": 0.0} and "speed" not in shipped
    assert shipped["deployed"]["validation"]["accuracy"] == pytest.approx(1 - packed["validation"]["accuracy"])


def test_glue_prints_totals_and_the_layer_table_on_request(tmp_path, tiny_base, capsys, monkeypatch):
    recipe = write_recipe(tmp_path / "rte.yaml", "rte", tiny_base)
    code, stdout, _ = run(capsys, "glue", "rte", "--recipe", recipe, "--output", tmp_path / "a")
    assert code == 0
    assert "packed, reloaded" in stdout and "binarized layers:" in stdout
    assert "bert.encoder.layer.0.attention.self.query" not in stdout
    from surge_nlp.kernels import ops

    # The summary is of what ships: the deployed form, every binarized layer on the kernels.
    if ops.available():
        assert "student as deployed:" in stdout
        layers = int(stdout.split("binarized layers:")[1].split()[0])
        assert f"on binary kernels:         {layers} layers" in stdout
    # Without the kernels the packed form is summarized, and says so.
    monkeypatch.setenv("SURGE_NLP_DISABLE_KERNELS", "1")
    ops.reset()
    try:
        code, stdout, _ = run(capsys, "glue", "rte", "--recipe", recipe, "--output", tmp_path / "a", "--resume")
    finally:
        monkeypatch.delenv("SURGE_NLP_DISABLE_KERNELS")
        ops.reset()
    assert code == 0 and "student as packed (kernels unavailable here: simulated):" in stdout
    assert "on binary kernels:         0 layers, 0 attention modules" in stdout
    code, stdout, _ = run(capsys, "glue", "rte", "--recipe", recipe, "--output", tmp_path / "a", "--resume", "--layers")
    assert code == 0 and "bert.encoder.layer.0.attention.self.query" in stdout


def test_only_the_main_process_prints_the_results(rte_run, capsys, monkeypatch):
    out, recipe = rte_run
    monkeypatch.setenv("RANK", "1")
    code, stdout, _ = run(capsys, "glue", "rte", "--recipe", recipe, "--output", out, "--resume")
    assert code == 0 and stdout == ""
    monkeypatch.setenv("RANK", "0")
    code, stdout, _ = run(capsys, "glue", "rte", "--recipe", recipe, "--output", out, "--resume")
    assert code == 0 and "teacher (FP)" in stdout


def test_a_cpu_launch_that_runs_one_process_is_reported(monkeypatch, caplog):
    import logging

    from accelerate import Accelerator

    from surge_nlp.distill.setup import asked_for_processes_but_runs_one, check_process_group

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    assert asked_for_processes_but_runs_one()
    with caplog.at_level(logging.WARNING):
        check_process_group(Accelerator(cpu=True))
    assert "runs ONE process" in caplog.text and "--multi_gpu --num_processes N" in caplog.text
    monkeypatch.delenv("MASTER_ADDR")
    assert not asked_for_processes_but_runs_one()
    # Launched processes that did not form a group: a ValueError, which the CLI prints in one line.
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="WORLD_SIZE=2 processes were launched but accelerate runs 1"):
        check_process_group(Accelerator(cpu=True))


def test_quiet_silences_every_progress_bar(tmp_path, tiny_base, capfd):
    import datasets
    import transformers

    recipe = write_recipe(tmp_path / "rte.yaml", "rte", tiny_base)
    try:
        assert main(["-q", "glue", "rte", "--recipe", str(recipe), "--output", str(tmp_path / "out")]) == 0
        captured = capfd.readouterr()
        assert "it/s" not in captured.err and "%|" not in captured.err
        assert "teacher (FP)" in captured.out
    finally:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()
        import huggingface_hub

        huggingface_hub.utils.enable_progress_bars()


def test_glue_under_accelerate_launch_with_two_cpu_processes_writes_and_prints_once(tmp_path, tiny_base, glue_mirror):
    # The README's multi-process command, on CPU (gloo): both processes run the pipeline, one writes.
    import os
    import subprocess
    import sys

    recipe = write_recipe(tmp_path / "wnli.yaml", "wnli", tiny_base)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": "",
           "SURGE_NLP_GLUE_DATASET": str(glue_mirror), "HF_DATASETS_CACHE": str(tmp_path / "datasets-cache")}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "surge_nlp.cli",
               "-q", "glue", "wnli", "--recipe", str(recipe), "--output", str(tmp_path / "out")]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert completed.stdout.count("teacher (FP)") == 1 and completed.stdout.count("packed student:") == 1  # rank 0 only
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["stages"][-1]["steps"] == 2  # 32 examples, batch 8 per process, 2 processes: 2 steps per epoch
    leftovers = [p for p in (tmp_path / "out").rglob(".*") if ".tmp" in p.name]
    assert not leftovers, leftovers  # every write completed, once
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "student")  # whole and loadable


WRITE_ONCE_SCRIPT = """
import sys
from pathlib import Path
from accelerate import PartialState
from surge_nlp.pipeline import write_once

state = PartialState(cpu=True)
out = Path(sys.argv[1])
write_once(lambda: (out / "first.txt").write_text("whole"))
print(f"rank {state.process_index} read {(out / 'first.txt').read_text()}", flush=True)

def failing_write():
    raise OSError("disk full while writing results.json")

try:
    write_once(failing_write)
except BaseException as error:
    print(f"rank {state.process_index} stopped: {type(error).__name__}: {error}", flush=True)
    raise
"""


def test_a_write_that_fails_on_the_main_process_stops_every_process_with_its_reason(tmp_path):
    # Before, the other process waited at the barrier until the launcher (or gloo's 30-minute timeout) ended it.
    import os
    import subprocess
    import sys

    script = tmp_path / "write_once_failure.py"
    script.write_text(WRITE_ONCE_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
               "--mixed_precision", "no", "--dynamo_backend", "no", str(script), str(tmp_path)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode != 0
    assert "rank 0 read whole" in completed.stdout and "rank 1 read whole" in completed.stdout  # a good write is seen by all
    assert "rank 0 stopped: OSError: disk full while writing results.json" in completed.stdout, completed.stderr[-4000:]
    assert ("rank 1 stopped: RuntimeError: the main process failed while writing, so this process stops too: "
            "OSError: disk full while writing results.json") in completed.stdout, completed.stderr[-4000:]


def test_a_missing_key_is_named_as_one(capsys, tmp_path, monkeypatch):
    # A KeyError's text is only the quoted key; the error line says what it is.
    import surge_nlp.cli as cli

    def reads_a_file_without_the_key(args):
        return {}["scheduler"]

    monkeypatch.setattr(cli, "cmd_plot", reads_a_file_without_the_key)
    assert _one_line_error(capsys, "plot", tmp_path) == (
        "surge-nlp: error: missing key 'scheduler' (in a file or setting this command read)")
