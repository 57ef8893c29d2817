"""SURGE checkpoints: what `save_pretrained` writes and what `from_pretrained` checks before loading.

Two forms, chosen by `SurgeConfig.checkpoint_format` (stored in `config.json`):

- "packed" (default, deployable): each binarized linear keeps `weight` as uint8 signs packed 8 per
  byte (`[out, ceil(in / 8)]`, see `surge_nlp.packing`), `weight_scale` (one alpha per output row),
  its bias and the input quantizer's learned scale/shift; with `embedding_bits=1` the word
  embeddings are packed the same way. No latent full-precision copy, no DPGC auxiliary weights.
  It reloads as `PackedSurgeLinear`/`PackedSurgeEmbedding`, for inference (and PEFT adapters).
- "training": the full training state (latent weights, auxiliary weights, quantizer state), so a
  reloaded model continues training exactly (resuming, multi-step distillation).

Both go through Transformers' own `save_pretrained` (the quantizer's `get_state_dict_and_metadata`
calls `checkpoint_state_dict`); there is no second save path. The safetensors metadata records the
form, a CRC-32 per tensor and the settings that give the tensors their meaning (bits, FFN
activation, attention binarization). Loading checks the files first (safetensors only, truncation,
a damaged header or data, tensor shapes and dtypes and those settings against config.json) and
says what is wrong before any weight is loaded.

Example:
    >>> import tempfile
    >>> import torch
    >>> from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification
    >>> import surge_nlp
    >>> model = surge_nlp.binarize(BertForSequenceClassification(BertConfig(hidden_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)))
    >>> model = model.eval()
    >>> ids = torch.tensor([[1, 5, 7, 2]])
    >>> with tempfile.TemporaryDirectory() as directory:
    ...     logits = model(ids).logits
    ...     model.save_pretrained(directory)
    ...     packed = AutoModelForSequenceClassification.from_pretrained(directory)
    ...     bool(torch.allclose(packed(ids).logits, logits, atol=1e-5))
    True
    >>> type(packed.bert.encoder.layer[0].attention.self.query).__name__
    'PackedSurgeLinear'
"""

from __future__ import annotations

import json
import math
import mmap
import os
import zlib
from collections.abc import Iterable

import torch
from torch import nn

from .attention import AttentionQuantizers
from .binarizers import ActivationQuantizer
from .config import CHECKPOINT_FORMATS, SurgeConfig
from .layers import SurgeEmbedding, SurgeLinear
from .packed_layers import PackedSurgeEmbedding, PackedSurgeLinear

METADATA_FORMAT_KEY = "surge_nlp.checkpoint_format"
# CRC-32 of every tensor's bytes, by name (safetensors itself has no checksum): catches damaged data.
METADATA_CHECKSUMS_KEY = "surge_nlp.crc32"
# The settings the saved tensors were computed under: config.json must agree on them, else the same
# tensors (same names and shapes) would silently compute something else (e.g. 2-bit for 1-bit inputs).
METADATA_CONFIG_KEY = "surge_nlp.quantization_config"
TENSOR_MEANING_FIELDS = ("weight_bits", "activation_bits", "embedding_bits", "binarize_attention", "ffn_activation",
                         "attention_probability_shift", "attention_probability_scale", "checkpoint_format")
SURGE_MODULES = (SurgeLinear, PackedSurgeLinear, SurgeEmbedding, PackedSurgeEmbedding, AttentionQuantizers)
_HEADER_LENGTH_BYTES = 8
_SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                         "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class CheckpointError(ValueError):
    """A SURGE checkpoint that cannot be loaded: the message says what is wrong and what to do."""


def surge_config_of(model: nn.Module) -> SurgeConfig:
    """The model's SurgeConfig; raises ValueError for a model not quantized with SURGE."""
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if not isinstance(config, SurgeConfig):
        raise ValueError(f"{type(model).__name__} is not a SURGE model; load it with a SurgeConfig or call surge_nlp.binarize(model, config)")
    return config


