"""The distillation / fine-tuning loop, on `accelerate.Accelerator`.

`train` reads top to bottom: set up (accelerator, optimizer with a separate learning rate for the
quantizer scales, warmup + linear decay), optionally resume from the last checkpoint, then per
micro-batch: student (and teacher) forward, weighted loss terms, backward with gradient
accumulation; per optimizer step: clipping, step, EDE progress, logging, checkpointing. The same
code runs on one device, on several processes (`accelerate launch --multi_gpu --num_processes N`,
which on a machine without GPUs forms a gloo group of CPU processes), and with mixed precision.

With a teacher the loss is `logits_weight * logits + hidden_weight * hidden + attention_weight *
attention + ground_truth_weight * ground_truth` (see `surge_nlp.distill.losses`); without one it is
the ground-truth loss alone, which is how the full-precision teacher is fine-tuned.

Resuming is exact: a checkpoint holds the model (activation scales and their `initialized` flags
included), optimizer, scheduler, every process's RNG states, the step counter, the position in the
epoch (data order is a function of seed and epoch) and the log history, so a killed run resumed
with `resume=True` ends with the same parameters and metrics as an uninterrupted one.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from surge_nlp.distill import TrainingConfig, train
    >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
    >>> data = [{"input_ids": torch.randint(0, 100, (8,)), "attention_mask": torch.ones(8, dtype=torch.long),
    ...          "labels": torch.tensor(i % 2)} for i in range(8)]
    >>> loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)
    >>> config = TrainingConfig(logits_weight=0, hidden_weight=0, ground_truth_weight=1, batch_size=4,
    ...                         num_epochs=1, log_every=1)
    >>> import tempfile
    >>> result = train(model, loader, config, output_dir=tempfile.mkdtemp(), progress=False)
    >>> result.steps, sorted(result.log_history[0])[:3]
    (2, ['epoch', 'loss', 'loss/ground_truth'])
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator, DataLoaderConfiguration
from accelerate.utils import set_seed
from safetensors.torch import load_model, save_model

from ..atomic import atomic_write, commit, temporary_sibling
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..attention import AttentionQuantizers
from ..binarizers import ActivationQuantizer, calibrate
from ..families import layer_index
from ..integration import set_training_progress, surge_linears
from .config import TrainingConfig
from .losses import attention_loss, ground_truth_loss, hidden_states_loss, logits_loss
from .projections import ProjectionRecorder

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
CHECKPOINTS = "checkpoints"
BEST = "best"
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "training_config.json"
LOG_FILE = "log_history.jsonl"

MetricFn = Callable[[np.ndarray, np.ndarray], dict[str, float]]


@dataclass
class TrainResult:
    """What `train` returns: the metrics of the model it leaves (empty without eval_loader), the log
    history (one record per logged step: loss terms, learning rates, lambda statistics; one per
    evaluation: "eval/<metric>"), optimizer steps done, wall-clock seconds of this call, and, with
    `eval_every` and `keep_best`, the step whose weights the model holds (`best_step`)."""

    metrics: dict[str, float]
    log_history: list[dict[str, float]]
    steps: int
    wall_time_s: float
    best_step: int | None = None

    @property
    def selected(self) -> str:
        """"best" when the model holds the best evaluation's weights, else "last"."""
        return "last" if self.best_step is None else "best"

    @property
    def eval_history(self) -> list[dict[str, float]]:
        """One record per evaluation: "step" and the metrics, without the "eval/" prefix."""
        return [{"step": record["step"], **{key[len("eval/"):]: value for key, value in record.items() if key.startswith("eval/")}}
                for record in self.log_history if any(key.startswith("eval/") for key in record)]


@dataclass
class _Progress:
    """The loop's position; saved as JSON in each checkpoint (no pickle). `best` is the best
    evaluation so far ({"step", "value", "metrics"}) whose weights lie in `best/step_<step>.safetensors`."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    log_history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] | None = None


# --------------------------------------------------------------------------------------------
# Building blocks


def model_inputs(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The encoder inputs of a batch (labels and other columns left out)."""
    return {key: batch[key] for key in MODEL_INPUTS if key in batch}


