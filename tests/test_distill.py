"""The distillation trainer: losses against hand computations, config validation, the Q/K/V
recorder, the loop (distillation and fine-tuning), exact resume after a kill, and a 2-process run."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification

import surge_nlp
from surge_nlp.distill import (
    ProjectionRecorder,
    TrainingConfig,
    attention_loss,
    evaluate,
    gram_direction_loss,
    ground_truth_loss,
    hidden_states_loss,
    list_checkpoints,
    logits_loss,
    predict,
    soft_cross_entropy,
    train,
)
from surge_nlp.distill.checkpoints import read_trainer_state
from surge_nlp.distill.setup import check_teacher

from .conftest import REPO, tiny_config

FINE_TUNE = dict(logits_weight=0.0, hidden_weight=0.0, ground_truth_weight=1.0)


# --------------------------------------------------------------------------------------------
# Losses against hand computations (plain Python loops, no torch ops)


def test_soft_cross_entropy_matches_hand_computation():
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    teacher = [[0.3, 1.5, -0.2], [2.0, 0.1, 0.4]]
    temperature = 2.0

    def softmax(row):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    expected = 0.0
    for s_row, t_row in zip(student, teacher):
        p_t, p_s = softmax(t_row), softmax(s_row)
        expected += -sum(pt * math.log(ps) for pt, ps in zip(p_t, p_s))
    expected = expected / len(student) * temperature**2
    got = soft_cross_entropy(torch.tensor(student), torch.tensor(teacher), temperature)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(logits_loss(torch.tensor(student), torch.tensor(teacher), temperature)) == pytest.approx(expected, rel=1e-6)


def test_logits_loss_is_mse_for_regression_and_rejects_shape_mismatch():
    student, teacher = torch.tensor([[1.0], [3.0]]), torch.tensor([[2.0], [0.0]])
    assert float(logits_loss(student, teacher, temperature=4.0)) == pytest.approx((1 + 9) / 2)
    with pytest.raises(ValueError, match="differ in shape"):
        logits_loss(torch.zeros(2, 3), torch.zeros(2, 2), 1.0)


def test_hidden_states_loss_sums_layers_and_skips_padding():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    teacher = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    expected = 0.0
    for s, t in zip(student, teacher):
        squared, count = 0.0, 0
        for b in range(2):
            for i in range(3):
                if mask[b, i]:
                    squared += sum((float(s[b, i, h]) - float(t[b, i, h])) ** 2 for h in range(4))
                    count += 4
        expected += squared / count
    assert float(hidden_states_loss(student, teacher, mask)) == pytest.approx(expected, rel=1e-6)
    # Without a mask every token counts: the plain MSE per layer.
    assert float(hidden_states_loss(student, teacher)) == pytest.approx(
        sum(float(((s - t) ** 2).mean()) for s, t in zip(student, teacher)), rel=1e-6)
    with pytest.raises(ValueError, match="same number of layers"):
        hidden_states_loss(student[:2], teacher)
    with pytest.raises(ValueError, match="same hidden size"):
        hidden_states_loss([torch.zeros(2, 3, 5)], [torch.zeros(2, 3, 4)])


def _hand_normalized_gram(x: np.ndarray, heads: int, mask: np.ndarray) -> np.ndarray:
    batch, tokens, width = x.shape
    dim = width // heads
    out = np.zeros((batch, heads, tokens, tokens))
    for b in range(batch):
        for h in range(heads):
            for i in range(tokens):
                for j in range(tokens):
                    if mask[b, i] and mask[b, j]:
                        out[b, h, i, j] = sum(x[b, i, h * dim + d] * x[b, j, h * dim + d] for d in range(dim))
            out[b, h] /= math.sqrt((out[b, h] ** 2).sum())
    return out


def test_gram_direction_loss_matches_hand_computation():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 4, 6, generator=g), torch.randn(2, 4, 6, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    gs = _hand_normalized_gram(student.numpy().astype(np.float64), 2, mask.numpy())
    gt = _hand_normalized_gram(teacher.numpy().astype(np.float64), 2, mask.numpy())
    expected = ((gs - gt) ** 2).sum(axis=(-1, -2)).mean()
    assert float(gram_direction_loss(student, teacher, num_heads=2, attention_mask=mask)) == pytest.approx(expected, rel=1e-5)
    # Direction only: a rescaled student (as binarization rescales activations) costs nothing extra.
    assert float(gram_direction_loss(3.0 * teacher, teacher, 2, mask)) == pytest.approx(0.0, abs=1e-6)
    # Padding tokens do not matter.
    noisy = student.clone()
    noisy[0, 3] = 100.0
    assert float(gram_direction_loss(noisy, teacher, 2, mask)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="not divisible"):
        gram_direction_loss(student, teacher, num_heads=4)


def test_attention_loss_sums_layers_and_projections():
    g = torch.Generator().manual_seed(2)
    student = [tuple(torch.randn(1, 3, 4, generator=g) for _ in range(3)) for _ in range(2)]
    teacher = [tuple(torch.randn(1, 3, 4, generator=g) for _ in range(3)) for _ in range(2)]
    expected = sum(float(gram_direction_loss(s, t, 2)) for sl, tl in zip(student, teacher) for s, t in zip(sl, tl))
    assert float(attention_loss(student, teacher, num_heads=2)) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same number of layers"):
        attention_loss(student[:1], teacher, 2)


def test_ground_truth_loss_cross_entropy_and_regression():
    logits = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]
    labels = [0, 1]
    expected = 0.0
    for row, label in zip(logits, labels):
        expected += -(row[label] - math.log(sum(math.exp(v) for v in row)))
    expected /= 2
    assert float(ground_truth_loss(torch.tensor(logits), torch.tensor(labels))) == pytest.approx(expected, rel=1e-6)
    assert float(ground_truth_loss(torch.tensor([[1.0], [2.0]]), torch.tensor([2.0, 4.0]))) == pytest.approx((1 + 4) / 2)


# --------------------------------------------------------------------------------------------
# Configuration


@pytest.mark.parametrize("field, value", [
    ("learning_rate", 0.0), ("learning_rate", True), ("scale_learning_rate", -1e-4), ("temperature", 0),
    ("num_epochs", 0), ("num_epochs", 1.5), ("max_steps", 0), ("batch_size", 0), ("gradient_accumulation_steps", 0),
    ("weight_decay", -0.1), ("warmup_ratio", 1.0), ("max_grad_norm", 0.0), ("seed", -1), ("logits_weight", -1.0),
    ("hidden_weight", float("nan")), ("attention_weight", "1"), ("ground_truth_weight", -0.5),
    ("checkpoint_every", 0), ("keep_checkpoints", 0), ("log_every", 0), ("mixed_precision", "fp8"),
])
def test_config_rejects_bad_fields_naming_them(field, value):
    with pytest.raises(ValueError, match=rf"TrainingConfig\.{field}=.*allowed values"):
        TrainingConfig(**{field: value})


def test_config_round_trip_and_errors():
    config = TrainingConfig(learning_rate=5e-4, max_steps=10, max_grad_norm=None, **FINE_TUNE)
    assert TrainingConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    assert not config.distills
    with pytest.raises(ValueError, match="no field.*'lr'"):
        TrainingConfig.from_dict({"lr": 1e-3})
    with pytest.raises(ValueError, match="loss weights are all 0"):
        TrainingConfig(logits_weight=0, hidden_weight=0)


# --------------------------------------------------------------------------------------------
# Models and batches


def tiny_model(family: str = "bert", seed: int = 0, num_labels: int = 2, **overrides):
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels=num_labels, **overrides))


def binarized(model, **config):
    return surge_nlp.binarize(model, surge_nlp.SurgeConfig(**config))


def examples(count: int, seed: int, seq_len: int = 10, vocab: int = 120, regression: bool = False):
    """Synthetic examples whose label is learnable from the first token (parity, or its value)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        input_ids = torch.randint(3, vocab, (seq_len,), generator=g)
        mask = torch.ones(seq_len, dtype=torch.long)
        mask[int(torch.randint(6, seq_len + 1, (1,), generator=g)):] = 0
        label = input_ids[0].float() / vocab if regression else input_ids[0] % 2
        rows.append({"input_ids": input_ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(input_ids),
                     "labels": label})
    return rows


