"""SURGE at the attention matmuls (issue 11): `compensated_matmul` and
`SurgeConfig(compensate_attention=True)`. The forward equals the binary path bit for bit; each
operand's gradient equals `g_b + lambda * g_a`, checked against an independent computation."""

from __future__ import annotations

import copy

import pytest
import torch

import surge_nlp
from surge_nlp import SurgeConfig
from surge_nlp.binarizers import ActivationQuantizer
from surge_nlp.compensator import AGS_EPS, GradientCompensator, compensated_matmul
from surge_nlp.distill import TrainingConfig, train
from surge_nlp.surrogates import ClippedSTE

from .conftest import fixed_batch, tiny_config


def calibrated_quantizer(signed: bool, shape, sample: torch.Tensor, bits: int = 1) -> ActivationQuantizer:
    quantizer = ActivationQuantizer(bits, signed=signed, surrogate=ClippedSTE(), shift_shape=shape)
    with torch.no_grad():
        quantizer(sample)  # calibrates alpha
        quantizer.beta.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
    return quantizer


def independent_gradients(a, b, quantize_a, quantize_b, upstream, scale, transpose_b):
    """g_b by autograd through the plain binary product; g_a of the FP product written out."""
    a_, b_ = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    qb = quantize_b(b_)
    y = torch.matmul(quantize_a(a_), qb.transpose(-1, -2) if transpose_b else qb) * scale
    (y * upstream).sum().backward()
    b_fp = b.detach().transpose(-1, -2) if transpose_b else b.detach()
    g_aux_a = scale * upstream @ b_fp.transpose(-1, -2)
    g_aux_b = scale * a.detach().transpose(-1, -2) @ upstream
    if transpose_b:
        g_aux_b = g_aux_b.transpose(-1, -2)
    return (a_.grad, g_aux_a), (b_.grad, g_aux_b), y.detach()


@pytest.mark.parametrize("mode", ["surge", "dpgc"])
@pytest.mark.parametrize("product", ["scores", "context"])
def test_compensated_matmul_forward_and_gradients(mode, product):
    torch.manual_seed(0)
    eta = 0.5
    if product == "scores":  # Q.K^T: both signed, per-channel shifts, b transposed after quantizing
        a, b = torch.randn(2, 2, 5, 4, dtype=torch.float64), torch.randn(2, 2, 6, 4, dtype=torch.float64)
        qa = calibrated_quantizer(True, (2, 1, 4), a).double()
        qb = calibrated_quantizer(True, (2, 1, 4), b).double()
        scale, transpose_b = 0.5, True
    else:  # P.V: unsigned probabilities times signed values
        a = torch.softmax(torch.randn(2, 2, 5, 6, dtype=torch.float64) * 3, dim=-1)
        b = torch.randn(2, 2, 6, 4, dtype=torch.float64)
        qa = calibrated_quantizer(False, (1,), a).double()
        qb = calibrated_quantizer(True, (2, 1, 4), b).double()
        scale, transpose_b = 1.0, False
    upstream = torch.randn(2, 2, 5, 6 if product == "scores" else 4, dtype=torch.float64)
    comp_a, comp_b = GradientCompensator(mode, eta), GradientCompensator(mode, eta)
    a_in, b_in = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    y = compensated_matmul(a_in, b_in, qa, qb, comp_a, comp_b, scale, transpose_b)
    (y * upstream).sum().backward()
    (g_b_a, g_aux_a), (g_b_b, g_aux_b), reference = independent_gradients(a, b, qa, qb, upstream, scale, transpose_b)
    assert torch.equal(y.detach(), reference)  # the binary product, bit for bit
    for got, g_b, g_aux, comp in ((a_in.grad, g_b_a, g_aux_a, comp_a), (b_in.grad, g_b_b, g_aux_b, comp_b)):
        lam = eta if mode == "dpgc" else eta * float(g_b.norm()) / (float(g_aux.norm()) + AGS_EPS)
        assert comp.last_lambda == pytest.approx(lam, rel=1e-6)
        assert torch.allclose(got, g_b + lam * g_aux, atol=1e-6)
        cosine = float((g_b * g_aux).sum() / (g_b.norm() * g_aux.norm()))
        assert comp.last_alignment == pytest.approx(cosine, rel=1e-5, abs=1e-7)
    assert float(g_b_a.norm()) > 0 and float(g_aux_a.norm()) > 0  # both paths are exercised


