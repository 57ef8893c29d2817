"""Hugging Face Hub publishing: `push_to_hub` with a generated model card.

`push_to_hub(model, repo_id, ...)` saves through the model's own `save_pretrained` (so the Hub gets
exactly the checkpoint `surge_nlp.serialization` writes, packed by default), adds a `README.md`
model card (`model-index` metadata with the GLUE dev results, base model, dataset, W-E-A bits, size,
estimator, deployed speed when measured, how to load it) and
uploads the folder with Transformers' Hub client in one commit, which also deletes the weight files
of an earlier upload that this one does not overwrite (shards of another size, a single file). It is a plain function: a SURGE
model's own `model.push_to_hub` stays Transformers' (the same packed checkpoint, Transformers'
generic card).

Example:
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> import surge_nlp
    >>> model = surge_nlp.binarize(BertForSequenceClassification(BertConfig(hidden_size=32,
    ...     num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100)))
    >>> card = surge_nlp.hub.model_card(model, metrics={"accuracy": 0.61}, task="rte")
    >>> "W-E-A bits: 1-32-1" in card and "| accuracy | 0.61 |" in card
    True
"""

from __future__ import annotations

import fnmatch
import os
import tempfile
from typing import Any

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.utils import hub as transformers_hub

from .serialization import surge_config_of

LIBRARY_TAGS = ["surge_nlp", "binarized", "1-bit"]


GLUE_DATASET = "nyu-mll/glue"


def _eval_results(metrics: dict[str, float], task: str, model_name: str) -> list[EvalResult]:
    from .glue import GLUE_TASKS

    if task not in GLUE_TASKS:
        return []
    return [EvalResult(task_type="text-classification", task_name="Text Classification", dataset_type=GLUE_DATASET,
                       dataset_name=f"GLUE {task.upper()}", dataset_config=task, dataset_split="validation",
                       metric_type=name, metric_name=name, metric_value=float(value))
            for name, value in metrics.items()]


def model_card(model: nn.Module, metrics: dict[str, float] | None = None, task: str | None = None,
               base_model: str | None = None, repo_id: str | None = None, tags: list[str] | None = None,
               speedup: float | None = None) -> str:
    """The README.md of a SURGE checkpoint: YAML metadata the Hub reads (library, tags, base model,
    dataset, and `model-index` with the GLUE dev results, so the Hub shows them as evaluation
    results), then the description (bits, size, estimator, the measured deployed speed-up when
    given) and a loading snippet. Built with `huggingface_hub`'s `ModelCard`/`ModelCardData`/`EvalResult`.

    `base_model` defaults to the name the model was loaded from; `task` to `config.finetuning_task`;
    `repo_id` is where the loading snippet points; `tags` are added to the library's own.
    """
    from .summary import summary

    config = surge_config_of(model)
    hf_config = model.config
    base_model = base_model or getattr(hf_config, "_name_or_path", "") or "unknown"
    task = task or getattr(hf_config, "finetuning_task", None) or "unknown"
    architecture = (getattr(hf_config, "architectures", None) or [type(model).__name__])[0]
    estimator = config.estimator if not config.has_auxiliary_branch else f"{config.estimator} (base {config.base_estimator}, eta {config.eta})"
    all_tags = LIBRARY_TAGS + [tag for tag in tags or [] if tag not in LIBRARY_TAGS]
    model_name = (repo_id or f"{architecture}-surge-{config.bits_label}").split("/")[-1]
    hub_base_model = base_model if base_model != "unknown" and not os.path.isabs(base_model) and not os.path.exists(base_model) else None
    eval_results = _eval_results(metrics or {}, task, model_name)
    card_data = ModelCardData(library_name="transformers", tags=all_tags, base_model=hub_base_model,
                              datasets=[GLUE_DATASET] if eval_results else None, model_name=model_name,
                              eval_results=eval_results or None, pipeline_tag="text-classification")
    totals = summary(model, print_fn=None).totals
    speed = (f"{speedup:.2f}x the FP32 model's inference speed (`surge_nlp.deploy` on CPU, measured on GLUE dev batches)"
             if speedup is not None
             else "not measured for this upload")
    lines = [f"# {architecture}, binarized with SURGE ({config.bits_label})", "", f"- Base model: {base_model}"]
    if eval_results:
        lines.append(f"- Dataset: {GLUE_DATASET}, config {task}")
    lines += [
        f"- Task: {task}",
        f"- W-E-A bits: {config.bits_label} (weights, word embeddings, activations)",
        f"- Size: {totals['deployed_bytes'] / 2**20:.2f} MiB deployed ({totals['compression_ratio']:.1f}x smaller than FP32), "
        f"{totals['params_1bit']:,} 1-bit and {totals['params_32bit']:,} 32-bit parameters",
        f"- Estimator: {estimator}",
        f"- Binarized attention: {config.binarize_attention}; FFN activation: {config.ffn_activation}",
        f"- Kept in full precision: {', '.join(config.modules_to_not_convert) or 'nothing'}",
        f"- Checkpoint form: {config.checkpoint_format}",
        f"- Deployed speed: {speed}",
        "",
        "## Metrics (GLUE dev)" if eval_results else "## Metrics",
        "",
    ]
    if metrics:
        lines += ["| metric | value |", "|---|---|"] + [f"| {name} | {value:.4g} |" for name, value in metrics.items()]
    else:
        lines.append("Not measured for this upload.")
    lines += [
        "",
        "## How to load",
        "",
        "`surge_nlp` must be imported first: it registers the `surge` quantization method that rebuilds",
        "the packed 1-bit layers (without it Transformers refuses the packed weights).",
        "",
        "```python",
        "import surge_nlp  # registers quant_method 'surge'",
        f"from transformers import AutoModelForSequenceClassification  # or the Auto class of {architecture}",
        "",
        f'model = AutoModelForSequenceClassification.from_pretrained("{repo_id or "path/to/this/checkpoint"}")',
        "fast = surge_nlp.deploy(model.eval())  # XNOR/popcount kernels for inference",
        "```",
        "",
    ]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)))