def loader(rows, batch_size: int = 4, shuffle: bool = True):
    return torch.utils.data.DataLoader(rows, batch_size=batch_size, shuffle=shuffle)


def accuracy(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
    return {"accuracy": float((predictions == references).mean()), "count": len(references)}


# --------------------------------------------------------------------------------------------
# Q/K/V recorder, parameter groups, student/teacher checks


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_projection_recorder_keeps_surge_linear_outputs_before_attention_quantizers(family):
    model = binarized(tiny_model(family)).eval()
    batch = torch.utils.data.default_collate(examples(2, seed=0))
    query = model.get_submodule("bert.encoder.layer.1.attention.self.query" if family == "bert"
                                else "distilbert.transformer.layer.1.attention.q_lin")
    seen = {}
    handle = query.register_forward_pre_hook(lambda module, args: seen.update(x=args[0]))
    with ProjectionRecorder(model) as recorder:
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        layers = recorder.layers()
    handle.remove()
    assert len(layers) == 2 and all(len(layer) == 3 for layer in layers)
    torch.testing.assert_close(layers[1][0], query(seen["x"]), rtol=0, atol=0)
    assert layers[1][0].unique().numel() > 2  # real-valued, not the binarized Q
    with pytest.raises(RuntimeError, match="one forward pass"):
        recorder.layers()


def test_projection_recorder_rejects_model_without_projections():
    with pytest.raises(ValueError, match="no complete query/key/value projections"):
        ProjectionRecorder(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_check_teacher_errors():
    student = tiny_model()
    with pytest.raises(ValueError, match="no teacher was given"):
        check_teacher(student, None, TrainingConfig())
    with pytest.raises(ValueError, match="a teacher was given"):
        check_teacher(student, tiny_model(), TrainingConfig(**FINE_TUNE))
    with pytest.raises(ValueError, match="same num_hidden_layers.*student has 2, teacher has 3"):
        check_teacher(student, tiny_model(num_hidden_layers=3), TrainingConfig())
    with pytest.raises(ValueError, match="same hidden_size"):
        check_teacher(student, tiny_model(hidden_size=64, intermediate_size=64), TrainingConfig())
    with pytest.raises(ValueError, match="same num_attention_heads"):
        check_teacher(student, tiny_model(num_attention_heads=4), TrainingConfig(hidden_weight=0, attention_weight=1))
    with pytest.raises(ValueError, match="same num_labels"):
        check_teacher(student, tiny_model(num_labels=3), TrainingConfig(hidden_weight=0))
    check_teacher(student, tiny_model(num_labels=3), TrainingConfig(logits_weight=0))  # hidden states only: fine


# --------------------------------------------------------------------------------------------
# The loop


def test_distillation_logs_every_loss_term_and_lambda_statistics(tmp_path):
    student = binarized(tiny_model(seed=1), estimator="surge")
    teacher = tiny_model(seed=0)
    config = TrainingConfig(batch_size=4, num_epochs=1, max_steps=3, log_every=1, checkpoint_every=100,
                            attention_weight=1.0, ground_truth_weight=0.5)
    result = train(student, loader(examples(16, seed=1)), config, teacher=teacher,
                   eval_loader=loader(examples(7, seed=2), batch_size=3, shuffle=False), metric_fn=accuracy,
                   output_dir=tmp_path, progress=False)
    assert result.steps == 3 and result.metrics["count"] == 7
    steps = [record for record in result.log_history if "loss" in record]
    assert [record["step"] for record in steps] == [1, 2, 3]
    first = steps[0]
    weighted = first["loss/logits"] + first["loss/hidden"] + first["loss/attention"] + 0.5 * first["loss/ground_truth"]
    assert first["loss"] == pytest.approx(weighted, rel=1e-5)
    lambdas = [first[f"lambda/layer_{layer}/{stat}"] for layer in (0, 1) for stat in ("min", "mean", "max")]
    assert all(value > 0 for value in lambdas) and first["lambda/layer_0/min"] <= first["lambda/layer_0/max"]
    alignments = [first[f"alignment/layer_{layer}/mean"] for layer in (0, 1)]
    assert all(-1 <= value <= 1 for value in alignments) and len(set(alignments)) == 2
    assert first["alignment/mean"] == pytest.approx(sum(alignments) / 2)
    # 3 steps, warmup ceil(0.1 * 3) = 1 step, then linear decay to 0; scales follow at their own peak.
    assert [record["lr/weights"] for record in steps] == pytest.approx([0.0, 2e-4, 1e-4])
    assert [record["lr/scales"] for record in steps] == pytest.approx([0.0, 1e-4, 5e-5])
    assert [record["lr/shifts"] for record in steps] == pytest.approx([0.0, 2e-4, 1e-4])  # BiT: the main rate
    assert [record["lr/no_decay"] for record in steps] == pytest.approx([0.0, 2e-4, 1e-4])
    assert result.log_history[-1]["eval/accuracy"] == result.metrics["accuracy"]
    on_disk = [json.loads(line) for line in (tmp_path / "log_history.jsonl").read_text().splitlines()]
    assert on_disk == result.log_history
    assert [path.name for path in list_checkpoints(tmp_path)] == ["step_3"]


def test_training_progress_drives_ede(tmp_path):
    student = binarized(tiny_model(), estimator="ede", binarize_attention=False)
    config = TrainingConfig(batch_size=4, num_epochs=2, log_every=1, **FINE_TUNE)
    train(student, loader(examples(8, seed=1)), config, output_dir=tmp_path, progress=False)
    surrogate = next(iter(surge_nlp.surge_linears(student).values())).input_quantizer.surrogate
    assert surrogate.progress == pytest.approx(3 / 4)  # set before each of the 4 steps: 0, 1/4, 2/4, 3/4


def test_fine_tuning_without_teacher_learns(tmp_path):
    train_rows, eval_rows = examples(32, seed=3), examples(16, seed=4)
    model = tiny_model(hidden_dropout_prob=0.0)
    before = evaluate(model, loader(train_rows, shuffle=False), accuracy)
    config = TrainingConfig(learning_rate=3e-3, batch_size=8, num_epochs=5, warmup_ratio=0.0, log_every=4, **FINE_TUNE)
    result = train(model, loader(train_rows, batch_size=8), config, eval_loader=loader(eval_rows, shuffle=False),
                   metric_fn=accuracy, output_dir=tmp_path, progress=False)
    after = evaluate(model, loader(train_rows, shuffle=False), accuracy)
    assert after["loss"] < 0.8 * before["loss"]
    assert result.steps == 20 and set(result.metrics) == {"loss", "accuracy", "count"}


def test_regression_head_distils_with_mse(tmp_path):
    teacher, student = tiny_model(num_labels=1), binarized(tiny_model(seed=1, num_labels=1))
    config = TrainingConfig(batch_size=4, num_epochs=1, log_every=1, hidden_weight=0.0, ground_truth_weight=1.0)
    rows = examples(8, seed=5, regression=True)
    result = train(student, loader(rows), config, teacher=teacher, eval_loader=loader(rows, shuffle=False),
                   output_dir=tmp_path, progress=False)
    first = result.log_history[0]
    logits, labels = predict(student, loader(rows, shuffle=False))
    assert logits.shape == (8, 1) and labels.dtype == np.float32
    assert first["loss"] == pytest.approx(first["loss/logits"] + first["loss/ground_truth"], rel=1e-5)
    assert result.metrics["loss"] == pytest.approx(float(np.mean((logits[:, 0] - labels) ** 2)), rel=1e-5)


def test_train_rejects_mismatched_batch_size_and_missing_labels(tmp_path):
    rows = examples(8, seed=0)
    with pytest.raises(ValueError, match="batch_size=4 differs from TrainingConfig.batch_size=16"):
        train(tiny_model(), loader(rows), TrainingConfig(**FINE_TUNE), output_dir=tmp_path)
    unlabeled = [{key: value for key, value in row.items() if key != "labels"} for row in rows]
    with pytest.raises(ValueError, match="needs a 'labels' entry"):
        train(tiny_model(), loader(unlabeled), TrainingConfig(batch_size=4, **FINE_TUNE), output_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# Resume: a killed run, resumed, ends exactly where an uninterrupted run ends


class Killed(Exception):
    pass


def resume_setup():
    config = TrainingConfig(learning_rate=1e-3, batch_size=2, gradient_accumulation_steps=2, num_epochs=2,
                            log_every=1, checkpoint_every=2, keep_checkpoints=2, ground_truth_weight=0.5)
    # 7 micro-batches per epoch: 4 optimizer steps, the last one of a single micro-batch; 8 steps.
    return config, examples(14, seed=6), examples(5, seed=7)


def run_resume_case(output_dir: Path, resume: bool = False, kill_at: int | None = None):
    config, train_rows, eval_rows = resume_setup()
    student = binarized(tiny_model(seed=1), estimator="surge")  # activation scales calibrate lazily
    teacher = tiny_model(seed=0)

    def kill(record):
        if record.get("step") == kill_at:
            raise Killed

    result = train(student, loader(train_rows, batch_size=2), config, teacher=teacher,
                   eval_loader=loader(eval_rows, shuffle=False), metric_fn=accuracy, output_dir=output_dir,
                   resume=resume, progress=False, on_log=kill)
    return student, result


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("uninterrupted")
    model, result = run_resume_case(output_dir)
    return output_dir, model.state_dict(), result


# Killed in step 5 (resumes at an epoch boundary, from step 4) or in step 7 (mid-epoch, from step 6).
@pytest.mark.parametrize("kill_at", [5, 7])
def test_killed_run_resumes_to_identical_parameters_and_metrics(tmp_path, uninterrupted, kill_at):
    reference_dir, expected_state, expected = uninterrupted
    assert expected.steps == 8
    assert [path.name for path in list_checkpoints(reference_dir)] == ["step_6", "step_8"]

    run = tmp_path / "killed"
    with pytest.raises(Killed):
        run_resume_case(run, kill_at=kill_at)
    last = kill_at - 1
    assert [path.name for path in list_checkpoints(run)] == [f"step_{last - 2}", f"step_{last}"]
    assert not list((run / "checkpoints").glob("*.tmp"))
    saved_wall = read_trainer_state(run / "checkpoints" / f"step_{last}")["wall_time_s"]
    resumed, result = run_resume_case(run, resume=True)

    # The wall time covers both calls: the first call's seconds up to its last checkpoint, and this call's.
    assert saved_wall > 0 and result.total_wall_time_s == pytest.approx(saved_wall + result.wall_time_s, abs=0.05)
    assert expected.total_wall_time_s == pytest.approx(expected.wall_time_s, abs=0.05)  # one call: the same
    assert result.steps == 8
    assert result.metrics == expected.metrics
    assert result.log_history == expected.log_history
    assert (run / "log_history.jsonl").read_text() == (reference_dir / "log_history.jsonl").read_text()
    resumed_state = resumed.state_dict()
    assert expected_state.keys() == resumed_state.keys()
    for name, tensor in expected_state.items():
        torch.testing.assert_close(resumed_state[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_resume_guards(tmp_path):
    config, train_rows, _ = resume_setup()
    config = TrainingConfig(**{**config.to_dict(), "num_epochs": 1, "max_steps": 2})
    # resume=True without a checkpoint starts afresh.
    first = train(tiny_model(), loader(train_rows, batch_size=2), config, teacher=tiny_model(), output_dir=tmp_path,
                  resume=True, progress=False)
    assert first.steps == 2
    with pytest.raises(FileExistsError, match="pass resume=True"):
        train(tiny_model(), loader(train_rows, batch_size=2), config, teacher=tiny_model(), output_dir=tmp_path)
    changed = TrainingConfig(**{**config.to_dict(), "learning_rate": 5e-3})
    with pytest.raises(ValueError, match=r"differs from the run .* in \['learning_rate'\]"):
        train(tiny_model(), loader(train_rows, batch_size=2), changed, teacher=tiny_model(), output_dir=tmp_path, resume=True)
    # Resuming a finished run does no more steps and reports the same history.
    again = train(tiny_model(), loader(train_rows, batch_size=2), config, teacher=tiny_model(), output_dir=tmp_path,
                  resume=True, progress=False)
    assert again.steps == 2 and [record["step"] for record in again.log_history] == [1, 2]
    # Another training set: the saved position (epoch, batches done) would name other batches, or
    # skip them all and spin forever when it is past the new epoch's end (before, nothing checked it).
    # A checkpoint from before the data record, whose position lies past this run's epoch: refused, not an endless loop.
    state_path = list_checkpoints(tmp_path)[-1] / "trainer_state.json"
    saved = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**{k: v for k, v in saved.items() if k != "data"}, "step": 0, "batches_in_epoch": 2}))
    with pytest.raises(ValueError, match=r"cannot resume: the checkpoint has done 2 batches of its epoch, but this run's epoch has 2"):
        train(tiny_model(), loader(train_rows[:4], batch_size=2), config, teacher=tiny_model(), output_dir=tmp_path, resume=True,
              progress=False)
    state_path.write_text(json.dumps(saved))
    for rows in (train_rows[:4], train_rows + train_rows[:2]):
        with pytest.raises(ValueError, match=r"cannot resume from .*step_2: the training data differs from the run's "
                                             r"\(examples 14 in the checkpoint, \d+ now, batches_per_epoch 7 in the checkpoint, \d+ now\)"):
            train(tiny_model(), loader(rows, batch_size=2), config, teacher=tiny_model(), output_dir=tmp_path, resume=True,
                  progress=False)


# --------------------------------------------------------------------------------------------
# Several processes: `accelerate launch` with 2 CPU processes (gloo), bf16 autocast


HELPER = REPO / "tests" / "helpers" / "ddp_train.py"


def test_two_process_accelerate_launch_agrees_across_ranks(tmp_path):
    # CPU only (gloo), also on a machine with a GPU.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(HELPER), str(tmp_path), "--mixed-precision", "bf16"]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank_{rank}.json").read_text()) for rank in (0, 1)]
    assert all(rank["world_size"] == 2 and rank["steps"] == 3 and rank["device"] == "cpu" for rank in ranks)
    assert ranks[0]["digest"] == ranks[1]["digest"]  # both replicas hold the same parameters
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    assert ranks[0]["metrics"]["count"] == 7  # gathered without the sampler's padding duplicates
    checkpoint = list_checkpoints(tmp_path / "run")[-1]
    assert {path.name for path in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_on_gpu(tmp_path, precision):
    # A process of its own: accelerate fixes the mixed precision once per process.
    completed = subprocess.run([sys.executable, str(HELPER), str(tmp_path), "--mixed-precision", precision],
                               env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=240)
    assert completed.returncode == 0, completed.stderr[-4000:]
    report = json.loads((tmp_path / "rank_0.json").read_text())
    assert report["device"].startswith("cuda") and report["steps"] == 3
    losses = [record[key] for record in report["log_history"] for key in record if key.startswith("loss")]
    assert losses and all(math.isfinite(value) for value in losses)
    assert 0.0 <= report["metrics"]["accuracy"] <= 1.0 and report["metrics"]["count"] == 7
