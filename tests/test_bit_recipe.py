"""BiT's ingredients (issue 10): ReLU FFN with an unsigned FFN-output quantizer, the weight scale's
two backward variants, shift/scale parameter groups, shifts carried across multi-step stages,
evaluation while training with best-checkpoint selection, per-task profile settings, and the
`cpu-full` protocol end to end on a tiny slice of real data."""

from __future__ import annotations

import collections
import json
import os
import re
import sys

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file
from torch import nn

import surge_nlp
from surge_nlp import SurgeConfig
from surge_nlp.binarizers import ActivationQuantizer, binarize_weight
from surge_nlp.distill import TrainingConfig, train
from surge_nlp.distill.checkpoints import is_improvement
from surge_nlp.distill.setup import parameter_groups
from surge_nlp.families import ffn_output_names
from surge_nlp.layers import SurgeLinear
from surge_nlp.pipeline import inherit_weights
from surge_nlp.recipe import RecipeError, load_recipe

from .conftest import REPO, fixed_batch, save_tiny, tiny_config

FFN_PATHS = {"bert": ("bert.encoder.layer.{}", "intermediate.intermediate_act_fn", "output.dense"),
             "roberta": ("roberta.encoder.layer.{}", "intermediate.intermediate_act_fn", "output.dense"),
             "distilbert": ("distilbert.transformer.layer.{}", "ffn.activation", "ffn.lin2")}


def tiny_model(family: str = "bert", **surge):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family))
    return surge_nlp.binarize(model, SurgeConfig(**surge))


# --------------------------------------------------------------------------------------------
# 1a. BiT's FFN


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_relu_ffn_swaps_the_activation_and_makes_only_the_ffn_output_input_unsigned(family):
    model = tiny_model(family, ffn_activation="relu")
    layer_path, activation, output = FFN_PATHS[family]
    for index in range(2):
        layer = model.get_submodule(layer_path.format(index))
        assert type(layer.get_submodule(activation)) is nn.ReLU
    unsigned = {name for name, m in model.named_modules() if isinstance(m, SurgeLinear) and not m.input_quantizer.signed}
    assert unsigned == {f"{layer_path.format(i)}.{output}" for i in range(2)} == ffn_output_names(model)
    # The default keeps the checkpoint's activation and every input signed.
    default = tiny_model(family)
    assert type(default.get_submodule(f"{layer_path.format(0)}.{activation}")) is not nn.ReLU
    assert all(m.input_quantizer.signed for m in default.modules() if isinstance(m, SurgeLinear))


def test_unsigned_ffn_output_quantizer_takes_bits_values_and_initial_scale():
    model = tiny_model("bert", ffn_activation="relu").train()
    dense = model.bert.encoder.layer[0].output.dense
    seen = {}
    dense.input_quantizer.register_forward_hook(lambda module, args, out: seen.update(x=args[0].detach(), y=out.detach()))
    model(**{k: v for k, v in fixed_batch().items() if k != "labels"})
    x, y = seen["x"], seen["y"]
    assert (x >= 0).all()  # post-ReLU
    alpha = float(dense.input_quantizer.alpha.detach())
    assert alpha == pytest.approx(4 * float(x.abs().mean()), rel=1e-5)  # beta starts at 0
    expected = alpha * torch.round(torch.clamp(x / alpha, 0, 1))
    assert torch.equal(y, expected)
    assert torch.unique(y).tolist() == [0.0, pytest.approx(alpha)]
    # Both levels occur: the threshold (alpha / 2 = 2 mean|x|) splits the post-ReLU values.
    assert 0 < int((y > 0).sum()) < y.numel()


def test_unsigned_quantizer_gradient_passes_inside_the_clip_range_only():
    quantizer = ActivationQuantizer(1, signed=False, surrogate=surge_nlp.surrogates.ClippedSTE(), shift_shape=(4,))
    with torch.no_grad():
        quantizer.alpha.fill_(2.0)
        quantizer.initialized.fill_(True)
    x = torch.tensor([[-1.0, 0.5, 1.5, 3.0]], requires_grad=True)
    quantizer(x).sum().backward()
    # u = x / 2 in [0, 1] for the middle two: straight-through there, zero where clipped.
    assert x.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]


@pytest.mark.parametrize("activation_bits", [1, 2])
def test_relu_student_packs_reloads_and_deploys_exactly(tmp_path, activation_bits):
    from transformers import AutoModelForSequenceClassification

    path = save_tiny(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(
        path, quantization_config=SurgeConfig(ffn_activation="relu", activation_bits=activation_bits, embedding_bits=1))
    batch = {k: v for k, v in fixed_batch().items() if k != "labels"}
    model.train()
    model(**batch)  # calibrates
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ActivationQuantizer):
                module.beta.normal_(0, 0.05)  # trained shifts, away from exact ties
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
    model.save_pretrained(tmp_path / "packed")
    packed = AutoModelForSequenceClassification.from_pretrained(tmp_path / "packed").eval()
    assert not packed.bert.encoder.layer[1].output.dense.input_quantizer.signed
    assert type(packed.bert.encoder.layer[1].intermediate.intermediate_act_fn) is nn.ReLU
    with torch.no_grad():
        assert torch.equal(packed(**batch).logits, reference)
    from surge_nlp.kernels import ops

    if not ops.available():
        pytest.skip(f"kernels unavailable: {ops.unavailable_reason()}")
    deployed = surge_nlp.deploy(packed)
    if activation_bits == 1:
        layer = deployed.bert.encoder.layer[1].output.dense
        assert layer.engine == "and-popcount" and not layer.input_quantizer.signed
    with torch.no_grad():
        assert torch.allclose(deployed(**batch).logits, reference, atol=1e-4)


# --------------------------------------------------------------------------------------------
# The attention-probability quantizer: BiT's (shift fixed at 0, fixed initial scale) as options


def test_probability_quantizer_default_learns_its_shift_and_takes_its_scale_from_the_padded_batch(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(save_tiny(tmp_path), quantization_config=SurgeConfig())
    batch = {k: v for k, v in fixed_batch().items() if k != "labels"}
    surge_nlp.calibrate(model, batch)
    probs = model.bert.encoder.layer[0].attention.self.surge_attention.probs
    assert isinstance(probs.beta, nn.Parameter)
    # softmax rows sum to 1: 4 * mean(p) = 4 / the padded length, whatever the mask
    assert probs.alpha.item() == pytest.approx(4 / batch["input_ids"].shape[1])


def test_bit_probability_quantizer_fixes_shift_and_initial_scale_and_round_trips(tmp_path):
    from transformers import AutoModelForSequenceClassification

    config = SurgeConfig(attention_probability_shift="zero", attention_probability_scale=4 / 128)
    model = AutoModelForSequenceClassification.from_pretrained(save_tiny(tmp_path), quantization_config=config)
    batch = {k: v for k, v in fixed_batch().items() if k != "labels"}
    surge_nlp.calibrate(model, batch)
    quantizers = [layer.attention.self.surge_attention for layer in model.bert.encoder.layer]
    assert all(q.probs.alpha.item() == pytest.approx(0.03125) and not isinstance(q.probs.beta, nn.Parameter) for q in quantizers)
    assert all(q.query.beta.requires_grad and q.query.alpha.item() != pytest.approx(0.03125) for q in quantizers)
    # the frozen shift is in no optimizer group; the other shifts are
    groups = {g["name"]: {id(p) for p in g["params"]} for g in parameter_groups(model, TrainingConfig())}
    assert all(id(q.probs.beta) not in set().union(*groups.values()) for q in quantizers)
    assert all(id(q.query.beta) in groups["shifts"] and id(q.probs.alpha) in groups["scales"] for q in quantizers)
    # one training step moves the probability scale but not its shift
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, TrainingConfig()))
    model(**batch).logits.sum().backward()
    optimizer.step()
    assert all(q.probs.beta.abs().max() == 0 and q.probs.alpha.item() != pytest.approx(0.03125) for q in quantizers)
    # reset (a stage that changes bits) goes back to the fixed scale, not the batch's
    quantizers[0].probs.reset_parameters()
    surge_nlp.calibrate(model, batch)
    assert quantizers[0].probs.alpha.item() == pytest.approx(0.03125)
    # packed checkpoint: the config and the fixed shift come back
    model.eval()
    with torch.no_grad():
        reference = model(**batch).logits
    model.save_pretrained(tmp_path / "packed")
    packed = AutoModelForSequenceClassification.from_pretrained(tmp_path / "packed").eval()
    reloaded = packed.bert.encoder.layer[0].attention.self.surge_attention.probs
    assert not isinstance(reloaded.beta, nn.Parameter) and reloaded.initial_scale == pytest.approx(0.03125)
    with torch.no_grad():
        assert torch.equal(packed(**batch).logits, reference)
    from surge_nlp.kernels import ops

    if not ops.available():
        pytest.skip(f"kernels unavailable: {ops.unavailable_reason()}")
    with torch.no_grad():
        assert torch.allclose(surge_nlp.deploy(packed)(**batch).logits, reference, atol=1e-4)


