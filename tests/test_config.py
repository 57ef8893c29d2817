"""SurgeConfig: defaults, JSON round trip, registration, and every invalid value a user can pass."""

from __future__ import annotations

import importlib
import json

import pytest

import surge_nlp
from surge_nlp import SurgeConfig


def test_to_dict_is_json_safe_and_round_trips():
    cfg = SurgeConfig(activation_bits=4, embedding_bits=1, estimator="dpgc", base_estimator="ede", eta=0.25,
                      binarize_attention=False, modules_to_not_convert=["classifier", "encoder.layer.0"])
    data = json.loads(json.dumps(cfg.to_dict()))
    assert data["quant_method"] == "surge"
    assert SurgeConfig.from_dict(data) == cfg
    assert SurgeConfig.from_dict(data).to_dict() == cfg.to_dict()


def test_round_trip_through_config_json(tiny_bert, tmp_path):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = SurgeConfig(activation_bits=2, estimator="ede")
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, quantization_config=cfg)
    model.config.save_pretrained(tmp_path / "cfg")
    saved = json.loads((tmp_path / "cfg" / "config.json").read_text())["quantization_config"]
    assert SurgeConfig.from_dict(saved) == cfg
    reloaded = AutoConfig.from_pretrained(tmp_path / "cfg").quantization_config
    assert SurgeConfig.from_dict(reloaded if isinstance(reloaded, dict) else reloaded.to_dict()) == cfg


def test_the_default_config_is_bit_w1a1_with_surge_and_a_full_precision_head_and_embeddings():
    # What SurgeConfig() does to a model, not what its fields say: every encoder linear gets 1-bit
    # weights and inputs with SURGE's compensator, attention is binarized, while the word
    # embeddings, the pooler and the classifier stay full precision.
    from torch import nn
    from transformers import BertConfig, BertForSequenceClassification

    import surge_nlp
    from surge_nlp.integration import surge_linears
    from surge_nlp.layers import SurgeEmbedding

    model = surge_nlp.binarize(BertForSequenceClassification(BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100)))
    linears = surge_linears(model)
    encoder = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and ".encoder." in f".{name}"]
    assert sorted(linears) == sorted(encoder) and len(linears) == 12
    assert all(m.weight_bits == 1 and m.input_bits == 1 and m.compensator.mode == "surge" for m in linears.values())
    assert all(hasattr(model.get_submodule(f"bert.encoder.layer.{i}.attention.self"), "surge_attention") for i in range(2))
    assert type(model.bert.pooler.dense) is nn.Linear and type(model.classifier) is nn.Linear
    assert not isinstance(model.bert.embeddings.word_embeddings, SurgeEmbedding)
    assert SurgeConfig().bits_label == "1-32-1"


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("weight_bits", 2, "1"),
        ("weight_bits", True, "1"),
        ("activation_bits", 3, "1, 2, 4, 8, 32"),
        ("embedding_bits", 8, "1, 32"),
        ("estimator", "sign", "'ste', 'clipped_ste', 'approx_sign', 'ede', 'dpgc', 'surge'"),
        ("base_estimator", "surge", "'ste', 'clipped_ste', 'approx_sign', 'ede'"),
        ("eta", 0.0, "a number > 0"),
        ("eta", -1, "a number > 0"),
        ("eta", "big", "a number > 0"),
        ("binarize_attention", "yes", "True, False"),
        ("modules_to_not_convert", "pooler", "a list of non-empty module names"),
        ("modules_to_not_convert", ["pooler", ""], "a list of non-empty module names"),
        ("quant_method", "bitnet", "'surge'"),
        ("activation_bits", 2.0, "1, 2, 4, 8, 32"),  # 2.0 == 2, but bit widths feed integer arithmetic
        ("weight_bits", 1.0, "1"),
        ("eta", float("inf"), "a number > 0"),
        ("attention_probability_scale", float("inf"), "None or a number > 0"),
        ("modules_to_not_convert", ["pooler", "layer[0"], "module names or regular expressions"),
    ],
)
def test_invalid_values_name_field_and_allowed_values(field, value, allowed):
    with pytest.raises(ValueError) as err:
        SurgeConfig(**{field: value})
    message = str(err.value)
    assert f"SurgeConfig.{field}=" in message and allowed in message