def parameter_groups(model: nn.Module, config: TrainingConfig) -> list[dict[str, Any]]:
    """AdamW groups: matrices (weight decay), vectors such as biases and LayerNorm (none), the
    activation quantizers' scales alpha (`scale_learning_rate`, no decay) and shifts beta
    (`shift_learning_rate`, default the main learning rate, no decay). Membership of the last two is
    decided by type (every `ActivationQuantizer`'s `alpha` and `beta`). Each group has a "name"."""
    quantizer_role: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, ActivationQuantizer):
            quantizer_role[id(module.alpha)] = "scales"
            quantizer_role[id(module.beta)] = "shifts"
    groups: dict[str, list[nn.Parameter]] = {"weights": [], "no_decay": [], "scales": [], "shifts": []}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        role = quantizer_role.get(id(parameter))
        if role is not None:
            groups[role].append(parameter)
        elif parameter.ndim < 2:
            groups["no_decay"].append(parameter)
        else:
            groups["weights"].append(parameter)
    settings = {
        "weights": (config.learning_rate, config.weight_decay),
        "no_decay": (config.learning_rate, 0.0),
        "scales": (config.scale_learning_rate, 0.0),
        "shifts": (config.shift_lr, 0.0),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in groups.items()
        if params
    ]


def _text_config(model: nn.Module):
    return model.config.get_text_config()


def check_teacher(student: nn.Module, teacher: nn.Module | None, config: TrainingConfig) -> None:
    """Raise ValueError when the configured losses cannot be computed for this student/teacher pair."""
    if teacher is None:
        if config.distills:
            raise ValueError(
                f"TrainingConfig has logits_weight={config.logits_weight}, hidden_weight={config.hidden_weight}, "
                f"attention_weight={config.attention_weight} but no teacher was given; pass teacher=..., or set "
                "them to 0 and ground_truth_weight > 0 to fine-tune on the labels"
            )
        return
    if not config.distills:
        raise ValueError("a teacher was given but logits_weight, hidden_weight and attention_weight are all 0; "
                         "set one of them > 0, or train without a teacher")
    student_config, teacher_config = _text_config(student), _text_config(teacher)

    def require_same(attribute: str, loss: str) -> None:
        ours, theirs = getattr(student_config, attribute), getattr(teacher_config, attribute)
        if ours != theirs:
            raise ValueError(f"{loss} distillation needs the same {attribute} in student and teacher; "
                             f"student has {ours}, teacher has {theirs}")

    if config.logits_weight > 0:
        require_same("num_labels", "logits")
    if config.hidden_weight > 0:
        require_same("num_hidden_layers", "hidden-state")
        require_same("hidden_size", "hidden-state")
    if config.attention_weight > 0:
        require_same("num_hidden_layers", "attention")
        require_same("num_attention_heads", "attention")


def lambda_statistics(model: nn.Module) -> dict[str, float]:
    """DPGC/SURGE monitoring of the latest backward: lambda per encoder layer (mean, min, max over its
    SurgeLinears) and overall mean, and the cosine between the binary and auxiliary input gradients
    ("alignment/layer_<i>/mean", "alignment/mean"); with `compensate_attention`, the same for the
    attention products' operands ("attention_lambda/layer_<i>/<operand>", "attention_alignment/...").
    Empty for a model without compensators."""
    stats = _attention_compensation_statistics(model)
    lambdas: dict[int, list[float]] = {}
    alignments: dict[int, list[float]] = {}
    for name, linear in surge_linears(model).items():
        layer = layer_index(name)
        value = linear.last_lambda  # a host sync: read once
        if layer is None or value is None:
            continue
        lambdas.setdefault(layer, []).append(value)
        alignments.setdefault(layer, []).append(linear.last_alignment)
    for layer, values in sorted(lambdas.items()):
        stats[f"lambda/layer_{layer}/mean"] = float(np.mean(values))
        stats[f"lambda/layer_{layer}/min"] = float(np.min(values))
        stats[f"lambda/layer_{layer}/max"] = float(np.max(values))
        stats[f"alignment/layer_{layer}/mean"] = float(np.mean(alignments[layer]))
    if lambdas:
        stats["lambda/mean"] = float(np.mean([v for values in lambdas.values() for v in values]))
        stats["alignment/mean"] = float(np.mean([v for values in alignments.values() for v in values]))
    return stats