@pytest.mark.parametrize("kwargs, message", [
    ({"attention_probability_shift": "frozen"}, "allowed values: 'learned', 'zero'"),
    ({"attention_probability_scale": 0}, "attention_probability_scale=0 is invalid"),
    ({"attention_probability_scale": True}, "attention_probability_scale=True is invalid"),
    ({"attention_probability_scale": 0.03, "binarize_attention": False}, "only apply with binarize_attention=True"),
    ({"attention_probability_shift": "zero", "binarize_attention": False}, "only apply with binarize_attention=True"),
])
def test_probability_quantizer_options_are_validated(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SurgeConfig(**kwargs)


def test_relu_on_a_family_without_a_known_ffn_names_the_model_type():
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(tiny_config("bert"))
    for layer in model.bert.encoder.layer:
        del layer.intermediate  # an FFN laid out some other way
    model.config.model_type = "mystery"
    with pytest.raises(ValueError, match=r"model type 'mystery'.*ffn_activation='gelu'"):
        surge_nlp.binarize(model, SurgeConfig(ffn_activation="relu"))


@pytest.mark.parametrize("field,value", [("ffn_activation", "silu"), ("weight_scale_gradient", "none")])
def test_new_config_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=rf"SurgeConfig.{field}='{value}' is invalid; allowed values"):
        SurgeConfig(**{field: value})


# --------------------------------------------------------------------------------------------
# 1b. The weight scale's backward


def _independent_weight_gradient(weight: torch.Tensor, upstream: torch.Tensor, through: bool) -> torch.Tensor:
    # Written out by hand: out = alpha * s, s = sign(c), c = W - mean_row(W), STE ds/dc = 1,
    # alpha = mean_row|c|, d alpha / dc = s / n; then dW = P(dc), P = row centring.
    n = weight.shape[-1]
    centred = weight - weight.mean(-1, keepdim=True)
    signs = torch.where(centred >= 0, 1.0, -1.0)
    alpha = centred.abs().mean(-1, keepdim=True)
    grad_c = alpha * upstream
    if through:
        grad_c = grad_c + signs * (signs * upstream).sum(-1, keepdim=True) / n
    return grad_c - grad_c.mean(-1, keepdim=True)


@pytest.mark.parametrize("variant", ["through", "detached"])
def test_weight_binarizer_gradient_matches_the_hand_derivation(variant):
    torch.manual_seed(1)
    weight = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(5, 7, dtype=torch.float64)
    out = binarize_weight(weight, variant)
    (out * upstream).sum().backward()
    expected = _independent_weight_gradient(weight.detach(), upstream, through=variant == "through")
    assert torch.allclose(weight.grad, expected, atol=1e-12)
    # The forward value does not depend on the variant.
    assert torch.equal(binarize_weight(weight.detach(), "through"), binarize_weight(weight.detach(), "detached"))


def test_the_two_weight_gradients_differ_by_the_scale_term():
    torch.manual_seed(2)
    weight = torch.randn(3, 16, requires_grad=True)
    upstream = torch.randn(3, 16)
    grads = {}
    for variant in ("through", "detached"):
        weight.grad = None
        (binarize_weight(weight, variant) * upstream).sum().backward()
        grads[variant] = weight.grad.clone()
    # With random upstream gradients the extra term is as large as the straight-through one.
    extra = (grads["through"] - grads["detached"]).norm() / grads["detached"].norm()
    assert 0.2 < float(extra) < 5


def test_surge_linear_and_embedding_follow_weight_scale_gradient():
    model = tiny_model("bert", weight_scale_gradient="detached", embedding_bits=1)
    linears = [m for m in model.modules() if isinstance(m, SurgeLinear)]
    assert linears and all(m.weight_scale_gradient == "detached" for m in linears)
    assert model.bert.embeddings.word_embeddings.weight_scale_gradient == "detached"
    layer = linears[0]
    x = torch.randn(4, layer.in_features)
    layer.eval()
    layer.weight.grad = None
    (layer(x) ** 2).sum().backward()
    got = layer.weight.grad.clone()
    reference = layer.weight.detach().clone().requires_grad_(True)
    q = layer.input_quantizer(x).detach()
    (F.linear(q, binarize_weight(reference, "detached"), layer.bias.detach()) ** 2).sum().backward()
    assert torch.allclose(got, reference.grad, atol=1e-6)


# --------------------------------------------------------------------------------------------
# 1c. Parameter groups


def test_parameter_groups_put_scales_and_shifts_in_their_own_groups():
    model = tiny_model("bert", ffn_activation="relu")
    names = {id(p): n for n, p in model.named_parameters()}
    config = TrainingConfig(learning_rate=5e-4, scale_learning_rate=1e-4, weight_decay=0.01)
    groups = {g["name"]: g for g in parameter_groups(model, config)}
    assert set(groups) == {"weights", "no_decay", "scales", "shifts"}
    scales = {names[id(p)] for p in groups["scales"]["params"]}
    shifts = {names[id(p)] for p in groups["shifts"]["params"]}
    quantizers = [n for n, m in model.named_modules() if isinstance(m, ActivationQuantizer)]
    assert scales == {f"{n}.alpha" for n in quantizers} and shifts == {f"{n}.beta" for n in quantizers}
    assert len(quantizers) == 2 * 6 + 2 * 4  # six linears and four attention quantizers per layer
    assert (groups["scales"]["lr"], groups["scales"]["weight_decay"]) == (1e-4, 0.0)
    assert (groups["shifts"]["lr"], groups["shifts"]["weight_decay"]) == (5e-4, 0.0)  # BiT: the main rate
    assert groups["weights"]["weight_decay"] == 0.01
    weights = {names[id(p)] for p in groups["weights"]["params"]}
    assert all(p.ndim == 2 for p in groups["weights"]["params"]) and not weights & (scales | shifts)
    every = [id(p) for g in groups.values() for p in g["params"]]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter exactly once
    slow = {g["name"]: g for g in parameter_groups(model, TrainingConfig(learning_rate=5e-4, shift_learning_rate=2e-5))}
    assert slow["shifts"]["lr"] == 2e-5


@pytest.mark.parametrize("field,value", [("shift_learning_rate", 0), ("eval_every", 0), ("eval_every", "step"),
                                         ("keep_best", "yes")])
def test_new_training_fields_are_validated(field, value):
    with pytest.raises(ValueError, match=rf"TrainingConfig.{field}=.* is invalid; allowed values"):
        TrainingConfig(**{field: value})


# --------------------------------------------------------------------------------------------
# 1d. Multi-step keeps the learned shifts


def _calibrated(model, seed: int):
    model.train()
    model(**{k: v for k, v in fixed_batch().items() if k != "labels"})
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for module in model.modules():
            if isinstance(module, ActivationQuantizer):
                module.beta.copy_(torch.randn(module.beta.shape, generator=g) * 0.1)
                module.alpha.mul_(1.5)
    return model


@pytest.mark.parametrize("keep_shifts", [True, False])
def test_a_stage_that_changes_bits_keeps_beta_and_recalibrates_alpha(keep_shifts):
    previous = _calibrated(tiny_model("bert", activation_bits=2), seed=0)
    student = tiny_model("bert", activation_bits=1)
    inherit_weights(student, previous, keep_shifts=keep_shifts)
    old = dict(previous.named_modules())
    quantizers = [(n, m) for n, m in student.named_modules() if isinstance(m, ActivationQuantizer)]
    assert quantizers
    for name, quantizer in quantizers:
        assert not bool(quantizer.initialized)  # alpha re-calibrates on the first batch
        expected = old[name].beta if keep_shifts else torch.zeros_like(quantizer.beta)
        assert torch.equal(quantizer.beta, expected), name
    # The recalibration measures around the kept shift: alpha = 2 mean|x - beta| at 1 bit.
    dense = student.bert.encoder.layer[0].attention.self.query
    seen = {}
    dense.input_quantizer.register_forward_pre_hook(lambda module, args: seen.update(x=args[0].detach().clone()))
    student.train()(**{k: v for k, v in fixed_batch().items() if k != "labels"})
    beta = dense.input_quantizer.beta.detach()
    assert float(dense.input_quantizer.alpha.detach()) == pytest.approx(2 * float((seen["x"] - beta).abs().mean()), rel=1e-5)


