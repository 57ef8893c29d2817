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
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_model
from torch import nn
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from ..atomic import write_json_atomically, write_text_atomically
from ..integration import set_training_progress
from .checkpoints import (CONFIG_FILE, TrainingState, best_weights_path, data_signature, eval_interval, is_improvement,
                          list_checkpoints, load_checkpoint, save_best, save_checkpoint)
from .config import TrainingConfig
from .evaluation import MetricFn, evaluate
from .losses import compute_losses
from .projections import ProjectionRecorder
from .records import LOG_FILE, RunLog, step_record
from .setup import calibrate_on_first_batch, check_arguments, make_accelerator, parameter_groups, resolve_trackers

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What `train` returns: the metrics of the model it leaves (empty without eval_loader), the log
    history (one record per logged step: loss terms, learning rates, lambda statistics; one per
    evaluation: "eval/<metric>"), optimizer steps done, wall-clock seconds of this call, with
    `eval_every` and `keep_best` the step whose weights the model holds (`best_step`), and the
    seconds of every call that made the model (`total_wall_time_s`; None after a resume from a
    checkpoint that did not record them)."""

    metrics: dict[str, float]
    log_history: list[dict[str, float]]
    steps: int
    wall_time_s: float
    best_step: int | None = None
    total_wall_time_s: float | None = None

    @property
    def selected(self) -> str:
        """"best" when the model holds the best evaluation's weights, else "last"."""
        return "last" if self.best_step is None else "best"

    @property
    def eval_history(self) -> list[dict[str, float]]:
        """One record per evaluation: "step" and the metrics, without the "eval/" prefix."""
        return [{"step": record["step"], **{key[len("eval/"):]: value for key, value in record.items() if key.startswith("eval/")}}
                for record in self.log_history if any(key.startswith("eval/") for key in record)]


# --------------------------------------------------------------------------------------------
# Building blocks


def _elapsed(before: float | None, started: float) -> float | None:
    """Seconds of earlier calls (None: unknown) plus this call's so far."""
    return None if before is None else before + time.perf_counter() - started


def _start_or_resume(accelerator: Accelerator, output_dir: Path, config: TrainingConfig, scheduler, resume: bool,
                     data: dict[str, int | None]) -> TrainingState:
    """The loop's state: from the newest checkpoint when resuming (its run's `data` must match),
    else fresh; the config and the log file (restarted from the checkpoint's history: records after
    it are redone) written."""
    state = TrainingState(data=data)
    checkpoints = list_checkpoints(output_dir) if resume else []
    if checkpoints:
        state = load_checkpoint(accelerator, checkpoints[-1], scheduler, data)
        logger.info("resumed from %s (step %d)", checkpoints[-1], state.step)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomically(output_dir / CONFIG_FILE, config.to_dict())
        write_text_atomically(output_dir / LOG_FILE, "".join(json.dumps(record) + "\n" for record in state.log_history))
    return state


def _epoch_batches(accelerator: Accelerator, train_loader, state: TrainingState):
    """The batches of the current epoch still to do: the order is a function of seed and epoch, so
    a run resumed mid-epoch skips exactly the batches it had done."""
    train_loader.set_epoch(state.epoch)
    if state.batches_in_epoch >= len(train_loader):  # (a checkpoint without a data record, from other data)
        raise ValueError(f"cannot resume: the checkpoint has done {state.batches_in_epoch} batches of its epoch, but this "
                         f"run's epoch has {len(train_loader)}; the training data differs from the run's. Resume with the "
                         "same data, or start a new output_dir")
    if state.batches_in_epoch:
        return accelerator.skip_first_batches(train_loader, state.batches_in_epoch)
    return train_loader


def _evaluate_and_keep_best(accelerator: Accelerator, student: nn.Module, eval_loader, metric_fn: MetricFn | None,
                            selection_key: str, config: TrainingConfig, output_dir: Path, state: TrainingState, log: RunLog) -> None:
    """Evaluate on the eval loader (dev, or held-out training rows), log it, and save the weights when they are the best so far."""
    metrics = evaluate(student, eval_loader, metric_fn, accelerator)
    if selection_key not in metrics:
        raise ValueError(f"best_metric={selection_key!r} is not among the evaluation's metrics {sorted(metrics)}")
    log({"step": state.step, **{f"eval/{key}": value for key, value in metrics.items()}})
    log.show(f"eval {selection_key}", metrics[selection_key])
    best_value = None if state.best is None else state.best["value"]
    if config.keep_best and is_improvement(metrics[selection_key], best_value, selection_key):
        save_best(accelerator, student, output_dir, state.step)
        state.best = {"step": state.step, "value": metrics[selection_key], "metrics": metrics}