def _attention_compensation_statistics(model: nn.Module) -> dict[str, float]:
    stats = {}
    for name, module in model.named_modules():
        layer = layer_index(name)
        if not isinstance(module, AttentionQuantizers) or module.compensators is None or layer is None:
            continue
        for operand, compensator in module.compensators.items():
            value = compensator.last_lambda
            if value is not None:
                stats[f"attention_lambda/layer_{layer}/{operand}"] = value
                stats[f"attention_alignment/layer_{layer}/{operand}"] = compensator.last_alignment
    return stats


def compute_losses(
    student: nn.Module,
    teacher: nn.Module | None,
    batch: dict[str, Any],
    config: TrainingConfig,
    student_projections: ProjectionRecorder | None = None,
    teacher_projections: ProjectionRecorder | None = None,
) -> dict[str, torch.Tensor]:
    """One micro-batch: the weighted total under "loss" and each enabled term under "loss/<term>".

    The projection recorders (active context managers on student and teacher) are needed only
    with `attention_weight > 0`.
    """
    inputs = model_inputs(batch)
    mask = inputs.get("attention_mask")
    want_hidden = teacher is not None and config.hidden_weight > 0
    student_out = student(**inputs, output_hidden_states=want_hidden)
    terms: dict[str, torch.Tensor] = {}
    if teacher is not None:
        with torch.no_grad():
            teacher_out = teacher(**inputs, output_hidden_states=want_hidden)
        if config.logits_weight > 0:
            terms["logits"] = logits_loss(student_out.logits, teacher_out.logits, config.temperature)
        if config.hidden_weight > 0:
            terms["hidden"] = hidden_states_loss(student_out.hidden_states, teacher_out.hidden_states, mask)
        if config.attention_weight > 0:
            terms["attention"] = attention_loss(student_projections.layers(), teacher_projections.layers(),
                                                _text_config(teacher).num_attention_heads, mask)
    if config.ground_truth_weight > 0:
        if "labels" not in batch:
            raise ValueError("ground_truth_weight > 0 needs a 'labels' entry in every training batch")
        terms["ground_truth"] = ground_truth_loss(student_out.logits, batch["labels"])
    weights = {"logits": config.logits_weight, "hidden": config.hidden_weight,
               "attention": config.attention_weight, "ground_truth": config.ground_truth_weight}
    total = sum(weights[name] * value for name, value in terms.items())
    return {"loss": total, **{f"loss/{name}": value for name, value in terms.items()}}