def test_a_stage_at_the_same_bits_keeps_scales_and_shifts():
    previous = _calibrated(tiny_model("bert", activation_bits=1), seed=1)
    student = tiny_model("bert", activation_bits=1)
    inherit_weights(student, previous)
    for (name, q), (_, p) in zip(*(([(n, m) for n, m in model.named_modules() if isinstance(m, ActivationQuantizer)])
                                    for model in (student, previous))):
        assert bool(q.initialized) and torch.equal(q.alpha, p.alpha) and torch.equal(q.beta, p.beta), name


def test_keep_shifts_is_a_validated_stage_key(tmp_path):
    recipe = {"task": "rte", "model": "m", "stages": [{"quantization": {}, "keep_shifts": "no"}]}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(RecipeError, match="keep_shifts` must be true or false"):
        load_recipe(str(path))
    recipe["stages"][0]["keep_shifts"] = False
    path.write_text(yaml.safe_dump(recipe))
    assert load_recipe(str(path)).stages[0].keep_shifts is False


# --------------------------------------------------------------------------------------------
# 1e. Evaluation while training, best checkpoint


def _toy_run(tmp_path, series, keep_best=True, best_metric="score", eval_every=2, num_epochs=3, resume=False,
             on_log=None, progress=False, **kwargs):
    """Train a tiny student whose evaluations report `series` in order; returns the result and a
    snapshot of the weights taken at every evaluation."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_config("bert"))
    data = [{k: v[i] for k, v in fixed_batch(16, seed=3).items()} for i in range(16)]
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    eval_loader = torch.utils.data.DataLoader(data[:8], batch_size=8)
    values = iter(series)
    snapshots = []

    def metric_fn(predictions, references):
        snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {"score": next(values)}

    config = TrainingConfig(logits_weight=0, hidden_weight=0, ground_truth_weight=1, batch_size=4, num_epochs=num_epochs,
                            learning_rate=1e-2, eval_every=eval_every, keep_best=keep_best, log_every=1, **kwargs)
    result = train(model, loader, config, output_dir=tmp_path / "run", progress=progress, eval_loader=eval_loader,
                   metric_fn=metric_fn, best_metric=best_metric, resume=resume, on_log=on_log)
    return model, result, snapshots


def test_best_checkpoint_is_the_best_of_a_known_metric_series(tmp_path):
    series = [0.30, 0.55, 0.52, 0.71, 0.60, 0.70]  # 12 steps, evaluated every 2
    model, result, snapshots = _toy_run(tmp_path, series)
    assert [r["step"] for r in result.eval_history] == [2, 4, 6, 8, 10, 12]
    assert [r["score"] for r in result.eval_history] == series
    assert result.best_step == 8 and result.selected == "best" and result.metrics["score"] == 0.71
    best = snapshots[series.index(0.71)]
    assert all(torch.equal(model.state_dict()[k], best[k]) for k in best)
    assert not torch.equal(model.state_dict()["classifier.weight"], snapshots[-1]["classifier.weight"])
    # Only the best weights stay on disk.
    assert sorted(p.name for p in (tmp_path / "run" / "best").iterdir()) == ["step_8.safetensors"]


def test_the_progress_bar_keeps_the_latest_dev_metric_beside_the_loss(tmp_path, capsys):
    _toy_run(tmp_path, [0.30, 0.55, 0.52, 0.71, 0.60, 0.70], progress=True)
    final = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    # Step 12 logs a loss after its evaluation: the dev metric must survive the loss update.
    assert "12/12" in final and "loss=" in final and "eval score=0.7000" in final


def test_keep_best_false_ends_with_the_last_weights(tmp_path):
    series = [0.9, 0.1, 0.2, 0.3, 0.4, 0.5]
    model, result, snapshots = _toy_run(tmp_path, series, keep_best=False)
    assert result.best_step is None and result.selected == "last" and result.metrics["score"] == 0.5
    assert all(torch.equal(model.state_dict()[k], snapshots[-1][k]) for k in snapshots[-1])


def test_epoch_evaluation_and_loss_selection(tmp_path):
    # 4 steps per epoch; "loss" is lower-is-better.
    _, result, _ = _toy_run(tmp_path, [0.0] * 3, best_metric=None, eval_every="epoch")
    assert [r["step"] for r in result.eval_history] == [4, 8, 12]
    losses = [r["loss"] for r in result.eval_history]
    assert result.best_step == result.eval_history[losses.index(min(losses))]["step"]
    assert is_improvement(0.4, 0.5, "loss") and not is_improvement(0.5, 0.5, "accuracy")
    assert is_improvement(0.6, 0.5, "accuracy") and is_improvement(1.0, None, "accuracy")
    # A NaN evaluation (diverged student, NaN predictions) never wins and never locks the selection.
    nan = float("nan")
    assert is_improvement(0.1, nan, "accuracy") and is_improvement(9.0, nan, "loss")
    assert not is_improvement(nan, 0.5, "accuracy") and not is_improvement(nan, 0.5, "loss")
    assert not is_improvement(nan, None, "accuracy")


class Killed(Exception):
    pass


def kill_at_step_7(record):
    """An `on_log` that stops a toy run as a kill would, after step 7's loss is logged."""
    if record.get("step") == 7 and "loss" in record:
        raise Killed


def test_best_selection_survives_a_resume(tmp_path):
    series = [0.30, 0.80, 0.52, 0.71, 0.60, 0.70]  # best at step 4, before the interruption
    straight_model, straight, _ = _toy_run(tmp_path / "a", series, checkpoint_every=2)

    with pytest.raises(Killed):
        _toy_run(tmp_path / "b", series, checkpoint_every=2, on_log=kill_at_step_7)
    # Resumed from step 6: evaluations 8, 10, 12 remain.
    resumed_model, resumed, _ = _toy_run(tmp_path / "b", series[3:], checkpoint_every=2, resume=True)
    assert straight.best_step == resumed.best_step == 4
    assert resumed.metrics == straight.metrics
    assert [r["step"] for r in resumed.eval_history] == [2, 4, 6, 8, 10, 12]
    reference = straight_model.state_dict()
    assert all(torch.equal(tensor, reference[key]) for key, tensor in resumed_model.state_dict().items())


def test_a_run_killed_between_a_new_best_and_its_checkpoint_keeps_the_older_best(tmp_path):
    # Evaluations every 2 steps, checkpoints every 4: the best moves from step 4 to step 6 after the
    # step-4 checkpoint, and the run is killed at step 7. Resumed from step 4 (best: step 4), the
    # re-evaluation at step 6 need not repeat 0.9 (another machine, another process count); here it
    # does not, so the step-4 weights must still be on disk.
    with pytest.raises(Killed):
        _toy_run(tmp_path, [0.3, 0.5, 0.9], checkpoint_every=4, on_log=kill_at_step_7)
    best_dir = tmp_path / "run" / "best"
    assert sorted(p.name for p in best_dir.iterdir()) == ["step_4.safetensors", "step_6.safetensors"]
    weights_at_step_4 = load_file(best_dir / "step_4.safetensors")
    model, result, _ = _toy_run(tmp_path, [0.1, 0.1, 0.1, 0.1], checkpoint_every=4, resume=True)
    assert result.best_step == 4 and result.metrics["score"] == 0.5
    assert all(torch.equal(model.state_dict()[key], tensor) for key, tensor in weights_at_step_4.items())
    # The last checkpoint (step 12) and the one before (step 8) both name step 4: nothing else stays.
    assert sorted(p.name for p in best_dir.iterdir()) == ["step_4.safetensors"]


