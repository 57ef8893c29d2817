"""Binary kernels and `deploy`: packed XOR/AND-popcount products against independent float
computations, deployed models against the simulated ones, the no-compiler fallback, and summary."""

from __future__ import annotations

import copy
import os
import stat

import pytest
import torch

import surge_nlp
from surge_nlp.binarizers import ActivationQuantizer
from surge_nlp.deploy import BINARY_ATTENTION_IMPLEMENTATION, deploy
from surge_nlp.kernels import ops
from surge_nlp.layers import SurgeLinear
from surge_nlp.packed_layers import PackedSurgeEmbedding, PackedSurgeLinear

from .conftest import tiny_config

# Where the kernels must build (CI=true, or SURGE_NLP_REQUIRE_KERNELS=1) this module fails rather than
# vanishing from the run: a broken kernel build would otherwise pass CI with every test below skipped.
KERNELS_REQUIRED = os.environ.get("CI", "").lower() == "true" or os.environ.get("SURGE_NLP_REQUIRE_KERNELS") == "1"
pytestmark = pytest.mark.skipif(not ops.available() and not KERNELS_REQUIRED,
                                reason=f"binary kernels unavailable: {ops.unavailable_reason()}")


def test_the_kernels_build_here():
    assert ops.available(), f"binary kernels unavailable: {ops.unavailable_reason()}"

# K values around the word size: single bits, one short of a word, exact words, padding bits; and
# long ones for AVX2's Harley-Seal path (from 32 words: an odd count, and past its 62-word flush).
REDUCTION_LENGTHS = (1, 7, 63, 64, 65, 130, 257, 520, 2100, 4100)


def _unpack(words: torch.Tensor, k: int) -> torch.Tensor:
    """Independent unpacking: bit j of word w -> element 64 w + j, as bool."""
    shifts = torch.arange(64)
    bits = (words.unsqueeze(-1) >> shifts) & 1
    return bits.reshape(*words.shape[:-1], -1)[..., :k].bool(), bits.reshape(*words.shape[:-1], -1)[..., k:]


def _signs(x: torch.Tensor) -> torch.Tensor:
    return torch.where(x >= 0, 1.0, -1.0).double()


@pytest.fixture(params=["generic", "avx2", "avx512_vpopcntdq"])
def variant(request):
    if request.param not in ops.supported_variants():
        pytest.skip(f"{request.param} kernels not supported by this CPU")
    with ops.use_variant(request.param):
        yield request.param


@pytest.mark.parametrize("k", REDUCTION_LENGTHS)
def test_pack_signs_matches_quantizer_bits_and_zeroes_padding(variant, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(3, 5, k, generator=g)
    x[0, 0, 0] = 0.25  # exactly beta below: (x - beta) / alpha == 0 counts as +1
    beta = torch.randn(k, generator=g) * 0.3
    beta[0] = 0.25
    bits, padding = _unpack(ops.pack_signs(x, beta, 0.7), k)
    assert torch.equal(bits, (x - beta) / 0.7 >= 0)
    assert bits[0, 0, 0]
    assert not padding.any()


def test_pack_signs_reads_strided_inputs_and_broadcast_shifts(variant):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 70, 3, 33, generator=g).transpose(1, 2)  # (B, H, T, d) view, as attention gets it
    beta = torch.randn(3, 1, 33, generator=g)
    bits, _ = _unpack(ops.pack_signs(x, beta, 1.3), 33)
    assert torch.equal(bits, (x - beta) / 1.3 >= 0)
    along_tokens, _ = _unpack(ops.pack_signs(x.transpose(2, 3), beta.transpose(1, 2), 1.3), 70)
    assert torch.equal(along_tokens, ((x - beta) / 1.3 >= 0).transpose(2, 3))


def test_pack_signs_counts_a_quotient_that_underflows_to_minus_zero_as_plus_one(variant):
    # (x - beta) / alpha rounds to -0.0 here, which the simulated quantizer reads as +1; the fast
    # path compares x - beta with 0 and must divide such a row of eight as the quantizer does.
    x = torch.tensor([[-1e-30, -1.0, 2.0, -1e-30, 0.0, -3.0, 1e-30, -2e-30, -1e-30]])
    beta, alpha = torch.zeros(9), 1e20
    expected = (x - beta) / alpha >= 0
    assert expected[0, 0] and not expected[0, 1]
    bits, _ = _unpack(ops.pack_signs(x, beta, alpha), 9)
    assert torch.equal(bits, expected)
    # the same values along a strided reduction with rows adjacent (V packed along the tokens)
    columns = x.reshape(9, 1).expand(9, 16).contiguous().transpose(0, 1)  # (16 rows, 9), row stride 1
    bits, _ = _unpack(ops.pack_signs(columns, torch.zeros(16, 1), alpha), 9)
    assert torch.equal(bits, expected.expand(16, 9))


def _levels(x: torch.Tensor, beta: torch.Tensor, alpha: float, q_neg: int, q_pos: int) -> torch.Tensor:
    """The quantizer's integer levels (ActivationQuantizer.unit_levels' expression)."""
    return ((x - beta) / alpha).clamp(-q_neg, q_pos).round()


LEVELS = [(2, 1), (8, 7), (0, 3), (0, 15), (128, 127)]  # signed 2/4/8-bit, unsigned 2/4-bit