# --------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def predict(model: nn.Module, loader, accelerator: Accelerator | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of every example (float32, shape (n, num_labels)) and the labels (None if absent).

    With an accelerator (and a loader it prepared) the results are gathered from all processes,
    without the duplicates the distributed sampler adds to even out the last batch.
    """
    was_training = model.training
    model.eval()
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    all_logits, all_labels = [], []
    try:
        for batch in loader:
            batch = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
            if accelerator is not None:
                with accelerator.autocast():
                    logits = model(**model_inputs(batch)).logits.float()
                logits = accelerator.gather_for_metrics(logits)
                labels = accelerator.gather_for_metrics(batch["labels"]) if "labels" in batch else None
            else:
                logits = model(**model_inputs(batch)).logits.float()
                labels = batch.get("labels")
            all_logits.append(logits.cpu())
            if labels is not None:
                all_labels.append(labels.cpu())
    finally:
        model.train(was_training)
    logits = torch.cat(all_logits).numpy()
    labels = torch.cat(all_labels).numpy() if all_labels else None
    return logits, labels


def evaluate(
    model: nn.Module, loader, metric_fn: MetricFn | None = None, accelerator: Accelerator | None = None
) -> dict[str, float]:
    """"loss" (ground-truth loss over the whole set) plus `metric_fn(predictions, references)`.

    Predictions are class indices (argmax), or the scores of a regression head (one output).

    Example:
        >>> import torch
        >>> from transformers import BertConfig, BertForSequenceClassification
        >>> model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=64, vocab_size=100))
        >>> batch = {"input_ids": torch.randint(0, 100, (4, 6)), "labels": torch.tensor([0, 1, 0, 1])}
        >>> accuracy = lambda p, r: {"accuracy": float((p == r).mean())}
        >>> sorted(evaluate(model, [batch], accuracy))
        ['accuracy', 'loss']
    """
    logits, labels = predict(model, loader, accelerator)
    if labels is None:
        raise ValueError("evaluate() needs a 'labels' entry in every batch")
    predictions = logits[:, 0] if logits.shape[-1] == 1 else logits.argmax(axis=-1)
    metrics = {"loss": float(ground_truth_loss(torch.from_numpy(logits), torch.from_numpy(labels)))}
    if metric_fn is not None:
        metrics.update({key: float(value) for key, value in metric_fn(predictions, labels).items()})
    return metrics


# --------------------------------------------------------------------------------------------
# Checkpoints: output_dir/checkpoints/step_N, written under a fixed temporary name (every process
# writes its part into it) and renamed by the main process (surge_nlp.atomic)


def _checkpoint_step(path: Path) -> int | None:
    match = re.fullmatch(r"step_(\d+)", path.name)
    return int(match[1]) if match and path.is_dir() else None


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (unfinished temporary directories are ignored)."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(step, path) for path in root.iterdir() if (step := _checkpoint_step(path)) is not None]
    return [path for _, path in sorted(found)]


def _save_checkpoint(accelerator: Accelerator, output_dir: Path, progress: _Progress, scheduler, keep: int) -> None:
    final = output_dir / CHECKPOINTS / f"step_{progress.step}"
    temporary = temporary_sibling(final, unique=False)
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))  # model, optimizer, RNG states of every process
    if accelerator.is_main_process:
        state = {"step": progress.step, "epoch": progress.epoch, "batches_in_epoch": progress.batches_in_epoch,
                 "scheduler": scheduler.state_dict(), "log_history": progress.log_history, "best": progress.best}
        (temporary / TRAINER_STATE).write_text(json.dumps(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit(temporary, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def _load_checkpoint(accelerator: Accelerator, checkpoint: Path, scheduler) -> _Progress:
    accelerator.load_state(str(checkpoint))
    state = json.loads((checkpoint / TRAINER_STATE).read_text())
    scheduler.load_state_dict(state["scheduler"])
    return _Progress(state["step"], state["epoch"], state["batches_in_epoch"], state["log_history"], state.get("best"))


# --------------------------------------------------------------------------------------------
# Evaluation while training: output_dir/best/step_N.safetensors holds the best weights so far


def eval_interval(config: TrainingConfig, steps_per_epoch: int) -> int | None:
    """Optimizer steps between evaluations (None: evaluate once, at the end)."""
    if config.eval_every is None:
        return None
    return steps_per_epoch if config.eval_every == "epoch" else config.eval_every


def is_improvement(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` beats `best`: lower is better for "loss", higher for every other metric;
    a tie keeps the earlier checkpoint."""
    if best is None:
        return True
    return value < best if metric == "loss" else value > best


def best_weights_path(output_dir: Path, step: int) -> Path:
    return output_dir / BEST / f"step_{step}.safetensors"


def _save_best(accelerator: Accelerator, model: nn.Module, output_dir: Path, step: int) -> None:
    # Written under a temporary name and renamed; older best files are removed only afterwards.
    if accelerator.is_main_process:
        path = best_weights_path(output_dir, step)
        with atomic_write(path) as temporary:
            save_model(model, str(temporary))
        for old in path.parent.iterdir():
            if old != path:
                old.unlink()
    accelerator.wait_for_everyone()


def _check_resumable(output_dir: Path, config: TrainingConfig, resume: bool) -> None:
    saved_config = output_dir / CONFIG_FILE
    if resume and saved_config.exists():
        saved = json.loads(saved_config.read_text())
        changed = sorted(key for key, value in config.to_dict().items() if saved.get(key) != value)
        if changed:
            raise ValueError(f"resume=True with a TrainingConfig that differs from the run in {output_dir} "
                             f"in {changed}; resume with the same config, or start a new output_dir")
    if not resume and list_checkpoints(output_dir):
        raise FileExistsError(f"{output_dir} holds checkpoints of an earlier run; pass resume=True to continue it, "
                              "or choose a new output_dir")