@pytest.mark.parametrize("damage, message", [
    (lambda path: path.write_text('{"step": 4'), "trainer_state.json is unreadable"),
    (lambda path: path.write_text('{"step": 4}'), "trainer_state.json lacks ['epoch', 'batches_in_epoch', 'scheduler', 'log_history']"),
    (lambda path: path.unlink(), "trainer_state.json is unreadable"),
])
def test_resuming_from_a_damaged_checkpoint_names_it(tmp_path, damage, message):
    _toy_run(tmp_path, [0.3, 0.5, 0.9, 0.1, 0.1, 0.1], checkpoint_every=4)
    damage(tmp_path / "run" / "checkpoints" / "step_12" / "trainer_state.json")
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        _toy_run(tmp_path, [0.1], checkpoint_every=4, resume=True)
    assert "step_12" in str(err.value)


def test_eval_every_without_an_eval_loader_is_an_error(tmp_path):
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification(tiny_config("bert"))
    data = [{k: v[i] for k, v in fixed_batch(4).items()} for i in range(4)]
    config = TrainingConfig(logits_weight=0, hidden_weight=0, ground_truth_weight=1, batch_size=4, eval_every=1)
    with pytest.raises(ValueError, match="eval_every=1 needs an eval_loader"):
        train(model, torch.utils.data.DataLoader(data, batch_size=4), config, output_dir=tmp_path, progress=False)


def test_an_unknown_best_metric_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"best_metric='f1' is not among the evaluation's metrics \['loss', 'score'\]"):
        _toy_run(tmp_path, [0.1] * 6, best_metric="f1")


# --------------------------------------------------------------------------------------------
# Profiles with per-task settings, and cpu-full


def test_profile_task_sections_apply_to_their_task_only(tmp_path):
    cola, stsb, rte = (load_recipe(task, profiles=["cpu-full"]) for task in ("cola", "stsb", "rte"))
    assert (cola.teacher.batch_size, cola.teacher.learning_rate) == (32, 3e-5)
    assert (stsb.teacher.batch_size, stsb.teacher.learning_rate) == (16, 5e-5)
    assert (rte.teacher.batch_size, rte.teacher.learning_rate, rte.teacher.num_epochs) == (16, 3e-5, 4)
    sst2 = load_recipe("sst2", profiles=["cpu-full"])
    assert sst2.teacher.num_epochs == 1 and sst2.stages[0].training.max_steps == 3750
    for recipe in (cola, stsb, rte, sst2):
        assert recipe.max_train_samples is None and recipe.max_eval_samples is None and recipe.max_seq_length is None
        stage = recipe.stages[0]
        assert stage.quantization.bits_label == "1-1-1" and stage.quantization.binarize_attention
        assert stage.quantization.ffn_activation == "relu" and stage.quantization.weight_scale_gradient == "detached"
        assert stage.training.eval_every in ("epoch", 750) and stage.training.keep_best


@pytest.mark.parametrize("tasks,message", [({"stsbb": {}}, "unknown GLUE task 'stsbb'"),
                                           ({"stsb": 3}, "must be a mapping of settings"),
                                           ([1], "must map task names to settings")])
def test_profile_task_sections_are_validated(tmp_path, tasks, message):
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"tasks": tasks}))
    with pytest.raises(RecipeError, match=message):
        load_recipe("stsb", profiles=[str(profile)])


def test_cpu_full_runs_end_to_end_on_a_tiny_slice(tmp_path, minilm_path, glue_mirror, monkeypatch, capsys):
    """The shipped profile as is, on the real MiniLM and real STS-B, cut to a few examples."""
    from surge_nlp.cli import main

    monkeypatch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))
    args = ["glue", "stsb", "--profile", "cpu-full", "--output", str(tmp_path / "out"),
            "--max-train-samples", "32", "--max-eval-samples", "16", "--set", "teacher.num_epochs=1",
            "--set", "distill.num_epochs=2"]
    assert main(args) == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    stage = results["stages"][0]
    assert stage["bits"] == "1-1-1" and stage["steps"] == 4 and stage["selected"] == "best"
    assert [r["step"] for r in stage["eval_history"]] == [2, 4]
    best = max(stage["eval_history"], key=lambda r: r["combined_score"])
    assert stage["best_step"] == best["step"]
    assert stage["metrics"]["validation"]["combined_score"] == pytest.approx(best["combined_score"], abs=1e-6)
    # the dev curve carries every metric the table reports (Pearson, not only the selection's combined score)
    assert all({"pearson", "spearmanr", "combined_score", "loss"} <= set(r) for r in stage["eval_history"])
    assert stage["metrics"]["validation"]["pearson"] == pytest.approx(best["pearson"], abs=1e-6)
    student_config = json.loads((tmp_path / "out" / "student" / "config.json").read_text())
    config = student_config["quantization_config"]
    assert config["ffn_activation"] == "relu" and config["checkpoint_format"] == "packed"
    assert student_config["problem_type"] == "regression" and student_config["id2label"] == {"0": "similarity"}
    assert "student w1e1a1" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# The ladder runner


@pytest.fixture
def ladder_module():
    sys.path.insert(0, str(REPO / "recipes"))
    try:
        import benchmark_ladder

        yield benchmark_ladder
    finally:
        sys.path.remove(str(REPO / "recipes"))