@pytest.mark.parametrize("q_neg,q_pos", LEVELS)
@pytest.mark.parametrize("k", (7, 64, 130))
def test_pack_levels_stores_the_quantizer_levels_as_bit_planes(variant, q_neg, q_pos, k):
    g = torch.Generator().manual_seed(300 + k + q_pos)
    alpha = 0.25
    x = torch.randn(4, 3, k, generator=g) * 2
    beta = torch.randn(k, generator=g) * 0.1
    ties_and_clipping = torch.tensor([0.5, 1.5, -0.5, -1.5, 2.5, 100.0])[: min(k, 6)]
    x[0, 0, : min(k, 6)] = beta[: min(k, 6)] + alpha * ties_and_clipping
    planes = ops.planes_for(q_neg, q_pos)
    packed = ops.pack_levels(x, beta, alpha, q_neg, q_pos)
    assert packed.shape == (4, 3, planes * ops.words(k))
    codes = torch.zeros(4, 3, k, dtype=torch.long)
    for p in range(planes):
        bits, padding = _unpack(packed[..., p * ops.words(k):(p + 1) * ops.words(k)], k)
        codes += bits.long() << p
        assert not padding.any()
    assert torch.equal(codes - q_neg, _levels(x, beta, alpha, q_neg, q_pos).long())


@pytest.mark.parametrize("q_neg,q_pos", LEVELS[:4])
@pytest.mark.parametrize("k", (5, 64, 200, 768, 2100))
def test_bit_serial_matmul_equals_float_product_of_levels_and_signs(variant, q_neg, q_pos, k):
    g = torch.Generator().manual_seed(400 + k + q_neg)
    m, n = 13, 37
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    beta = torch.randn(k, generator=g) * 0.1
    col_scale, bias = torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    levels = _levels(x, beta, 0.4, q_neg, q_pos)
    a = ops.pack_levels(x, beta, 0.4, q_neg, q_pos)
    panels = ops.weight_panels(ops.pack_signs(w, torch.zeros(k), 1.0))
    planes = ops.planes_for(q_neg, q_pos)
    out = ops.binary_matmul(a, panels, k, ops.AND, 0.4, col_scale, bias, planes=planes, offset=q_neg)
    dot = (levels.double() @ _signs(w).T).float()  # exact integers
    assert torch.equal(out, dot * 0.4 * col_scale + bias)  # the simulated path's order: dot * alpha_x * alpha_w + bias
    plain = ops.binary_matmul(a, ops.pack_signs(w, torch.zeros(k), 1.0), k, ops.AND, planes=planes, offset=q_neg)
    assert torch.equal(plain, dot)  # B laid out per call: the same products


@pytest.mark.parametrize("k", REDUCTION_LENGTHS)
def test_xor_matmul_equals_float_product_of_signs_with_scales(variant, k):
    g = torch.Generator().manual_seed(100 + k)
    m, n = 19, 70  # not multiples of the 16 x 64 tiles nor of the 4-row micro-kernel
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    col_scale, bias = torch.rand(n, generator=g) + 0.1, torch.randn(n, generator=g)
    zero = torch.zeros(k)
    out = ops.binary_matmul(ops.pack_signs(x, zero, 1.0), ops.pack_signs(w, zero, 1.0), k, ops.XOR, 0.5, col_scale, bias)
    expected = 0.5 * (_signs(x) @ _signs(w).T) * col_scale.double() + bias.double()
    torch.testing.assert_close(out.double(), expected, rtol=1e-6, atol=1e-5)
    integer = ops.binary_matmul(ops.pack_signs(x, zero, 1.0), ops.pack_signs(w, zero, 1.0), k)
    assert torch.equal(integer.double(), _signs(x) @ _signs(w).T)
    panels = ops.binary_matmul(ops.pack_signs(x, zero, 1.0), ops.weight_panels(ops.pack_signs(w, zero, 1.0)), k)
    assert torch.equal(panels, integer)


@pytest.mark.parametrize("k", (5, 64, 128, 200))
def test_and_matmul_sums_signed_values_over_selected_positions(variant, k):
    g = torch.Generator().manual_seed(200 + k)
    p = torch.rand(2, 3, 9, k, generator=g)  # selected where p > 0.5
    v = torch.randn(2, 3, 11, k, generator=g)
    p_bits = ops.pack_levels(p, torch.zeros(1), 1.0, 0, 1)
    v_bits = ops.pack_signs(v, torch.zeros(k), 1.0)
    out = ops.binary_matmul(p_bits, v_bits, k, ops.AND, 2.0)
    expected = 2.0 * (p > 0.5).double() @ _signs(v).transpose(-1, -2)
    assert torch.equal(out.double(), expected)


def test_matmul_writes_into_strided_output(variant):
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 3, 8, 40, generator=g), torch.randn(2, 3, 5, 40, generator=g)
    zero = torch.zeros(40)
    storage = torch.full((2, 8, 3, 5), float("nan"))  # (B, T, H, d): what attention returns
    ops.binary_matmul(ops.pack_signs(a, zero, 1.0), ops.pack_signs(b, zero, 1.0), 40, out=storage.transpose(1, 2))
    assert torch.equal(storage.transpose(1, 2).double(), _signs(a) @ _signs(b).transpose(-1, -2))


def test_matmul_reads_strided_packed_rows(variant):
    # One-word rows taken from wider packed rows: row stride 2 words, the kernel's gathered path.
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(9, 128, generator=g), torch.randn(13, 128, generator=g)
    zero = torch.zeros(128)
    a_words, b_words = ops.pack_signs(a, zero, 1.0)[:, :1], ops.pack_signs(b, zero, 1.0)[:, :1]
    assert b_words.stride() == (2, 1)
    out = ops.binary_matmul(a_words, b_words, 64)
    assert torch.equal(out.double(), _signs(a[:, :64]) @ _signs(b[:, :64]).T)