# --------------------------------------------------------------------------------------------
# The loop


def _has_accelerator_device() -> bool:
    device_api = getattr(torch, "accelerator", None)  # torch >= 2.6
    return device_api.is_available() if device_api is not None else torch.cuda.is_available()


TRACKERS = ("tensorboard", "wandb", "mlflow")
TRACKER_PROJECT = "surge_nlp"


def resolve_trackers(report_to: str | list[str] | None) -> list[str]:
    """The tracker names of `report_to` ("none", "all", one name or a list), each checked to be
    installed; ValueError naming the allowed values or the package to install otherwise."""
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    if names in ([None], ["none"]):
        return []
    installed = {"tensorboard": is_tensorboard_available(), "wandb": is_wandb_available(), "mlflow": is_mlflow_available()}
    if names == ["all"]:
        return [name for name in TRACKERS if installed[name]]
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to={report_to!r} is invalid; allowed values: 'none', 'all', {', '.join(map(repr, TRACKERS))} "
                             "or a list of them")
        if not installed[name]:
            raise ValueError(f"report_to={name!r} needs the {name} package: pip install {name}")
    return names


def _check_process_group(accelerator: Accelerator) -> None:
    # Without this, launched processes that failed to form a group would each train alone and
    # write the same checkpoints.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != accelerator.num_processes:
        raise RuntimeError(f"WORLD_SIZE={world_size} processes were launched but accelerate runs {accelerator.num_processes}; "
                           "launch with `accelerate launch --multi_gpu --num_processes N` (torchrun; gloo on CPU)")
    if asked_for_processes_but_runs_one():
        logger.warning("`accelerate launch --cpu --num_processes N` runs ONE process (accelerate's simple launcher); "
                       "for N CPU processes use `accelerate launch --multi_gpu --num_processes N` (gloo on CPU)")


def asked_for_processes_but_runs_one() -> bool:
    """True under `accelerate launch --cpu --num_processes N>1`: accelerate's simple launcher sets
    the rendezvous address (MASTER_ADDR) for N processes but starts only this one (no WORLD_SIZE)."""
    env = os.environ
    return "MASTER_ADDR" in env and "WORLD_SIZE" not in env and env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")


