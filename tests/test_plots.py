"""PNG plots of runs (loss terms, dev metrics, SURGE's lambda and cosine) and benchmark bar charts."""

from __future__ import annotations

import json

import pytest

from surge_nlp.plots import bar_chart, plot_run, read_log


def _png_shape(path):
    import matplotlib.image

    return matplotlib.image.imread(path).shape


def _write_log(path, records):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def test_plot_run_draws_each_log_of_a_run(tmp_path):
    surge = [{"step": s, "loss": 2 / s, "loss/logits": 1 / s, "loss/hidden": 1 / s, "lambda/layer_0/mean": 0.3,
              "lambda/layer_1/mean": 0.4, "alignment/layer_0/mean": 0.7, "alignment/layer_1/mean": 0.6} for s in range(1, 6)]
    surge += [{"step": 5, "eval/loss": 0.6, "eval/accuracy": 0.7}]
    _write_log(tmp_path / "stages" / "w1a1" / "log_history.jsonl", surge)
    _write_log(tmp_path / "teacher_training" / "log_history.jsonl", [{"step": s, "loss": 1 / s} for s in (1, 2)])
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == ["teacher_training_loss.png", "w1a1_dev.png", "w1a1_loss.png", "w1a1_surge.png"]
    for path in written:
        height, width, _ = _png_shape(path)
        assert height > 200 and width > 300
    assert not list((tmp_path / "plots").glob("*.tmp.png"))
    # Redrawing does not pick up its own output folder.
    assert sorted(p.name for p in plot_run(tmp_path)) == sorted(p.name for p in written)


def test_a_torn_last_log_line_is_skipped(tmp_path):
    path = tmp_path / "log_history.jsonl"
    path.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    assert read_log(path) == [{"step": 1, "loss": 1.0}]


def test_plot_run_without_logs_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no log_history.jsonl under"):
        plot_run(tmp_path)


def test_bar_chart(tmp_path):
    path = bar_chart(["stsb", "mrpc", "avg"], {"teacher": [85.0, 86.0, 85.5], "w1a1": [60.0, None, 60.0]},
                     tmp_path / "bars.png", ylabel="dev metric (x100)", title="ladder",
                     errors={"w1a1": [1.0, None, 0.5]})
    assert path.is_file() and _png_shape(path)[1] > 300


def test_the_cli_draws_plots_of_a_glue_run(tmp_path, capsys):
    from surge_nlp.cli import main

    _write_log(tmp_path / "run" / "stages" / "w1a1" / "log_history.jsonl", [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])
    assert main(["plot", str(tmp_path / "run")]) == 0
    assert capsys.readouterr().out.strip().endswith("w1a1_loss.png")
    assert main(["plot", str(tmp_path / "empty")]) == 2
    assert "no log_history.jsonl" in capsys.readouterr().err


def test_tensorboard_receives_every_logged_scalar(tmp_path):
    pytest.importorskip("tensorboard")
    import torch
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from transformers import BertForSequenceClassification

    import surge_nlp
    from surge_nlp.distill import TrainingConfig, train

    from .conftest import fixed_batch, tiny_config

    torch.manual_seed(0)
    teacher = BertForSequenceClassification(tiny_config("bert"))
    student = surge_nlp.binarize(BertForSequenceClassification(tiny_config("bert")), surge_nlp.SurgeConfig(estimator="surge"))
    data = [{k: v[i] for k, v in fixed_batch(8, seed=1).items()} for i in range(8)]
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    accuracy = lambda p, r: {"accuracy": float((p == r).mean())}  # noqa: E731
    config = TrainingConfig(batch_size=4, num_epochs=2, log_every=1, eval_every=2, ground_truth_weight=0.5)
    result = train(student, loader, config, teacher=teacher, output_dir=tmp_path, progress=False, report_to="tensorboard",
                   eval_loader=torch.utils.data.DataLoader(data, batch_size=8), metric_fn=accuracy, best_metric="accuracy")
    events = list((tmp_path / "surge_nlp").rglob("events.out.tfevents.*"))
    assert events
    scalars = {}
    for path in events:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in accumulator.Scalars(tag)]
    expected = {"loss", "loss/logits", "loss/hidden", "loss/ground_truth", "lr/weights", "lr/scales", "lr/shifts",
                "lambda/layer_0/mean", "alignment/layer_1/mean", "lambda/mean", "eval/accuracy", "eval/loss"}
    assert expected <= set(scalars), expected - set(scalars)
    logged = [(r["step"], r["loss"]) for r in result.log_history if "loss" in r]
    assert [step for step, _ in scalars["loss"]] == [step for step, _ in logged]
    assert [value for _, value in scalars["loss"]] == pytest.approx([value for _, value in logged], rel=1e-6)


@pytest.mark.parametrize("report_to,message", [("comet", "report_to='comet' is invalid; allowed values"),
                                               (["tensorboard", "nope"], "is invalid; allowed values")])
def test_unknown_trackers_are_errors(report_to, message):
    from surge_nlp.distill.setup import resolve_trackers

    with pytest.raises(ValueError, match=message):
        resolve_trackers(report_to)
    assert resolve_trackers("none") == [] and resolve_trackers(None) == []


def test_report_to_all_without_any_tracker_says_so(monkeypatch, caplog):
    import logging

    import accelerate.utils

    from surge_nlp.distill.setup import resolve_trackers

    for name in ("is_tensorboard_available", "is_wandb_available", "is_mlflow_available"):
        monkeypatch.setattr(accelerate.utils, name, lambda: False)
    with caplog.at_level(logging.WARNING):
        assert resolve_trackers("all") == []
    assert "report_to='all': none of tensorboard, wandb, mlflow is installed" in caplog.text
