"""Model families (surge_nlp.families): every registered family, with a tiny random config, binarizes
exactly its encoder linears, runs binarized attention where its attention function allows (and names
the family where it does not), distils, round-trips packed exactly, deploys like the simulated path,
and runs `surge-nlp glue` end to end as `--model`."""

from __future__ import annotations

import re

import pytest
import torch
import transformers
from torch import nn
from transformers import AutoModelForSequenceClassification

import surge_nlp
from surge_nlp import AttentionQuantizers, PackedSurgeLinear, SurgeConfig, SurgeLinear
from surge_nlp.distill import TrainingConfig, train
from surge_nlp.distill.projections import ProjectionRecorder
from surge_nlp.families import FAMILIES, family_of
from surge_nlp.kernels import ops

from .conftest import TINY

LAYER = dict(TINY, num_hidden_layers=3)


def family_config(family: str, vocab_size: int = 120, **overrides) -> transformers.PretrainedConfig:
    sizes = {**LAYER, "vocab_size": vocab_size, **overrides}
    if family == "bert":
        return transformers.BertConfig(**sizes)
    if family == "roberta":
        return transformers.RobertaConfig(**{**sizes, "pad_token_id": 1, "max_position_embeddings": 70})
    if family == "xlm-roberta":
        return transformers.XLMRobertaConfig(**{**sizes, "pad_token_id": 1, "max_position_embeddings": 70})
    if family == "electra":
        return transformers.ElectraConfig(embedding_size=sizes["hidden_size"], **sizes)
    if family == "distilbert":
        return transformers.DistilBertConfig(dim=32, n_layers=3, n_heads=2, hidden_dim=64, vocab_size=vocab_size,
                                             max_position_embeddings=64, **overrides)
    if family == "deberta-v2":
        return transformers.DebertaV2Config(**sizes, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
                                            max_relative_positions=32, norm_rel_ebd="layer_norm", share_att_key=False,
                                            type_vocab_size=0)
    if family == "modernbert":
        # 3 layers with global attention every 2nd: layers 0 and 2 global, layer 1 local (window 8).
        return transformers.ModernBertConfig(**sizes, pad_token_id=0, eos_token_id=1, bos_token_id=2, cls_token_id=2,
                                             sep_token_id=1, global_attn_every_n_layers=2, local_attention=8,
                                             hidden_activation="gelu")
    raise ValueError(family)


# The encoder linears of each family, written out independently of the registry.
ENCODER_LINEARS = {
    "bert": r"bert\.encoder\.layer\.\d\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    "roberta": r"roberta\.encoder\.layer\.\d\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    "xlm-roberta": r"roberta\.encoder\.layer\.\d\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    "electra": r"electra\.encoder\.layer\.\d\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    "distilbert": r"distilbert\.transformer\.layer\.\d\.(attention\.(q_lin|k_lin|v_lin|out_lin)|ffn\.(lin1|lin2))",
    # with share_att_key=False, the relative-position projections are encoder linears too
    "deberta-v2": r"deberta\.encoder\.layer\.\d\.(attention\.self\.(query_proj|key_proj|value_proj|pos_key_proj|pos_query_proj)"
                  r"|attention\.output\.dense|intermediate\.dense|output\.dense)",
    "modernbert": r"model\.layers\.\d\.(attn\.(Wqkv|Wo)|mlp\.(Wi|Wo))",
}
PER_LAYER = {"deberta-v2": 8, "modernbert": 4}
FAMILY_NAMES = [family.name for family in FAMILIES]
WITH_ATTENTION = [family.name for family in FAMILIES if family.attention_interface]


def tiny(family: str, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_config(family_config(family, **overrides))


def batch(seed: int = 0, size: int = 4, length: int = 20) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (size, length), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_the_registry_covers_the_issue_families():
    assert set(FAMILY_NAMES) >= {"bert", "roberta", "xlm-roberta", "electra", "distilbert", "deberta-v2", "modernbert"}
    assert set(ENCODER_LINEARS) == set(FAMILY_NAMES)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_exactly_the_encoder_linears_are_binarized_and_nothing_else(tmp_path, family):
    path = tmp_path / family
    tiny(family).save_pretrained(path)
    fp = AutoModelForSequenceClassification.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, quantization_config=SurgeConfig(binarize_attention=False))
    assert family_of(model).name == family
    kinds = {name: type(m) for name, m in model.named_modules()}
    replaced = {name for name, kind in kinds.items() if kind is SurgeLinear}
    expected = {name for name, m in fp.named_modules() if isinstance(m, nn.Linear) and re.fullmatch(ENCODER_LINEARS[family], name)}
    assert replaced == expected and len(expected) == 3 * PER_LAYER.get(family, 6)
    fp_kinds = {name: type(m) for name, m in fp.named_modules()}

    def others(found):  # outside the replaced linears (and their own quantizer submodules)
        return {name: kind for name, kind in found.items() if not any(name == r or name.startswith(r + ".") for r in replaced)}
    assert others(kinds) == others(fp_kinds)  # heads, embeddings, norms, poolers untouched
    fp_state = fp.state_dict()
    for name in replaced:  # pretrained weights in the latent weights
        assert torch.equal(model.get_submodule(name).weight, fp_state[f"{name}.weight"])