def train(
    model: nn.Module,
    train_loader: torch.utils.data.DataLoader,
    config: TrainingConfig,
    *,
    teacher: nn.Module | None = None,
    eval_loader: torch.utils.data.DataLoader | None = None,
    metric_fn: MetricFn | None = None,
    output_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    on_log: Callable[[dict[str, float]], None] | None = None,
    best_metric: str | None = None,
    report_to: str | list[str] | None = None,
) -> TrainResult:
    """Distil `teacher` into `model` (or fine-tune `model` on the labels when teacher is None).

    Args:
        model: the student, e.g. a SURGE-binarized BertForSequenceClassification; trained in place.
        train_loader: DataLoader of dict batches (`input_ids`, `attention_mask`, optional
            `token_type_ids`, `labels`) with `batch_size == config.batch_size`; accelerate shards it.
        config: the TrainingConfig.
        teacher: frozen model with the same label count (and layers / hidden size / heads for the
            hidden-state and attention losses). Kept in eval mode, never updated.
        eval_loader, metric_fn: evaluated once at the end (see `evaluate`), or every
            `config.eval_every` steps and at the last step; each result is in the log history.
        best_metric: with `eval_every` and `keep_best`, the key of `metric_fn`'s result that picks
            the best evaluation (higher is better), e.g. a GLUE task's main metric; None: the eval
            "loss" (lower is better). The model ends with the best evaluation's weights, and
            `TrainResult.metrics` are that evaluation's.
        report_to: experiment trackers that receive every log record (loss terms, learning rates,
            lambda and alignment per layer, dev metrics), through accelerate's trackers:
            "tensorboard", "wandb", "mlflow", a list of them, "all", or None/"none" (default). Their
            files go under `output_dir` (TensorBoard: `output_dir/surge_nlp/`).
        output_dir: where checkpoints, `training_config.json` and `log_history.jsonl` go.
        resume: continue from the newest checkpoint in output_dir (a fresh start when there is none).
        progress: show a progress bar on the main process.
        on_log: called on every process with each log record (a dict), after it is written.

    A record holds, for one optimizer step: "step", "epoch" (fractional), the learning rates used
    ("lr/weights", "lr/no_decay", "lr/scales"), "loss" and each enabled "loss/<term>" (means over
    the step's micro-batches and the processes), and the main process's AGS lambda statistics
    ("lambda/layer_<i>/mean|min|max", "lambda/mean") and binary/auxiliary gradient cosines
    ("alignment/layer_<i>/mean", "alignment/mean"). Each evaluation adds a record with "eval/<metric>".
    Accelerate fixes the mixed precision once per process: train with one `mixed_precision` per process.
    """
    started = time.perf_counter()
    output_dir = Path(output_dir)
    check_teacher(model, teacher, config)
    if train_loader.batch_size is not None and train_loader.batch_size != config.batch_size:
        raise ValueError(f"train_loader.batch_size={train_loader.batch_size} differs from "
                         f"TrainingConfig.batch_size={config.batch_size}; build the loader with the config's batch size")
    _check_resumable(output_dir, config, resume)
    if config.eval_every is not None and eval_loader is None:
        raise ValueError(f"TrainingConfig.eval_every={config.eval_every!r} needs an eval_loader; pass eval_loader=... "
                         "or set eval_every=None")
    selection_key = best_metric or "loss"

    trackers = resolve_trackers(report_to)
    accelerator = Accelerator(
        cpu=not _has_accelerator_device(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # Epoch e is shuffled with seed + e on every process, so a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        log_with=trackers or None,
        project_dir=str(output_dir) if trackers else None,
    )
    _check_process_group(accelerator)
    if trackers:
        # Tracker hyperparameters must be plain scalars: None becomes "None".
        hyperparameters = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                           for key, value in config.to_dict().items()}
        accelerator.init_trackers(TRACKER_PROJECT, config=hyperparameters)
    set_seed(config.seed)
    optimizer = torch.optim.AdamW(parameter_groups(model, config))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # The loader's worker seed comes from its own generator, not the global one, so the global RNG
    # (dropout) advances only with training steps and a resumed run draws the same numbers.
    train_loader.generator = torch.Generator().manual_seed(config.seed)
    if eval_loader is not None:
        eval_loader = accelerator.prepare(eval_loader)
    student = accelerator.unwrap_model(model)
    if teacher is not None:
        teacher = teacher.to(accelerator.device).eval()

    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    total_steps = steps_per_epoch * config.num_epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    interval = eval_interval(config, steps_per_epoch)
    # Not passed to accelerator.prepare: it would step num_processes times per optimizer step.
    scheduler = get_linear_schedule_with_warmup(optimizer.optimizer, math.ceil(config.warmup_ratio * total_steps), total_steps)

    state = _Progress()
    checkpoints = list_checkpoints(output_dir) if resume else []
    if checkpoints:
        state = _load_checkpoint(accelerator, checkpoints[-1], scheduler)
        logger.info("resumed from %s (step %d)", checkpoints[-1], state.step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
        # The log file restarts from the checkpoint's history: records after it are redone.
        (output_dir / LOG_FILE).write_text("".join(json.dumps(record) + "\n" for record in state.log_history))

    def log(record: dict[str, float]) -> None:
        state.log_history.append(record)
        if accelerator.is_main_process:
            with open(output_dir / LOG_FILE, "a") as file:
                file.write(json.dumps(record) + "\n")
        if trackers:
            accelerator.log({key: value for key, value in record.items() if key != "step"}, step=int(record["step"]))
        if on_log is not None:
            on_log(record)

    # Explicit, on every process: the activation scales start from one batch, averaged over the processes.
    if state.step < total_steps and any(isinstance(m, ActivationQuantizer) and not bool(m.initialized) for m in student.modules()):
        first = next(iter(train_loader))
        calibrate(student, {key: value.to(accelerator.device) for key, value in model_inputs(first).items()})
    bar = tqdm(total=total_steps, initial=state.step, disable=not (progress and accelerator.is_local_main_process))

    def evaluate_now() -> None:
        metrics = evaluate(student, eval_loader, metric_fn, accelerator)
        if selection_key not in metrics:
            raise ValueError(f"best_metric={selection_key!r} is not among the evaluation's metrics {sorted(metrics)}")
        log({"step": state.step, **{f"eval/{key}": value for key, value in metrics.items()}})
        bar.set_postfix_str(f"dev {selection_key}={metrics[selection_key]:.4f}")
        best_value = None if state.best is None else state.best["value"]
        if config.keep_best and is_improvement(metrics[selection_key], best_value, selection_key):
            _save_best(accelerator, student, output_dir, state.step)
            state.best = {"step": state.step, "value": metrics[selection_key], "metrics": metrics}

    model.train()
    step_terms: list[dict[str, torch.Tensor]] = []
    with contextlib.ExitStack() as recordings:
        student_projections = teacher_projections = None
        if teacher is not None and config.attention_weight > 0:
            student_projections = recordings.enter_context(ProjectionRecorder(student))
            teacher_projections = recordings.enter_context(ProjectionRecorder(teacher))
        while state.step < total_steps:
            train_loader.set_epoch(state.epoch)
            batches = train_loader
            if state.batches_in_epoch:  # resumed mid-epoch: same order (seed + epoch), done batches skipped
                batches = accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
            for batch in batches:
                set_training_progress(student, state.step / total_steps)  # drives EDE's t
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        terms = compute_losses(model, teacher, batch, config, student_projections, teacher_projections)
                    accelerator.backward(terms["loss"])
                    if accelerator.sync_gradients and config.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad()
                step_terms.append({name: value.detach().float() for name, value in terms.items()})
                state.batches_in_epoch += 1
                if state.batches_in_epoch == len(train_loader):
                    state.epoch, state.batches_in_epoch = state.epoch + 1, 0
                if not accelerator.sync_gradients:
                    continue

                # One optimizer step is done.
                learning_rates = {f"lr/{group['name']}": group["lr"] for group in optimizer.param_groups}
                scheduler.step()
                state.step += 1
                bar.update(1)
                if state.step % config.log_every == 0 or state.step == total_steps:
                    names = list(step_terms[0])
                    means = torch.stack([torch.stack([micro[name] for micro in step_terms]).mean() for name in names])
                    means = accelerator.reduce(means, reduction="mean")  # over processes
                    record = {"step": state.step, "epoch": state.step / steps_per_epoch, **learning_rates}
                    record.update({name: float(value) for name, value in zip(names, means)})
                    record.update(lambda_statistics(student))
                    log(record)
                    bar.set_postfix(loss=f"{record['loss']:.4f}")
                step_terms.clear()
                # Before the checkpoint, so that a resumed run holds the same best-so-far.
                if interval is not None and (state.step % interval == 0 or state.step == total_steps):
                    evaluate_now()
                if state.step % config.checkpoint_every == 0 or state.step == total_steps:
                    _save_checkpoint(accelerator, output_dir, state, scheduler, config.keep_checkpoints)
                if state.step >= total_steps:
                    break
    bar.close()

    metrics: dict[str, float] = {}
    best_step = None
    if eval_loader is not None and interval is None:
        metrics = evaluate(student, eval_loader, metric_fn, accelerator)
        log({"step": state.step, **{f"eval/{key}": value for key, value in metrics.items()}})
    elif eval_loader is not None:
        evaluations = [record for record in state.log_history if any(key.startswith("eval/") for key in record)]
        metrics = {key[len("eval/"):]: value for key, value in evaluations[-1].items() if key.startswith("eval/")}
        if config.keep_best and state.best is not None:
            load_model(student, str(best_weights_path(output_dir, state.best["step"])))
            metrics, best_step = dict(state.best["metrics"]), state.best["step"]
    if trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(metrics, list(state.log_history), state.step, time.perf_counter() - started, best_step)