def set_checkpoint_format(model: nn.Module, checkpoint_format: str) -> None:
    """Choose what `model.save_pretrained` / `push_to_hub` write: "packed" or "training".

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> import surge_nlp
        >>> model = surge_nlp.binarize(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=100)))
        >>> surge_nlp.set_checkpoint_format(model, "training")
        >>> model.config.quantization_config.checkpoint_format
        'training'
    """
    config = surge_config_of(model)
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format={checkpoint_format!r} is invalid; allowed values: {', '.join(map(repr, CHECKPOINT_FORMATS))}")
    if checkpoint_format == "training" and is_packed(model):
        raise ValueError(
            "this model holds packed 1-bit weights (it was loaded from a packed checkpoint), which cannot be turned "
            "back into a training checkpoint: load the training checkpoint (checkpoint_format='training') to keep training"
        )
    config.checkpoint_format = checkpoint_format
    model.config.quantization_config = config


def is_packed(model: nn.Module) -> bool:
    """True when the model holds packed 1-bit weights (uint8 tensors in its state), whatever module
    type runs them (`PackedSurgeLinear`, or `surge_nlp.deploy`'s kernels): no latent weights to train."""
    return any(tensor.dtype == torch.uint8 for tensor in model.state_dict().values())


def _ties_word_embeddings(model: nn.Module) -> bool:
    get_output = getattr(model, "get_output_embeddings", None)
    config = getattr(model, "config", None)
    if get_output is None or get_output() is None or config is None:
        return False
    return bool(getattr(config.get_text_config(), "tie_word_embeddings", False))


def _packed_module(module: nn.Module, name: str, model: nn.Module) -> nn.Module | None:
    if isinstance(module, SurgeLinear):
        return PackedSurgeLinear.from_surge_linear(module)
    if isinstance(module, SurgeEmbedding):
        if _ties_word_embeddings(model):
            raise ValueError(
                f"embedding_bits=1 packs {name}, but the config ties it to the output layer, which needs the full-precision "
                "matrix: build the model with tie_word_embeddings=False, or save with checkpoint_format='training'"
            )
        return PackedSurgeEmbedding.from_surge_embedding(module)
    return None


def pack_model(model: nn.Module) -> nn.Module:
    """Replace every SurgeLinear/SurgeEmbedding by its packed deploy form, in place; returns `model`.

    Works on a materialised model (packs the trained weights; the model then saves packed) and on
    the meta device (builds the empty packed modules that `from_pretrained` loads a packed
    checkpoint into).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertModel
        >>> import surge_nlp
        >>> model = surge_nlp.binarize(BertModel(BertConfig(hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))).eval()
        >>> ids = torch.tensor([[3, 4, 5]])
        >>> reference = model(ids).last_hidden_state
        >>> packed = surge_nlp.pack_model(model)
        >>> type(packed.encoder.layer[0].output.dense).__name__
        'PackedSurgeLinear'
        >>> bool(torch.equal(packed(ids).last_hidden_state, reference))
        True
    """
    for name, module in list(model.named_modules()):
        packed = _packed_module(module, name, model)
        if packed is not None:
            model.set_submodule(name, packed.train(module.training))  # the mode it replaces
    config = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
    if isinstance(config, SurgeConfig):
        config.checkpoint_format = "packed"
    return model