def test_unsigned_one_bit_levels_round_half_down_and_clear_masked_keys(variant):
    p = torch.tensor([[0.3, 0.5, 0.5000001, 0.9, 0.9, 0.0]])
    mask = torch.tensor([[0.0, 0.0, 0.0, 0.0, torch.finfo(torch.float32).min, 0.0]])
    bits, padding = _unpack(ops.pack_levels(p, torch.tensor([-0.1]), 1.2, 0, 1, mask), 6)
    quantized = torch.round(torch.clamp((p + 0.1) / 1.2, 0, 1)).bool() & (mask > torch.finfo(torch.float32).min / 2)
    assert torch.equal(bits, quantized)
    # (0.5 + 0.1) / 1.2 == 0.5 exactly rounds to 0; a hair above rounds to 1; the masked 0.9 is cleared
    assert bits.tolist() == [[False, False, True, True, False, False]]
    assert not padding.any()
    # quotients within a few ulps of 0.5 on either side, where comparing p - beta with alpha / 2 could err
    g = torch.Generator().manual_seed(8)
    alpha, beta = 0.0371, torch.tensor([0.0113])
    near = beta + alpha * (0.5 + torch.randint(-40, 41, (3, 200), generator=g) * 2.0**-26)
    bits, _ = _unpack(ops.pack_levels(near, beta, alpha, 0, 1), 200)
    assert torch.equal(bits, torch.round(torch.clamp((near - beta) / alpha, 0, 1)).bool())


@pytest.mark.parametrize("m,n", [(256, 512), (600, 40), (8, 3000)])  # threads split rows, rows, columns
def test_large_products_use_threads_and_agree_with_one_thread(m, n):
    g = torch.Generator().manual_seed(4)
    x, w = torch.randn(m, 768, generator=g), torch.randn(n, 768, generator=g)
    zero = torch.zeros(768)
    a, b = ops.pack_signs(x, zero, 1.0), ops.pack_signs(w, zero, 1.0)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = ops.binary_matmul(a, b, 768)
        torch.set_num_threads(max(2, previous))
        multi = ops.binary_matmul(a, b, 768)
    finally:
        torch.set_num_threads(previous)
    assert torch.equal(single, multi)
    assert torch.equal(single.double(), _signs(x) @ _signs(w).T)


def test_matmul_adds_a_per_sequence_bias_as_an_attention_mask_does(variant):
    g = torch.Generator().manual_seed(9)
    a, b = torch.randn(2, 3, 7, 64, generator=g), torch.randn(2, 3, 9, 64, generator=g)
    mask = torch.zeros(2, 1, 1, 9)
    mask[1, ..., 5:] = torch.finfo(torch.float32).min
    mask[0, ..., 0] = -0.75
    zero = torch.zeros(64)
    bits_a, bits_b = ops.pack_signs(a, zero, 1.0), ops.pack_signs(b, zero, 1.0)
    expected = ops.binary_matmul(bits_a, bits_b, 64, scale=0.3) + mask
    assert torch.equal(ops.binary_matmul(bits_a, bits_b, 64, scale=0.3, bias=mask), expected)
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.binary_matmul(bits_a, bits_b, 64, bias=torch.zeros(2, 1, 7, 9))


def test_gather_signs_equals_unpacking_the_looked_up_rows(variant):
    from surge_nlp.packing import pack_signs, unpack_binary_weight

    g = torch.Generator().manual_seed(10)
    packed, scales = pack_signs(torch.randn(30, 77, generator=g) >= 0), torch.rand(30, generator=g)
    ids = torch.tensor([[0, 29, 5, -1], [3, 3, -30, 17]])
    expected = unpack_binary_weight(packed[ids], scales[ids], 77, torch.float32)
    assert torch.equal(ops.gather_signs(packed, ids, scales, 77), expected)
    with pytest.raises(IndexError, match="index 30 is out of bounds for 30 rows"):
        ops.gather_signs(packed, torch.tensor([1, 30]), scales, 77)


def test_kernel_argument_errors():
    zero = torch.zeros(10)
    a = ops.pack_signs(torch.randn(2, 10), zero, 1.0)
    with pytest.raises(TypeError, match="float32"):
        ops.pack_signs(torch.randn(2, 10, dtype=torch.float64), zero, 1.0)
    with pytest.raises(ValueError, match="k=65 needs 2 words"):
        ops.binary_matmul(a, a, k=65)
    with pytest.raises(ValueError, match="do not match"):
        ops.binary_matmul(a, a.unsqueeze(0), k=10)
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.pack_signs(torch.randn(2, 10), torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match="col_scale"):
        ops.binary_matmul(a, a, k=10, col_scale=torch.ones(3))
    with pytest.raises(ValueError, match="allowed values"):
        with ops.use_variant("neon"):
            pass


# ---------------------------------------------------------------- deployed models


def _calibrated_tiny(seed: int = 0, num_hidden_layers: int = 2, family: str = "bert", **surge) -> tuple[torch.nn.Module, dict]:
    """A tiny binarized model with calibrated quantizers and non-zero shifts, and a padded batch.

    The shifts are randomised as training would leave them: with every beta and bias exactly 0 (a
    fresh random model), products that are exactly 0 in exact arithmetic come out of the FP32
    matmul as +-1 ulp residues whose sign the next quantizer reads, so the simulated model itself
    is rounding-dependent there, while the kernels compute the exact 0 (sign +1).
    """
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    sizes = {} if family == "distilbert" else dict(hidden_size=96, num_attention_heads=3, intermediate_size=130,
                                                   num_hidden_layers=num_hidden_layers)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, **sizes))
    model = surge_nlp.binarize(model, surge_nlp.SurgeConfig(**surge)).eval()
    g = torch.Generator().manual_seed(seed)
    batch = {"input_ids": torch.randint(3, 120, (3, 40), generator=g), "attention_mask": torch.ones(3, 40, dtype=torch.long)}
    batch["attention_mask"][1, 25:] = 0
    batch["attention_mask"][2, 6:] = 0
    with torch.no_grad():
        model(**batch)  # calibrates every alpha on this batch
        for name, parameter in model.named_parameters():
            if name.endswith("beta"):
                parameter.normal_(0.0, 0.05, generator=g)
    return model, batch


