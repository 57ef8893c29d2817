"""The training loop's records: one optimizer step's log record, and `RunLog`, where records go
(the state's history, `log_history.jsonl`, the trackers, the caller's callback, the progress bar)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..monitoring import lambda_statistics
from .checkpoints import TrainingState

LOG_FILE = "log_history.jsonl"


class RunLog:
    """Where the loop's records go: the state's history, `log_history.jsonl` (main process), the
    trackers and the caller's `on_log`; and the progress bar, which shows the latest loss and evaluation metric."""

    def __init__(self, accelerator: Accelerator, output_dir: Path, state: TrainingState, trackers: list[str],
                 on_log: Callable[[dict[str, float]], None] | None, bar: tqdm) -> None:
        self.accelerator, self.path, self.state, self.trackers, self.on_log, self.bar = \
            accelerator, output_dir / LOG_FILE, state, trackers, on_log, bar
        self.shown: dict[str, str] = {}  # the bar's postfix, each field kept until it is updated

    def __call__(self, record: dict[str, float]) -> None:
        self.state.log_history.append(record)
        if self.accelerator.is_main_process:
            with open(self.path, "a") as file:
                file.write(json.dumps(record) + "\n")
        if self.trackers:
            self.accelerator.log({key: value for key, value in record.items() if key != "step"}, step=int(record["step"]))
        if self.on_log is not None:
            self.on_log(record)

    def show(self, name: str, value: float) -> None:
        self.shown[name] = f"{value:.4f}"
        self.bar.set_postfix(self.shown)


def step_record(accelerator: Accelerator, student: nn.Module, state: TrainingState, step_terms: list[dict[str, torch.Tensor]],
                 steps_per_epoch: int, learning_rates: dict[str, float]) -> dict[str, float]:
    """One optimizer step's log record: the loss terms (means over its micro-batches and the
    processes), the learning rates it used, and SURGE's per-layer lambda and alignment."""
    names = list(step_terms[0])
    means = torch.stack([torch.stack([micro[name] for micro in step_terms]).mean() for name in names])
    means = accelerator.reduce(means, reduction="mean")  # over processes
    record = {"step": state.step, "epoch": state.step / steps_per_epoch, **learning_rates}
    record.update({name: float(value) for name, value in zip(names, means)})
    record.update(lambda_statistics(student))
    return record