def packed_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The deployable state dict: `model.state_dict()` with every binarized layer in packed form.
    Raises ValueError when an activation quantizer was never calibrated: reloaded, such a model
    would take its scales from whatever batch it saw first."""
    uncalibrated = [name for name, module in model.named_modules()
                    if isinstance(module, ActivationQuantizer) and not bool(module.initialized)]
    if uncalibrated:
        raise ValueError(
            f"checkpoint_format='packed' saves the deployable model, but {len(uncalibrated)} activation quantizer(s) "
            f"are not calibrated (first: {uncalibrated[0]}); train the model, or run surge_nlp.calibrate(model, batch) "
            "on representative inputs, before saving; or save with checkpoint_format='training'"
        )
    state = model.state_dict()
    for name, module in model.named_modules():
        packed = _packed_module(module, name, model)
        if packed is None:
            continue
        prefix = f"{name}." if name else ""
        for key in [key for key in state if key.startswith(prefix)]:
            del state[key]
        state.update({prefix + key: tensor for key, tensor in packed.state_dict().items()})
    return state


def _crc32(tensor: torch.Tensor) -> int:
    data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
    return zlib.crc32(data)


def checkpoint_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """What `save_pretrained` writes for a SURGE model, per its `checkpoint_format`, and the
    safetensors metadata (the format and a CRC-32 per tensor)."""
    config = surge_config_of(model)
    if config.checkpoint_format == "training":
        if is_packed(model):
            raise ValueError(
                "checkpoint_format='training' needs the latent weights, but this model holds packed 1-bit weights; "
                "call surge_nlp.set_checkpoint_format(model, 'packed') or reload the training checkpoint"
            )
        state = model.state_dict()
    else:
        state = packed_state_dict(model)
    checksums = {name: _crc32(tensor) for name, tensor in state.items()}
    metadata = {METADATA_FORMAT_KEY: config.checkpoint_format, METADATA_CHECKSUMS_KEY: json.dumps(checksums, separators=(",", ":")),
                METADATA_CONFIG_KEY: json.dumps({name: getattr(config, name) for name in TENSOR_MEANING_FIELDS})}
    return state, metadata


_DAMAGED = "the file is damaged; save the model again with save_pretrained, or download the checkpoint again"


def read_safetensors_header(path: str | os.PathLike) -> dict[str, dict]:
    """The tensor entries (dtype, shape, data_offsets) of a safetensors file, after checking that the
    file is complete and self-consistent; raises CheckpointError naming the file otherwise."""
    return _read_header(os.fspath(path))[0]


def _is_count(value: object) -> bool:
    """A non-negative JSON integer (JSON's true/false are not counts)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_header(path: str) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensor entries, metadata, offset of the data section) of a checked safetensors file."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(_HEADER_LENGTH_BYTES)
        if len(prefix) < _HEADER_LENGTH_BYTES:
            raise CheckpointError(f"{path} is truncated ({size} bytes, shorter than a safetensors header): {_DAMAGED}")
        header_length = int.from_bytes(prefix, "little")
        if _HEADER_LENGTH_BYTES + header_length > size:
            raise CheckpointError(f"{path} is truncated or corrupted (its header claims {header_length} bytes, the file has {size}): {_DAMAGED}")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path} is corrupted (its safetensors header is not valid JSON: {error}): {_DAMAGED}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} is corrupted (its safetensors header is not a JSON object): {_DAMAGED}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path} is corrupted (its __metadata__ is not a mapping of strings): {_DAMAGED}")
    spans = []
    for name, entry in header.items():
        try:
            start, end = entry["data_offsets"]
            shape, itemsize = entry["shape"], _SAFETENSORS_ITEMSIZE[entry["dtype"]]
            if not (_is_count(start) and _is_count(end) and start <= end and isinstance(shape, list)
                    and all(_is_count(dim) for dim in shape)):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} is corrupted (tensor {name!r} has an invalid header entry {entry!r}): {_DAMAGED}") from None
        expected = math.prod(shape) * itemsize
        if end - start != expected:
            raise CheckpointError(f"{path} is corrupted (tensor {name!r} spans {end - start} bytes, its dtype and shape need {expected}): {_DAMAGED}")
        spans.append((start, end, name))
    # As the safetensors format requires: the tensors tile the data section, in order, no gap or overlap.
    data_end = 0
    for start, end, name in sorted(spans):
        if start != data_end:
            problem = "overlaps the tensor before it" if start < data_end else f"leaves {start - data_end} unclaimed bytes before it"
            raise CheckpointError(f"{path} is corrupted (tensor {name!r} at bytes {start}-{end} {problem}): {_DAMAGED}")
        data_end = end
    available = size - _HEADER_LENGTH_BYTES - header_length
    if available != data_end:
        problem = "truncated" if available < data_end else "corrupted (trailing bytes)"
        raise CheckpointError(f"{path} is {problem}: its tensors need {data_end} data bytes, the file holds {available}: {_DAMAGED}")
    return header, metadata, _HEADER_LENGTH_BYTES + header_length


def check_safetensors_file(path: str | os.PathLike) -> dict[str, dict]:
    """`read_safetensors_header`, plus every tensor checked against the CRC-32 surge_nlp recorded
    when saving (files without checksums pass); raises CheckpointError naming a damaged tensor."""
    return _checked_file(os.fspath(path))[0]


def _checked_file(path: str) -> tuple[dict[str, dict], dict[str, str]]:
    """(tensor entries, metadata) of a safetensors file whose header and checksums were checked."""
    header, metadata, data_start = _read_header(path)
    if METADATA_CHECKSUMS_KEY not in metadata:
        return header, metadata
    try:
        checksums = json.loads(metadata[METADATA_CHECKSUMS_KEY])
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} is corrupted (its {METADATA_CHECKSUMS_KEY} metadata is not valid JSON): {_DAMAGED}") from None
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for name, entry in header.items():
            # Names Transformers renamed while saving have no recorded checksum under the new name.
            if name not in checksums:
                continue
            start, end = entry["data_offsets"]
            if zlib.crc32(data[data_start + start:data_start + end]) != checksums[name]:
                raise CheckpointError(f"{path} is corrupted: the data of tensor {name!r} does not match its checksum: {_DAMAGED}")
    return header, metadata


