"""Checkpoint selection on held-out training rows (surge_nlp.glue.selection): the split, its place in
recipes, and the pipeline evaluating the held-out rows while training instead of dev."""

import json
import math

import datasets
import pytest
import yaml

from surge_nlp.glue import HELD_OUT, GlueData, Selection, evaluate_model, get_task
from surge_nlp.recipe import RecipeError, load_recipe


def rows(count: int) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"idx": list(range(count)), "labels": [i % 2 for i in range(count)]})


def test_split_holds_out_a_seeded_fraction_and_keeps_the_order():
    train = rows(100)
    kept, held = (list(part["idx"]) for part in Selection(held_out=0.1, seed=3).split(train))
    assert (len(kept), len(held)) == (90, 10)
    assert kept == sorted(kept) and held == sorted(held)  # the training set's order
    assert sorted(kept + held) == list(range(100))  # disjoint and complete
    assert list(Selection(held_out=0.1, seed=3).split(train)[1]["idx"]) == held  # a function of the seed
    assert list(Selection(held_out=0.1, seed=4).split(train)[1]["idx"]) != held
    assert held != list(range(10)) and held != list(range(90, 100))  # drawn, not a block
    assert [len(part) for part in Selection(held_out=0.25).split(rows(10))] == [8, 2]  # round(2.5) = 2
    assert [len(part) for part in Selection(held_out=0.01).split(rows(10))] == [9, 1]  # at least one row held out


def test_split_refuses_what_would_leave_nothing_to_train_or_hold_out():
    with pytest.raises(ValueError, match=r"held_out=0.5 leaves no training rows out of 1"):
        Selection(held_out=0.5).split(rows(1))
    with pytest.raises(ValueError, match="held_out is 0"):
        Selection().split(rows(10))


@pytest.mark.parametrize("held_out", [-0.1, 0.6, math.nan, True, "0.1", None])
def test_held_out_must_be_a_fraction_up_to_one_half(held_out):
    with pytest.raises(ValueError, match=r"selection.held_out=.* is invalid; allowed values: a number in \[0, 0.5\]"):
        Selection(held_out=held_out)


def test_selection_settings_are_checked_by_name():
    assert Selection.from_dict(None) == Selection() and not Selection().enabled
    assert Selection.from_dict({"held_out": 0.2, "seed": 1}) == Selection(0.2, 1) and Selection(0.2).enabled
    with pytest.raises(ValueError, match=r"selection.seed=1.5 is invalid; allowed values: an integer"):
        Selection(held_out=0.1, seed=1.5)
    with pytest.raises(ValueError, match=r"selection.seed=True is invalid; allowed values: an integer"):
        Selection(held_out=0.1, seed=True)  # YAML's `yes` is a bool, not a seed
    with pytest.raises(ValueError, match=r"selection has no setting\(s\) \['fraction'\]; allowed: \['held_out', 'seed'\]"):
        Selection.from_dict({"fraction": 0.1})
    with pytest.raises(ValueError, match="selection must be a mapping"):
        Selection.from_dict(0.1)


def test_recipes_take_a_selection_and_name_the_field_when_it_is_wrong():
    assert load_recipe("mrpc", profiles=["cpu-full"]).selection == Selection()
    recipe = load_recipe("mrpc", profiles=["cpu-full"], overrides={"selection": {"held_out": 0.1}})
    assert recipe.selection == Selection(held_out=0.1)
    with pytest.raises(RecipeError, match=r"cpu-full.yaml \+ command line: selection.held_out=2 is invalid"):
        load_recipe("mrpc", profiles=["cpu-full"], overrides={"selection": {"held_out": 2}})


def test_evaluation_while_training_reads_the_held_out_rows_when_there_are_some():
    dev, held = rows(6), rows(4)
    data = GlueData(task=get_task("rte"), dataset="local", train=rows(20), validation={"validation": dev})
    assert data.selection_split() == ("validation", dev)
    data.held_out = held
    assert data.selection_split() == (HELD_OUT, held)


def test_the_pipeline_selects_on_held_out_training_rows(tmp_path, tiny_base, glue_mirror, monkeypatch):
    """RTE cut to 20 training rows, 5 of them held out: both the teacher and the student train on 15,
    and the student's evaluations while training are of the 5 held-out rows, not of dev."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from surge_nlp.cli import main
    from surge_nlp.pipeline import load_data

    monkeypatch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))
    recipe = {"task": "rte", "model": str(tiny_base), "max_train_samples": 20, "max_eval_samples": 8, "max_seq_length": 32,
              "selection": {"held_out": 0.25, "seed": 1},
              "teacher": {"learning_rate": 1e-3, "num_epochs": 1, "batch_size": 8, "ground_truth_weight": 1.0,
                          "logits_weight": 0.0, "hidden_weight": 0.0},
              "distill": {"learning_rate": 1e-3, "num_epochs": 1, "batch_size": 8, "eval_every": "epoch"},
              "stages": [{"name": "w1a1", "quantization": {"estimator": "clipped_ste"}}]}
    (tmp_path / "rte.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "out"
    assert main(["-q", "glue", "rte", "--recipe", str(tmp_path / "rte.yaml"), "--output", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["selection"] == {"held_out": 0.25, "seed": 1}
    stage = results["stages"][0]
    assert stage["train_examples"] == 15 and stage["steps"] == 2 and stage["selected_on"] == HELD_OUT
    teacher_log = [json.loads(line) for line in (out / "teacher_training" / "log_history.jsonl").read_text().splitlines()]
    assert teacher_log[-1]["step"] == 2  # the teacher fine-tuned on the same 15 rows

    # the one evaluation (at the last step, so the kept weights are the final ones) is of the held-out rows
    tokenizer = AutoTokenizer.from_pretrained(out / "teacher")
    data = load_data(load_recipe(str(tmp_path / "rte.yaml")), tokenizer)
    assert len(data.held_out) == 5 and not set(data.held_out["idx"]) & set(data.train["idx"])
    student = AutoModelForSequenceClassification.from_pretrained(out / "stages" / "w1a1" / "final").eval()
    on_held_out = evaluate_model("rte", student, GlueData(data.task, data.dataset, validation={"validation": data.held_out}), tokenizer, 8)
    assert [r["step"] for r in stage["eval_history"]] == [2] and stage["best_step"] == 2
    assert stage["eval_history"][0]["accuracy"] == pytest.approx(on_held_out["validation"]["accuracy"])
    assert 5 * stage["eval_history"][0]["accuracy"] == pytest.approx(round(5 * stage["eval_history"][0]["accuracy"]))
    # the reported number is still dev's, measured once at the end
    on_dev = evaluate_model("rte", student, data, tokenizer, 8)
    assert stage["metrics"]["validation"]["accuracy"] == pytest.approx(on_dev["validation"]["accuracy"])