def test_shipped_ladder_has_the_issue_rows(ladder_module):
    ladder = ladder_module.load_ladder(REPO / "recipes" / "ladder.yaml")
    rows = ladder["rows"]
    assert {"w1a1", "w1a1_fp_embeddings", "w1a2", "w1a4", "w1a1_multistep"} <= set(rows)
    bits = {name: [s.quantization.activation_bits for s in ladder_module.row_recipe(ladder, name, "stsb").stages] for name in rows}
    assert bits["w1a1"] == [1] and bits["w1a2"] == [2] and bits["w1a4"] == [4] and bits["w1a1_multistep"] == [2, 1]
    # multi-step trains as long as one step on every task: half the epochs each, or half SST-2's step cap
    for task in ("stsb", "cola", "sst2"):
        one_step = ladder_module.row_recipe(ladder, "w1a1", task).stages[0].training
        chain = [s.training for s in ladder_module.row_recipe(ladder, "w1a1_multistep", task).stages]
        if task == "sst2":
            assert one_step.max_steps == 3750 and [(t.max_steps, t.num_epochs) for t in chain] == [(1875, 1), (1875, 1)]
        else:
            assert one_step.max_steps is None and [(t.max_steps, t.num_epochs) for t in chain] == [(None, 4), (None, 4)]
    ablations = {name: ladder_module.row_recipe(ladder, name, "mrpc") for name in rows if name.startswith("ablation_")}
    on = ablations["ablation_all_on"].stages[0]
    # each ablation differs from all-on in exactly its ingredient; all share the 1-epoch, 64-token, FP-embedding protocol
    differs = {name: {f for f in ("ffn_activation", "weight_scale_gradient") if getattr(r.stages[-1].quantization, f) != getattr(on.quantization, f)}
               | ({"shift_lr"} if r.stages[-1].training.shift_lr != on.training.shift_lr else set()) for name, r in ablations.items()}
    assert differs == {"ablation_all_on": set(), "ablation_gelu_ffn": {"ffn_activation"}, "ablation_scale_through": {"weight_scale_gradient"},
                       "ablation_shift_at_scale_lr": {"shift_lr"}, "ablation_all_off": {"ffn_activation", "weight_scale_gradient", "shift_lr"},
                       "ablation_multistep": set(), "ablation_multistep_reset_shifts": set(), "ablation_one_step_two_epochs": set()}
    assert (on.quantization.ffn_activation, on.quantization.weight_scale_gradient) == ("relu", "detached")
    assert ablations["ablation_shift_at_scale_lr"].stages[0].training.shift_lr == 1e-4
    assert [s.keep_shifts for s in ablations["ablation_multistep"].stages] == [True, True]
    assert ablations["ablation_multistep_reset_shifts"].stages[1].keep_shifts is False
    # the multi-step control: the same two epochs as ablation_multistep's two stages, one step at W1A1
    control = ablations.pop("ablation_one_step_two_epochs")
    assert [s.training.num_epochs for s in control.stages] == [2] and control.stages[0].quantization == on.quantization
    assert ladder_module.row_tasks(ladder, "ablation_one_step_two_epochs") == ["stsb"]
    for r in ablations.values():
        assert r.max_seq_length == 64 and all(s.quantization.embedding_bits == 32 and s.training.num_epochs == 1 for s in r.stages)
    assert all(ladder_module.row_tasks(ladder, name) == ["stsb", "mrpc"] for name in ablations)
    # the ablation table pairs each ablation with the row it switches one ingredient off in
    probes = ("probe_fp_attention", "probe_a2", "probe_attention_loss", "probe_logits_only", "probe_lr1e3",
              "probe_probs_zero_shift", "probe_probs_bit_scale", "probe_probs_bit", "probe_hidden_only", "probe_no_clip",
              "probe_surge", "probe_surge_eta01")
    assert {a["row"]: a["against"] for a in ladder["ablations"]} == {
        "ablation_gelu_ffn": "ablation_all_on", "ablation_scale_through": "ablation_all_on",
        "ablation_shift_at_scale_lr": "ablation_all_on", "ablation_all_off": "ablation_all_on",
        "ablation_multistep_reset_shifts": "ablation_multistep", "ablation_one_step_two_epochs": "ablation_multistep", **{probe: "ablation_all_on" for probe in probes}}
    assert ladder_module.ablation_rows(ladder) == set(ablations) | set(probes) | {"ablation_one_step_two_epochs"}
    # each STS-B probe changes exactly one setting of the all-on protocol
    on_stsb = ladder_module.row_recipe(ladder, "ablation_all_on", "stsb").stages[0]
    changed = {}
    for probe in probes:
        stage = ladder_module.row_recipe(ladder, probe, "stsb").stages[0]
        assert ladder_module.row_tasks(ladder, probe) == ["stsb"]
        changed[probe] = {f"quantization.{k}" for k, v in stage.quantization.to_dict().items() if v != on_stsb.quantization.to_dict()[k]} | \
                         {f"training.{k}" for k, v in stage.training.to_dict().items() if v != on_stsb.training.to_dict()[k]}
    assert changed == {"probe_fp_attention": {"quantization.binarize_attention"}, "probe_a2": {"quantization.activation_bits"},
                       "probe_attention_loss": {"training.attention_weight"}, "probe_logits_only": {"training.hidden_weight"},
                       "probe_lr1e3": {"training.learning_rate"},
                       "probe_probs_zero_shift": {"quantization.attention_probability_shift"},
                       "probe_probs_bit_scale": {"quantization.attention_probability_scale"},
                       "probe_probs_bit": {"quantization.attention_probability_shift", "quantization.attention_probability_scale"},
                       "probe_hidden_only": {"training.logits_weight"}, "probe_no_clip": {"training.max_grad_norm"},
                       "probe_surge": {"quantization.estimator"}, "probe_surge_eta01": {"quantization.estimator", "quantization.eta"}}
    assert ladder_module.row_recipe(ladder, "probe_probs_bit", "stsb").stages[0].quantization.attention_probability_scale == 4 / 128
    assert ladder_module.row_recipe(ladder, "probe_no_clip", "stsb").stages[0].training.max_grad_norm is None
    augmented = ladder_module.row_recipe(ladder, "w1a1_augmented", "stsb")
    assert augmented.augmentation.copies == 7 and augmented.stages[0].training.num_epochs == 1
    assert augmented.stages[0].quantization == ladder_module.row_recipe(ladder, "w1a1", "stsb").stages[0].quantization
    # w1a1_other_tasks: w1a1's student over STS-B + MRPC inputs, capped at w1a1's 2,880 steps (8 x 360)
    transfer = ladder_module.row_recipe(ladder, "w1a1_other_tasks", "stsb")
    assert transfer.augmentation.other_tasks == ("mrpc",) and transfer.augmentation.copies == 0
    assert transfer.stages[0].training.max_steps == 8 * 360 and transfer.stages[0].training.eval_every == 360
    assert transfer.stages[0].quantization == ladder_module.row_recipe(ladder, "w1a1", "stsb").stages[0].quantization
    # w1a1_bit_schedule: w1a1's student at BiT's STS-B schedule (batch 8, 20 epochs), evaluated every epoch
    bit_schedule = ladder_module.row_recipe(ladder, "w1a1_bit_schedule", "stsb").stages[0]
    assert (bit_schedule.training.batch_size, bit_schedule.training.num_epochs, bit_schedule.training.eval_every) == (8, 20, "epoch")
    assert bit_schedule.quantization == ladder_module.row_recipe(ladder, "w1a1", "stsb").stages[0].quantization
    assert ladder_module.row_tasks(ladder, "w1a1_bit_schedule") == ["stsb"]
    assert ladder_module.row_recipe(ladder, "w1a1", "stsb").max_seq_length is None  # the task's own length (128)
    w1a1 = ladder_module.row_recipe(ladder, "w1a1", "stsb").stages[0]
    assert w1a1.training.shift_lr == w1a1.training.learning_rate and w1a1.quantization.embedding_bits == 1


def test_run_ladder_sh_names_only_rows_of_the_ladder(ladder_module, tmp_path):
    # Run the script with a `python` that records its arguments: every `run` it asks for must name
    # rows the ladder has (benchmark_ladder refuses others, and `set -e` would stop the grid there).
    import shlex
    import subprocess

    log = tmp_path / "calls.txt"
    shim = tmp_path / "bin" / "python"
    shim.parent.mkdir()
    shim.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim.parent}:{os.environ['PATH']}"}
    subprocess.run(["bash", str(REPO / "recipes" / "run_ladder.sh"), "out", "teachers"], cwd=REPO, env=env, check=True)
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    rows = set(ladder_module.load_ladder(REPO / "recipes" / "ladder.yaml")["rows"])
    runs = [call for call in calls if call[1] == "run"]
    named = [call[i + 1] for call in runs for i, arg in enumerate(call) if arg == "--row"]
    assert named and set(named) <= rows
    assert any("--row" not in call and "--task" not in call for call in runs)  # the last run covers every row
    assert [call[1] for call in calls[-2:]] == ["baseline", "table"]
    assert all(call[call.index("--output") + 1] == "out" for call in runs)


@pytest.mark.parametrize("content,message", [
    ({"rows": {"x": {"bits": 1}}}, "row 'x' must be a mapping with keys among"),
    ({"rows": {"x": {"tasks": ["nope"]}}}, "unknown GLUE task 'nope'"),
    ({"rows": {"x": {"quantization": {"activation_bits": 3}}}}, "activation_bits=3 is invalid"),
    ({"rows": {"x": {"stages": []}}}, "must be a non-empty list"),
    ({"rows": {"x": {"recipe": {"stages": []}}}}, "stages go in rows.x.stages"),
    ({"rows": {"x": {}}, "ablations": [{"row": "x", "against": "y", "off": "1a"}]}, r"ablations\[0\].against='y' is not a row"),
    ({"rows": {"x": {}}, "ablations": [{"row": "x"}]}, r"ablations\[0\] must be a mapping with keys"),
    ({"rows": {"x": {"recipe": {"max_seq_length": "long"}}}}, "max_seq_length"),
    ({"profiles": ["nope"], "rows": {"x": {}}}, "no profile named 'nope'"),
    ({"profiles": ["cpu-full"], "tasks": ["stsb"], "rows": {"x": {"stages": [{}, {"share": 0.3}]}}},
     r"rows.x.stages\[1\].share=0.3 gives stsb 2.4 num epochs of 8; allowed: a share that leaves a whole number"),
    ({"rows": {"x": {"stages": [{"share": 1.5}]}}}, r"rows.x.stages\[0\].share=1.5 is invalid; allowed: a fraction in \(0, 1\]"),
    ({"rows": {"x": {"stages": [{"share": "half"}]}}}, r"share='half' is invalid"),
    ({"rows": {"x": {"stages": [{"share": 0.5, "training": {"num_epochs": 2}}]}}},
     r"rows.x.stages\[0\].share takes a share of the one-step schedule; the stage also sets num_epochs"),
])
def test_ladder_file_errors_name_the_field(ladder_module, tmp_path, content, message):
    path = tmp_path / "ladder.yaml"
    path.write_text(yaml.safe_dump(content))
    with pytest.raises((ladder_module.LadderError, RecipeError), match=message):
        ladder_module.load_ladder(path)