_TORCH_TO_SAFETENSORS = {torch.uint8: "U8", torch.bool: "BOOL"}
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


def _check_saved_settings(path: str | os.PathLike, metadata: dict[str, str], config: SurgeConfig) -> None:
    """CheckpointError unless the settings recorded in the file's `metadata` (files saved before this
    record pass) agree with config.json's on every field that gives the tensors their meaning."""
    saved = metadata.get(METADATA_CONFIG_KEY)
    if saved is None:
        return
    try:
        settings = json.loads(saved)
        differ = {name: (settings[name], getattr(config, name)) for name in TENSOR_MEANING_FIELDS
                  if name in settings and settings[name] != getattr(config, name)}
    except (json.JSONDecodeError, TypeError):
        raise CheckpointError(f"{path} is corrupted (its {METADATA_CONFIG_KEY} metadata is not a JSON object): {_DAMAGED}") from None
    if differ:
        details = ", ".join(f"{name}={saved_value!r} in the file but {loaded!r} in config.json"
                            for name, (saved_value, loaded) in differ.items())
        raise CheckpointError(f"{path} was saved with other quantization settings than config.json gives ({details}): "
                              "the weights and config.json do not belong together; use the config.json saved with these weights")


def _find(key: str, header: dict[str, dict], prefix: str) -> str | None:
    # A checkpoint of a task model loads into its base model and back: keys may differ by the prefix.
    for candidate in (key, f"{prefix}.{key}", key.removeprefix(f"{prefix}.")):
        if candidate in header:
            return candidate
    return None


def validate_checkpoint(model: nn.Module, checkpoint_files: Iterable[str | os.PathLike], config: SurgeConfig) -> None:
    """Before loading a SURGE checkpoint: check every file and every SURGE tensor it must provide.

    `model` is the skeleton built from config.json (on the meta device is fine). Raises
    CheckpointError for a file that is not safetensors, a damaged file, a missing SURGE tensor, a
    shape/dtype that does not match the configuration, or settings recorded in the file (bits,
    FFN activation, attention binarization, format) that differ from config.json's.
    """
    header: dict[str, dict] = {}
    metadata_by_file: dict[str, dict[str, str]] = {}
    for path in checkpoint_files:
        if not str(path).endswith(".safetensors"):
            # Only safetensors can be checked before loading (and a pickled file is not opened at all).
            raise CheckpointError(f"{path}: a SURGE checkpoint is read from safetensors files only; save it again "
                                  "with save_pretrained (which writes safetensors)")
        file_header, metadata_by_file[os.fspath(path)] = _checked_file(os.fspath(path))
        header.update(file_header)
    if not header:
        return
    prefix = getattr(model, "base_model_prefix", "")
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, SURGE_MODULES):
            expected.update({f"{name}.{key}": tensor for key, tensor in module.state_dict().items()})
    form = f"checkpoint_format={config.checkpoint_format!r}"
    for key, tensor in expected.items():
        found = _find(key, header, prefix)
        if found is None:
            raise CheckpointError(
                f"the checkpoint has no tensor {key!r}, which a SURGE model with {form} needs: the weights and "
                "config.json do not belong together; save the model again with save_pretrained"
            )
        entry = header[found]
        if tensor.is_floating_point():
            dtype_ok = entry["dtype"] in _FLOAT_DTYPES
        else:
            dtype_ok = tensor.dtype not in _TORCH_TO_SAFETENSORS or entry["dtype"] == _TORCH_TO_SAFETENSORS[tensor.dtype]
        if list(entry["shape"]) != list(tensor.shape) or not dtype_ok:
            raise CheckpointError(
                f"checkpoint tensor {found!r} is {entry['dtype']} {entry['shape']}, but the model built from config.json "
                f"({form}, the layer sizes) expects {_TORCH_TO_SAFETENSORS.get(tensor.dtype, 'float')} {list(tensor.shape)}: "
                "the weights and config.json do not belong together; use the config.json saved with these weights"
            )
    for path, metadata in metadata_by_file.items():  # tensors that fit, but were computed under other settings
        _check_saved_settings(path, metadata, config)
