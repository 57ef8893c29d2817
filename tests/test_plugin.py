"""The Transformers plug-in: which modules are replaced, pretrained weights in the right places,
training through optimizers and `transformers.Trainer`, the real MiniLM teacher, and summary()."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

import surge_nlp
from surge_nlp import AttentionQuantizers, SurgeConfig, SurgeEmbedding, SurgeLinear

from .conftest import fixed_batch, save_tiny

ENCODER_LINEARS = {
    "bert": r"bert\.encoder\.layer\.\d\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    "roberta": r"roberta\.encoder\.layer\.\d\.(attention\.self\.(query|key|value)|attention\.output\.dense|intermediate\.dense|output\.dense)",
    "distilbert": r"distilbert\.transformer\.layer\.\d\.(attention\.(q_lin|k_lin|v_lin|out_lin)|ffn\.(lin1|lin2))",
}


def _kinds(model):
    return {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))}


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_exactly_the_encoder_linears_are_replaced(tmp_path, family):
    path = save_tiny(tmp_path, family)
    fp = AutoModelForSequenceClassification.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, quantization_config=SurgeConfig())
    fp_kinds, kinds = _kinds(fp), _kinds(model)
    assert fp_kinds.keys() == kinds.keys()
    replaced = {name for name, kind in kinds.items() if kind is SurgeLinear}
    expected = {name for name in fp_kinds if re.fullmatch(ENCODER_LINEARS[family], name)}
    assert replaced == expected and len(expected) == 12
    for name, kind in kinds.items():  # everything else untouched: classifier, pooler, embeddings
        if name not in replaced:
            assert kind is fp_kinds[name], name
    # Pretrained weights land in the latent weights, and the auxiliary weights start from them.
    fp_state = fp.state_dict()
    for name in replaced:
        layer = model.get_submodule(name)
        assert torch.equal(layer.weight, fp_state[f"{name}.weight"])
        assert torch.equal(layer.bias, fp_state[f"{name}.bias"])
        assert torch.equal(layer.aux_weight, layer.weight)
        assert not bool(layer.input_quantizer.initialized) and torch.all(layer.input_quantizer.beta == 0)
    # One attention-quantizer set per self-attention module, and the "surge" attention runs.
    assert sum(isinstance(m, AttentionQuantizers) for m in model.modules()) == 2
    assert model.config._attn_implementation == "surge"


def test_modules_to_not_convert_is_honoured(tiny_bert):
    cfg = SurgeConfig(modules_to_not_convert=["classifier", "pooler", "encoder.layer.0", "output.dense"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, quantization_config=cfg)
    replaced = {name for name, m in model.named_modules() if isinstance(m, SurgeLinear)}
    assert replaced == {f"bert.encoder.layer.1.attention.self.{p}" for p in ("query", "key", "value")} | {
        "bert.encoder.layer.1.intermediate.dense"}
    assert not hasattr(model.bert.encoder.layer[0].attention.self, "surge_attention")


def test_nothing_to_binarize_is_a_clear_error(tiny_bert):
    with pytest.raises(ValueError, match="SURGE found no encoder linear to binarize"):
        AutoModelForSequenceClassification.from_pretrained(tiny_bert, quantization_config=SurgeConfig(modules_to_not_convert=["bert"]))
    with pytest.raises(TypeError, match="needs a Transformers PreTrainedModel.*Sequential"):
        surge_nlp.binarize(nn.Sequential(nn.Linear(2, 2)), SurgeConfig())
    with pytest.raises(ValueError, match="found no encoder linear.*and the given filter_fn"):
        surge_nlp.binarize(AutoModelForSequenceClassification.from_pretrained(tiny_bert), SurgeConfig(), filter_fn=lambda m, n: False)


def test_binarize_filter_fn_selects_apart_from_modules_to_not_convert(tiny_bert):
    seen = []

    def only_layer_1_but_not_its_value(module, name):
        seen.append((type(module).__name__, name))
        return ".layer.1." in name and not name.endswith(".value")

    cfg = SurgeConfig(embedding_bits=1, modules_to_not_convert=["classifier", "pooler", "intermediate"])
    with pytest.raises(ValueError, match=r"word embedding 'bert.embeddings.word_embeddings' is left out by modules_to_not_convert "
                                         r"entries \['embeddings\\\\.word_embeddings\$'\]"):  # the filter also decides the embedding
        surge_nlp.binarize(AutoModelForSequenceClassification.from_pretrained(tiny_bert), cfg, filter_fn=only_layer_1_but_not_its_value)
    cfg = SurgeConfig(modules_to_not_convert=["classifier", "pooler", "intermediate"])
    model = surge_nlp.binarize(AutoModelForSequenceClassification.from_pretrained(tiny_bert), cfg, filter_fn=only_layer_1_but_not_its_value)
    replaced = {name for name, m in model.named_modules() if isinstance(m, SurgeLinear)}
    # both predicates hold: layer 1 only (filter), no value (filter), no intermediate (modules_to_not_convert)
    assert replaced == {f"bert.encoder.layer.1.{p}" for p in ("attention.self.query", "attention.self.key", "attention.output.dense", "output.dense")}
    assert hasattr(model.bert.encoder.layer[1].attention.self, "surge_attention")
    assert not hasattr(model.bert.encoder.layer[0].attention.self, "surge_attention")
    # the filter saw the module objects with their qualified names
    assert ("Linear", "bert.encoder.layer.0.attention.self.query") in seen and ("BertSelfAttention", "bert.encoder.layer.1.attention.self") in seen
    # the result is a quantized model in Transformers' sense, set by the quantizer's own hooks
    assert isinstance(model.hf_quantizer, surge_nlp.SurgeHfQuantizer) and model.is_quantized
    assert model.quantization_method == "surge" and model.config._attn_implementation == "surge"
    with pytest.raises(TypeError, match=r"filter_fn=\.\.\.\) must be a callable"):
        surge_nlp.binarize(AutoModelForSequenceClassification.from_pretrained(tiny_bert), cfg, filter_fn="layer.1")


def test_a_model_with_attention_left_in_full_precision_runs_it_as_eager_attention(tiny_bert):
    # Before: the "surge" implementation is one for all layers, and a layer left out (modules_to_not_convert,
    # filter_fn; the binarize docstring's own example) raised on the first forward.
    import copy

    fp = AutoModelForSequenceClassification.from_pretrained(tiny_bert, attn_implementation="eager").eval()
    cfg = SurgeConfig(modules_to_not_convert=["classifier", "pooler", "encoder.layer.0"])
    model = surge_nlp.binarize(copy.deepcopy(fp), cfg).eval()
    assert not hasattr(model.bert.encoder.layer[0].attention.self, "surge_attention")
    batch = {"input_ids": torch.randint(3, 100, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    batch["attention_mask"][1, 5:] = 0
    captured = {}

    def keep_output(name):
        return lambda module, inputs, output: captured.__setitem__(name, output[0] if isinstance(output, tuple) else output)

    fp.bert.encoder.layer[0].register_forward_hook(keep_output("fp"))
    model.bert.encoder.layer[0].register_forward_hook(keep_output("surge"))
    for grad in (False, True):  # the exact inference path and the autograd path
        with torch.set_grad_enabled(grad):
            fp(**batch), model(**batch)
        # Layer 0 is all full precision: the same output as Transformers' eager attention.
        torch.testing.assert_close(captured["surge"], captured["fp"], rtol=1e-5, atol=1e-5)
    # An attention module that should have quantizers and has none is still an error, not silent FP.
    del model.bert.encoder.layer[1].attention.self.surge_attention
    with pytest.raises(RuntimeError, match="has no `surge_attention` quantizers"):
        model(**batch)


@pytest.mark.parametrize("checkpoint_format", ["packed", "training"])
def test_a_model_binarized_with_a_filter_saves_and_reloads_as_it_was(tiny_bert, tmp_path, checkpoint_format):
    # Before: config.json held modules_to_not_convert only, so from_pretrained converted what the filter had
    # kept in full precision, and refused the checkpoint with a misleading error.
    cfg = SurgeConfig(binarize_attention=False, checkpoint_format=checkpoint_format)
    model = surge_nlp.binarize(AutoModelForSequenceClassification.from_pretrained(tiny_bert), cfg,
                               filter_fn=lambda module, name: ".layer.0." not in f".{name}.").eval()
    batch = {"input_ids": torch.randint(3, 100, (2, 7))}
    surge_nlp.calibrate(model, batch)
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path / "saved")
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    def kinds(m):  # which modules are binarized (SurgeLinear, or PackedSurgeLinear once reloaded packed)
        return {name: "binary" if hasattr(module, "weight_bits") else "fp" for name, module in m.named_modules()
                if "encoder.layer" in name and (isinstance(module, nn.Linear) or hasattr(module, "weight_bits"))}

    assert kinds(again) == kinds(model) and type(again.bert.encoder.layer[0].output.dense) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(again(**batch).logits, expected)
    assert cfg.modules_to_not_convert == SurgeConfig().modules_to_not_convert  # the caller's config is not changed


def test_binarize_keeps_the_callers_config_apart_from_the_models():
    from transformers import BertConfig, BertForSequenceClassification

    def tiny():
        return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=64, vocab_size=100))

    cfg = SurgeConfig()
    first = surge_nlp.binarize(tiny(), cfg)
    surge_nlp.set_checkpoint_format(first, "training")  # before: written into the caller's object, so the next model too
    second = surge_nlp.binarize(tiny(), cfg)
    assert cfg.checkpoint_format == "packed" and second.config.quantization_config.checkpoint_format == "packed"
    assert first.config.quantization_config is not cfg and second.config.quantization_config is not cfg


def test_relu_ffn_goes_only_where_the_ffn_output_linear_is_binarized(tiny_bert):
    # Before: every layer's GELU became ReLU, also in layers kept in full precision.
    cfg = SurgeConfig(ffn_activation="relu", modules_to_not_convert=["classifier", "pooler", "encoder.layer.0"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, quantization_config=cfg)
    assert type(model.bert.encoder.layer[0].intermediate.intermediate_act_fn) is not nn.ReLU
    assert type(model.bert.encoder.layer[1].intermediate.intermediate_act_fn) is nn.ReLU
    assert not model.bert.encoder.layer[1].output.dense.input_quantizer.signed


def test_binarize_in_memory_matches_from_pretrained(tiny_bert):
    cfg = SurgeConfig(estimator="dpgc", activation_bits=2)
    loaded = AutoModelForSequenceClassification.from_pretrained(tiny_bert, quantization_config=cfg).eval()
    in_memory = surge_nlp.binarize(AutoModelForSequenceClassification.from_pretrained(tiny_bert), cfg).eval()
    assert in_memory.config.quantization_config == cfg and in_memory.is_quantized
    batch = fixed_batch()
    batch.pop("labels")
    torch.testing.assert_close(loaded(**batch).logits, in_memory(**batch).logits)
    with pytest.raises(ValueError, match="already quantized"):
        surge_nlp.binarize(in_memory, cfg)
    with pytest.raises(TypeError, match="needs a SurgeConfig"):
        surge_nlp.binarize(AutoModelForSequenceClassification.from_pretrained(tiny_bert), {"activation_bits": 1})


@pytest.mark.parametrize("training", [False, True])
def test_binarize_keeps_the_models_mode(tiny_bert, training):
    # Before: the swapped-in layers came in training mode inside an eval model (from_pretrained gives one),
    # so evaluating without another .eval() ran the training path (SURGE's auxiliary branch included).
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert).train(training)
    cfg = SurgeConfig(embedding_bits=1, ffn_activation="relu")
    model = surge_nlp.binarize(model, cfg)
    modes = {name: module.training for name, module in model.named_modules()}
    assert set(modes.values()) == {training}, [name for name, mode in modes.items() if mode != training]
    assert any(isinstance(module, SurgeEmbedding) for module in model.modules())
    assert any(isinstance(module, nn.ReLU) for module in model.modules())


def test_one_bit_embeddings(tiny_bert):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, quantization_config=SurgeConfig(embedding_bits=1))
    emb = model.bert.embeddings.word_embeddings
    assert isinstance(emb, SurgeEmbedding)
    rows = emb(torch.tensor([[5, 7]]))[0]
    for row in rows:  # each row is +-alpha_row
        assert row.abs().unique().numel() == 1
    assert type(model.bert.embeddings.position_embeddings) is nn.Embedding


def test_padding_does_not_change_binarized_outputs(tiny_bert):
    """The binarized attention must keep masked tokens out (the learned shift must not revive them)."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, quantization_config=SurgeConfig())
    ids = torch.randint(3, 120, (1, 6))
    model(input_ids=ids)  # calibrate activation scales
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, AttentionQuantizers):
                m.probs.beta.fill_(-10.0)  # an extreme learned shift: every probability rounds up
    model.eval()
    short = model(input_ids=ids).logits
    padded_ids = torch.cat([ids, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 4)], dim=1).long()
    padded = model(input_ids=padded_ids, attention_mask=mask).logits
    torch.testing.assert_close(short, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["ste", "clipped_ste", "approx_sign", "ede", "dpgc", "surge"])
