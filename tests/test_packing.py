"""Packed 1-bit checkpoints: bit packing, save/reload through the Auto classes, the training form,
conflicting configs, damaged files, push_to_hub through an intercepted Hub client, summary vs the
file on disk, and PEFT adapters on a SURGE model."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import surge_nlp
from surge_nlp import CheckpointError, PackedSurgeEmbedding, PackedSurgeLinear, SurgeConfig, SurgeEmbedding, SurgeLinear
from surge_nlp.binarizers import ActivationQuantizer
from surge_nlp.packing import pack_signs, unpack_signs
from surge_nlp.serialization import read_safetensors_header

from .conftest import fixed_batch, tiny_config

WEIGHTS = "model.safetensors"
# No dropout: a training step is then a deterministic function of the weights and the batch.
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _binarized(model_class=transformers.BertForSequenceClassification, config: SurgeConfig | None = None, seed: int = 0, **overrides):
    """A tiny random SURGE model whose weights are not the initialisation's and whose activation
    quantizers are calibrated (one training-mode forward), in eval mode."""
    torch.manual_seed(seed)
    model = model_class(tiny_config(**{**NO_DROPOUT, **overrides}))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn_like(parameter))
    model = surge_nlp.binarize(model, config or SurgeConfig())
    _forward(model, fixed_batch())
    return model.eval()


def _forward(model, batch):
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if isinstance(model, transformers.BertForMultipleChoice):
        inputs = {k: v.unsqueeze(1).expand(-1, 2, -1).contiguous() for k, v in inputs.items()}
    return model(**inputs)


def _outputs(model, batch) -> list[torch.Tensor]:
    with torch.no_grad():
        out = _forward(model, batch)
    return [value for value in out.values() if isinstance(value, torch.Tensor)]


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b) and len(a) > 0
    return max((x - y).abs().max().item() for x, y in zip(a, b))


# ---------------------------------------------------------------- bit packing


@pytest.mark.parametrize("num_signs", [1, 7, 8, 9, 16, 37])
def test_pack_signs_matches_numpy_packbits(num_signs):
    signs = torch.rand(5, num_signs, generator=torch.Generator().manual_seed(num_signs)) > 0.5
    expected = np.packbits(signs.numpy(), axis=-1, bitorder="little")
    packed = pack_signs(signs)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (num_signs + 7) // 8)
    assert np.array_equal(packed.numpy(), expected)
    assert torch.equal(unpack_signs(packed, num_signs), signs)


def test_unpack_rejects_wrong_shapes_and_dtypes():
    with pytest.raises(ValueError, match=r"a packed row of 9 signs has 2 bytes, got 1"):
        unpack_signs(torch.zeros(3, 1, dtype=torch.uint8), 9)
    with pytest.raises(TypeError, match="uint8"):
        unpack_signs(torch.zeros(3, 2), 9)
    with pytest.raises(TypeError, match="bool"):
        pack_signs(torch.ones(3, 2))


@pytest.mark.parametrize("in_features", [16, 20])
def test_packed_linear_reproduces_surge_linear_exactly(in_features):
    torch.manual_seed(0)
    layer = SurgeLinear.from_config(SurgeConfig(), in_features, 6)
    torch.nn.init.normal_(layer.weight)
    layer.reset_surge_state()
    x = torch.randn(4, 3, in_features)
    layer(x)  # calibrates the input quantizer
    layer.eval()
    packed = PackedSurgeLinear.from_surge_linear(layer)
    assert packed.weight.dtype == torch.uint8 and packed.weight.shape == (6, (in_features + 7) // 8)
    centered = layer.weight - layer.weight.mean(dim=1, keepdim=True)
    assert torch.equal(packed.binary_weight(), centered.abs().mean(dim=1, keepdim=True) * torch.where(centered >= 0, 1.0, -1.0))
    assert torch.equal(packed(x), layer(x))
    assert not any(name.endswith("aux_weight") for name in packed.state_dict())


def test_packed_embedding_reproduces_surge_embedding_exactly():
    torch.manual_seed(0)
    embedding = SurgeEmbedding(30, 12, padding_idx=0)
    packed = PackedSurgeEmbedding.from_surge_embedding(embedding)
    ids = torch.randint(0, 30, (2, 9))
    assert torch.equal(packed(ids), embedding(ids))
    assert packed.weight.shape == (30, 2)


# ---------------------------------------------------------------- save / reload


AUTO_CLASSES = [
    (transformers.AutoModel, transformers.BertModel),
    (transformers.AutoModelForSequenceClassification, transformers.BertForSequenceClassification),
    (transformers.AutoModelForMaskedLM, transformers.BertForMaskedLM),
    (transformers.AutoModelForTokenClassification, transformers.BertForTokenClassification),
    (transformers.AutoModelForQuestionAnswering, transformers.BertForQuestionAnswering),
    (transformers.AutoModelForMultipleChoice, transformers.BertForMultipleChoice),
    (transformers.AutoModelForNextSentencePrediction, transformers.BertForNextSentencePrediction),
    (transformers.AutoModelForPreTraining, transformers.BertForPreTraining),
]


@pytest.mark.parametrize("auto_class, model_class", AUTO_CLASSES, ids=[c.__name__ for _, c in AUTO_CLASSES])
def test_every_bert_auto_class_reloads_the_packed_checkpoint(tmp_path, auto_class, model_class):
    model = _binarized(model_class)
    batch = fixed_batch()
    expected = _outputs(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = auto_class.from_pretrained(tmp_path).eval()  # no quantization_config passed
    assert type(reloaded) is model_class
    assert _max_difference(_outputs(reloaded, batch), expected) <= 1e-5
    packed = [m for m in reloaded.modules() if isinstance(m, PackedSurgeLinear)]
    assert len(packed) == 2 * 6 and not any(isinstance(m, SurgeLinear) for m in reloaded.modules())


@pytest.mark.parametrize("family", ["roberta", "distilbert"])
def test_other_bert_families_reload_the_packed_checkpoint(tmp_path, family):
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(tiny_config(family))
    model = surge_nlp.binarize(model, SurgeConfig(embedding_bits=1))
    batch = fixed_batch()
    _forward(model, batch)
    model.eval()
    expected = _outputs(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert sum(isinstance(m, PackedSurgeLinear) for m in reloaded.modules()) == 12
    assert isinstance(reloaded.get_input_embeddings(), PackedSurgeEmbedding)
    assert _max_difference(_outputs(reloaded, batch), expected) <= 1e-5


@pytest.mark.parametrize("embedding_bits", [32, 1])
def test_packed_checkpoint_holds_only_deployable_tensors(tmp_path, embedding_bits):
    model = _binarized(config=SurgeConfig(embedding_bits=embedding_bits, estimator="surge"))
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    linears = surge_nlp.surge_linears(model)
    assert len(linears) == 12
    for name, layer in linears.items():
        assert saved[f"{name}.weight"].dtype == torch.uint8
        assert saved[f"{name}.weight"].shape == (layer.out_features, layer.in_features // 8)
        assert torch.equal(saved[f"{name}.weight"], pack_signs(layer.weight >= layer.weight.mean(dim=1, keepdim=True)))
        assert torch.equal(saved[f"{name}.weight_scale"], (layer.weight - layer.weight.mean(1, keepdim=True)).abs().mean(1))
        assert torch.equal(saved[f"{name}.input_quantizer.alpha"], layer.input_quantizer.alpha.detach())
    assert not any("aux_weight" in key for key in saved)
    word = saved["bert.embeddings.word_embeddings.weight"]
    assert word.dtype == (torch.uint8 if embedding_bits == 1 else torch.float32)
    assert ("bert.embeddings.word_embeddings.weight_scale" in saved) == (embedding_bits == 1)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config == {**SurgeConfig(embedding_bits=embedding_bits).to_dict(), "checkpoint_format": "packed"}
    with safe_open(tmp_path / WEIGHTS, "pt") as handle:
        assert handle.metadata()["surge_nlp.checkpoint_format"] == "packed"


def test_one_bit_embeddings_round_trip(tmp_path):
    model = _binarized(config=SurgeConfig(embedding_bits=1))
    batch = fixed_batch()
    expected = _outputs(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.bert.embeddings.word_embeddings, PackedSurgeEmbedding)
    assert _max_difference(_outputs(reloaded, batch), expected) <= 1e-5


def test_one_bit_embeddings_tied_to_an_output_layer_cannot_be_packed(tmp_path):
    model = _binarized(transformers.BertForMaskedLM, config=SurgeConfig(embedding_bits=1))
    with pytest.raises(ValueError, match="ties it to the output layer.*tie_word_embeddings=False"):
        model.save_pretrained(tmp_path)
    untied = _binarized(transformers.BertForMaskedLM, config=SurgeConfig(embedding_bits=1), tie_word_embeddings=False)
    batch = fixed_batch()
    expected = _outputs(untied, batch)
    untied.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert _max_difference(_outputs(reloaded, batch), expected) <= 1e-5


def test_binarize_keeps_a_tied_output_layer_tied_as_from_pretrained_does(tmp_path):
    # Before: binarize gave the 1-bit embedding a copy of the weights, and the MLM decoder kept the old
    # parameter, so it no longer trained with the embedding (from_pretrained's model ties them).
    torch.manual_seed(0)
    transformers.BertForMaskedLM(tiny_config(**NO_DROPOUT)).save_pretrained(tmp_path)
    config = SurgeConfig(embedding_bits=1)
    binarized = surge_nlp.binarize(transformers.BertForMaskedLM.from_pretrained(tmp_path), config)
    loaded = surge_nlp.from_pretrained(tmp_path, config, auto_class=transformers.AutoModelForMaskedLM)
    batch = {key: value for key, value in fixed_batch().items() if key != "labels"}
    for model in (binarized, loaded):
        assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        model(**batch).logits.square().mean().backward()  # also calibrates the activation quantizers
        optimizer.step()
    assert _max_difference(_outputs(binarized.eval(), batch), _outputs(loaded.eval(), batch)) <= 1e-6


def test_pooler_is_binarized_only_when_removed_from_modules_to_not_convert(tmp_path):
    default = _binarized()
    assert not isinstance(default.bert.pooler.dense, SurgeLinear)
    model = _binarized(config=SurgeConfig(modules_to_not_convert=["classifier"]))
    assert isinstance(model.bert.pooler.dense, SurgeLinear)
    batch = fixed_batch()
    expected = _outputs(model, batch)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded.bert.pooler.dense, PackedSurgeLinear)
    assert _max_difference(_outputs(reloaded, batch), expected) <= 1e-5


def test_sharded_packed_checkpoint_round_trips(tmp_path):
    model = _binarized()
    batch = fixed_batch()
    expected = _outputs(model, batch)
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert _max_difference(_outputs(reloaded, batch), expected) <= 1e-5


def test_packed_model_saves_again_identically(tmp_path):
    _binarized().save_pretrained(tmp_path / "first")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "first")
    reloaded.save_pretrained(tmp_path / "second")
    first, second = load_file(tmp_path / "first" / WEIGHTS), load_file(tmp_path / "second" / WEIGHTS)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    with pytest.raises(ValueError, match="packed 1-bit weights"):
        surge_nlp.set_checkpoint_format(reloaded, "training")


def test_pack_model_in_memory_keeps_the_outputs_and_saves_packed(tmp_path):
    model = _binarized(config=SurgeConfig(checkpoint_format="training", embedding_bits=1))
    batch = fixed_batch()
    expected = _outputs(model, batch)
    assert surge_nlp.pack_model(model) is model
    assert not any(isinstance(m, (SurgeLinear, SurgeEmbedding)) for m in model.modules())
    assert _max_difference(_outputs(model, batch), expected) == 0.0
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "packed"
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert _max_difference(_outputs(reloaded, batch), expected) == 0.0


def test_summary_of_a_reloaded_packed_model_matches_the_file(tmp_path):
    _binarized(config=SurgeConfig(embedding_bits=1)).save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    totals = surge_nlp.summary(reloaded, print_fn=None).totals
    path = tmp_path / WEIGHTS
    with open(path, "rb") as handle:
        header_bytes = 8 + int.from_bytes(handle.read(8), "little")
    flags = sum(1 for key in read_safetensors_header(path) if key.endswith(".initialized"))
    # The file's tensor data is exactly the summary's deployed bytes plus one byte per quantizer flag.
    assert os.path.getsize(path) - header_bytes == totals["deployed_bytes"] + flags
    assert totals["fp32_bytes"] == 4 * sum(p.numel() for p in transformers.BertForSequenceClassification(tiny_config()).parameters())


# ---------------------------------------------------------------- training checkpoints


def _sgd_steps(model, batches):
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for batch in batches:
        optimizer.zero_grad()
        model(**batch).loss.backward()
        optimizer.step()


def test_training_checkpoint_continues_training_exactly(tmp_path):
    batches = [fixed_batch(seed=seed) for seed in range(4)]
    config = SurgeConfig(checkpoint_format="training", estimator="surge")
    resumed = _binarized(config=config)
    continuous = _binarized(config=SurgeConfig(checkpoint_format="training", estimator="surge"))
    _sgd_steps(resumed, batches[:2])
    resumed.save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    assert any(key.endswith("aux_weight") for key in saved)
    assert saved["bert.encoder.layer.0.attention.self.query.weight"].dtype == torch.float32
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert isinstance(reloaded.bert.encoder.layer[0].attention.self.query, SurgeLinear)
    _sgd_steps(reloaded, batches[2:])
    _sgd_steps(continuous, batches)
    expected = dict(continuous.named_parameters())
    assert expected.keys() == dict(reloaded.named_parameters()).keys()
    for name, parameter in reloaded.named_parameters():
        assert torch.equal(parameter, expected[name]), name


def test_trainer_resumes_exactly_from_training_checkpoints(tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    data = Dataset.from_dict({k: v.tolist() for k, v in fixed_batch(batch_size=16).items()})

    def train(output_dir, resume_from_checkpoint=None):
        model = _binarized(config=SurgeConfig(checkpoint_format="training"))
        args = TrainingArguments(output_dir=str(output_dir), max_steps=4, per_device_train_batch_size=8, report_to=[],
                                 save_strategy="steps", save_steps=2, use_cpu=True, learning_rate=1e-3, seed=0)
        Trainer(model=model, args=args, train_dataset=data).train(resume_from_checkpoint=resume_from_checkpoint)
        return model

    uninterrupted = train(tmp_path / "full")
    resumed = train(tmp_path / "resumed", resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    expected = dict(uninterrupted.named_parameters())
    for name, parameter in resumed.named_parameters():
        assert torch.equal(parameter, expected[name]), name


def test_training_checkpoint_teacher_reproduces_its_logits(tmp_path):
    student = _binarized(config=SurgeConfig(checkpoint_format="training"))
    batch = fixed_batch()
    expected = _outputs(student, batch)
    student.save_pretrained(tmp_path)
    teacher = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    assert _max_difference(_outputs(teacher, batch), expected) <= 1e-5


def test_set_checkpoint_format_switches_the_saved_form(tmp_path):
    model = _binarized(config=SurgeConfig(checkpoint_format="training"))
    surge_nlp.set_checkpoint_format(model, "packed")
    model.save_pretrained(tmp_path)
    assert load_file(tmp_path / WEIGHTS)["bert.encoder.layer.0.output.dense.weight"].dtype == torch.uint8
    with pytest.raises(ValueError, match="checkpoint_format='bits' is invalid; allowed values: 'packed', 'training'"):
        surge_nlp.set_checkpoint_format(model, "bits")
    with pytest.raises(ValueError, match="not a SURGE model"):
        surge_nlp.set_checkpoint_format(transformers.BertModel(tiny_config()), "packed")


# ---------------------------------------------------------------- configs passed at load time


def test_conflicting_surge_config_is_an_error_in_our_loader(tmp_path):
    _binarized().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"conflicts with the checkpoint.*activation_bits: saved 1, passed 2"):
        surge_nlp.from_pretrained(tmp_path, SurgeConfig(activation_bits=2))


def test_bare_transformers_load_keeps_the_saved_config(tmp_path):
    # What README says a bare from_pretrained does with a conflicting SurgeConfig: Transformers warns
    # and loads the checkpoint's own config (no quantizer hook can refuse it; surge_nlp patches nothing).
    _binarized().save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="quantization_config` from the model will be used"):
        model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, quantization_config=SurgeConfig(activation_bits=2))
    assert model.config.quantization_config.activation_bits == 1
    assert isinstance(model.bert.encoder.layer[0].output.dense, PackedSurgeLinear)


def test_the_same_surge_config_loads_without_warning(tmp_path, recwarn, caplog):
    _binarized().save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        model = surge_nlp.from_pretrained(tmp_path, SurgeConfig())
    assert isinstance(model.bert.encoder.layer[0].output.dense, PackedSurgeLinear)
    assert not [w for w in recwarn if "quantization_config" in str(w.message)]
    assert "quantization_config" not in caplog.text


# ---------------------------------------------------------------- damaged or mismatched checkpoints


@pytest.fixture
def packed_dir(tmp_path):
    _binarized().save_pretrained(tmp_path / "packed")
    return tmp_path / "packed"


def _load(path):
    return transformers.AutoModelForSequenceClassification.from_pretrained(path)


def _rewrite_tensor(directory, key, change):
    """Replace one tensor of the saved weights by `change(tensor)` (the file loses surge_nlp's metadata)."""
    path = directory / WEIGHTS
    tensors = load_file(path)
    tensors[key] = change(tensors[key])
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_quantization_config(directory, field, value):
    config_path = directory / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"][field] = value
    config_path.write_text(json.dumps(config))


def test_an_uncalibrated_model_is_not_saved_packed(tmp_path):
    # Reloaded, it would take its activation scales from whatever batch came first.
    torch.manual_seed(0)
    model = surge_nlp.binarize(transformers.BertForSequenceClassification(tiny_config(**NO_DROPOUT)), SurgeConfig())
    with pytest.raises(ValueError, match=r"not calibrated \(first: bert\.encoder\.layer\.0\..*surge_nlp\.calibrate"):
        model.save_pretrained(tmp_path / "packed")
    assert not (tmp_path / "packed" / WEIGHTS).exists()
    surge_nlp.set_checkpoint_format(model, "training")  # the latent weights are a valid start for training
    model.save_pretrained(tmp_path / "training")
    surge_nlp.set_checkpoint_format(model, "packed")
    batch = fixed_batch()
    assert surge_nlp.calibrate(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}) > 0
    model.save_pretrained(tmp_path / "packed")
    reloaded = _load(tmp_path / "packed")
    assert all(bool(q.initialized) for q in reloaded.modules() if isinstance(q, ActivationQuantizer))


