"""Data augmentation for distillation (surge_nlp.glue.augment) and its place in recipes and the pipeline."""

import json

import datasets
import numpy as np
import pytest
import yaml

from surge_nlp.glue.augment import Augmentation
from surge_nlp.recipe import RecipeError, load_recipe

SPECIAL = [0, 101, 102]  # padding, [CLS], [SEP]


def pairs(count: int = 200, seed: int = 0) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    rows = {"input_ids": [], "token_type_ids": [], "attention_mask": [], "labels": []}
    for _ in range(count):
        a, b = rng.integers(1000, 1050, rng.integers(3, 9)), rng.integers(1000, 1050, rng.integers(3, 9))
        ids = [101, *a, 102, *b, 102]
        rows["input_ids"].append(ids)
        rows["token_type_ids"].append([0] * (len(a) + 2) + [1] * (len(b) + 1))
        rows["attention_mask"].append([1] * len(ids))
        rows["labels"].append(float(rng.random()))
    return datasets.Dataset.from_dict(rows)


def test_copies_follow_the_originals_with_only_ordinary_tokens_replaced():
    train = pairs()
    augmented = Augmentation(copies=3, replace_prob=0.3, seed=1).apply(train, SPECIAL)
    assert len(augmented) == 4 * len(train) and augmented.column_names == train.column_names
    assert augmented.features == train.features
    assert augmented[: len(train)] == train[:]  # the originals first, untouched
    original_ids = train["input_ids"]
    vocabulary = {t for ids in original_ids for t in ids} - set(SPECIAL)
    replaced = ordinary = 0
    for copy in range(1, 4):
        for i, row in enumerate(augmented.select(range(copy * len(train), (copy + 1) * len(train)))):
            source = original_ids[i]
            assert len(row["input_ids"]) == len(source)
            assert row["token_type_ids"] == train[i]["token_type_ids"] and row["labels"] == train[i]["labels"]
            for new, old in zip(row["input_ids"], source):
                if old in SPECIAL:
                    assert new == old  # [CLS], [SEP] stay where they are
                else:
                    assert new in vocabulary  # drawn from the training set's own tokens
                    ordinary += 1
                    replaced += new != old
    # A replacement may draw the same token (1 in 50 here): the changed share is p * (1 - ~0.02).
    assert 0.25 < replaced / ordinary < 0.32


def test_replacements_follow_the_training_token_frequencies():
    # Token 7 is 9 times as frequent as token 8 among ordinary tokens: replacements keep that ratio.
    train = datasets.Dataset.from_dict({"input_ids": [[101] + [7] * 9 + [8] + [102]] * 400})
    augmented = Augmentation(copies=1, replace_prob=1.0, seed=3).apply(train, SPECIAL)
    drawn = np.array([ids[1:-1] for ids in augmented.select(range(400, 800))["input_ids"]]).ravel()
    assert set(drawn) == {7, 8} and abs((drawn == 8).mean() - 0.1) < 0.01


def test_augmentation_is_a_function_of_its_seed_and_off_by_default():
    train = pairs(50)
    a = Augmentation(copies=2, seed=5).apply(train, SPECIAL)["input_ids"]
    assert a == Augmentation(copies=2, seed=5).apply(train, SPECIAL)["input_ids"]
    assert a != Augmentation(copies=2, seed=6).apply(train, SPECIAL)["input_ids"]
    assert Augmentation().apply(train, SPECIAL) is train and not Augmentation().enabled


@pytest.mark.parametrize("data, message", [
    ({"copies": -1}, r"augmentation.copies=-1 is invalid; allowed values: an integer >= 0"),
    ({"copies": 1.5}, r"augmentation.copies=1.5 is invalid"),
    ({"replace_prob": 0}, r"augmentation.replace_prob=0 is invalid; allowed values: a number in \(0, 1\]"),
    ({"replace_prob": 1.5}, r"augmentation.replace_prob=1.5 is invalid"),
    ({"seed": "x"}, r"augmentation.seed='x' is invalid; allowed values: an integer"),
    ({"seed": True}, r"augmentation.seed=True is invalid; allowed values: an integer"),
    ({"copis": 2}, r"augmentation has no setting\(s\) \['copis'\]"),
    ({"other_tasks": ["mrpc", "foo"]}, r"augmentation.other_tasks=\['mrpc', 'foo'\] is invalid; allowed values: a list of "
                                        r"distinct GLUE tasks among cola, sst2, mrpc"),
    ({"other_tasks": ["mrpc", "mrpc"]}, r"augmentation.other_tasks=\['mrpc', 'mrpc'\] is invalid"),
    ({"other_tasks": "mrpc"}, r"augmentation.other_tasks='mrpc' is invalid"),
    ([2], r"augmentation must be a mapping"),
])
def test_invalid_settings_name_the_field(data, message):
    with pytest.raises(ValueError, match=message):
        Augmentation.from_dict(data)