def test_a_few_steps_lower_the_loss_for_every_estimator(tiny_bert, estimator):
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, quantization_config=SurgeConfig(estimator=estimator))
    model.train()
    model.config.hidden_dropout_prob = 0.0
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    batch = fixed_batch()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        surge_nlp.set_training_progress(model, step / 29)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5, losses
    lambdas = [m.last_lambda for m in surge_nlp.surge_linears(model).values()]
    if estimator in ("dpgc", "surge"):
        # A random tiny model has near-uniform attention, whose 1-bit probabilities all round to 0:
        # no gradient reaches the attention's binary branches (g_b = 0, so AGS gives lambda = 0).
        # The FFN linears always receive one.
        assert all(lam is not None and lam >= 0 for lam in lambdas)
        ffn = [m.last_lambda for n, m in surge_nlp.surge_linears(model).items() if "attention" not in n]
        assert all(lam > 0 for lam in ffn)
        if estimator == "dpgc":
            assert all(lam == pytest.approx(0.5) for lam in lambdas)
    else:
        assert all(lam is None for lam in lambdas)


def test_ede_progress_reaches_every_surrogate(tiny_bert):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, quantization_config=SurgeConfig(estimator="ede"))
    surge_nlp.set_training_progress(model, 1.0)
    surrogates = [m.surrogate for m in model.modules() if hasattr(m, "surrogate")]
    assert len(surrogates) == 12 + 2 * 4
    assert all(s.t == pytest.approx(10.0) for s in surrogates)


