"""GLUE metrics as an `evaluate` module that ships with surge_nlp and loads offline.

`evaluate.load("glue", task)` fetches its script from the Hugging Face Hub; this module gives the
same configs and output keys from a local path and needs only numpy and scipy (no scikit-learn):

- cola: `matthews_correlation`
- stsb: `pearson`, `spearmanr`
- mrpc, qqp: `accuracy`, `f1` (F1 of the positive class, label 1)
- sst2, mnli, qnli, rte, wnli: `accuracy`

Values are fractions (accuracy and F1 in [0, 1], correlations in [-1, 1]), as GLUE's own scorer
computes them; multiply by 100 to print the numbers the GLUE papers report. An undefined score
(a correlation of a constant vector, F1 without any positive) is reported as 0.0, the convention of
scikit-learn's `matthews_corrcoef`/`f1_score` used by the reference GLUE metric, so model selection
never compares NaN.

Example:
    >>> import evaluate
    >>> from surge_nlp.glue.metrics import GLUE_METRIC_PATH
    >>> metric = evaluate.load(str(GLUE_METRIC_PATH), "mrpc")
    >>> metric.compute(predictions=[1, 1, 0, 0], references=[1, 0, 0, 0])
    {'accuracy': 0.75, 'f1': 0.6666666666666666}
"""

import datasets
import evaluate
import numpy as np
from scipy import stats

_DESCRIPTION = "GLUE benchmark metrics (Wang et al., 2019), computed locally with numpy and scipy."

_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted label ids (classification) or scores (stsb).
    references: gold label ids (classification) or scores (stsb); an unlabelled test split
        (label -1) is rejected.
Returns: a dict with the task's metrics; see the module docstring.
"""

_CITATION = """\
@inproceedings{wang2019glue,
  title={{GLUE}: A Multi-Task Benchmark and Analysis Platform for Natural Language Understanding},
  author={Wang, Alex and Singh, Amanpreet and Michael, Julian and Hill, Felix and Levy, Omer and Bowman, Samuel R.},
  booktitle={International Conference on Learning Representations},
  year={2019}
}
"""



def accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(np.mean(predictions == references))


def binary_f1(predictions: np.ndarray, references: np.ndarray) -> float:
    """F1 of class 1: 2TP / (2TP + FP + FN); 0.0 when there is no positive at all."""
    true_positives = np.sum((predictions == 1) & (references == 1))
    false_positives = np.sum((predictions == 1) & (references != 1))
    false_negatives = np.sum((predictions != 1) & (references == 1))
    denominator = 2 * true_positives + false_positives + false_negatives
    return float(2 * true_positives / denominator) if denominator else 0.0


def matthews_correlation(predictions: np.ndarray, references: np.ndarray) -> float:
    """Matthews correlation from the confusion matrix (Gorodkin's K-class form; binary MCC for two classes)."""
    classes, encoded = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    encoded_references, encoded_predictions = np.split(encoded, 2)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (encoded_references, encoded_predictions), 1.0)
    true_per_class, predicted_per_class = confusion.sum(axis=1), confusion.sum(axis=0)
    samples, correct = confusion.sum(), np.trace(confusion)
    covariance_true_predicted = correct * samples - true_per_class @ predicted_per_class
    covariance_predicted = samples**2 - predicted_per_class @ predicted_per_class
    covariance_true = samples**2 - true_per_class @ true_per_class
    denominator = np.sqrt(covariance_predicted * covariance_true)
    return float(covariance_true_predicted / denominator) if denominator else 0.0


def _is_constant(values: np.ndarray) -> bool:
    return bool(np.all(values == values[0]))


def pearson_and_spearman(predictions: np.ndarray, references: np.ndarray) -> dict:
    """Pearson and Spearman correlation; 0.0 when either side is constant (correlation undefined)."""
    if len(predictions) < 2 or _is_constant(predictions) or _is_constant(references):
        return {"pearson": 0.0, "spearmanr": 0.0}
    return {
        "pearson": float(stats.pearsonr(predictions, references)[0]),
        "spearmanr": float(stats.spearmanr(predictions, references)[0]),
    }


def _accuracy(predictions: np.ndarray, references: np.ndarray) -> dict:
    return {"accuracy": accuracy(predictions, references)}


def _accuracy_and_f1(predictions: np.ndarray, references: np.ndarray) -> dict:
    return {"accuracy": accuracy(predictions, references), "f1": binary_f1(predictions, references)}


def _matthews(predictions: np.ndarray, references: np.ndarray) -> dict:
    return {"matthews_correlation": matthews_correlation(predictions, references)}


_SCORERS = {
    "cola": _matthews,
    "sst2": _accuracy,
    "mrpc": _accuracy_and_f1,
    "stsb": pearson_and_spearman,
    "qqp": _accuracy_and_f1,
    "mnli": _accuracy,
    "qnli": _accuracy,
    "rte": _accuracy,
    "wnli": _accuracy,
}
_REGRESSION_TASKS = ("stsb",)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class GlueMetric(evaluate.Metric):
    """GLUE metric for one task, chosen by `config_name` (one of the nine task names)."""

    def _info(self):
        if self.config_name not in _SCORERS:
            raise ValueError(
                f"GLUE metric config {self.config_name!r} is invalid; allowed values: {', '.join(_SCORERS)}"
            )
        value_type = "float64" if self.config_name in _REGRESSION_TASKS else "int64"
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value(value_type), "references": datasets.Value(value_type)}
            ),
            reference_urls=["https://gluebenchmark.com/"],
            format="numpy",
        )

    def _compute(self, predictions, references):
        predictions, references = np.asarray(predictions), np.asarray(references)
        if len(references) == 0:
            raise ValueError(f"GLUE {self.config_name}: no examples to score")
        if np.any(references < 0):
            raise ValueError(
                f"GLUE {self.config_name}: references contain negative labels (-1 marks an unlabelled "
                "test split; score a validation split instead)"
            )
        return _SCORERS[self.config_name](predictions, references)
