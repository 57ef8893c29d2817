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


def test_measure_speed_refuses_models_on_another_device_than_the_batches():
    # A GPU teacher timed against CPU kernels (or fed CPU batches) is no measurement; "meta" stands in for a GPU.
    on_device = torch.nn.Linear(4, 2).to("meta")
    with pytest.raises(ValueError, match="same device as the batches"):
        measure_speed(on_device, torch.nn.Linear(4, 2), [{"input": torch.ones(1, 4)}])


class Relocatable(torch.nn.Linear):
    """Records every move; a move off "meta" (standing in for a GPU) allocates fresh CPU storage."""

    def __init__(self) -> None:
        super().__init__(4, 2)
        self.moves: list[str] = []

    def to(self, device):
        self.moves.append(str(device))
        if self.weight.device.type == "meta":
            return self.to_empty(device=device)
        return super().to(device)


def test_the_shipped_speed_times_the_reference_on_the_cpu_and_gives_it_back_to_its_device():
    # Before: the trainer left the teacher on its accelerator, and the timing fed it CPU batches (a crash at
    # the end of run_glue on a GPU machine, after all the training); timing it there would compare a GPU with the kernels.
    from surge_nlp.shipped import _speed_on_cpu

    reference = Relocatable()
    torch.nn.Module.to(reference, "meta")
    speed = _speed_on_cpu(reference, torch.nn.Linear(4, 2), [{"input": torch.ones(3, 4)}])
    assert reference.moves == ["cpu", "meta"] and reference.weight.device.type == "meta"
    assert speed["batch_size"] == 3 and speed["speedup"] > 0