def _logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _assert_same_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # Bit for bit: at inference the simulated path computes the integer products and applies the
    # scales in the kernels' order, so both binarize the same values (issue 13, item 5).
    assert torch.equal(actual, expected), (actual - expected).abs().max()


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_deployed_model_matches_simulated_logits_on_binary_kernels(family):
    model, batch = _calibrated_tiny(family=family, embedding_bits=1)
    expected = _logits(model, batch)
    fast = deploy(copy.deepcopy(model))
    kernel_layers = [m for m in fast.modules() if isinstance(m, PackedSurgeLinear) and m.engine == "xor-popcount"]
    assert len(kernel_layers) == 12 and not any(isinstance(m, SurgeLinear) for m in fast.modules())
    assert fast.config._attn_implementation == BINARY_ATTENTION_IMPLEMENTATION
    assert isinstance(fast.get_input_embeddings(), PackedSurgeEmbedding)
    _assert_same_logits(_logits(fast, batch), expected)
    # Every hidden state, not only the logits: the kernels reproduce each layer.
    with torch.no_grad():
        simulated = model(**batch, output_hidden_states=True).hidden_states
        deployed = fast(**batch, output_hidden_states=True).hidden_states
    for reference, actual in zip(simulated, deployed):
        assert torch.equal(actual, reference)


def test_deploy_refuses_a_model_off_the_cpu_before_changing_it():
    # The kernels are CPU code: a CUDA model's tensors handed to C crashed the interpreter (a device pointer).
    # A meta-device model stands in for one on a GPU here (the same check: device type not "cpu").
    model, _ = _calibrated_tiny(seed=2, num_hidden_layers=1)
    meta = copy.deepcopy(model).to("meta")
    with pytest.raises(ValueError, match=r"on meta: call model.cpu\(\) first"):
        deploy(meta)
    assert not any(isinstance(m, PackedSurgeLinear) for m in meta.modules())  # left as it was
    assert meta.config._attn_implementation != BINARY_ATTENTION_IMPLEMENTATION


def test_kernel_operands_off_the_cpu_are_refused_not_read_as_host_memory():
    device_words = torch.zeros(4, 2, dtype=torch.int64, device="meta")
    host_words = torch.zeros(4, 2, dtype=torch.int64)
    with pytest.raises(TypeError, match="rows must be a CPU tensor .* on meta"):
        ops.weight_panels(device_words)
    with pytest.raises(TypeError, match="a must be a CPU tensor"):
        ops.binary_matmul(device_words, host_words, k=128)
    with pytest.raises(TypeError, match="b must be a CPU tensor"):
        ops.binary_matmul(host_words, device_words, k=128)
    packed = torch.zeros(3, 2, dtype=torch.uint8)
    with pytest.raises(TypeError, match="ids must be a CPU tensor"):
        ops.gather_signs(packed, torch.tensor([1], device="meta"), torch.ones(3), columns=16)


def test_gather_signs_and_bytes_to_words_refuse_a_column_count_the_bytes_do_not_hold():
    # Before: columns=64 over 2-byte rows returned 64 columns, 48 of them read past each row (and the buffer).
    packed = torch.zeros(3, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="64 columns need 8 bytes per row, the matrix has 2"):
        ops.gather_signs(packed, torch.tensor([2]), torch.ones(3), columns=64)
    assert ops.gather_signs(packed, torch.tensor([2]), torch.ones(3), columns=13).shape == (1, 13)
    with pytest.raises(ValueError, match="64 columns need 8 bytes per row, got 2"):
        ops.bytes_to_words(packed, 64)


def test_deploy_of_a_plain_module_wrapping_a_transformers_model_switches_its_attention():
    # Before: the linears were swapped, then set_attn_implementation (absent on nn.Module) raised,
    # leaving a half-deployed model.
    model, batch = _calibrated_tiny(seed=3, num_hidden_layers=1)
    expected = _logits(model, batch)

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, **inputs):
            return self.inner(**inputs)

    fast = deploy(Wrapper(copy.deepcopy(model)))
    assert fast.inner.config._attn_implementation == BINARY_ATTENTION_IMPLEMENTATION
    _assert_same_logits(_logits(fast, batch), expected)
    report = surge_nlp.summary(fast, print_fn=None).totals
    assert report["kernel_attention_modules"] == 1 and report["kernel_layers"] > 0

    # Binary attention outside any Transformers model: refused before anything changes.
    bare = Wrapper(copy.deepcopy(model).bert.encoder)
    with pytest.raises(ValueError, match="not inside a Transformers model"):
        deploy(bare)
    assert not any(isinstance(m, PackedSurgeLinear) for m in bare.modules())


def test_a_deployed_model_pickles_and_its_kernel_layers_refuse_training_mode():
    import io
    import pickle

    model, batch = _calibrated_tiny(seed=4, num_hidden_layers=1)
    fast = deploy(model)
    expected = _logits(fast, batch)
    # The load hooks were lambdas: torch.save(model) and spawn-based multiprocessing failed.
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    again = pickle.loads(pickle.dumps(fast))
    _assert_same_logits(_logits(again, batch), expected)
    # The kernels compute no gradient: training a deployed model would silently train nothing below them.
    fast.train()
    with pytest.raises(RuntimeError, match="inference only .* training mode"):
        fast(**batch)
    fast.eval()
    _assert_same_logits(_logits(fast, batch), expected)