@pytest.mark.parametrize("argv, message", [
    (["table", "--row", "w1a1"], "--row do(es) not apply to table"),
    (["table", "--task", "rte", "--seed", "7"], "--task and --seed do(es) not apply to table"),
    (["collect", "--seed", "7", "--into", "x"], "--seed do(es) not apply to collect"),
    (["baseline", "--row", "w1a1"], "--row do(es) not apply to baseline"),
    (["run", "--row", "nope"], "--row 'nope' is not in"),
])
def test_ladder_refuses_filters_its_action_would_ignore(ladder_module, tmp_path, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        ladder_module.main([*argv, "--output", str(tmp_path / "out"), "--teachers", str(tmp_path / "teachers")])
    assert message in str(exit_info.value.code)
    assert not (tmp_path / "out").exists() and not (tmp_path / "teachers").exists()


def test_ladder_runs_resumably_and_tabulates(ladder_module, tmp_path, minilm_path, glue_mirror, monkeypatch, capsys):
    from transformers import AutoTokenizer, BertConfig, BertModel

    monkeypatch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))
    base = tmp_path / "tiny"
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    profile = tmp_path / "tiny-profile.yaml"
    profile.write_text(yaml.safe_dump({"model": str(base), "max_train_samples": 24, "max_eval_samples": 16,
                                       "teacher": {"num_epochs": 1, "batch_size": 8},
                                       "distill": {"num_epochs": 2, "batch_size": 8, "learning_rate": 1e-3}}))
    ladder = tmp_path / "ladder.yaml"
    ladder.write_text(yaml.safe_dump({"profiles": ["cpu-full", str(profile)], "tasks": ["rte"],
                                      "rows": {"w1a1": {}, "w1a1_multistep": {"stages": [
                                          {"quantization": {"activation_bits": 2}, "training": {"num_epochs": 1}},
                                          {"training": {"num_epochs": 1}}]}}}))
    argv = ["--ladder", str(ladder), "--output", str(tmp_path / "runs"), "--teachers", str(tmp_path / "teachers")]
    ladder_module.main(["run", *argv])
    out = capsys.readouterr().out
    assert "w1a1 rte: accuracy=" in out and "w1a1_multistep rte: accuracy=" in out
    first = json.loads((tmp_path / "runs" / "w1a1" / "rte" / "results.json").read_text())
    ladder_module.main(["run", *argv, "--row", "w1a1"])  # finished: not redone
    assert json.loads((tmp_path / "runs" / "w1a1" / "rte" / "results.json").read_text()) == first
    # diagnose_fit on the finished run: its inference-mode dev accuracy is the run's own.
    import diagnose_fit

    fit = diagnose_fit.main(["--run", str(tmp_path / "runs" / "w1a1" / "rte"), "--teacher", str(tmp_path / "teachers" / "rte" / "teacher"),
                             "--row", "w1a1", "--task", "rte", "--ladder", str(ladder), "--json", str(tmp_path / "fit.json")])
    written = json.loads((tmp_path / "fit.json").read_text())
    assert written["fit"] == fit and written["source"]["run"] == str(tmp_path / "runs" / "w1a1" / "rte")
    assert (written["source"]["row"], written["source"]["task"], written["source"]["examples"]) == ("w1a1", "rte", 600)
    assert fit["dev/eval"]["accuracy"] == pytest.approx(first["stages"][-1]["metrics"]["validation"]["accuracy"])
    assert set(fit) == {f"{split}/{mode}" for split in ("train", "dev") for mode in diagnose_fit.MODES}
    # the training forward without dropout binarizes the same values up to float near-ties (16 examples)
    assert abs(fit["dev/eval"]["accuracy"] - fit["dev/eval+grad"]["accuracy"]) <= 1 / 16
    assert all(0 <= values["agreement_teacher"] <= 1 and 0 < values["majority_share"] <= 1 for values in fit.values())
    table_json = tmp_path / "table.json"
    ladder_module.main(["table", *argv, "--json", str(table_json)])
    table = json.loads(table_json.read_text())
    teacher_metrics = json.loads((tmp_path / "teachers" / "rte" / "teacher" / "teacher_metrics.json").read_text())
    assert table["teacher"] == {"rte": pytest.approx(100 * teacher_metrics["metrics"]["validation"]["accuracy"])}
    rows = {row["name"]: row for row in table["rows"]}
    assert rows["w1a1"]["bits"] == "1-1-1" and rows["w1a1"]["activation_bits"] == 1 and not rows["w1a1"]["multistep"]
    assert rows["w1a1"]["metrics"]["rte"] == pytest.approx(100 * first["stages"][-1]["metrics"]["validation"]["accuracy"])
    assert rows["w1a1_multistep"]["multistep"] and rows["w1a1_multistep"]["stages"] == ["w1e1a2", "w1e1a1"]
    # the selection-free number: the last evaluation in the final stage's log, at its last step
    final = first["stages"][-1]
    log = tmp_path / "runs" / "w1a1" / "rte" / "stages" / final["name"] / "log_history.jsonl"
    evals = [r for r in map(json.loads, log.read_text().splitlines()) if "eval/accuracy" in r]
    assert evals[-1]["step"] == final["steps"] and len(evals) == 2  # eval_every: epoch, 2 epochs
    assert rows["w1a1"]["metrics_last"]["rte"] == pytest.approx(100 * evals[-1]["eval/accuracy"])
    assert rows["w1a1"]["wall_s"]["rte"] > 0 and "--row w1a1 --task rte" in rows["w1a1"]["command"]["rte"]
    # run.json: one call per `run` that worked on it (the second `run` found it finished and added none)
    calls = json.loads((tmp_path / "runs" / "w1a1" / "rte" / "run.json").read_text())["calls"]
    assert [(call["row"], call["task"], call["seed"], call["cwd"]) for call in calls] == [("w1a1", "rte", None, os.getcwd())]
    assert rows["w1a1"]["command"]["rte"] == calls[0]["command"] and f"--output {tmp_path / 'runs'}" in calls[0]["command"]
    commit = ladder_module.checkout_commit()
    assert calls[0]["commit"] == commit and rows["w1a1"]["commit"]["rte"] == ([commit] if commit else [])
    # the majority-class floor, written beside the teacher by `run`: the training set's most frequent label
    splits = datasets.load_dataset(str(glue_mirror), "rte")
    majority = collections.Counter(splits["train"]["label"]).most_common(1)[0][0]
    floor = 100 * float(np.mean(np.asarray(splits["validation"]["label"]) == majority))
    assert table["majority_class"] == {"rte": pytest.approx(floor)}
    out = capsys.readouterr().out
    assert "| w1a1 | 1-1-1 |" in out and f"| majority class | - | {floor:.1f} |" in out
    ladder_module.main(["table", *argv, "--plot", str(tmp_path / "ladder.png")])
    assert (tmp_path / "ladder.png").stat().st_size > 5000
    # collect: the record of each finished run (no models) in the same layout, which the table reads alike
    collected = tmp_path / "collected"
    ladder_module.main(["collect", *argv, "--into", str(collected), "--row", "w1a1_multistep"])
    assert "collected" in capsys.readouterr().out and [p.name for p in collected.iterdir()] == ["w1a1_multistep"]
    ladder_module.main(["collect", *argv, "--into", str(collected)])
    files = {str(p.relative_to(collected / "w1a1_multistep" / "rte")) for p in (collected / "w1a1_multistep" / "rte").rglob("*")}
    assert {"results.json", "wall.json", "run.json", "log_history_w1e1a2.jsonl", "log_history_w1e1a1.jsonl",
            "plots/w1e1a2_loss.png", "plots/w1e1a1_loss.png"} <= files
    assert not any(name.endswith(".safetensors") or name.startswith(("student", "stages")) or ".tmp" in name for name in files)
    source = tmp_path / "runs" / "w1a1_multistep" / "rte" / "stages" / "w1e1a2" / "log_history.jsonl"
    assert (collected / "w1a1_multistep" / "rte" / "log_history_w1e1a2.jsonl").read_bytes() == source.read_bytes()
    ladder_module.main(["table", *argv, "--json", str(table_json)])
    ladder_module.main(["table", *argv[:2], "--output", str(collected), *argv[4:], "--json", str(tmp_path / "collected.json")])
    assert json.loads((tmp_path / "collected.json").read_text()) == json.loads(table_json.read_text())
    with pytest.raises(SystemExit, match="collect needs --into"):
        ladder_module.main(["collect", *argv])
    with pytest.raises(SystemExit, match="--row 'nope' is not in"):
        ladder_module.main(["collect", *argv, "--into", str(collected), "--row", "nope"])
    # A repeat with another seed: its own folder, its recipe's seed, averaged into the row.
    ladder_module.main(["run", *argv, "--row", "w1a1", "--seed", "7"])
    repeat = json.loads((tmp_path / "runs" / "w1a1@seed7" / "rte" / "results.json").read_text())
    assert repeat["stages"][-1]["seed"] == 7 and first["stages"][-1]["seed"] == 42
    ladder_module.main(["table", *argv, "--json", str(table_json)])
    row = {row["name"]: row for row in json.loads(table_json.read_text())["rows"]}["w1a1"]
    values = {int(seed): value for seed, value in row["metrics_by_seed"]["rte"].items()}
    assert values == {42: pytest.approx(100 * first["stages"][-1]["metrics"]["validation"]["accuracy"]),
                      7: pytest.approx(100 * repeat["stages"][-1]["metrics"]["validation"]["accuracy"])}
    assert row["metrics"]["rte"] == pytest.approx(sum(values.values()) / 2) and row["seed"] == [7, 42]
    assert "--seed 7" in row["command"]["rte"]