@pytest.mark.parametrize("family", WITH_ATTENTION)
def test_binarized_attention_runs_the_surge_attention_in_every_layer(family):
    model = surge_nlp.binarize(tiny(family), SurgeConfig(embedding_bits=1))
    quantizers = [m for m in model.modules() if isinstance(m, AttentionQuantizers)]
    assert len(quantizers) == 3 and not any(bool(q.query.initialized) for q in quantizers)
    with torch.no_grad():
        logits = model(**batch()).logits
    assert torch.isfinite(logits).all()
    # Every layer's quantizers saw their operands: the family's attention dispatched to "surge".
    assert all(bool(q.query.initialized) and bool(q.probs.initialized) for q in quantizers)
    # The padding mask is honoured (ModernBERT: and the local window): what sits in padded positions
    # cannot change the other tokens' outputs, bit for bit (same shapes, so the same float operations).
    other = batch()
    other["input_ids"] = torch.where(other["attention_mask"].bool(), other["input_ids"], torch.randint(3, 120, other["input_ids"].shape))
    assert not torch.equal(other["input_ids"], batch()["input_ids"])
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(**other).logits, model(**batch()).logits)


def test_a_family_without_the_attention_interface_is_named_and_the_model_is_untouched():
    model = tiny("deberta-v2")
    before = {name: type(m) for name, m in model.named_modules()}
    with pytest.raises(ValueError, match="binarize_attention=True is not available for model type 'deberta-v2'"):
        surge_nlp.binarize(model, SurgeConfig())
    assert {name: type(m) for name, m in model.named_modules()} == before and getattr(model, "hf_quantizer", None) is None


def test_relu_ffn_where_the_ffn_is_gated_is_refused_naming_the_family():
    with pytest.raises(ValueError, match="ffn_activation='relu' is not available for model type 'modernbert'.*gated"):
        surge_nlp.binarize(tiny("modernbert"), SurgeConfig(ffn_activation="relu"))


@pytest.mark.parametrize("family", ["electra", "xlm-roberta", "deberta-v2"])
def test_relu_ffn_quantizes_the_family_ffn_output_input_unsigned(family):
    model = surge_nlp.binarize(tiny(family), SurgeConfig(ffn_activation="relu", binarize_attention=False))
    unsigned = {name for name, m in model.named_modules() if isinstance(m, SurgeLinear) and not m.input_quantizer.signed}
    assert len(unsigned) == 3 and all(name.endswith(".output.dense") and ".attention." not in name for name in unsigned)


def _config_for(family: str, **extra) -> SurgeConfig:
    return SurgeConfig(binarize_attention=family in WITH_ATTENTION, **extra)


