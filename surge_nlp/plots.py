"""Pictures of training, drawn from the logs a run writes (matplotlib, Agg backend: no display needed).

`plot_run(run_dir)` finds every `log_history.jsonl` under `run_dir` (the teacher's and each
stage's) and writes, into `run_dir/plots/`, per log:

- `<name>_loss.png`: the total loss and every loss term over optimizer steps (log scale);
- `<name>_dev.png`: the metrics of each evaluation while training over steps (when the run evaluated):
  dev, or the held-out training rows of a recipe's `selection`;
- `<name>_surge.png`: the per-layer AGS lambda and the cosine between the binary and auxiliary
  input gradients over steps (DPGC/SURGE runs only).

`surge-nlp glue` and `surge-nlp distill` call it at the end; `surge-nlp plot RUN_DIR` redraws.
`bar_chart` draws a benchmark table (groups x series) for the benchmark scripts.

Example:
    >>> import json, pathlib, tempfile
    >>> from surge_nlp.plots import plot_run
    >>> run = pathlib.Path(tempfile.mkdtemp())
    >>> (run / "stages" / "w1a1").mkdir(parents=True)
    >>> records = [{"step": s, "loss": 1 / s, "loss/logits": 0.5 / s} for s in (1, 2, 3)]
    >>> _ = (run / "stages" / "w1a1" / "log_history.jsonl").write_text("".join(json.dumps(r) + "\\n" for r in records))
    >>> [path.name for path in plot_run(run)]
    ['w1a1_loss.png']
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

from .atomic import atomic_write
from .distill.records import LOG_FILE

PLOTS = "plots"
_LAYER_KEY = re.compile(r"^(lambda|alignment)/layer_(\d+)/mean$")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def read_log(path: str | Path) -> list[dict[str, float]]:
    """The records of a `log_history.jsonl` (one JSON object per line; a torn last line is skipped)."""
    records = []
    for line in Path(path).read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if key in r and r[key] is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _save(figure, path: Path) -> Path:
    with atomic_write(path) as temporary:  # keeps the .png suffix matplotlib reads the format from
        figure.savefig(temporary, dpi=110, bbox_inches="tight")
    return path


def plot_log(records: list[dict], name: str, out_dir: str | Path) -> list[Path]:
    """The plots of one log (see the module docstring); returns the files written."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    loss_keys = sorted({k for r in records for k in r if k == "loss" or k.startswith("loss/")})
    if loss_keys:
        figure, axes = plt.subplots(figsize=(7, 4))
        for key in loss_keys:
            steps, values = _series(records, key)
            axes.plot(steps, values, label="total" if key == "loss" else key.split("/", 1)[1],
                      linewidth=2 if key == "loss" else 1.2)
        if all(v > 0 for k in loss_keys for v in _series(records, k)[1]):
            axes.set_yscale("log")
        axes.set(xlabel="optimizer step", ylabel="training loss", title=f"{name}: loss terms")
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
        written.append(_save(figure, out_dir / f"{name}_loss.png"))
        plt.close(figure)
    eval_keys = sorted({k for r in records for k in r if k.startswith("eval/") and k != "eval/loss"})
    if eval_keys:
        figure, axes = plt.subplots(figsize=(7, 4))
        for key in eval_keys:
            steps, values = _series(records, key)
            axes.plot(steps, [100 * v for v in values], marker="o", label=key.split("/", 1)[1])
        axes.set(xlabel="optimizer step", ylabel="metric (x100)", title=f"{name}: metrics at each evaluation (dev or held-out)")
        axes.legend(fontsize=8)
        axes.grid(alpha=0.3)
        written.append(_save(figure, out_dir / f"{name}_dev.png"))
        plt.close(figure)
    layers = sorted({int(m[2]) for r in records for k in r if (m := _LAYER_KEY.match(k))})
    if layers:
        figure, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
        for layer in layers:
            top.plot(*_series(records, f"lambda/layer_{layer}/mean"), label=f"layer {layer}")
            bottom.plot(*_series(records, f"alignment/layer_{layer}/mean"), label=f"layer {layer}")
        top.set(ylabel="AGS lambda (mean of layer)", title=f"{name}: SURGE per layer")
        bottom.set(xlabel="optimizer step", ylabel="cos(g_b, g_a)")
        for axes in (top, bottom):
            axes.grid(alpha=0.3)
        top.legend(fontsize=8, ncol=min(len(layers), 6))
        written.append(_save(figure, out_dir / f"{name}_surge.png"))
        plt.close(figure)
    return written


def plot_run(run_dir: str | Path) -> list[Path]:
    """Plots of every log under `run_dir` into `run_dir/plots/`; returns the files written.

    Raises:
        FileNotFoundError: `run_dir` holds no `log_history.jsonl`.
    """
    run_dir = Path(run_dir)
    logs = sorted(p for p in run_dir.rglob(LOG_FILE) if PLOTS not in p.relative_to(run_dir).parts)
    if not logs:
        raise FileNotFoundError(f"no {LOG_FILE} under {run_dir}: pass the output directory of surge-nlp glue/distill")
    written = []
    for log in logs:
        relative = log.parent.relative_to(run_dir)
        name = "_".join(part for part in relative.parts if part != "stages") or "run"
        written += plot_log(read_log(log), name, run_dir / PLOTS)
    return written


def bar_chart(groups: Sequence[str], series: dict[str, Sequence[float | None]], path: str | Path, *,
              ylabel: str, title: str, errors: dict[str, Sequence[float | None]] | None = None) -> Path:
    """Grouped bars: one group per entry of `groups`, one bar per series (None: no bar), optional error bars."""
    plt = _pyplot()
    width = 0.8 / max(len(series), 1)
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(series)) * 0.45 + 2), 4.2))
    for index, (label, values) in enumerate(series.items()):
        positions = [g + (index - (len(series) - 1) / 2) * width for g in range(len(groups))]
        # A missing value (None) draws no bar and no error bar.
        heights = [math.nan if v is None else v for v in values]
        yerr = None
        if errors and label in errors:
            yerr = [math.nan if e is None else e for e in errors[label]]
        axes.bar(positions, heights, width, label=label, yerr=yerr, capsize=2)
    axes.set_xticks(range(len(groups)), groups)
    axes.set(ylabel=ylabel, title=title)
    axes.grid(axis="y", alpha=0.3)
    # Outside, right of the axes: clear of the bars and of two-line group labels.
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _save(figure, path)
    plt.close(figure)
    return path
