"""Setting up a training run: its inputs and argument checks, optimizer groups, teacher checks, the
accelerator and its trackers, and the activation scales' calibration."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration
from torch import nn

from ..binarizers import ActivationQuantizer, calibrate
from .checkpoints import check_resumable
from .config import TrainingConfig

logger = logging.getLogger("surge_nlp.distill.trainer")

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


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


def text_config(model: nn.Module):
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
    student_config, teacher_config = text_config(student), text_config(teacher)

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


def has_accelerator_device() -> bool:
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
        available = [name for name in TRACKERS if installed[name]]
        if not available:
            logger.warning("report_to='all': none of %s is installed, so nothing is reported beyond log_history.jsonl "
                           "(pip install surge-nlp[tracking] for TensorBoard)", ", ".join(TRACKERS))
        return available
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"report_to={report_to!r} is invalid; allowed values: 'none', 'all', {', '.join(map(repr, TRACKERS))} "
                             "or a list of them")
        if not installed[name]:
            raise ValueError(f"report_to={name!r} needs the {name} package: pip install {name}")
    return names


def check_process_group(accelerator: Accelerator) -> None:
    # Without this, launched processes that failed to form a group would each train alone and
    # write the same checkpoints.
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != accelerator.num_processes:
        raise ValueError(f"WORLD_SIZE={world_size} processes were launched but accelerate runs {accelerator.num_processes}; "
                           "launch with `accelerate launch --multi_gpu --num_processes N` (torchrun; gloo on CPU)")
    if asked_for_processes_but_runs_one():
        logger.warning("`accelerate launch --cpu --num_processes N` runs ONE process (accelerate's simple launcher); "
                       "for N CPU processes use `accelerate launch --multi_gpu --num_processes N` (gloo on CPU)")


def asked_for_processes_but_runs_one() -> bool:
    """True under `accelerate launch --cpu --num_processes N>1`: accelerate's simple launcher sets
    the rendezvous address (MASTER_ADDR) for N processes but starts only this one (no WORLD_SIZE)."""
    env = os.environ
    return "MASTER_ADDR" in env and "WORLD_SIZE" not in env and env.get("ACCELERATE_USE_CPU", "").lower() in ("true", "1")


def make_accelerator(config: TrainingConfig, output_dir: Path, trackers: list[str]) -> Accelerator:
    """The run's Accelerator (CPU unless an accelerator device exists), its trackers initialised."""
    accelerator = Accelerator(
        cpu=not has_accelerator_device(),
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        # Epoch e is shuffled with seed + e on every process, so a resumed run sees the same order.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        log_with=trackers or None,
        project_dir=str(output_dir) if trackers else None,
    )
    check_process_group(accelerator)
    if trackers:
        # Tracker hyperparameters must be plain scalars: None becomes "None".
        hyperparameters = {key: value if isinstance(value, (int, float, str, bool)) else str(value)
                           for key, value in config.to_dict().items()}
        accelerator.init_trackers(TRACKER_PROJECT, config=hyperparameters)
    return accelerator


def check_arguments(model: nn.Module, train_loader, config: TrainingConfig, teacher: nn.Module | None,
                     eval_loader, output_dir: Path, resume: bool) -> None:
    check_teacher(model, teacher, config)
    if train_loader.batch_size is not None and train_loader.batch_size != config.batch_size:
        raise ValueError(f"train_loader.batch_size={train_loader.batch_size} differs from "
                         f"TrainingConfig.batch_size={config.batch_size}; build the loader with the config's batch size")
    check_resumable(output_dir, config, resume)
    if config.eval_every is not None and eval_loader is None:
        raise ValueError(f"TrainingConfig.eval_every={config.eval_every!r} needs an eval_loader; pass eval_loader=... "
                         "or set eval_every=None")


def calibrate_on_first_batch(accelerator: Accelerator, student: nn.Module, train_loader) -> None:
    """Explicit, on every process: the activation scales start from one batch, averaged over the processes."""
    if any(isinstance(m, ActivationQuantizer) and not bool(m.initialized) for m in student.modules()):
        first = next(iter(train_loader))
        calibrate(student, {key: value.to(accelerator.device) for key, value in model_inputs(first).items()})