def test_other_tasks_inputs_follow_the_copies_with_a_placeholder_label():
    train, other = pairs(30, seed=0), pairs(20, seed=1).add_column("idx", list(range(20)))
    other = other.remove_columns("labels").add_column("labels", [1] * 20)  # another task's labels: classes, not scores
    augmented = Augmentation(copies=1, replace_prob=0.5, other_tasks=("mrpc",)).apply(train, SPECIAL, [other])
    assert len(augmented) == 30 + 30 + 20 and augmented.features == train.features
    assert augmented[:30] == train[:]
    added = augmented.select(range(60, 80))
    for name in ("input_ids", "token_type_ids", "attention_mask"):
        assert added[name] == other[name]  # the other task's inputs, unchanged
    assert added["labels"] == [0.0] * 20  # never read: distillation targets are the teacher's outputs
    only_others = Augmentation(other_tasks=("mrpc",))
    assert only_others.enabled and len(only_others.apply(train, SPECIAL, [other])) == 50
    assert only_others.to_dict() == {"copies": 0, "replace_prob": 0.1, "seed": 0, "other_tasks": ["mrpc"]}
    with pytest.raises(ValueError, match=r"0 other training sets for other_tasks=\['mrpc'\]"):
        only_others.apply(train, SPECIAL)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['token_type_ids'\]"):
        only_others.apply(train, SPECIAL, [other.remove_columns("token_type_ids")])


def test_other_tasks_inputs_the_student_is_scored_on_are_dropped(caplog):
    # GLUE tasks share sentences (MRPC's training pairs hold 229 of STS-B's dev and test pairs): an added
    # input equal to one the student is scored on, in either sentence order, must not be distilled on.
    train, other = pairs(30, seed=0), pairs(20, seed=1)
    same = other[3]["input_ids"]
    first_end = same.index(102)
    swapped = [101, *same[first_end + 1:-1], 102, *same[1:first_end], 102]
    held_out = [same, swapped[:], other[5]["input_ids"][:-1] + [0, 0], [101, 1049, 102]]  # padding is no sentence
    other = other.map(lambda row, i: {"input_ids": swapped} if i == 7 else row, with_indices=True)
    with caplog.at_level("WARNING", logger="surge_nlp.glue.augment"):
        augmented = Augmentation(other_tasks=("mrpc",)).apply(train, SPECIAL, [other], held_out=held_out)
    kept = [row for row in range(20) if row not in (3, 5, 7)]
    assert augmented["input_ids"][30:] == [other[row]["input_ids"] for row in kept]
    assert augmented[:30] == train[:]  # the task's own training set is never filtered
    assert "3 of 20 mrpc inputs dropped" in caplog.text


def test_recipes_take_other_tasks_with_the_same_input_only():
    recipe = load_recipe("stsb", profiles=["cpu-full"], overrides={"augmentation": {"other_tasks": ["mrpc", "rte"]}})
    assert recipe.augmentation.other_tasks == ("mrpc", "rte")
    with pytest.raises(RecipeError, match=r"augmentation.other_tasks=\['cola'\] is invalid for stsb; allowed values: "
                                          r"tasks with its input \(a sentence pair\), other than itself: mrpc, qqp, "):
        load_recipe("stsb", profiles=["cpu-full"], overrides={"augmentation": {"other_tasks": ["cola"]}})
    with pytest.raises(RecipeError, match=r"other_tasks=\['sst2'\] is invalid for sst2; allowed values: tasks with its "
                                          r"input \(one sentence\), other than itself: cola$"):
        load_recipe("sst2", profiles=["cpu-full"], overrides={"augmentation": {"other_tasks": ["sst2"]}})
    with pytest.raises(RecipeError, match=r"other_tasks=\['mrpc'\]\) with ground_truth_weight > 0"):
        load_recipe("stsb", profiles=["cpu-full"], overrides={"augmentation": {"other_tasks": ["mrpc"]},
                                                              "distill": {"ground_truth_weight": 0.5}})