def _pair(**config):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_config("bert", attention_probs_dropout_prob=0.0, hidden_dropout_prob=0.0))
    plain = surge_nlp.binarize(copy.deepcopy(base), SurgeConfig(**config))
    compensated = surge_nlp.binarize(copy.deepcopy(base), SurgeConfig(compensate_attention=True, **config))
    return plain, compensated


def test_compensated_attention_forward_equals_the_binary_path_and_changes_the_gradients():
    plain, compensated = _pair()
    batch = {k: v for k, v in fixed_batch().items() if k != "labels"}
    outputs = {}
    for name, model in (("plain", plain), ("compensated", compensated)):
        model.train()
        out = model(**batch, output_attentions=True)
        out.logits.sum().backward()
        outputs[name] = out
    assert torch.equal(outputs["plain"].logits, outputs["compensated"].logits)
    assert all(torch.equal(p, c) for p, c in zip(outputs["plain"].attentions, outputs["compensated"].attentions))
    query_grads = [m.bert.encoder.layer[0].attention.self.query.weight.grad for m in (plain, compensated)]
    assert not torch.allclose(*query_grads)  # Q's gradient now includes lambda * g_a of Q.K^T
    quantizers = compensated.bert.encoder.layer[0].attention.self.surge_attention
    assert set(quantizers.compensators) == {"query", "key", "value", "probs"}
    assert all(c.last_lambda is not None and c.last_lambda >= 0 for c in quantizers.compensators.values())
    assert plain.bert.encoder.layer[0].attention.self.surge_attention.compensators is None


def test_compensated_attention_is_inactive_in_eval_and_saves_nothing_extra(tmp_path):
    from transformers import AutoModelForSequenceClassification

    plain, compensated = _pair()
    batch = {k: v for k, v in fixed_batch().items() if k != "labels"}
    compensated.train()(**batch)
    plain.load_state_dict(compensated.state_dict())
    assert set(plain.state_dict()) == set(compensated.state_dict())  # compensators hold no state
    compensated.eval()
    with torch.no_grad():
        reference = compensated(**batch).logits
        assert torch.equal(plain.eval()(**batch).logits, reference)
    compensated.save_pretrained(tmp_path / "packed")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "packed").eval()
    assert reloaded.config.quantization_config.compensate_attention is True
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, reference)


def test_trainer_logs_attention_lambdas(tmp_path):
    from transformers import BertForSequenceClassification

    _, student = _pair(estimator="surge")
    torch.manual_seed(1)
    teacher = BertForSequenceClassification(tiny_config("bert"))
    data = [{k: v[i] for k, v in fixed_batch(8, seed=2).items()} for i in range(8)]
    config = TrainingConfig(batch_size=4, num_epochs=1, log_every=1)
    result = train(student, torch.utils.data.DataLoader(data, batch_size=4), config, teacher=teacher,
                   output_dir=tmp_path, progress=False)
    record = result.log_history[-1]
    from surge_nlp.attention import AttentionQuantizers

    layers = [module for module in student.modules() if isinstance(module, AttentionQuantizers)]
    assert len(layers) == 2
    for layer, module in enumerate(layers):
        for operand in ("query", "key", "value", "probs"):
            # The logged values are those of the last backward (log_every=1), read from each compensator.
            compensator = module.compensators[operand]
            assert record[f"attention_lambda/layer_{layer}/{operand}"] == pytest.approx(compensator.last_lambda)
            assert 0 <= compensator.last_lambda < float("inf")
            assert record[f"attention_alignment/layer_{layer}/{operand}"] == pytest.approx(compensator.last_alignment)
            assert -1 <= compensator.last_alignment <= 1
    assert sum(record[f"attention_lambda/layer_{layer}/query"] for layer in (0, 1)) > 0  # the branch was active


@pytest.mark.parametrize("config,message", [
    ({"compensate_attention": True, "estimator": "clipped_ste"}, "compensate_attention=True is invalid"),
    ({"compensate_attention": True, "binarize_attention": False}, "compensate_attention=True is invalid"),
    ({"compensate_attention": 1}, "compensate_attention=1 is invalid"),
])
def test_compensate_attention_validation(config, message):
    with pytest.raises(ValueError, match=message):
        SurgeConfig(**config)