def test_transformers_trainer_accepts_and_trains_the_model(tiny_bert, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, quantization_config=SurgeConfig())
    assert model.hf_quantizer.is_qat_trainable and model.hf_quantizer.is_trainable
    batch = fixed_batch(batch_size=16)
    data = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    before = model.bert.encoder.layer[0].attention.self.query.weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=3, per_device_train_batch_size=8,
                             report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3
    assert not torch.equal(before, model.bert.encoder.layer[0].attention.self.query.weight)


@pytest.mark.slow
def test_real_minilm_teacher_is_fully_binarized(minilm_path):
    from transformers import AutoModel, AutoTokenizer

    model = AutoModel.from_pretrained(minilm_path, quantization_config=SurgeConfig())
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    encoder = {name for name in linears if name.startswith("encoder.layer.")}
    assert len(encoder) == 6 * 6
    assert all(isinstance(linears[name], SurgeLinear) for name in encoder)
    assert not isinstance(model.pooler.dense, SurgeLinear)
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    batch = tokenizer(["binary networks are small", "and fast"], padding=True, return_tensors="pt")
    out = model(**batch).last_hidden_state
    assert out.shape == (2, batch["input_ids"].shape[1], 384) and torch.isfinite(out).all()
    report = surge_nlp.summary(model, print_fn=None)
    assert report.totals["binarized_layers"] == 36
    assert report.totals["params_1bit"] == sum(linears[n].weight.numel() for n in encoder)