def test_binary_attention_matches_simulated_attention_alone():
    model, batch = _calibrated_tiny(seed=1, num_hidden_layers=1)
    expected = _logits(model, batch)
    surge_nlp.deploy(model)
    for name, module in model.named_modules():  # linears back to the simulated path: attention is what is tested
        if isinstance(module, PackedSurgeLinear):
            model.set_submodule(name, _SimulatedLinear(module))
    _assert_same_logits(_logits(model, batch), expected)


class _SimulatedLinear(torch.nn.Module):
    """A deployed layer's kernel words and quantizer state evaluated in torch (independent of the
    kernels): the integer dot product, then the scales in the kernels' epilogue order."""

    def __init__(self, layer: PackedSurgeLinear) -> None:
        super().__init__()
        self.layer = layer
        bits, _ = _unpack(ops.bytes_to_words(layer.weight, layer.in_features), layer.in_features)
        self.signs = torch.where(bits, 1.0, -1.0)

    def forward(self, x):
        alpha, beta = self.layer.input_quantizer.alpha.detach().abs(), self.layer.input_quantizer.beta.detach()
        signs = torch.where((x - beta) / alpha >= 0, 1.0, -1.0)
        dot = torch.nn.functional.linear(signs, self.signs)
        return dot * alpha * self.layer.weight_scale + self.layer.bias


def test_binary_attention_with_a_mask_that_differs_per_query_matches_the_simulated_one():
    from surge_nlp.attention import surge_attention_forward
    from surge_nlp.deploy import binary_attention_forward

    model, _ = _calibrated_tiny(seed=8, num_hidden_layers=1)
    module = model.bert.encoder.layer[0].attention.self
    g = torch.Generator().manual_seed(8)
    query, key, value = (torch.randn(2, 3, 12, 32, generator=g) for _ in range(3))
    causal = torch.full((12, 12), torch.finfo(torch.float32).min).triu(1).expand(2, 1, 12, 12).contiguous()
    padding = torch.zeros(2, 1, 12, 12)
    padding[1, ..., 8:] = torch.finfo(torch.float32).min
    with torch.no_grad():
        for mask in (causal, padding, None):  # the epilogue's per-key bias for padding only
            expected, _ = surge_attention_forward(module, query, key, value, mask)
            actual, _ = binary_attention_forward(module, query, key, value, mask)
            assert torch.equal(actual, expected)


def test_a_state_dict_loaded_into_a_deployed_model_reaches_its_kernels():
    first, batch = _calibrated_tiny(seed=9, embedding_bits=1)
    second, _ = _calibrated_tiny(seed=10, embedding_bits=1)
    expected = _logits(second, batch)
    fast = deploy(first)
    fast.load_state_dict(deploy(copy.deepcopy(second)).state_dict())
    _assert_same_logits(_logits(fast, batch), expected)  # weights, quantizer scales and attention scales


def test_deploy_from_packed_checkpoint_form():
    from surge_nlp.serialization import pack_model

    model, batch = _calibrated_tiny(seed=2, embedding_bits=1)
    expected = _logits(model, batch)
    packed = pack_model(copy.deepcopy(model))
    assert any(isinstance(m, PackedSurgeLinear) for m in packed.modules())
    packed_layers = {name: m for name, m in packed.named_modules() if isinstance(m, PackedSurgeLinear)}
    fast = deploy(packed)
    # the same layer objects, now on the kernels: one deployed layer, not a second class
    assert {name: m for name, m in fast.named_modules() if isinstance(m, PackedSurgeLinear)} == packed_layers
    assert {m.engine for m in packed_layers.values()} == {"xor-popcount"} and len(packed_layers) == 12
    _assert_same_logits(_logits(fast, batch), expected)


def test_deployed_model_saves_a_packed_checkpoint_that_deploys_again(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, batch = _calibrated_tiny(seed=6, embedding_bits=1)
    fast = deploy(model)
    expected = _logits(fast, batch)
    fast.save_pretrained(tmp_path / "deployed")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "deployed").eval()
    assert isinstance(reloaded.bert.encoder.layer[0].attention.self.query, PackedSurgeLinear)
    _assert_same_logits(_logits(reloaded, batch), expected)  # the packed model on the simulated path
    assert torch.equal(_logits(deploy(reloaded), batch), expected)


def test_deployed_layer_state_dict_is_the_packed_checkpoints_and_loads_back():
    from surge_nlp.serialization import pack_model

    model, _ = _calibrated_tiny(seed=7, num_hidden_layers=1)
    packed_state = pack_model(copy.deepcopy(model)).bert.encoder.layer[0].intermediate.dense.state_dict()
    layer = deploy(model).bert.encoder.layer[0].intermediate.dense
    state = layer.state_dict()
    assert state.keys() == packed_state.keys()  # the kernels' panel words are not saved
    assert all(torch.equal(state[k], packed_state[k]) for k in state)
    assert state["weight"].dtype == torch.uint8 and tuple(state["weight"].shape) == (130, 12)
    copy_of = PackedSurgeLinear(96, 130, activation_bits=1)
    copy_of.load_state_dict(state)
    x = torch.randn(4, 96)
    torch.testing.assert_close(copy_of(x), layer(x), rtol=1e-5, atol=1e-4)  # simulated vs kernels
    assert torch.equal(copy_of.use_kernels()(x), layer(x))
    state["weight"] = state["weight"][:, :5]
    with pytest.raises(RuntimeError, match="size mismatch for weight"):
        copy_of.load_state_dict(state)