def test_wall_clock_counts_a_call_while_it_runs_and_appends_to_earlier_calls(ladder_module, tmp_path):
    import time

    path = tmp_path / "wall.json"
    path.write_text("[12.5]")
    with ladder_module.WallClock(path, heartbeat_s=0.05):
        assert json.loads(path.read_text())[0] == 12.5 and len(json.loads(path.read_text())) == 2
        time.sleep(0.4)
        # a process killed here would leave this on disk: the earlier call and this one up to its last beat
        during = json.loads(path.read_text())
        assert during[0] == 12.5 and during[1] >= 0.1
    after = json.loads(path.read_text())
    assert after[0] == 12.5 and after[1] >= 0.4


def test_wall_clock_records_a_call_that_fails(ladder_module, tmp_path):
    path = tmp_path / "wall.json"
    with pytest.raises(RuntimeError), ladder_module.WallClock(path, heartbeat_s=10):
        raise RuntimeError("interrupted")
    assert len(json.loads(path.read_text())) == 1


def test_table_takes_the_recorded_command_and_falls_back_for_older_runs(ladder_module, tmp_path):
    run_dir = tmp_path / "w1a1" / "rte"
    run_dir.mkdir(parents=True)
    fallback = ladder_module.command("w1a1", "rte", tmp_path, tmp_path / "teachers")
    assert ladder_module.provenance_calls(run_dir) == []
    assert ladder_module.recorded_command(ladder_module.provenance_calls(run_dir), fallback) == fallback
    (run_dir / "run.json").write_text(json.dumps({"calls": [{"command": "first", "commit": "a"}, {"command": "second", "commit": "b"}]}))
    assert ladder_module.recorded_command(ladder_module.provenance_calls(run_dir), fallback) == "second"


# --------------------------------------------------------------------------------------------
# Calibration is an explicit step; an uncalibrated forward never calls a collective


def test_calibrate_initialises_every_quantizer_once_in_eval_mode():
    model = tiny_model("bert", ffn_activation="relu").train()
    inputs = {k: v for k, v in fixed_batch().items() if k != "labels"}
    count = sum(isinstance(m, ActivationQuantizer) for m in model.modules())
    assert surge_nlp.calibrate(model, inputs) == count and model.training  # mode restored
    scales = [float(m.alpha.detach()) for m in model.modules() if isinstance(m, ActivationQuantizer)]
    assert surge_nlp.calibrate(model, inputs) == 0
    assert scales == [float(m.alpha.detach()) for m in model.modules() if isinstance(m, ActivationQuantizer)]
    assert not any(m.collective_calibration for m in model.modules() if isinstance(m, ActivationQuantizer))