def push_to_hub(model: nn.Module, repo_id: str, *, metrics: dict[str, float] | None = None, task: str | None = None,
                base_model: str | None = None, commit_message: str | None = None, commit_description: str | None = None,
                private: bool | None = None, token: bool | str | None = None, revision: str | None = None,
                create_pr: bool = False, max_shard_size: int | str | None = "50GB", tags: list[str] | None = None,
                speedup: float | None = None, tokenizer: PreTrainedTokenizerBase | None = None) -> Any:
    """Upload `model.save_pretrained`'s files plus a SURGE model card to `repo_id` (one commit).

    Same arguments as Transformers' `push_to_hub`, plus the model card's `metrics`, `task`,
    `base_model` and `speedup` (the deployed form's measured speed over FP32, e.g.
    `surge_nlp.shipped.measure_speed(...)["speedup"]`), and `tokenizer`, whose files go in the same
    commit (without it the repository holds no tokenizer: `AutoTokenizer.from_pretrained(repo_id)`
    and `pipeline(...)` need one). Returns the Hub client's commit info.
    """
    api = transformers_hub.hf_api()
    repo_id = api.create_repo(repo_id, private=private, token=token, exist_ok=True).repo_id
    card = model_card(model, metrics=metrics, task=task, base_model=base_model, repo_id=repo_id, tags=tags, speedup=speedup)
    with tempfile.TemporaryDirectory() as directory:
        model.save_pretrained(directory, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        with open(os.path.join(directory, "README.md"), "w", encoding="utf-8") as handle:
            handle.write(card)
        if revision is not None and not revision.startswith("refs/pr"):
            _ensure_branch(api, repo_id, revision, token, create_pr)  # before listing: a new branch starts as a copy of main
        new_files = _files_under(directory)
        parent, stale = _stale_weight_files(api, repo_id, revision, token, new_files)
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=os.path.join(directory, name)) for name in new_files]
        operations += [CommitOperationDelete(path_in_repo=name) for name in stale]
        message = commit_message or ("Upload model" if "Model" in type(model).__name__ else f"Upload {type(model).__name__}")  # Transformers' default
        return api.create_commit(repo_id=repo_id, operations=operations, commit_message=message, parent_commit=parent,
                                 commit_description=commit_description, token=token, create_pr=create_pr, revision=revision)


def _ensure_branch(api: Any, repo_id: str, branch: str, token: bool | str | None, create_pr: bool) -> None:
    """Create `branch` if it is missing, as Transformers' push does; without write access a pull
    request may still target it (the Hub answers 403 to the creation, and the commit opens the PR)."""
    try:
        api.create_branch(repo_id=repo_id, branch=branch, token=token, exist_ok=True)
    except HfHubHTTPError as error:
        if not (create_pr and error.response is not None and error.response.status_code == 403):
            raise


def _files_under(directory: str) -> list[str]:
    """Every file below `directory` as a repository path (`a/b.json`), sorted; save_pretrained may
    write folders (a tokenizer's `additional_chat_templates/`)."""
    return sorted(os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
                  for root, _, names in os.walk(directory) for name in names)


# Top-level weight files Transformers writes: one file, or shards plus their index.
WEIGHT_FILE_PATTERNS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json",
                        "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json")


def _stale_weight_files(api: Any, repo_id: str, revision: str | None, token: bool | str | None,
                        new_files: list[str]) -> tuple[str | None, list[str]]:
    """The commit the repository's `revision` points to, and its weight files that this upload does
    not replace. They must go in the same commit: `from_pretrained` prefers a single `model.safetensors`
    over an index, so a packed file left beside a newly sharded upload would load instead of it (and
    stale shards beside a new single file only mislead). Other files (an adapter, a README) are the
    owner's and stay. The upload commits onto that commit (`parent_commit`): if the repository moved
    in between, the Hub refuses it rather than delete from a listing that is out of date."""
    try:
        parent = api.repo_info(repo_id, revision=revision, token=token).sha
        existing = api.list_repo_files(repo_id, revision=parent, token=token)
    except (RepositoryNotFoundError, RevisionNotFoundError):  # nothing there to replace (or a PR to a branch not made)
        return None, []
    return parent, [name for name in existing if "/" not in name and name not in new_files
                    and any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_FILE_PATTERNS)]