@pytest.mark.parametrize("activation_bits", (1, 2))
def test_padding_bits_of_packed_weights_do_not_reach_the_kernels(activation_bits):
    # 13 inputs pack into 2 bytes per row; the 3 unused bits of the second byte are whatever the
    # file holds. The simulated path never reads them; the kernels must not either.
    torch.manual_seed(0)
    layer = PackedSurgeLinear(13, 5, activation_bits=activation_bits)
    with torch.no_grad():
        layer.weight.copy_(torch.randint(0, 256, layer.weight.shape, dtype=torch.uint8))
        layer.weight_scale.uniform_(0.5, 1.5)
    assert (layer.weight[:, -1] >> 5).any()  # some padding bits are set
    x = torch.randn(4, 13)
    simulated = layer(x)  # calibrates the input quantizer on x
    torch.testing.assert_close(copy.deepcopy(layer).use_kernels()(x), simulated, rtol=1e-5, atol=1e-4)


def test_use_kernels_refuses_what_the_kernels_cannot_run():
    with pytest.raises(ValueError, match="need 1-, 2- or 4-bit inputs; this layer has activation_bits=8"):
        PackedSurgeLinear(16, 4, activation_bits=8).use_kernels()
    with pytest.raises(ValueError, match="not calibrated"):
        PackedSurgeLinear(16, 4, activation_bits=1).use_kernels()


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_multibit_layer_on_bit_serial_kernels_equals_its_simulated_forward(bits, signed):
    torch.manual_seed(bits)
    layer = SurgeLinear(200, 70, activation_bits=bits, input_signed=signed).eval()
    x = torch.randn(5, 9, 200)
    with torch.no_grad():
        layer(x)  # calibrates alpha
        layer.input_quantizer.beta.normal_(0.0, 0.1)
        expected = layer(x)
    packed = PackedSurgeLinear.from_surge_linear(layer)
    fast = copy.deepcopy(packed).use_kernels()
    assert fast.engine == "bit-serial-popcount" and packed.engine == "simulated"
    with torch.no_grad():
        assert torch.equal(fast(x), expected)
        assert torch.equal(packed(x), expected)
        for variant in ops.supported_variants():  # every variant's bit-serial kernel
            with ops.use_variant(variant):
                assert torch.equal(fast(x), expected), variant


def test_a_state_dict_loaded_after_use_kernels_reaches_the_kernels():
    torch.manual_seed(0)
    layers = [SurgeLinear(64, 24, activation_bits=2).eval() for _ in range(2)]
    x = torch.randn(6, 64)
    with torch.no_grad():
        for layer in layers:
            layer(x)
    fast = PackedSurgeLinear.from_surge_linear(layers[0]).use_kernels()
    other = PackedSurgeLinear.from_surge_linear(layers[1])
    fast.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(fast(x), layers[1](x))


@pytest.mark.parametrize("bits,ffn_activation", [(2, "gelu"), (4, "gelu"), (2, "relu")])
def test_multibit_activations_run_bit_serial_kernels_and_summary_says_so(bits, ffn_activation):
    model, batch = _calibrated_tiny(seed=3, activation_bits=bits, ffn_activation=ffn_activation)
    expected = _logits(model, batch)
    fast = deploy(model)
    linears = [m for m in fast.modules() if isinstance(m, (PackedSurgeLinear, SurgeLinear))]
    assert len(linears) == 12 and {m.engine for m in linears} == {"bit-serial-popcount"}
    if ffn_activation == "relu":  # the FFN output linear's input is unsigned: codes = levels, no offset
        assert not fast.bert.encoder.layer[0].output.dense.input_quantizer.signed
    assert fast.config._attn_implementation == "surge"  # multi-bit attention operands: simulated
    _assert_same_logits(_logits(fast, batch), expected)
    report = surge_nlp.summary(fast, print_fn=None)
    assert {layer.engine for layer in report.layers if layer.kind == "linear"} == {"bit-serial-popcount"}
    assert report.totals["kernel_layers"] == 12 and report.totals["kernel_attention_modules"] == 0
    assert "bit-serial-popcount" in str(report)


def test_eight_bit_activations_stay_simulated_and_summary_says_so():
    model, batch = _calibrated_tiny(seed=3, activation_bits=8)
    expected = _logits(model, batch)
    fast = deploy(model)
    assert {m.engine for m in fast.modules() if isinstance(m, (PackedSurgeLinear, SurgeLinear))} == {"simulated"}
    _assert_same_logits(_logits(fast, batch), expected)
    report = surge_nlp.summary(fast, print_fn=None)
    assert report.totals["kernel_layers"] == 0 and report.totals["kernel_attention_modules"] == 0


def test_summary_reports_layers_on_binary_kernels():
    model, _ = _calibrated_tiny(seed=4)
    before = surge_nlp.summary(model, print_fn=None)
    assert before.totals["kernel_layers"] == 0
    fast = deploy(model)
    report = surge_nlp.summary(fast, print_fn=None)
    engines = {layer.name: layer.engine for layer in report.layers}
    assert engines["bert.encoder.layer.0.attention.self.query"] == "xor-popcount"
    assert report.totals["kernel_layers"] == 12 and report.totals["kernel_attention_modules"] == 2
    assert report.totals["params_1bit"] == before.totals["params_1bit"]
    assert "xor-popcount" in str(report)


def test_deploy_refuses_uncalibrated_quantizers():
    from transformers import BertForSequenceClassification

    model = surge_nlp.binarize(BertForSequenceClassification(tiny_config()), surge_nlp.SurgeConfig())
    with pytest.raises(ValueError, match="not calibrated"):
        deploy(model)


def test_without_compiler_the_model_runs_simulated_with_one_notice(monkeypatch, tmp_path):
    model, batch = _calibrated_tiny(seed=5)
    expected = _logits(model, batch)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("SURGE_NLP_KERNEL_CACHE", str(tmp_path / "cache"))  # no cached library to fall back on
    ops.reset()
    try:
        with pytest.warns(RuntimeWarning, match="binary kernels unavailable .*no-such-compiler.*simulated path") as caught:
            fast = deploy(model)
            deploy(copy.deepcopy(model))  # the notice is shown once
        assert len([w for w in caught if "binary kernels" in str(w.message)]) == 1
        assert "\n" not in str(caught[0].message)
        assert not ops.available()
        assert any(isinstance(m, SurgeLinear) for m in fast.modules())
        _assert_same_logits(_logits(fast, batch), expected)
        assert surge_nlp.summary(fast, print_fn=None).totals["kernel_layers"] == 0
    finally:
        monkeypatch.undo()
        ops.reset()
    assert ops.available()


