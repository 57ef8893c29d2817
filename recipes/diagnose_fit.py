"""How a trained student fits its teacher, on training and dev examples, in three forward modes.

A student whose dev metric is low either did not fit its teacher at all, fits the training set
only (a generalisation gap), or fits it in training mode but not in the inference path (a
train/inference mismatch). This script tells them apart for one finished ladder run:

- modes: `eval` (inference: no gradients, the exact integer path), `eval+grad` (the training
  forward without dropout) and `train` (the training forward with dropout);
- per split and mode: for a regression head (STS-B) the Pearson correlation of the student's
  scores with the labels and with the teacher's scores, their MSE to the teacher's, and the
  spread (standard deviation) of the scores next to the teacher's; for classification the
  accuracy, the agreement with the teacher and the share of the most frequent prediction.

    SURGE_NLP_GLUE_DATASET=../shared/data/glue python recipes/diagnose_fit.py \\
        --run runs/ladder/ablation_all_on/stsb --teacher runs/cpu-full/stsb/teacher --row ablation_all_on --task stsb
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import pearsonr
from transformers import AutoModelForSequenceClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
import benchmark_ladder  # noqa: E402

from surge_nlp.atomic import write_json_atomically  # noqa: E402
from surge_nlp.glue import make_dataloader  # noqa: E402
from surge_nlp.pipeline import load_data  # noqa: E402

MODES = ("eval", "eval+grad", "train")


def outputs(model: torch.nn.Module, dataset, tokenizer, mode: str, batch_size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """The model's logits and the labels over `dataset`, in one of MODES."""
    model.train(mode == "train")
    logits, labels = [], []
    with torch.set_grad_enabled(mode != "eval"):
        for batch in make_dataloader(dataset, tokenizer, batch_size=batch_size):
            labels.append(batch.pop("labels").float())
            logits.append(model(**batch).logits.detach().float())
    return torch.cat(logits).numpy(), torch.cat(labels).numpy()


def fit(student: np.ndarray, teacher: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    if student.shape[-1] == 1:
        s, t = student[:, 0], teacher[:, 0]
        return {"pearson_labels": float(pearsonr(s, labels)[0]), "pearson_teacher": float(pearsonr(s, t)[0]),
                "mse_teacher": float(np.mean((s - t) ** 2)), "std": float(s.std()), "teacher_std": float(t.std())}
    s, t = student.argmax(-1), teacher.argmax(-1)
    return {"accuracy": float(np.mean(s == labels)), "agreement_teacher": float(np.mean(s == t)),
            "majority_share": float(np.bincount(s).max() / len(s))}


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished ladder run: <output>/<row>/<task>")
    parser.add_argument("--teacher", required=True, help="the run's teacher directory")
    parser.add_argument("--row", required=True, help="the run's row in the ladder file (its recipe)")
    parser.add_argument("--task", required=True)
    parser.add_argument("--ladder", default=str(Path(__file__).with_name("ladder.yaml")))
    parser.add_argument("--examples", type=int, default=600, help="the first N examples of each split")
    parser.add_argument("--json", help="also write the result here, with its source (run, row, task, commit)")
    args = parser.parse_args(argv)

    recipe = benchmark_ladder.row_recipe(benchmark_ladder.load_ladder(args.ladder), args.row, args.task)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    data = load_data(recipe, tokenizer)
    student = AutoModelForSequenceClassification.from_pretrained(Path(args.run) / "stages" / recipe.stages[-1].name / "final")
    teacher = AutoModelForSequenceClassification.from_pretrained(args.teacher).eval()
    torch.manual_seed(0)  # the dropout of the train mode
    result = {}
    for split, dataset in (("train", data.train), ("dev", next(iter(data.validation.values())))):
        dataset = dataset.select(range(min(args.examples, len(dataset))))
        teacher_logits, labels = outputs(teacher, dataset, tokenizer, "eval")
        for mode in MODES:
            result[f"{split}/{mode}"] = fit(outputs(student, dataset, tokenizer, mode)[0], teacher_logits, labels)
    for key, values in result.items():
        print(f"{key:<16}", "  ".join(f"{name}={value:.3f}" for name, value in values.items()))
    if args.json:  # with where it came from, so that the file alone says which student it judged
        source = {"run": str(args.run), "teacher": str(args.teacher), "row": args.row, "task": args.task,
                  "examples": args.examples, "commit": benchmark_ladder.checkout_commit()}
        write_json_atomically(Path(args.json), {"source": source, "fit": result})
    return result


if __name__ == "__main__":
    main()