def test_recipes_take_augmentation_and_refuse_it_with_label_losses():
    recipe = load_recipe("stsb", profiles=["cpu-full"], overrides={"augmentation": {"copies": 7, "replace_prob": 0.1}})
    assert recipe.augmentation == Augmentation(copies=7, replace_prob=0.1)
    assert load_recipe("stsb", profiles=["cpu-full"]).augmentation == Augmentation()
    with pytest.raises(RecipeError, match="augmentation.replace_prob=2 is invalid"):
        load_recipe("stsb", profiles=["cpu-full"], overrides={"augmentation": {"copies": 1, "replace_prob": 2}})
    with pytest.raises(RecipeError, match=r"ground_truth_weight > 0 in stage\(s\) \['w1e1a1'\]"):
        load_recipe("stsb", profiles=["cpu-full"], overrides={"augmentation": {"copies": 1},
                                                              "distill": {"ground_truth_weight": 0.5}})


def _run_augmented(tmp_path, tiny_base, task: str, augmentation: dict, **recipe_extra) -> dict:
    """`surge-nlp glue TASK` on the first 16 training rows with `augmentation`; its results.json."""
    from surge_nlp.cli import main

    distill = {"learning_rate": 1e-3, "num_epochs": 1, "batch_size": 8}
    if "max_steps" in recipe_extra:
        distill["max_steps"] = recipe_extra.pop("max_steps")
    recipe = {"task": task, "model": str(tiny_base), "max_train_samples": 16, "max_eval_samples": 8,
              "augmentation": augmentation,
              "teacher": {"learning_rate": 1e-3, "num_epochs": 1, "batch_size": 8, "ground_truth_weight": 1.0,
                          "logits_weight": 0.0, "hidden_weight": 0.0},
              "distill": distill, "stages": [{"name": "w1a1", "quantization": {"estimator": "clipped_ste"}}], **recipe_extra}
    (tmp_path / f"{task}.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["-q", "glue", task, "--recipe", str(tmp_path / f"{task}.yaml"), "--output", str(tmp_path / "out")]) == 0
    return json.loads((tmp_path / "out" / "results.json").read_text())


def test_the_pipeline_distils_on_the_augmented_set(tmp_path, tiny_base, glue_mirror, monkeypatch):
    monkeypatch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))
    results = _run_augmented(tmp_path, tiny_base, "rte", {"copies": 2, "replace_prob": 0.2})
    teacher_log = (tmp_path / "out" / "teacher_training" / "log_history.jsonl").read_text().splitlines()
    assert results["augmentation"] == {"copies": 2, "replace_prob": 0.2, "seed": 0, "other_tasks": []}
    stage = results["stages"][0]
    assert stage["train_examples"] == 48 and stage["steps"] == 6  # 16 originals + 2 copies, batch 8
    assert json.loads(teacher_log[-1])["step"] == 2  # the teacher fine-tunes on the 16 originals only


def test_the_pipeline_drops_other_tasks_inputs_that_are_dev_or_test_inputs(tmp_path, tiny_base, glue_mirror, monkeypatch):
    monkeypatch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))
    results = _run_augmented(tmp_path, tiny_base, "stsb", {"other_tasks": ["mrpc"]}, max_seq_length=32, max_steps=1)
    # MRPC's training pair 1 is one of STS-B's dev or test pairs (the only one among its first 16).
    assert results["stages"][0]["train_examples"] == 16 + 15


def test_the_pipeline_distils_on_other_tasks_inputs_too(tmp_path, tiny_base, glue_mirror, monkeypatch):
    monkeypatch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))
    results = _run_augmented(tmp_path, tiny_base, "rte", {"other_tasks": ["mrpc"]}, max_seq_length=32, max_steps=3)
    assert results["augmentation"]["other_tasks"] == ["mrpc"]
    # The added task is capped at max_train_samples as RTE's own set is (before: all 3,668 MRPC pairs).
    assert results["stages"][0]["train_examples"] == 16 + 16 and results["stages"][0]["steps"] == 3