def _distillation_loss(student: nn.Module, teacher: nn.Module, inputs: dict) -> float:
    with torch.no_grad():
        s = student(**inputs, output_hidden_states=True)
        t = teacher(**inputs, output_hidden_states=True)
    hidden = sum(torch.mean((a - b) ** 2) for a, b in zip(s.hidden_states, t.hidden_states))
    return float(hidden + torch.mean((s.logits - t.logits) ** 2))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_a_few_distillation_steps_lower_the_loss(tmp_path, family):
    no_dropout = {"dropout": 0.0} if family == "distilbert" else {"hidden_dropout_prob": 0.0}
    # A student from other random weights than its teacher's: a real gap for a few steps to close.
    teacher = tiny(family, seed=0, **no_dropout)
    student = surge_nlp.binarize(tiny(family, seed=1, **no_dropout), _config_for(family, estimator="surge"))
    g = torch.Generator().manual_seed(1)
    rows = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids[0] % 2}
            for ids in torch.randint(3, 120, (16, 12), generator=g)]
    held_out = {"input_ids": torch.randint(3, 120, (8, 12), generator=g)}
    held_out["attention_mask"] = torch.ones_like(held_out["input_ids"])
    surge_nlp.calibrate(student.eval(), held_out)
    before = _distillation_loss(student, teacher.eval(), held_out)
    config = TrainingConfig(learning_rate=2e-3, batch_size=4, num_epochs=4, warmup_ratio=0.0, log_every=4, checkpoint_every=1000,
                            attention_weight=1.0 if family in WITH_ATTENTION else 0.0)
    result = train(student, torch.utils.data.DataLoader(rows, batch_size=4, shuffle=True), config, teacher=teacher,
                   output_dir=tmp_path, progress=False)
    after = _distillation_loss(student.eval(), teacher, held_out)
    assert result.steps == 16 and after < 0.9 * before, (before, after)
    if family in WITH_ATTENTION:  # the per-layer lambda statistics find the family's layers
        assert {f"lambda/layer_{i}/mean" for i in range(3)} <= set(result.log_history[0])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_the_qkv_recorder_finds_each_family_projections(family):
    model = surge_nlp.binarize(tiny(family), _config_for(family)).eval()
    with ProjectionRecorder(model) as recorder:
        with torch.no_grad():
            model(**batch())
        layers = recorder.layers()
    hidden = 32
    assert len(layers) == 3 and all(tuple(p.shape) == (4, 20, hidden) for layer in layers for p in layer)
    if family == "modernbert":  # the fused Wqkv output, split as the attention module splits it
        wqkv = model.model.layers[0].attn.Wqkv
        seen = {}
        handle = wqkv.register_forward_hook(lambda module, args, output: seen.update(out=output))
        with ProjectionRecorder(model) as recorder, torch.no_grad():
            model(**batch())
            q, k, v = recorder.layers()[0]
        handle.remove()
        view = seen["out"].view(4, 20, 3, 2, 16)
        assert torch.equal(q, view[:, :, 0].reshape(4, 20, hidden)) and torch.equal(v, view[:, :, 2].reshape(4, 20, hidden))


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_packed_round_trip_is_exact_and_deploy_matches_the_simulated_path(tmp_path, family):
    model = surge_nlp.binarize(tiny(family), _config_for(family, embedding_bits=1)).eval()
    inputs = batch(seed=2)
    with torch.no_grad():
        model(**inputs)  # calibrates
        for name, parameter in model.named_parameters():
            if name.endswith("beta"):
                parameter.normal_(0.0, 0.05)  # trained shifts, away from exact ties
        expected = model(**inputs).logits
    model.save_pretrained(tmp_path / "packed")
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "packed").eval()
    assert sum(isinstance(m, PackedSurgeLinear) for m in reloaded.modules()) == 3 * PER_LAYER.get(family, 6)
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, expected)
    if not ops.available():
        pytest.skip(f"kernels unavailable: {ops.unavailable_reason()}")
    fast = surge_nlp.deploy(reloaded)
    assert {m.engine for m in fast.modules() if isinstance(m, PackedSurgeLinear)} == {"xor-popcount"}
    with torch.no_grad():
        torch.testing.assert_close(fast(**inputs).logits, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))


@pytest.mark.parametrize("family", ["electra", "xlm-roberta", "deberta-v2", "modernbert"])
def test_surge_nlp_glue_accepts_the_family_as_model(tmp_path, family, minilm_path, glue_mirror, monkeypatch, capsys):
    import json

    import yaml
    from transformers import AutoTokenizer

    from surge_nlp.cli import main

    monkeypatch.setenv("SURGE_NLP_GLUE_DATASET", str(glue_mirror))
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)  # a real WordPiece tokenizer over real RTE text
    base = tmp_path / "base"
    config = family_config(family, vocab_size=tokenizer.vocab_size, max_position_embeddings=160)
    torch.manual_seed(0)
    transformers.AutoModel.from_config(config).save_pretrained(base)
    tokenizer.save_pretrained(base)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "task": "rte", "model": str(base), "max_train_samples": 16, "max_eval_samples": 16, "max_seq_length": 64,
        "teacher": {"learning_rate": 1e-3, "num_epochs": 1, "batch_size": 8, "ground_truth_weight": 1.0,
                    "logits_weight": 0.0, "hidden_weight": 0.0},
        "distill": {"learning_rate": 1e-3, "num_epochs": 1, "batch_size": 8, "attention_weight": 0.0},
        "stages": [{"name": "w1a1", "quantization": {"activation_bits": 1, "binarize_attention": family in WITH_ATTENTION}}]}))
    assert main(["-q", "glue", "rte", "--recipe", str(recipe), "--model", str(base), "--output", str(tmp_path / "run")]) == 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "accuracy" in result["stages"][-1]["metrics"]["validation"]
    student = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "student")
    assert family_of(student).name == family and any(isinstance(m, PackedSurgeLinear) for m in student.modules())
    out = capsys.readouterr().out
    assert "teacher (FP)" in out and "1-32-1" in out  # the final table: teacher and the W1A1 student
