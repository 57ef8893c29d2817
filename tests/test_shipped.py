"""surge_nlp.shipped: the speed measurement the model card reports."""

import time

import pytest
import torch

from surge_nlp.shipped import measure_speed


class Sleeper(torch.nn.Module):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds, self.calls = seconds, 0

    def forward(self, input_ids):
        self.calls += 1
        time.sleep(self.seconds)
        return input_ids


def test_measure_speed_times_both_models_on_every_batch_and_reports_their_ratio():
    slow, fast = Sleeper(0.02), Sleeper(0.0)
    batches = [{"input_ids": torch.zeros(3, 5)}, {"input_ids": torch.zeros(3, 7)}]
    speed = measure_speed(slow, fast, batches, repeats=2)
    assert slow.calls == fast.calls == 1 + 2 * len(batches)  # one warm-up, then every batch per repeat
    assert speed["reference_s_per_batch"] >= 0.02
    assert speed["speedup"] == pytest.approx(speed["reference_s_per_batch"] / speed["deployed_s_per_batch"])
    assert speed["speedup"] > 1 and speed["batch_size"] == 3 and speed["batches"] == 2


def test_measure_speed_needs_a_batch():
    with pytest.raises(ValueError, match="at least one batch"):
        measure_speed(Sleeper(0), Sleeper(0), [])