def test_an_uncalibrated_forward_on_one_of_several_processes_warns_instead_of_hanging(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        quantizer = ActivationQuantizer(1, signed=True, surrogate=surge_nlp.surrogates.ClippedSTE())
        calls = []
        original = dist.get_world_size
        dist.get_world_size = lambda *a, **k: 2  # as if a second process existed that never runs this forward
        original_all_reduce = dist.all_reduce
        dist.all_reduce = lambda *a, **k: calls.append("all_reduce")
        try:
            with pytest.warns(RuntimeWarning, match="calibrated on this process alone"):
                quantizer(torch.randn(4, 3))
            assert calls == [] and bool(quantizer.initialized)
            other = ActivationQuantizer(1, signed=True, surrogate=surge_nlp.surrogates.ClippedSTE())
            other.collective_calibration = True
            other(torch.randn(4, 3))
            assert calls == ["all_reduce"]
        finally:
            dist.get_world_size, dist.all_reduce = original, original_all_reduce
    finally:
        dist.destroy_process_group()


def test_ablation_table_is_each_row_minus_its_reference(ladder_module):
    ladder = {"ablations": [{"row": "off", "against": "on", "off": "1b"}, {"row": "missing", "against": "on", "off": "1c"}]}
    result = {"rows": [{"name": "on", "metrics": {"stsb": 10.5, "mrpc": 80.0}, "wall_s": {}},
                       {"name": "off", "metrics": {"stsb": 9.2}, "wall_s": {"stsb": 711.0}}]}
    first, second = ladder_module.ablation_table(ladder, result)
    assert first["delta"] == {"stsb": pytest.approx(-1.3)} and first["reference"] == {"stsb": 10.5}  # only paired tasks
    assert second["delta"] == {} and second["metrics"] == {}  # not run yet: an empty row, not a made-up number
    # Repeats: paired by seed, a seed that only one side ran is left out of both means.
    result["rows"][0]["metrics_by_seed"] = {"stsb": {42: 10.5, 2: 12.0, 3: 11.0}}
    result["rows"][1]["metrics_by_seed"] = {"stsb": {42: 9.2, 2: 9.0}}
    (paired, _) = ladder_module.ablation_table(ladder, result)
    assert paired["delta_by_seed"]["stsb"] == {42: pytest.approx(-1.3), 2: pytest.approx(-3.0)}
    assert paired["delta"]["stsb"] == pytest.approx(-2.15) and paired["reference"]["stsb"] == pytest.approx(11.25)
    text = ladder_module.ablation_markdown([first, second], ["stsb", "mrpc"], {"stsb": "pearson", "mrpc": "f1"})
    assert "| 1b | on | 9.2 / 10.5 (-1.3) |  |" in text and "| 1c | on |  |  |" in text


def test_ablation_is_paired_with_its_reference_at_the_same_commit_where_there_is_one(ladder_module):
    ladder = {"ablations": [{"row": "probe", "against": "on", "off": "p"}, {"row": "old", "against": "on", "off": "o"},
                            {"row": "later", "against": "on", "off": "l"}]}
    on = {"name": "on", "metrics": {"stsb": 10.5}, "metrics_by_seed": {"stsb": {42: 10.5}}, "commit_by_seed": {"stsb": {42: None}},
          "reruns": {"stsb": [{"seed": 42, "commit": "aaa", "value": 9.6}, {"seed": 42, "commit": "bbb", "value": 9.0},
                              {"seed": 2, "commit": "aaa", "value": 8.0}]}, "wall_s": {}}

    def row(name, value, commit):
        return {"name": name, "metrics": {"stsb": value}, "metrics_by_seed": {"stsb": {42: value}},
                "commit_by_seed": {"stsb": {42: commit}}, "wall_s": {}}

    probe, old, later = ladder_module.ablation_table(ladder, {"rows": [on, row("probe", 11.3, "bbb"), row("old", 8.1, None),
                                                                       row("later", 8.8, "ccc")]})
    # the rerun at the probe's own commit, not the row's run (10.5) nor the first rerun (9.6)
    assert probe["reference"] == {"stsb": 9.0} and probe["delta"]["stsb"] == pytest.approx(2.3)
    assert probe["commits_by_seed"] == {"stsb": {42: ["bbb", "bbb"]}}
    # no commit known, or none of the reference's at that commit: the reference's own run of the seed, said so
    assert old["reference"] == {"stsb": 10.5} and old["commits_by_seed"] == {"stsb": {42: [None, None]}}
    assert later["reference"] == {"stsb": 10.5} and later["commits_by_seed"] == {"stsb": {42: ["ccc", None]}}
    text = ladder_module.ablation_markdown([probe, old, later], ["stsb"], {"stsb": "pearson"})
    assert "| p | on | 11.3 / 9.0 (+2.3) | bbb / bbb |" in text
    assert "| o | on | 8.1 / 10.5 (-2.4) | ? / ? |" in text and "| l | on | 8.8 / 10.5 (-1.7) | ccc / ? |" in text


def test_reruns_take_their_commit_from_run_json_and_stay_out_of_the_row(ladder_module, tmp_path):
    def finished(run_dir, value, seed, commits):
        run_dir.mkdir(parents=True)
        (run_dir / "results.json").write_text(json.dumps({"stages": [{"seed": seed, "metrics": {"validation": {"pearson": value}}}]}))
        if commits is not None:
            (run_dir / "run.json").write_text(json.dumps({"calls": [{"command": "c", "commit": c} for c in commits]}))

    finished(tmp_path / "aaa" / "on" / "stsb", 0.096, 42, ["aaa"])
    finished(tmp_path / "aaa" / "on@seed2" / "stsb", 0.08, 2, ["aaa"])
    finished(tmp_path / "named-bbb" / "on" / "stsb", 0.09, 42, ["bbb", "ccc"])  # resumed at another commit: mixed
    finished(tmp_path / "ddd" / "on" / "stsb", 0.07, 42, None)  # no run.json: the folder's name is not evidence
    found = ladder_module.reruns_of(tmp_path, "on", "stsb")
    assert [(r["seed"], r["commit"], round(r["value"], 6)) for r in found] == [(42, "aaa", 9.6), (2, "aaa", 8.0),
                                                                               (42, None, 7.0), (42, None, 9.0)]
    assert ladder_module.reruns_of(tmp_path, "off", "stsb") == [] and ladder_module.reruns_of(None, "on", "stsb") == []
    assert ladder_module.run_commit([]) is None and ladder_module.run_commit([{"commit": "a"}, {"commit": "a"}]) == "a"


def test_row_folder_names_parse_back_to_row_and_seed(ladder_module, tmp_path):
    for row, seed in [("w1a1", None), ("w1a1", 7), ("w1a1_multistep", 0), ("w1a1", -1)]:
        assert ladder_module.row_and_seed(ladder_module.run_dir_of(tmp_path, row, "stsb", seed).parent.name) == (row, seed)
    for folder in ["on", "on@seed3", "on@seedx", "on@seed²", "on_more@seed4"]:  # malformed seeds and another row are not repeats of "on"
        (tmp_path / folder / "stsb").mkdir(parents=True)
        (tmp_path / folder / "stsb" / "results.json").write_text("{}")
    assert [seed for seed, _ in ladder_module.seeds_run(tmp_path, "on", "stsb")] == [None, 3]


def test_ladder_runner_docstring_examples_run(ladder_module):
    # pytest collects doctests under surge_nlp/ only; the recipes' runner is checked here
    import doctest

    outcome = doctest.testmod(ladder_module)
    assert outcome.attempted > 0 and outcome.failed == 0


def test_last_eval_value_reads_the_final_evaluation_not_the_kept_best(ladder_module, tmp_path):
    stage = {"name": "w1e1a1", "steps": 30, "selected": "best", "best_step": 10,
             "metrics": {"validation": {"accuracy": 0.6, "f1": 0.8}}}
    records = [{"step": 5, "loss": 1.0}, {"step": 10, "eval/f1": 0.8, "eval/accuracy": 0.6},
               {"step": 30, "eval/f1": 0.7, "eval/accuracy": 0.55}]
    run = tmp_path / "run"
    (run / "stages" / "w1e1a1").mkdir(parents=True)
    (run / "stages" / "w1e1a1" / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert ladder_module.last_eval_value(run, stage, "mrpc") == pytest.approx(70.0)  # MRPC reports F1
    assert ladder_module.last_eval_value(run, stage, "rte") == pytest.approx(55.0)
    collected = tmp_path / "collected"  # the layout `collect` writes
    collected.mkdir()
    (collected / "log_history_w1e1a1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert ladder_module.last_eval_value(collected, stage, "mrpc") == pytest.approx(70.0)
    # a log whose last evaluation is not at the stage's last step says nothing; the kept best is not the last
    (collected / "log_history_w1e1a1.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:2]))
    assert ladder_module.last_eval_value(collected, stage, "mrpc") is None
    assert ladder_module.last_eval_value(tmp_path / "none", stage, "mrpc") is None
    assert ladder_module.last_eval_value(tmp_path / "none", {**stage, "selected": "last"}, "mrpc") == pytest.approx(80.0)
    # a teacher's record has no stage name: its own eval_history answers, no stage log is looked for
    teacher = {"steps": 30, "selected": "best", "best_step": 10, "metrics": {"validation": {"f1": 0.8}},
               "eval_history": [{"step": 10, "f1": 0.8}, {"step": 30, "f1": 0.75}]}
    assert ladder_module.last_eval_value(run, teacher, "mrpc") == pytest.approx(75.0)
    assert ladder_module.last_eval_value(run, {**teacher, "eval_history": []}, "mrpc") is None
    # a stage that selected on held-out training rows logged those, not dev: dev at its last step is unknown
    assert ladder_module.last_eval_value(run, {**stage, "selected_on": "held_out_train"}, "mrpc") is None
    assert ladder_module.last_eval_value(run, {**stage, "selected_on": "validation"}, "mrpc") == pytest.approx(70.0)
    assert ladder_module.last_eval_value(run, {**stage, "selected_on": "held_out_train", "best_step": 30}, "mrpc") == pytest.approx(80.0)


def test_table_gives_the_average_at_the_last_eval_beside_the_kept_best(ladder_module, tmp_path):
    """Hand-made runs where the kept best is not the last evaluation: two seeds averaged, the
    markdown column, a run with no last evaluation on record marked n/a, the teacher's own cell."""
    ladder = ladder_module.load_ladder(REPO / "recipes" / "ladder.yaml")
    ladder = {**ladder, "tasks": ["rte", "mrpc"]}
    teachers, output = tmp_path / "teachers", tmp_path / "runs"
    for task, metrics in [("rte", {"accuracy": 0.56}), ("mrpc", {"f1": 0.85, "accuracy": 0.78})]:
        (teachers / task / "teacher").mkdir(parents=True)
        (teachers / task / "teacher" / "teacher_metrics.json").write_text(json.dumps(
            {"steps": 10, "selected": "last", "best_step": None, "metrics": {"validation": metrics}}))

    def finished(folder, task, best, last, logged=True, **recorded):
        run = output / folder / task
        run.mkdir(parents=True)
        key = ladder_module.reported_metric(task)
        stage = {"name": "w1e1a1", "steps": 20, "seed": 42, "bits": "1-1-1", "selected": "best", "best_step": 10,
                 "metrics": {"validation": {key: best}}, **recorded}
        (run / "results.json").write_text(json.dumps({"stages": [stage]}))
        if logged:
            (run / "log_history_w1e1a1.jsonl").write_text(
                json.dumps({"step": 10, f"eval/{key}": best}) + "\n" + json.dumps({"step": 20, f"eval/{key}": last}) + "\n")

    finished("w1a1", "rte", 0.56, 0.50)
    finished("w1a1@seed7", "rte", 0.54, 0.52)
    finished("w1a4", "rte", 0.58, 0.51)
    finished("w1a4", "mrpc", 0.84, 0.80, logged=False)
    finished("w1a1_held_out_selection", "rte", 0.57, 0.53, selected_on="held_out_train")  # its log is of held-out rows
    result = ladder_module.table(ladder, output, teachers)
    rows = {row["name"]: row for row in result["rows"]}
    assert rows["w1a1"]["selected"]["rte"][0] == "seed 42, w1e1a1: best (step 10 of 20)"
    assert rows["w1a1_held_out_selection"]["selected"]["rte"] == ["seed 42, w1e1a1: best on held-out train (step 10 of 20)"]
    assert rows["w1a1_held_out_selection"]["metrics"]["rte"] == pytest.approx(57.0)
    assert rows["w1a1_held_out_selection"]["metrics_last"]["rte"] is None
    assert rows["w1a1"]["metrics"]["rte"] == pytest.approx(55.0) and rows["w1a1"]["metrics_last"]["rte"] == pytest.approx(51.0)
    assert rows["w1a4"]["metrics_last"] == {"rte": pytest.approx(51.0), "mrpc": None}
    assert result["teacher_last"] == {"rte": pytest.approx(56.0), "mrpc": pytest.approx(85.0)}
    lines = {line.split(" | ")[0]: line.split(" | ") for line in ladder_module.markdown(result, ["rte", "mrpc"]).splitlines()}
    head = lines["| row"]
    column = head.index("avg at last eval (% of teacher)")
    assert lines["| FP teacher"][column] == "70.5 (100%)"
    assert lines["| w1a1"][column] == "(51.0 over 1) (91%)"  # RTE only: 51.0 against the teacher's 56.0
    assert lines["| w1a4"][column] == "n/a"