def _final_metrics(accelerator: Accelerator, student: nn.Module, eval_loader, metric_fn: MetricFn | None,
                   config: TrainingConfig, output_dir: Path, state: TrainingState, evaluated_while_training: bool,
                   log: RunLog) -> tuple[dict[str, float], int | None]:
    """The metrics the trained model ends with, and the step whose weights it holds (None: the last).
    Without evaluation while training, one evaluation now; with it and `keep_best`, the best
    evaluation's weights are loaded back."""
    if eval_loader is None:
        return {}, None
    if not evaluated_while_training:
        metrics = evaluate(student, eval_loader, metric_fn, accelerator)
        log({"step": state.step, **{f"eval/{key}": value for key, value in metrics.items()}})
        return metrics, None
    evaluations = [record for record in state.log_history if any(key.startswith("eval/") for key in record)]
    metrics = {key[len("eval/"):]: value for key, value in evaluations[-1].items() if key.startswith("eval/")}
    if config.keep_best and state.best is not None:
        load_model(student, str(best_weights_path(output_dir, state.best["step"])))
        return dict(state.best["metrics"]), state.best["step"]
    return metrics, None


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
    check_arguments(model, train_loader, config, teacher, eval_loader, output_dir, resume)
    selection_key = best_metric or "loss"

    # Set-up: accelerator, optimizer (own groups for scales and shifts), data, schedule.
    trackers = resolve_trackers(report_to)
    accelerator = make_accelerator(config, output_dir, trackers)
    set_seed(config.seed)
    optimizer = torch.optim.AdamW(parameter_groups(model, config))
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    # The batch order is a function of seed and epoch (accelerate's seedable sampler, `set_epoch`).
    # Each epoch's iteration of the wrapped loader also draws its worker base seed from the global
    # RNG (the generator set here stays on accelerate's wrapper); a resumed run still draws the same
    # numbers, as the checkpoint's RNG state is taken after the draw mid-epoch and before it at an
    # epoch boundary, and skipping batches draws nothing (tests/test_distill.py checks the resume).
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

    state = _start_or_resume(accelerator, output_dir, config, scheduler, resume, data_signature(accelerator, train_loader))
    wall_before = state.wall_time_s
    if state.step >= total_steps:  # a finished run resumed: nothing is trained now
        started = time.perf_counter()
    if state.step < total_steps:
        calibrate_on_first_batch(accelerator, student, train_loader)
    bar = tqdm(total=total_steps, initial=state.step, disable=not (progress and accelerator.is_local_main_process))
    log = RunLog(accelerator, output_dir, state, trackers, on_log, bar)

    model.train()
    step_terms: list[dict[str, torch.Tensor]] = []
    with contextlib.ExitStack() as recordings:
        student_projections = teacher_projections = None
        if teacher is not None and config.attention_weight > 0:
            student_projections = recordings.enter_context(ProjectionRecorder(student))
            teacher_projections = recordings.enter_context(ProjectionRecorder(teacher))
        while state.step < total_steps:
            for batch in _epoch_batches(accelerator, train_loader, state):
                # One micro-batch: forward, losses, backward; the optimizer steps once per accumulation.
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

                # One optimizer step is done: schedule, log, evaluate, checkpoint.
                learning_rates = {f"lr/{group['name']}": group["lr"] for group in optimizer.param_groups}
                scheduler.step()
                state.step += 1
                bar.update(1)
                if state.step % config.log_every == 0 or state.step == total_steps:
                    record = step_record(accelerator, student, state, step_terms, steps_per_epoch, learning_rates)
                    log(record)
                    log.show("loss", record["loss"])
                step_terms.clear()
                # Before the checkpoint, so that a resumed run holds the same best-so-far.
                if interval is not None and (state.step % interval == 0 or state.step == total_steps):
                    _evaluate_and_keep_best(accelerator, student, eval_loader, metric_fn, selection_key, config, output_dir, state, log)
                if state.step % config.checkpoint_every == 0 or state.step == total_steps:
                    state.wall_time_s = _elapsed(wall_before, started)
                    save_checkpoint(accelerator, output_dir, state, scheduler, config.keep_checkpoints)
                if state.step >= total_steps:
                    break
    bar.close()

    metrics, best_step = _final_metrics(accelerator, student, eval_loader, metric_fn, config, output_dir, state,
                                        interval is not None, log)
    if trackers:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return TrainResult(metrics, list(state.log_history), state.step, time.perf_counter() - started, best_step,
                       _elapsed(wall_before, started))