@pytest.mark.parametrize("family,head", [("bert", "ForSequenceClassification"), ("roberta", "ForSequenceClassification"),
                                         ("distilbert", "ForSequenceClassification"), ("bert", "ForTokenClassification")])
def test_summary_macs_match_a_counted_forward(tmp_path, family, head):
    # Independent count: run one sequence and add up, for every linear, the rows it really
    # processed x in x out; the pooler and a sequence-classification head see one row, the
    # encoder and a token-classification head every token. Attention: Q.K^T and P.V per layer.
    import transformers

    from .conftest import tiny_config

    config = tiny_config(family)
    model_class = getattr(transformers, f"{type(config).__name__[:-len('Config')]}{head}")
    torch.manual_seed(0)
    model = model_class(config)
    model.save_pretrained(tmp_path / "m")
    model = model_class.from_pretrained(tmp_path / "m", quantization_config=SurgeConfig(estimator="clipped_ste", modules_to_not_convert=[])).eval()
    seq_len, counted, binary = 16, {}, {}
    hooks = [m.register_forward_hook(lambda m, args, out, name=name: counted.__setitem__(
        name, args[0].numel() // m.in_features * m.in_features * m.out_features))
        for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        model(input_ids=torch.randint(3, 120, (1, seq_len)))
    for hook in hooks:
        hook.remove()
    text = model.config
    hidden = getattr(text, "hidden_size", None) or text.dim
    layers = getattr(text, "num_hidden_layers", None) or text.n_layers
    attention = layers * 2 * seq_len * seq_len * hidden
    report = surge_nlp.summary(model, seq_len=seq_len, print_fn=None)
    assert report.totals["macs_per_sequence"] == sum(counted.values()) + attention
    one_bit = {layer.name for layer in report.layers if layer.kind == "linear" and layer.input_bits == 1}
    assert one_bit and one_bit <= set(counted)
    assert report.totals["binary_mac_share"] == pytest.approx((sum(counted[n] for n in one_bit) + attention)
                                                              / report.totals["macs_per_sequence"])
    per_sequence = {name for name, macs in counted.items() if macs == model.get_submodule(name).in_features * model.get_submodule(name).out_features}
    assert bool(per_sequence) == (head == "ForSequenceClassification")
    # the binarized per-sequence layers (the pooler; nothing is kept in FP here but the classifier) say so
    reported = {layer.name for layer in report.layers if not layer.per_token}
    assert reported == per_sequence & {layer.name for layer in report.layers}
    assert ("bert.pooler.dense" in reported) == (family == "bert" and head == "ForSequenceClassification")


@pytest.mark.parametrize("share,printed", [(0.99996, "99.99%"), (1.0, "100.00%"), (0.98695, "98.69%")])
def test_summary_never_rounds_the_binary_share_up_to_all(share, printed):
    from surge_nlp.summary import ModelSummary

    totals = dict(binarized_layers=1, kernel_layers=0, kernel_attention_modules=0, params_1bit=8, params_32bit=1,
                  deployed_bytes=5, fp32_bytes=36, compression_ratio=7.2, seq_len=128, macs_per_sequence=1000,
                  binary_mac_share=share)
    assert f"binary MACs (seq 128):     {printed} of 1,000" in ModelSummary([], totals).format(layers=False)


def test_summary_counts(tiny_bert):
    model = AutoModelForSequenceClassification.from_pretrained(tiny_bert, quantization_config=SurgeConfig())
    lines = []
    report = surge_nlp.summary(model, seq_len=16, print_fn=lines.append)
    t = report.totals
    per_layer_1bit = 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert t["params_1bit"] == per_layer_1bit
    fp_params = sum(p.numel() for n, p in model.named_parameters() if "aux_weight" not in n)
    deployable = sum(p.numel() for n, p in model.named_parameters()
                     if "aux_weight" not in n and "quantizer" not in n and "surge_attention" not in n)
    assert t["fp32_bytes"] == 4 * deployable
    # deployed = 1 bit per binarized weight + 32 bits for every other deployable value (+ per-row scales)
    scales = sum(layer.params_32bit for layer in report.layers)
    assert t["params_32bit"] == fp_params - per_layer_1bit + 2 * (4 * 32 + 64 + 32)
    assert t["deployed_bytes"] == sum((l.params_1bit + 7) // 8 for l in report.layers) + 4 * t["params_32bit"]
    assert t["compression_ratio"] == pytest.approx(t["fp32_bytes"] / t["deployed_bytes"])
    assert 0 < t["binary_mac_share"] < 1 and scales > 0
    assert "compression ratio" in lines[0] and "bert.encoder.layer.0.attention.self.query" in lines[0]
    assert report.as_dict()["layers"][0]["weight_bits"] == 1