def test_truncated_file_is_reported(packed_dir):
    path = packed_dir / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model.safetensors is truncated: its tensors need \d+ data bytes, the file holds \d+.*save the model again"):
        _load(packed_dir)
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated .*shorter than a safetensors header"):
        _load(packed_dir)


def test_corrupted_header_is_reported(packed_dir):
    path = packed_dir / WEIGHTS
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupted .*not valid JSON.*download the checkpoint again"):
        _load(packed_dir)


def _rewrite_header(path, change):
    """Rewrite the JSON header of a safetensors file by `change(header)`, keeping its data section."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + length])
    change(header)
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length:])


def _two_tensors(header):
    names = sorted((name for name in header if name != "__metadata__"), key=lambda name: header[name]["data_offsets"][0])
    return [header[name] for name in names if header[name]["data_offsets"][1] - header[name]["data_offsets"][0] >= 4][:2]


def _swap_data_between(header):
    # The first tensor claims bytes 1.. of its span plus one of the next: same sizes, same total, overlapping.
    first, second = _two_tensors(header)
    start, end = first["data_offsets"]
    first["data_offsets"] = [start + 1, end + 1]


def _shift_negative(header):
    first, _ = _two_tensors(header)
    first["data_offsets"] = [-4, first["data_offsets"][1] - first["data_offsets"][0] - 4]


@pytest.mark.parametrize("change, message", [
    (lambda header: _two_tensors(header)[0].update(data_offsets=["0", "4"]), "has an invalid header entry"),
    (_shift_negative, "has an invalid header entry"),
    (lambda header: _two_tensors(header)[0].update(shape=[True, 4]), "has an invalid header entry"),
    (lambda header: _two_tensors(header)[0].update(dtype="F128"), "has an invalid header entry"),
    (_swap_data_between, r"at bytes \d+-\d+ (overlaps the tensor before it|leaves 1 unclaimed bytes before it)"),
    (lambda header: header["__metadata__"].update(format=1), "its __metadata__ is not a mapping of strings"),
])
def test_a_lying_header_is_reported(packed_dir, change, message):
    # Each header is valid JSON with consistent sizes; only the entries lie (before: a TypeError or the
    # safetensors library's own error, not a CheckpointError naming the file).
    _rewrite_header(packed_dir / WEIGHTS, change)
    with pytest.raises(CheckpointError, match=f"model.safetensors is corrupted .*{message}.*download the checkpoint again"):
        _load(packed_dir)


def test_damaged_tensor_data_is_reported(packed_dir):
    path = packed_dir / WEIGHTS
    header = read_safetensors_header(path)
    with open(path, "rb") as handle:
        data_start = 8 + int.from_bytes(handle.read(8), "little")
    key = "bert.encoder.layer.0.attention.self.value.weight"
    data = bytearray(path.read_bytes())
    data[data_start + header[key]["data_offsets"][0]] ^= 0x10  # one flipped bit: one sign of the packed weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"corrupted: the data of tensor '{key}' does not match its checksum"):
        _load(packed_dir)


def test_packed_tensor_with_the_wrong_shape_is_reported(packed_dir):
    key = "bert.encoder.layer.1.intermediate.dense.weight"
    _rewrite_tensor(packed_dir, key, lambda tensor: tensor[:, :3].contiguous())
    with pytest.raises(CheckpointError, match=rf"'{key}' is U8 \[64, 3\], but the model built from config.json .* expects U8 \[64, 4\]"):
        _load(packed_dir)


def test_missing_packed_tensor_is_reported(packed_dir):
    path = packed_dir / WEIGHTS
    tensors = load_file(path)
    del tensors["bert.encoder.layer.0.attention.self.key.weight_scale"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="no tensor 'bert.encoder.layer.0.attention.self.key.weight_scale'"):
        _load(packed_dir)


def test_training_weights_under_a_packed_config_are_reported(tmp_path):
    _binarized(config=SurgeConfig(checkpoint_format="training")).save_pretrained(tmp_path)
    _edit_quantization_config(tmp_path, "checkpoint_format", "packed")
    with pytest.raises(CheckpointError, match=r"is F32 \[32, 32\], but .*checkpoint_format='packed'.* expects U8 \[32, 4\]"):
        _load(tmp_path)


@pytest.mark.parametrize("field, value, message", [
    ("activation_bits", 2, r"activation_bits=1 in the file but 2 in config.json"),
    ("ffn_activation", "relu", r"ffn_activation='gelu' in the file but 'relu' in config.json"),
    ("binarize_attention", False, r"binarize_attention=True in the file but False in config.json"),
])
def test_weights_saved_under_other_settings_are_reported(packed_dir, field, value, message):
    # Same tensor names and shapes, other meaning: without the settings recorded in the file this
    # config.json would load and compute something else, silently.
    _edit_quantization_config(packed_dir, field, value)
    with pytest.raises(CheckpointError, match=rf"saved with other quantization settings than config.json gives \({message}\)"):
        _load(packed_dir)


def test_a_float_tensor_stored_as_integers_is_reported(packed_dir):
    key = "bert.encoder.layer.0.attention.self.key.weight_scale"
    _rewrite_tensor(packed_dir, key, lambda tensor: tensor.to(torch.int64))
    with pytest.raises(CheckpointError, match=rf"'{key}' is I64 \[32\], but .* expects float \[32\]"):
        _load(packed_dir)


def test_a_pickled_surge_checkpoint_is_refused_before_it_is_opened(packed_dir):
    path = packed_dir / WEIGHTS
    torch.save(load_file(path), packed_dir / "pytorch_model.bin")
    path.unlink()
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin: a SURGE checkpoint is read from safetensors files only"):
        _load(packed_dir)


@pytest.mark.parametrize("field, value, message", [
    ("activation_bits", 3, r"SurgeConfig.activation_bits=3 is invalid; allowed values: 1, 2, 4, 8, 32"),
    ("checkpoint_format", "zip", r"SurgeConfig.checkpoint_format='zip' is invalid; allowed values: 'packed', 'training'"),
    ("weight_bitz", 1, r"SurgeConfig has no field\(s\) \['weight_bitz'\]"),
])
def test_invalid_surge_field_in_config_json_is_reported(packed_dir, field, value, message):
    _edit_quantization_config(packed_dir, field, value)
    with pytest.raises(ValueError, match=message):
        _load(packed_dir)


def test_loading_without_surge_nlp_fails_loudly(packed_dir):
    # A fresh interpreter that never imports surge_nlp: Transformers does not know "surge".
    code = ("import sys; from transformers import AutoModelForSequenceClassification as A; "
            "A.from_pretrained(sys.argv[1]); print('LOADED')")
    result = subprocess.run([sys.executable, "-c", code, str(packed_dir)], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": ""}, cwd=packed_dir)
    output = result.stdout + result.stderr
    assert result.returncode != 0 and "LOADED" not in output
    assert "surge" in output and "mismatch" in output.lower()


# ---------------------------------------------------------------- push_to_hub


def test_push_to_hub_uploads_a_loadable_packed_checkpoint_and_card(tmp_path, intercepted_hub):
    model = _binarized(config=SurgeConfig(embedding_bits=1))
    batch = fixed_batch()
    expected = _outputs(model, batch)
    surge_nlp.push_to_hub(model, "tiny-surge", metrics={"accuracy": 0.625}, task="rte", tags=["glue"])
    (repo_id, files, _), = intercepted_hub["commits"]
    assert repo_id == "user/tiny-surge" and sorted(files) == ["README.md", "config.json", WEIGHTS]
    uploaded = intercepted_hub["dir"]
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(uploaded).eval()
    assert _max_difference(_outputs(reloaded, batch), expected) <= 1e-5
    # The same tensors and metadata as save_pretrained: one save path.
    model.save_pretrained(tmp_path / "saved")
    pushed, saved = load_file(uploaded / WEIGHTS), load_file(tmp_path / "saved" / WEIGHTS)
    assert pushed.keys() == saved.keys() and all(torch.equal(pushed[k], saved[k]) for k in saved)
    with safe_open(uploaded / WEIGHTS, "pt") as a, safe_open(tmp_path / "saved" / WEIGHTS, "pt") as b:
        assert a.metadata() == b.metadata()
    card = (uploaded / "README.md").read_text()
    from huggingface_hub import ModelCard

    (result,) = ModelCard(card).data.eval_results  # the Hub's evaluation results
    assert (result.dataset_type, result.dataset_config, result.dataset_split) == ("nyu-mll/glue", "rte", "validation")
    assert (result.metric_type, result.metric_value) == ("accuracy", 0.625)
    for text in ("W-E-A bits: 1-1-1", "Estimator: surge (base clipped_ste, eta 0.5)", "Task: rte", "| accuracy | 0.625 |",
                 "import surge_nlp", 'from_pretrained("user/tiny-surge")', "library_name: transformers", "- surge_nlp\n",
                 "- glue\n"):
        assert text in card, text


def test_a_new_push_deletes_the_weight_files_it_does_not_replace(tmp_path, intercepted_hub):
    # Packed single file first, then the training checkpoint in shards: from_pretrained prefers
    # model.safetensors, so the old packed file left beside the new shards would load instead of them.
    packed = _binarized(config=SurgeConfig(embedding_bits=1))
    surge_nlp.push_to_hub(packed, "tiny-surge")
    uploaded = intercepted_hub["dir"]
    (uploaded / "notes.txt").write_text("kept: not a weight file")
    (uploaded / "adapter_model.safetensors").write_text("kept: not a file Transformers' save writes")
    (uploaded / "sub").mkdir()
    (uploaded / "sub" / "model.safetensors").write_text("kept: not top level")
    training = _binarized(config=SurgeConfig(embedding_bits=1, checkpoint_format="training"), seed=1)
    surge_nlp.push_to_hub(training, "tiny-surge", max_shard_size="20KB")
    shards = sorted(f.name for f in uploaded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and intercepted_hub["deleted"] == [[], [WEIGHTS]]
    # each commit is made onto the commit that was listed (the Hub refuses it if the repository moved)
    assert [kwargs["parent_commit"] for _, _, kwargs in intercepted_hub["commits"]] == [f"{0:040x}", f"{1:040x}"]
    assert sorted(f.name for f in uploaded.iterdir()) == sorted(["README.md", "adapter_model.safetensors", "config.json",
                                                                 "model.safetensors.index.json", "notes.txt", "sub", *shards])
    batch = fixed_batch()
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(uploaded).eval()
    assert _max_difference(_outputs(reloaded, batch), _outputs(training.eval(), batch)) <= 1e-5
    # and back: one packed file replaces the shards and their index
    surge_nlp.push_to_hub(packed, "tiny-surge")
    assert sorted(intercepted_hub["deleted"][-1]) == sorted(["model.safetensors.index.json", *shards])
    assert sorted(f.name for f in uploaded.iterdir()) == ["README.md", "adapter_model.safetensors", "config.json", WEIGHTS, "notes.txt", "sub"]


def test_a_push_to_a_new_branch_replaces_the_weight_files_it_starts_with(intercepted_hub):
    # The branch is made before the repository is listed: it starts as a copy of main, whose single
    # packed file would otherwise stay beside the new shards on the branch and load instead of them.
    packed = _binarized(config=SurgeConfig(embedding_bits=1))
    surge_nlp.push_to_hub(packed, "tiny-surge")
    training = _binarized(config=SurgeConfig(embedding_bits=1, checkpoint_format="training"), seed=1)
    surge_nlp.push_to_hub(training, "tiny-surge", revision="v2", max_shard_size="20KB")
    assert [(repo, branch) for repo, branch, _ in intercepted_hub["branches"]] == [("user/tiny-surge", "v2")]
    assert intercepted_hub["deleted"][-1] == [WEIGHTS] and intercepted_hub["commits"][-1][2]["revision"] == "v2"
    # Without write access a pull request may target a branch it cannot create (the Hub answers 403)
    intercepted_hub["refuse_branches"] = True
    surge_nlp.push_to_hub(packed, "tiny-surge", revision="v3", create_pr=True)
    assert intercepted_hub["commits"][-1][2]["create_pr"] is True
    from huggingface_hub.errors import HfHubHTTPError

    with pytest.raises(HfHubHTTPError, match="403"):  # not a pull request: the refusal stands
        surge_nlp.push_to_hub(packed, "tiny-surge", revision="v3")


def test_push_to_hub_uploads_the_folders_save_pretrained_writes(intercepted_hub):
    class TemplatesTokenizer:  # what a tokenizer with several chat templates writes
        def save_pretrained(self, directory):
            Path(directory, "tokenizer.json").write_text("{}")
            Path(directory, "additional_chat_templates").mkdir()
            Path(directory, "additional_chat_templates", "tool.jinja").write_text("{{ x }}")

    surge_nlp.push_to_hub(_binarized(), "tiny-surge", tokenizer=TemplatesTokenizer())
    (_, files, kwargs), = intercepted_hub["commits"]
    assert sorted(files) == ["README.md", "additional_chat_templates/tool.jinja", "config.json", WEIGHTS, "tokenizer.json"]
    assert kwargs["commit_message"] == "Upload BertForSequenceClassification"  # Transformers' default message


def test_push_to_hub_of_a_reloaded_model_without_metrics(packed_dir, intercepted_hub):
    model = transformers.AutoModelForSequenceClassification.from_pretrained(packed_dir)
    surge_nlp.push_to_hub(model, "again")
    card = (intercepted_hub["dir"] / "README.md").read_text()
    assert "Not measured for this upload." in card and f"Base model: {packed_dir}" in card
    assert load_file(intercepted_hub["dir"] / WEIGHTS).keys() == load_file(packed_dir / WEIGHTS).keys()


def test_transformers_own_push_to_hub_uploads_the_same_packed_checkpoint(packed_dir, intercepted_hub):
    # Not patched by surge_nlp: Transformers' method, its generic card, and our quantizer's packed state dict.
    model = transformers.AutoModelForSequenceClassification.from_pretrained(packed_dir)
    assert type(model).push_to_hub is transformers.PreTrainedModel.push_to_hub and "push_to_hub" not in vars(model)
    model.push_to_hub("plain")
    pushed, saved = load_file(intercepted_hub["dir"] / WEIGHTS), load_file(packed_dir / WEIGHTS)
    assert pushed.keys() == saved.keys() and all(torch.equal(pushed[k], saved[k]) for k in saved)
    assert pushed["bert.encoder.layer.0.output.dense.weight"].dtype == torch.uint8


# ---------------------------------------------------------------- PEFT


LORA_TARGETS = ["self.query", "self.value", "pooler.dense"]


@pytest.mark.parametrize("form", ["training", "packed"])
def test_lora_trains_with_trainer_and_saves_adapters_apart_from_the_packed_base(tmp_path, form):
    from datasets import Dataset
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import Trainer, TrainingArguments

    model = _binarized()
    model.save_pretrained(tmp_path / "base")
    if form == "packed":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=LORA_TARGETS, modules_to_save=["classifier"], task_type="SEQ_CLS"))
    query = peft_model.base_model.model.bert.encoder.layer[0].attention.self.query
    assert isinstance(query.base_layer, SurgeLinear if form == "training" else PackedSurgeLinear)
    batch = fixed_batch(batch_size=16)
    data = Dataset.from_dict({k: v.tolist() for k, v in batch.items()})
    lora_before = query.lora_B["default"].weight.detach().clone()
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=8, report_to=[],
                             save_strategy="no", use_cpu=True, learning_rate=1e-2)
    assert Trainer(model=peft_model, args=args, train_dataset=data).train().global_step == 2
    assert not torch.equal(lora_before, query.lora_B["default"].weight)

    peft_model.eval()
    expected = _outputs(peft_model, batch)
    peft_model.save_pretrained(tmp_path / "adapter")
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all("lora_" in key or "classifier" in key for key in adapter)
    assert not any(t.dtype == torch.uint8 for t in adapter.values())
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
    restored = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    # Adapters trained on the latent-weight model fit the packed base too: it computes the same binary layers.
    assert _max_difference(_outputs(restored, batch), expected) <= 1e-5