def test_disable_switch_keeps_the_simulated_path(monkeypatch):
    monkeypatch.setenv("SURGE_NLP_DISABLE_KERNELS", "1")
    ops.reset()
    try:
        assert not ops.available() and "SURGE_NLP_DISABLE_KERNELS" in ops.unavailable_reason()
    finally:
        monkeypatch.undo()
        ops.reset()


def _use_compiler_script(monkeypatch, tmp_path, name: str, script: str) -> None:
    """CC = a shell script standing in for the compiler; kernels cached under tmp_path/cache."""
    compiler = tmp_path / name
    compiler.write_text("#!/bin/sh\n" + script)
    compiler.chmod(0o755)
    monkeypatch.setenv("CC", str(compiler))
    monkeypatch.setenv("SURGE_NLP_KERNEL_CACHE", str(tmp_path / "cache"))


def test_build_failure_message_names_the_compiler_error(monkeypatch, tmp_path):
    from surge_nlp.kernels import build

    _use_compiler_script(monkeypatch, tmp_path, "fake-cc", "echo 'fatal: broken toolchain' >&2\nexit 1\n")
    with pytest.raises(build.KernelBuildError, match="broken toolchain"):
        build.build_library()
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library left behind


def test_compiler_without_openmp_still_builds_single_threaded_kernels(monkeypatch, tmp_path):
    from surge_nlp.kernels import build

    _use_compiler_script(monkeypatch, tmp_path, "cc-without-openmp",
                         'for arg in "$@"; do [ "$arg" = -fopenmp ] && exit 1; done\nexec cc "$@"\n')
    with pytest.warns(RuntimeWarning, match="without OpenMP"):
        path = build.build_library()
    assert path.exists() and path.parent == tmp_path / "cache"
    assert "omp_" not in path.read_bytes().decode("latin-1")  # no OpenMP runtime referenced
    # Cached under its own name: the same compiler with OpenMP builds the threaded library, not this one.
    _use_compiler_script(monkeypatch, tmp_path, "cc-with-openmp", 'exec cc "$@"\n')
    threaded = build.build_library()
    assert threaded != path and "omp_" in threaded.read_bytes().decode("latin-1")


def _assert_unavailable_while_patched(monkeypatch, reason: str) -> None:
    """Under the test's patches the kernels are unavailable for `reason` (the simulated path runs); undone, they load."""
    ops.reset()
    try:
        assert not ops.available() and reason in ops.unavailable_reason()
    finally:
        monkeypatch.undo()
        ops.reset()
    assert ops.available()


def test_an_unwritable_kernel_cache_is_a_build_error_and_the_simulated_path_runs(monkeypatch, tmp_path):
    # Before: a plain OSError escaped ops.available() and deploy crashed (a read-only home, a file in the way).
    from surge_nlp.kernels import build

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("SURGE_NLP_KERNEL_CACHE", str(tmp_path / "a-file" / "cache"))
    with pytest.raises(build.KernelBuildError, match="cannot write the kernel cache .*SURGE_NLP_KERNEL_CACHE"):
        build.build_library()
    _assert_unavailable_while_patched(monkeypatch, "cannot write the kernel cache")


def test_who_may_supply_the_kernel_library():
    # Loading the library runs its code as this user: another user's file, or one others can write, is refused.
    from surge_nlp.kernels.build import untrusted_reason

    me, other, file = 1000, 1001, stat.S_IFREG
    assert untrusted_reason(file | 0o755, me, me) is None
    assert untrusted_reason(file | 0o755, 0, me) is None  # root's (a system-wide cache)
    assert untrusted_reason(file | 0o755, other, me) == "owned by another user (uid 1001)"
    assert untrusted_reason(file | 0o775, me, me) == "writable by other users (-rwxrwxr-x)"
    assert untrusted_reason(file | 0o757, me, me) == "writable by other users (-rwxr-xrwx)"


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_an_untrusted_cached_library_is_built_again_and_never_loaded(monkeypatch, tmp_path):
    from surge_nlp.kernels import build

    monkeypatch.setenv("SURGE_NLP_KERNEL_CACHE", str(tmp_path / "cache"))
    old_umask = os.umask(0o002)  # a user-private-group umask: the group must still not write our build
    try:
        path = build.build_library()
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755 and build.load_library() is not None
    # A cached file that others could have written is replaced by a fresh build, not loaded.
    path.unlink()  # a new file (writing into the loaded one in place would crash this process: it is mapped)
    path.write_bytes(b"someone else's code")
    path.chmod(0o777)
    assert build.build_library() == path and stat.S_IMODE(path.stat().st_mode) == 0o755
    assert build.load_library().surge_interface().decode() == build.INTERFACE.text
    # Where it cannot be replaced, loading refuses it, and the simulated path runs.
    path.chmod(0o775)
    monkeypatch.setattr(build, "build_library", lambda: path)
    with pytest.raises(build.KernelBuildError, match=rf"{path.name} is writable by other users \(-rwxrwxr-x\).*KERNEL_CACHE"):
        build.load_library()
    _assert_unavailable_while_patched(monkeypatch, "writable by other users")