def test_base_estimator_only_with_auxiliary_branch():
    with pytest.raises(ValueError, match="base_estimator='ede' only applies with estimator in"):
        SurgeConfig(estimator="ste", base_estimator="ede")
    assert SurgeConfig(estimator="surge", base_estimator="ede").binary_estimator == "ede"
    assert SurgeConfig(estimator="approx_sign").binary_estimator == "approx_sign"


def test_binarize_attention_needs_quantized_activations():
    with pytest.raises(ValueError, match="binarize_attention=True is invalid with activation_bits=32"):
        SurgeConfig(activation_bits=32)
    assert SurgeConfig(activation_bits=32, binarize_attention=False).activation_bits == 32


def test_unknown_field_from_dict_names_it():
    with pytest.raises(ValueError, match=r"no field\(s\) \['act_bits'\]"):
        SurgeConfig.from_dict({"quant_method": "surge", "act_bits": 1})


def test_from_dict_keyword_overrides_are_validated_and_the_rest_returned():
    config, unused = SurgeConfig.from_dict({"quant_method": "surge"}, return_unused_kwargs=True,
                                           activation_bits=2, output_attentions=True)
    assert config.activation_bits == 2 and unused == {"output_attentions": True}
    assert SurgeConfig.from_dict({"quant_method": "surge", "weight_bits": 1}, eta=0.5).eta == 0.5
    # Transformers' base class set these after validation: a float bit width reached deploy's integer code.
    with pytest.raises(ValueError, match="activation_bits"):
        SurgeConfig.from_dict({"quant_method": "surge"}, activation_bits=2.0)
    with pytest.raises(ValueError, match="estimator"):
        SurgeConfig.from_dict({"quant_method": "surge"}, estimator="nonsense")


def test_registered_with_transformers_and_reimport_is_idempotent():
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING, AutoQuantizationConfig

    assert AUTO_QUANTIZATION_CONFIG_MAPPING["surge"].__name__ == "SurgeConfig"
    assert AUTO_QUANTIZER_MAPPING["surge"].__name__ == "SurgeHfQuantizer"
    surge_nlp.register()
    importlib.reload(surge_nlp)  # re-running the package's import registers again without raising
    assert isinstance(AutoQuantizationConfig.from_dict({"quant_method": "surge"}), SurgeConfig)


def test_stale_class_from_a_reloaded_module_is_replaced(monkeypatch):
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    stale = type("SurgeHfQuantizer", (), {"__module__": "surge_nlp.quantizer"})  # what a reload leaves behind
    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "surge", stale)
    surge_nlp.register()
    assert AUTO_QUANTIZER_MAPPING["surge"] is surge_nlp.SurgeHfQuantizer


def test_foreign_registration_is_not_overwritten(monkeypatch):
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    class Impostor:  # another package's "surge"
        pass

    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "surge", Impostor)
    with pytest.raises(RuntimeError, match="already registered by"):
        surge_nlp.register()


def test_registered_surrogates_are_allowed_estimators():
    from surge_nlp.surrogates import SURROGATES, Surrogate, make_surrogate

    class Linear(Surrogate):
        name = "test_linear_surrogate"

        def derivative(self, u):
            return 1 - u.abs().clamp(max=1)

    try:
        config = SurgeConfig(estimator="test_linear_surrogate", binarize_attention=True)
        assert config.binary_estimator == "test_linear_surrogate"
        assert SurgeConfig(estimator="surge", base_estimator="test_linear_surrogate").base_estimator == "test_linear_surrogate"
        assert isinstance(make_surrogate("test_linear_surrogate"), Linear)
        with pytest.raises(ValueError, match="already registered"):
            type("Clash", (Surrogate,), {"name": "test_linear_surrogate", "__module__": "elsewhere"})
    finally:
        SURROGATES.pop("test_linear_surrogate")
    with pytest.raises(ValueError, match=r"estimator='test_linear_surrogate' is invalid; allowed values: 'ste', 'clipped_ste'"):
        SurgeConfig(estimator="test_linear_surrogate")
