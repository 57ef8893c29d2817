"""The trainer's state on disk: resumable checkpoints and the best evaluation's weights.

- `output_dir/checkpoints/step_N`: accelerate's full state (model, optimizer, RNG of every process)
  plus `trainer_state.json` (the loop's position, log history and best-so-far; JSON, no pickle),
  written under a fixed temporary name by every process and renamed by the main one.
- `output_dir/best/step_N.safetensors`: the weights of the best evaluation so far (atomic), and of
  the best each kept checkpoint recorded (a resume from it may need them; see `prune_best`).
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from safetensors.torch import save_model
from torch import nn

from ..atomic import atomic_write, commit, temporary_sibling
from .config import TrainingConfig

CHECKPOINTS = "checkpoints"
BEST = "best"
TRAINER_STATE = "trainer_state.json"
CONFIG_FILE = "training_config.json"


@dataclass
class TrainingState:
    """The loop's position; saved as JSON in each checkpoint (no pickle). `best` is the best
    evaluation so far ({"step", "value", "metrics"}) whose weights lie in `best/step_<step>.safetensors`."""

    step: int = 0
    epoch: int = 0
    batches_in_epoch: int = 0
    log_history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    data: dict[str, int | None] | None = None  # `data_signature` of the run's training loader
    # Training seconds that made this state, over every call of a resumed run (work redone after a
    # kill counts once); None when resumed from a checkpoint that did not record it.
    wall_time_s: float | None = 0.0


def data_signature(accelerator: Accelerator, train_loader) -> dict[str, int | None]:
    """What a resumed run must share with its checkpoint for `batches_in_epoch` to name the same
    batch: the training set's size, the loader's batches per epoch on each process, the process count."""
    try:
        examples = len(train_loader.dataset)
    except TypeError:  # an iterable dataset has no length
        examples = None
    return {"examples": examples, "batches_per_epoch": len(train_loader), "processes": accelerator.num_processes}


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


def save_checkpoint(accelerator: Accelerator, output_dir: Path, progress: TrainingState, scheduler, keep: int) -> None:
    final = output_dir / CHECKPOINTS / f"step_{progress.step}"
    temporary = temporary_sibling(final, unique=False)
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))  # model, optimizer, RNG states of every process
    if accelerator.is_main_process:
        state = {"step": progress.step, "epoch": progress.epoch, "batches_in_epoch": progress.batches_in_epoch,
                 "scheduler": scheduler.state_dict(), "log_history": progress.log_history, "best": progress.best,
                 "data": progress.data, "wall_time_s": progress.wall_time_s}
        (temporary / TRAINER_STATE).write_text(json.dumps(state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        commit(temporary, final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
        prune_best(output_dir, None if progress.best is None else progress.best["step"])
    accelerator.wait_for_everyone()


STATE_KEYS = ("step", "epoch", "batches_in_epoch", "scheduler", "log_history")


def read_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's `trainer_state.json`; ValueError naming the checkpoint when it is unreadable or incomplete."""
    path = checkpoint / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot resume from {checkpoint}: {path.name} is unreadable ({err}); "
                         "remove that checkpoint to resume from the one before") from None
    missing = [key for key in STATE_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"cannot resume from {checkpoint}: {path.name} lacks {missing}; it was not written by this "
                         "trainer, or by an incompatible version")
    return state


def load_checkpoint(accelerator: Accelerator, checkpoint: Path, scheduler, data: dict[str, int | None]) -> TrainingState:
    """The loop's state from `checkpoint`, whose run must have had the same `data` (`data_signature`;
    checkpoints written before it was recorded are not checked): with another training set, batch
    count or process count, the saved position would skip the wrong batches, or all of them."""
    state = read_trainer_state(checkpoint)
    saved = state.get("data")
    if saved is not None and saved != data:
        details = ", ".join(f"{key} {saved.get(key)} in the checkpoint, {value} now" for key, value in data.items()
                            if saved.get(key) != value)
        raise ValueError(f"cannot resume from {checkpoint}: the training data differs from the run's ({details}); "
                         "a changed training set (max_train_samples, selection, augmentation, dataset) or process count. "
                         "Resume with the same data and launch, or start a new output_dir")
    accelerator.load_state(str(checkpoint))
    scheduler.load_state_dict(state["scheduler"])
    return TrainingState(state["step"], state["epoch"], state["batches_in_epoch"], state["log_history"], state.get("best"), data,
                         state.get("wall_time_s"))


# --------------------------------------------------------------------------------------------
# Evaluation while training: output_dir/best/step_N.safetensors holds the best weights so far


def eval_interval(config: TrainingConfig, steps_per_epoch: int) -> int | None:
    """Optimizer steps between evaluations (None: evaluate once, at the end)."""
    if config.eval_every is None:
        return None
    return steps_per_epoch if config.eval_every == "epoch" else config.eval_every


def is_improvement(value: float, best: float | None, metric: str) -> bool:
    """Whether `value` beats `best`: lower is better for "loss", higher for every other metric;
    a tie keeps the earlier checkpoint. A NaN never beats anything and is beaten by any number (a
    first evaluation that came out NaN must not lock the selection)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value < best if metric == "loss" else value > best


def best_weights_path(output_dir: Path, step: int) -> Path:
    return output_dir / BEST / f"step_{step}.safetensors"


def save_best(accelerator: Accelerator, model: nn.Module, output_dir: Path, step: int) -> None:
    # Written under a temporary name and renamed; older best files are pruned only afterwards.
    if accelerator.is_main_process:
        with atomic_write(best_weights_path(output_dir, step)) as temporary:
            save_model(model, str(temporary))
        prune_best(output_dir, step)
    accelerator.wait_for_everyone()


def prune_best(output_dir: Path, current: int | None) -> None:
    """Remove the best-weight files that neither the current best (`current`, a step) nor a kept
    checkpoint names: a run killed after a new best but before its next checkpoint resumes with
    the older best of that checkpoint, and must find its weights if no later evaluation beats it.
    At most `keep_checkpoints + 1` files stay."""
    keep = {current} if current is not None else set()
    for checkpoint in list_checkpoints(output_dir):
        try:
            best = read_trainer_state(checkpoint).get("best")
        except ValueError:
            continue  # a damaged checkpoint cannot be resumed from (load_checkpoint says so)
        if best is not None:
            keep.add(best["step"])
    kept_names = {best_weights_path(output_dir, step).name for step in keep}
    root = output_dir / BEST
    for path in root.iterdir() if root.is_dir() else ():
        if path.name not in kept_names:
            path.unlink()


def check_resumable(output_dir: Path, config: TrainingConfig, resume: bool) -> None:
    saved_config = output_dir / CONFIG_FILE
    if resume and saved_config.exists():
        saved = json.loads(saved_config.read_text())
        changed = sorted(key for key, value in config.to_dict().items() if saved.get(key) != value)
        if changed:
            raise ValueError(f"resume=True with a TrainingConfig that differs from the run in {output_dir} "
                             f"in {changed}; resume with the same config, or start a new output_dir")
    if not resume and list_checkpoints(output_dir):
        raise FileExistsError(f"{output_dir} holds checkpoints of an earlier run; pass resume=True (the CLI's --resume) to continue it, "
                              "or choose a new output_dir")