def test_the_kernel_cache_keeps_the_most_recently_used_builds(monkeypatch, tmp_path):
    # Every checkout and source version has its own build; before, none was ever removed.
    from surge_nlp.kernels import build

    cache = tmp_path / "cache"
    cache.mkdir()
    stale = [cache / f"surge_kernels-{index:016x}.so" for index in range(build.KEEP_BUILDS + 3)]
    for age, old in enumerate(stale):
        old.write_bytes(b"an older build")
        os.utime(old, (1e9 - age, 1e9 - age))  # stale[0] the most recently used
    (cache / "notes.txt").write_text("not a build")
    monkeypatch.setenv("SURGE_NLP_KERNEL_CACHE", str(cache))
    built = build.build_library()
    kept = set(cache.glob("surge_kernels-*.so"))
    assert kept == {built, *stale[: build.KEEP_BUILDS - 1]}
    assert (cache / "notes.txt").exists()
    # Loading marks a build as used: it outlives builds made before it was loaded.
    os.utime(built, (1.0, 1.0))
    build.load_library()
    assert built.stat().st_mtime > 1e9


def test_the_kernel_cache_key_names_the_machine(monkeypatch, tmp_path):
    # A cache shared by an x86 and an ARM node must not hand one the other's library.
    from surge_nlp.kernels import build

    here = build._cache_key("cc", openmp=True)
    monkeypatch.setattr(build.platform, "machine", lambda: "another-architecture")
    assert build._cache_key("cc", openmp=True) != here
    assert build._cache_key("cc", openmp=False) != build._cache_key("cc", openmp=True)


# ---------------------------------------------------------------- the interface table


def test_the_interface_table_drives_signatures_variants_and_the_check_of_a_loaded_library(monkeypatch):
    import ctypes
    import dataclasses

    from surge_nlp.kernels import build

    table = build.read_interface('#define SURGE_INTERFACE \\\n    "abi 7\\n" \\\n    "variants a b\\n" \\\n'
                                 '    "fn f v p 3*q f\\n" \\\n    "fn g s\\n"\nint x;')
    assert (table.abi, table.variants) == (7, ("a", "b"))
    assert table.signatures == {"f": ([ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_float], None), "g": ([], ctypes.c_char_p)}
    # The shipped table: the variant list is the C enum's, and the loaded library reports the same table.
    assert ops.VARIANTS == build.INTERFACE.variants == ("generic", "avx2", "avx512_vpopcntdq")
    assert build.load_library().surge_interface().decode() == build.INTERFACE.text
    # A cached library built from another table (a stale or foreign file) is refused, not called.
    monkeypatch.setattr(build, "INTERFACE", dataclasses.replace(build.INTERFACE, text=build.INTERFACE.text + "fn extra v\n"))
    with pytest.raises(build.KernelBuildError, match="reports another interface"):
        build.load_library()
    with pytest.raises(build.KernelBuildError, match="no SURGE_INTERFACE table"):
        build.read_interface("int main(void) { return 0; }")


def test_use_variant_forces_the_variant_and_restores_automatic_selection():
    lib = ops._lib()
    assert lib.surge_forced_variant() == -1  # automatic: small products may go to a faster neighbour
    for name in ops.supported_variants():
        with ops.use_variant(name):
            assert lib.surge_forced_variant() == ops.VARIANTS.index(name) and ops.active_variant() == name
            with ops.use_variant("generic"):  # nested: restores the outer forced variant
                assert ops.active_variant() == "generic"
            assert ops.active_variant() == name
        assert lib.surge_forced_variant() == -1


def test_the_peak_micro_kernel_counts_the_xor_bits_on_every_variant(variant):
    g = torch.Generator().manual_seed(11)
    a = torch.randint(-2**62, 2**62, (ops.PEAK_WORDS,), generator=g, dtype=torch.int64)
    b = torch.randint(-2**62, 2**62, (ops.PEAK_WORDS,), generator=g, dtype=torch.int64)
    # each word of b against four words of a: a[8r + w % 8] for r < 4
    partners = a[:32].reshape(4, 8)[:, torch.arange(ops.PEAK_WORDS) % 8]
    expected = sum(bin(int(x) & (2**64 - 1)).count("1") for x in (partners ^ b).flatten().tolist())
    assert ops.peak_xor_popcount(a, b, reps=3, threads=1) == 3 * expected
    assert ops.peak_xor_popcount(a, b, reps=2, threads=2) == 2 * 2 * expected
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.peak_xor_popcount(a[:40], b[:40], reps=1)


def test_calibrating_through_the_exact_inference_path_gives_the_autograd_paths_scales():
    # surge_nlp.calibrate runs without gradients, so the exact path calibrates: every scale must be
    # the one the autograd path would set (a scale read before its quantizer saw its operand would
    # scale the attention scores by an uncalibrated 1.0 and miscalibrate everything after it).
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_config(tiny_config("bert", hidden_size=96, num_attention_heads=3,
                                                                      intermediate_size=130, hidden_dropout_prob=0.0,
                                                                      attention_probs_dropout_prob=0.0))
    batch = {"input_ids": torch.randint(3, 120, (3, 20)), "attention_mask": torch.ones(3, 20, dtype=torch.long)}
    exact, autograd = (surge_nlp.binarize(copy.deepcopy(base), surge_nlp.SurgeConfig()).eval() for _ in range(2))
    surge_nlp.calibrate(exact, batch)
    autograd(**batch)  # eval mode with gradients: the autograd path calibrates
    scales = lambda model: {name: m.alpha.item() for name, m in model.named_modules() if isinstance(m, ActivationQuantizer)}  # noqa: E731
    exact_scales, autograd_scales = scales(exact), scales(autograd)
    assert exact_scales.keys() == autograd_scales.keys() and len(exact_scales) > 10
    for name in exact_scales:
        assert exact_scales[name] == pytest.approx(autograd_scales[name], rel=1e-2), name  # float rounding only
