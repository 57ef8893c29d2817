"""The mathematics: surrogate derivatives against their formulas, forward binarizers against
hand-computed values, and DPGC/AGS gradients against an independent autograd computation."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from surge_nlp import GradientCompensator, SurgeConfig, SurgeLinear
from surge_nlp.binarizers import ActivationQuantizer, binarize_weight, weight_signs_and_scales
from surge_nlp.surrogates import EDE, STE, ApproxSign, ClippedSTE, hard_sign, make_surrogate

U = torch.tensor([-3.0, -1.0, -0.75, -0.25, 0.0, 0.25, 0.75, 0.999, 1.0, 2.5], dtype=torch.float64)


def _autograd_derivative(surrogate, u):
    u = u.clone().requires_grad_(True)
    surrogate.sign(u).sum().backward()
    return u.grad


def _by_formula(fn, u):
    return torch.tensor([fn(float(v)) for v in u], dtype=u.dtype)


def test_sign_forward_is_strictly_binary():
    out = make_surrogate("clipped_ste").sign(U)
    assert set(out.tolist()) == {-1.0, 1.0}
    assert out[U == 0].item() == 1.0  # 0 is not a 1-bit value: sign(0) = +1
    assert torch.equal(hard_sign(U), torch.where(U >= 0, 1.0, -1.0).double())


@pytest.mark.parametrize(
    "surrogate, formula",
    [
        (STE(), lambda u: 1.0),
        (ClippedSTE(), lambda u: 1.0 if abs(u) <= 1 else 0.0),
        (ApproxSign(), lambda u: 2 + 2 * u if -1 <= u < 0 else (2 - 2 * u if 0 <= u < 1 else 0.0)),
    ],
)
def test_surrogate_derivative_matches_formula(surrogate, formula):
    expected = _by_formula(formula, U)
    assert torch.allclose(_autograd_derivative(surrogate, U), expected)
    assert torch.allclose(surrogate.derivative(U), expected)


@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_ede_derivative_and_schedule(progress):
    ede = EDE(progress)
    t = 10 ** (-1 + 2 * progress)
    k = max(1 / t, 1)
    expected = _by_formula(lambda u: k * t * (1 - math.tanh(t * u) ** 2), U)
    assert math.isclose(ede.t, t) and math.isclose(ede.k, k)
    assert torch.allclose(_autograd_derivative(ede, U), expected)


def test_ede_progress_is_validated():
    with pytest.raises(ValueError, match="allowed values: 0 <= progress <= 1"):
        EDE().set_progress(1.5)


def test_unknown_surrogate():
    with pytest.raises(ValueError, match="unknown surrogate 'tanh'; allowed values"):
        make_surrogate("tanh")


def test_binarize_weight_values_and_ste_gradient():
    w = torch.tensor([[1.0, 2.0, 6.0], [-1.0, -1.0, 2.0]], requires_grad=True)
    # row 0: mean 3, centred [-2, -1, 3], alpha 2; row 1: mean 0, centred [-1, -1, 2], alpha 4/3
    expected = torch.tensor([[-2.0, -2.0, 2.0], [-4 / 3, -4 / 3, 4 / 3]])
    out = binarize_weight(w)
    assert torch.allclose(out, expected)
    signs, scales = weight_signs_and_scales(w.detach())
    assert torch.equal(signs, torch.tensor([[False, False, True], [False, False, True]]))
    assert torch.allclose(scales, torch.tensor([2.0, 4 / 3]))
    # Independent gradient: sign() treated as identity (STE) inside alpha * sign(W - mean).
    g = torch.randn(2, 3)
    (out * g).sum().backward()
    w2 = w.detach().clone().requires_grad_(True)
    centred = w2 - w2.mean(dim=1, keepdim=True)
    alpha = centred.abs().mean(dim=1, keepdim=True)
    (alpha * (centred + (torch.sign(centred) - centred).detach()) * g).sum().backward()
    assert torch.allclose(w.grad, w2.grad)


def test_activation_binarizer_forward_and_lsq_gradients():
    q = ActivationQuantizer(bits=1, signed=True, surrogate=ClippedSTE(), shift_shape=(3,))
    x = torch.tensor([[0.5, -2.0, 0.1], [1.0, 0.2, -0.3]])
    out = q(x)  # first call calibrates alpha = 2 * mean|x|
    alpha = 2 * x.abs().mean()
    assert bool(q.initialized) and torch.allclose(q.alpha, alpha.reshape(1))
    assert torch.allclose(out, alpha * torch.where(x >= 0, 1.0, -1.0))

    with torch.no_grad():
        q.alpha.fill_(0.8)
        q.beta.copy_(torch.tensor([0.6, 0.0, -0.5]))
    x = x.clone().requires_grad_(True)
    g = torch.randn(2, 3)
    (q(x) * g).sum().backward()
    u = (x.detach() - q.beta.detach()) / 0.8
    inside = (u.abs() <= 1).float()
    grad_scale = 1 / math.sqrt(x.numel() * 1)
    assert torch.allclose(x.grad, g * inside)
    assert torch.allclose(q.beta.grad, (-g * inside).sum(0))
    expected_alpha = ((torch.where(u >= 0, 1.0, -1.0) - u * inside) * g).sum() * grad_scale
    assert torch.allclose(q.alpha.grad, expected_alpha.reshape(1), atol=1e-6)


@pytest.mark.parametrize("bits, signed, levels", [(2, True, [-2, -1, 0, 1]), (4, False, list(range(16))), (1, False, [0, 1])])
def test_multibit_and_unsigned_levels(bits, signed, levels):
    q = ActivationQuantizer(bits=bits, signed=signed, surrogate=STE())
    with torch.no_grad():
        q.alpha.fill_(0.5)
        q.initialized.fill_(True)
    x = torch.linspace(-5, 10, 301)
    out = q(x)
    assert set((out / 0.5).round().int().tolist()) == set(levels)
    assert torch.allclose(out, 0.5 * torch.round(torch.clamp(x / 0.5, min(levels), max(levels))))


def test_invalid_activation_bits():
    with pytest.raises(ValueError, match="bits=3 is invalid; allowed values: 1, 2, 4, 8"):
        ActivationQuantizer(bits=3, signed=True, surrogate=STE())


# ---- SurgeLinear: DPGC forward equality and AGS gradient -------------------------------------

def _layer(estimator, base="clipped_ste", eta=0.5, bits=1, seed=0):
    torch.manual_seed(seed)
    cfg = SurgeConfig(estimator=estimator, base_estimator=base if estimator in ("dpgc", "surge") else "clipped_ste",
                      eta=eta, activation_bits=bits, binarize_attention=bits != 32)
    layer = SurgeLinear.from_config(cfg, in_features=16, out_features=8)
    torch.nn.init.normal_(layer.weight, std=0.2)
    layer.reset_surge_state()
    with torch.no_grad():
        layer.aux_weight.add_(0.05 * torch.randn_like(layer.aux_weight)) if layer.aux_weight is not None else None
    return layer


def _twin_without_aux(layer, base):
    """The same layer with the base estimator and no auxiliary branch (the binary branch alone)."""
    twin = SurgeLinear(16, 8, activation_bits=layer.activation_bits, estimator=base)
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("aux_")}
    twin.load_state_dict(state)
    return twin


@pytest.mark.parametrize("estimator", ["dpgc", "surge"])
@pytest.mark.parametrize("base", ["clipped_ste", "approx_sign", "ede"])
def test_dpgc_forward_equals_binary_branch_exactly(estimator, base):
    layer = _layer(estimator, base)
    x = torch.randn(4, 5, 16)
    layer.train()
    y = layer(x)
    twin = _twin_without_aux(layer, base).train()
    assert torch.equal(y, twin(x))
    assert torch.equal(y, layer.binary_forward(x))


@pytest.mark.parametrize("estimator, eta", [("surge", 0.5), ("surge", 2.0), ("dpgc", 0.3)])
@pytest.mark.parametrize("bits", [1, 4, 32])
def test_input_gradient_is_g_b_plus_lambda_g_a(estimator, eta, bits):
    layer = _layer(estimator, eta=eta, bits=bits).train()
    twin = _twin_without_aux(layer, "clipped_ste").train()
    x = torch.randn(3, 7, 16, requires_grad=True)
    g_y = torch.randn(3, 7, 8)
    (layer(x) * g_y).sum().backward()

    x_b = x.detach().clone().requires_grad_(True)
    (twin(x_b) * g_y).sum().backward()
    g_b = x_b.grad
    g_a = g_y @ layer.aux_weight.detach()
    lam = eta * g_b.norm() / (g_a.norm() + 1e-8) if estimator == "surge" else torch.tensor(eta)
    assert torch.allclose(x.grad, g_b + lam * g_a, atol=1e-6)
    assert math.isclose(layer.last_lambda, float(lam), rel_tol=1e-5)
    cosine = float((g_b * g_a).sum() / (g_b.norm() * g_a.norm()))
    assert math.isclose(layer.last_alignment, cosine, rel_tol=1e-4, abs_tol=1e-6)
    # aux weight gets the ordinary gradient of f_a(x) = x W_a^T; latent weights the binary branch's.
    assert torch.allclose(layer.aux_weight.grad, g_y.reshape(-1, 8).t() @ x.detach().reshape(-1, 16), atol=1e-5)
    assert torch.allclose(layer.weight.grad, twin.weight.grad, atol=1e-6)


def test_eval_mode_skips_auxiliary_branch():
    layer = _layer("surge").eval()
    x = torch.randn(2, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.aux_weight.grad is None and layer.last_lambda is None and layer.last_alignment is None


def test_plain_estimators_have_no_auxiliary_branch():
    layer = _layer("clipped_ste")
    assert layer.aux_weight is None and layer.compensator is None and layer.last_lambda is None
    assert "aux_weight" not in layer.state_dict()


def test_compensator_validation_and_one_lambda_per_backward():
    with pytest.raises(ValueError, match="mode='ags' is invalid"):
        GradientCompensator("ags", 1.0)
    with pytest.raises(ValueError, match="eta=0 is invalid"):
        GradientCompensator("surge", 0)
    comp = GradientCompensator("surge", 1.0)
    g_b, g_a = torch.ones(4), 2 * torch.ones(4)
    assert torch.allclose(comp.combine(g_b, g_a), g_b + 0.5 * g_a)
    assert comp.last_lambda == pytest.approx(0.5)
    assert comp.last_alignment == pytest.approx(1.0)  # parallel gradients
    comp.combine(g_b, torch.tensor([1.0, -1.0, 1.0, -1.0]))
    assert comp.last_alignment == pytest.approx(0.0, abs=1e-7)  # orthogonal
    comp.combine(g_b, -g_b)
    assert comp.last_alignment == pytest.approx(-1.0)
    assert comp.combine(g_b, None) is g_b


def test_activation_bits_32_leaves_inputs_full_precision():
    layer = _layer("clipped_ste", bits=32)
    x = torch.randn(3, 16)
    assert layer.input_quantizer is None
    assert torch.allclose(layer(x), F.linear(x, binarize_weight(layer.weight), layer.bias))


# ---- low-rank auxiliary branch ------------------------------------------------------------------

@pytest.mark.parametrize("rank", [1, 3, 8])
def test_low_rank_auxiliary_branch_gradients(rank):
    torch.manual_seed(1)
    cfg = SurgeConfig(estimator="surge", eta=0.7, aux_rank=rank)
    layer = SurgeLinear.from_config(cfg, in_features=16, out_features=8)
    torch.nn.init.normal_(layer.weight, std=0.2)
    layer.reset_surge_state()
    assert layer.aux_weight is None and layer.aux_u.shape == (8, rank) and layer.aux_v.shape == (rank, 16)
    # Initialised to the best rank-r approximation of the pretrained weight.
    u, s, vh = torch.linalg.svd(layer.weight.detach())
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    assert torch.allclose(layer.aux_u @ layer.aux_v, best, atol=1e-5)

    layer.train()
    twin = _twin_without_aux(layer, "clipped_ste").train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    g_y = torch.randn(3, 5, 8)
    y = layer(x)
    assert torch.equal(y, twin(x.detach()))
    (y * g_y).sum().backward()
    x_b = x.detach().clone().requires_grad_(True)
    (twin(x_b) * g_y).sum().backward()
    # Independent autograd of the auxiliary branch f_a(x) = x (U V)^T.
    u_ref = layer.aux_u.detach().clone().requires_grad_(True)
    v_ref = layer.aux_v.detach().clone().requires_grad_(True)
    x_a = x.detach().clone().requires_grad_(True)
    (x_a @ (u_ref @ v_ref).t() * g_y).sum().backward()
    lam = 0.7 * x_b.grad.norm() / (x_a.grad.norm() + 1e-8)
    assert torch.allclose(x.grad, x_b.grad + lam * x_a.grad, atol=1e-5)
    assert torch.allclose(layer.aux_u.grad, u_ref.grad, atol=1e-5)
    assert torch.allclose(layer.aux_v.grad, v_ref.grad, atol=1e-5)


def test_aux_rank_validation():
    with pytest.raises(ValueError, match="SurgeConfig.aux_rank=0 is invalid; allowed values: None"):
        SurgeConfig(aux_rank=0)
    with pytest.raises(ValueError, match="aux_rank=4 only applies with estimator in"):
        SurgeConfig(estimator="clipped_ste", aux_rank=4)



def test_aux_rank_above_the_smallest_linear_is_refused_before_any_module_changes():
    import surge_nlp
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100))
    query = model.encoder.layer[0].attention.self.query
    with pytest.raises(ValueError, match=r"SurgeConfig.aux_rank=33 is invalid for this model; allowed values: None \(full rank\) "
                                         r"or an integer from 1 to 32"):
        surge_nlp.binarize(model, SurgeConfig(estimator="surge", aux_rank=33))
    assert model.encoder.layer[0].attention.self.query is query  # nothing was swapped
    surge_nlp.binarize(model, SurgeConfig(estimator="surge", aux_rank=32))  # the largest allowed rank works


# ---------------------------------------------------------------- the exact inference path


def test_exact_inference_stays_exact_under_bf16_autocast():
    # Accelerate evaluates under autocast: before, the integer dot products of 3072 inputs were summed in bf16
    # (exact only up to 256), so the "exact" path no longer gave the kernels' floats.
    torch.manual_seed(0)
    layer = SurgeLinear.from_config(SurgeConfig(activation_bits=1), 3072, 8).eval()
    # Inputs that agree in sign with weight rows 0-3 except for 37 entries: dot products of 2998, which bf16
    # cannot hold (it rounds them to 3008).
    centred = layer.weight.detach() - layer.weight.detach().mean(dim=1, keepdim=True)
    x = centred[:4].clone()
    x[:, :37] *= -1
    with torch.no_grad():
        layer(x)  # calibrates
        expected = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = layer(x)
    assert torch.equal(actual.float(), expected)


def test_a_training_mode_forward_without_gradients_takes_the_autograd_path():
    # Reentrant gradient checkpointing runs each block once without gradients, then again with them: both
    # passes must compute the same values, so only eval mode without gradients is the exact inference path.
    from surge_nlp.layers import exact_inference

    layer = SurgeLinear.from_config(SurgeConfig(activation_bits=1), 16, 4)
    with torch.no_grad():
        assert not exact_inference(layer.train())
        assert exact_inference(layer.eval())
    assert not exact_inference(layer)  # gradients recorded
