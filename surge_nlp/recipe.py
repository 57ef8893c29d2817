"""GLUE recipes: YAML configuration, merged in layers and validated at the boundary.

A recipe is `defaults.yaml` (what every task shares: BERT-base scale, METHOD.md section 2),
overlaid by the task's file (`<task>.yaml`: its learning rate, epochs, batch size), then
optionally by profiles in order (`profiles/<name>.yaml`, e.g. `cpu`: the
MiniLM teacher on two CPU cores in bounded time), then by command-line overrides. Mappings merge
key by key; lists (the distillation `stages`) are replaced whole. The shipped recipes are package
data (`surge_nlp/recipes/glue/`, read through `importlib.resources`), so an installed wheel has them. A profile may hold a `tasks:`
mapping, task name -> settings, laid over the recipe after the rest of the profile, for that task
only (e.g. `cpu-full`'s per-task teacher learning rates).

Stages chain as in BiT's multi-step distillation: stage 1's teacher is the full-precision
teacher; each later stage starts from the previous stage's student and uses it as its teacher.

Example:
    >>> from surge_nlp.recipe import load_recipe
    >>> recipe = load_recipe("rte", profiles=["cpu"])  # doctest: +SKIP
    >>> [stage.quantization.bits_label for stage in recipe.stages]  # doctest: +SKIP
    ['1-32-1']
"""

from __future__ import annotations

import copy
import re
from importlib import resources
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import SurgeConfig
from .distill import TrainingConfig
from .glue import GLUE_TASKS, get_task
from .glue.augment import Augmentation
from .glue.selection import Selection

PROFILE_TASKS_KEY = "tasks"
RECIPE_KEYS = ("task", "model", "dataset", "max_seq_length", "max_train_samples", "max_eval_samples",
               "augmentation", "selection", "teacher", "distill", "stages")
STAGE_KEYS = ("name", "quantization", "training", "keep_shifts")
STAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class RecipeError(ValueError):
    """A recipe file is missing, unreadable, or holds an invalid value."""


def recipe_dir() -> Path:
    """The shipped GLUE recipes: `surge_nlp/recipes/glue` inside the installed package."""
    return Path(str(resources.files("surge_nlp").joinpath("recipes", "glue")))


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise RecipeError(f"cannot read recipe {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise RecipeError(f"recipe {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {path} must be a mapping of settings, got {type(data).__name__}")
    return data


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings key by key, everything else (lists included) replaced."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


@dataclass
class Stage:
    """One distillation stage: the student's quantization and the stage's training settings.

    `keep_shifts` (multi-step): when this stage changes the activation bit width of the previous
    stage's student, start from its learned shifts beta and re-calibrate only the scales alpha
    (default); False re-initialises both."""

    name: str
    quantization: SurgeConfig
    training: TrainingConfig
    keep_shifts: bool = True


@dataclass
class Recipe:
    """A validated GLUE recipe (see the module docstring for how files combine)."""

    task: str
    model: str
    teacher: TrainingConfig
    stages: list[Stage]
    dataset: str | None = None
    max_seq_length: int | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    # More inputs for the distillation stages (the teacher's fine-tuning never sees them): noisy copies
    # and other tasks' training inputs, `augmentation: {copies: K, replace_prob: p, seed: s, other_tasks: [...]}`;
    # see surge_nlp.glue.augment.
    augmentation: Augmentation = field(default_factory=Augmentation)
    # Where evaluation while training picks the kept checkpoint: dev (default), or a held-out part of
    # the training set, `selection: {held_out: f, seed: s}`; see surge_nlp.glue.selection.
    selection: Selection = field(default_factory=Selection)
    sources: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """Every resolved setting, as a recipe file would hold it: `Recipe.from_dict(r.to_dict())`
        gives the same recipe (results.json keeps it, so a run can be repeated from it alone)."""
        return {"task": self.task, "model": self.model, "dataset": self.dataset, "max_seq_length": self.max_seq_length,
                "max_train_samples": self.max_train_samples, "max_eval_samples": self.max_eval_samples,
                "augmentation": self.augmentation.to_dict(), "selection": self.selection.to_dict(),
                "teacher": self.teacher.to_dict(),
                "stages": [{"name": stage.name, "quantization": stage.quantization.to_dict(), "training": stage.training.to_dict(),
                            "keep_shifts": stage.keep_shifts} for stage in self.stages]}

    @classmethod
    def from_dict(cls, data: dict[str, Any], sources: list[str] | None = None) -> "Recipe":
        where = " + ".join(sources or ["recipe"])
        unknown = sorted(set(data) - set(RECIPE_KEYS))
        if unknown:
            raise RecipeError(f"{where}: unknown setting(s) {unknown}; allowed: {list(RECIPE_KEYS)}")
        for key in ("task", "model"):
            if not isinstance(data.get(key), str) or not data[key]:
                raise RecipeError(f"{where}: `{key}` must be a non-empty string, got {data.get(key)!r}")
        for key in ("max_seq_length", "max_train_samples", "max_eval_samples"):
            value = data.get(key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise RecipeError(f"{where}: `{key}` must be null or an integer >= 1, got {value!r}")
        if data.get("dataset") is not None and (not isinstance(data["dataset"], str) or not data["dataset"]):
            raise RecipeError(f"{where}: `dataset` must be null or a non-empty string (a Hub id or a local path), "
                              f"got {data['dataset']!r}")
        try:
            get_task(data["task"])
            teacher = TrainingConfig.from_dict(_settings(data.get("teacher"), "`teacher`"))
            shared = _settings(data.get("distill"), "`distill`")
            stages_data = data.get("stages")
            if not isinstance(stages_data, list) or not stages_data:
                raise RecipeError("`stages` must be a non-empty list of {name, quantization, training}")
            stages = []
            for index, stage in enumerate(stages_data):
                if not isinstance(stage, dict) or set(stage) - set(STAGE_KEYS) or "quantization" not in stage:
                    raise RecipeError(f"stage {index + 1} must be a mapping with `quantization` and optional "
                                      f"`name`, `training`, `keep_shifts`; got {stage!r}")
                name = str(stage.get("name") or f"stage{index + 1}")
                if not STAGE_NAME.fullmatch(name):
                    raise RecipeError(f"stage {index + 1}: `name` {name!r} is invalid; it names the folder stages/<name>: "
                                      "letters, digits, '.', '_' and '-', starting with a letter or digit")
                keep_shifts = stage.get("keep_shifts", True)
                if not isinstance(keep_shifts, bool):
                    raise RecipeError(f"stage {index + 1} ({name}): `keep_shifts` must be true or false, got {keep_shifts!r}")
                training = TrainingConfig.from_dict(merge(shared, _settings(stage.get("training"), f"stage {index + 1} ({name}): `training`")))
                quantization = _settings(stage["quantization"], f"stage {index + 1} ({name}): `quantization`")
                stages.append(Stage(name, SurgeConfig.from_dict(quantization), training, keep_shifts))
        except (ValueError, TypeError) as err:
            raise RecipeError(f"{where}: {err}") from None
        names = [stage.name for stage in stages]
        if len(set(names)) != len(names):
            raise RecipeError(f"{where}: stage names must be unique, got {names}")
        try:
            augmentation = Augmentation.from_dict(data.get("augmentation"))
            selection = Selection.from_dict(data.get("selection"))
        except (ValueError, TypeError) as err:
            raise RecipeError(f"{where}: {err}") from None
        _check_training_roles(teacher, stages, selection)
        labelled = [stage.name for stage in stages if stage.training.ground_truth_weight > 0]
        if augmentation.enabled and labelled:
            raise RecipeError(f"{where}: augmentation (copies={augmentation.copies}, other_tasks="
                              f"{list(augmentation.other_tasks)}) with ground_truth_weight > 0 in stage(s) {labelled}: "
                              "a perturbed copy keeps its original's label, which no longer describes it, and another "
                              "task's input has none; augment only stages distilled from the teacher (ground_truth_weight: 0)")
        inputs = len(get_task(data["task"]).text_columns)
        allowed = [name for name, task in GLUE_TASKS.items() if len(task.text_columns) == inputs and name != data["task"]]
        if any(name not in allowed for name in augmentation.other_tasks):
            raise RecipeError(f"{where}: augmentation.other_tasks={list(augmentation.other_tasks)} is invalid for "
                              f"{data['task']}; allowed values: tasks with its input ({'a sentence pair' if inputs == 2 else 'one sentence'}), "
                              f"other than itself: {', '.join(allowed)}")
        return cls(task=data["task"], model=data["model"], teacher=teacher, stages=stages,
                   dataset=data.get("dataset"), max_seq_length=data.get("max_seq_length"),
                   max_train_samples=data.get("max_train_samples"), max_eval_samples=data.get("max_eval_samples"),
                   augmentation=augmentation, selection=selection, sources=list(sources or []))


def check_one_mixed_precision(precisions: dict[str, str]) -> None:
    """RecipeError unless the trainings that run in one process (named in `precisions`) share one mixed precision."""
    if len(set(precisions.values())) > 1:
        raise RecipeError(f"mixed_precision must be the same for every training in one process (accelerate fixes it once "
                          f"per process); got {precisions}")


def _check_training_roles(teacher: TrainingConfig, stages: list[Stage], selection: Selection) -> None:
    """What the pipeline would only find out hours in (after the teacher's fine-tuning): the teacher
    learns from the labels alone, every stage from a teacher, one mixed precision for all stages
    (they run in one process, and accelerate fixes it once per process; the teacher's is checked
    where it is fine-tuned in the same process, `run_glue`), and a held-out selection that some stage uses."""
    if teacher.distills or teacher.ground_truth_weight <= 0:
        raise RecipeError(f"`teacher` fine-tunes on the labels: it needs ground_truth_weight > 0 (got "
                          f"{teacher.ground_truth_weight}) and logits_weight, hidden_weight, attention_weight 0 (got "
                          f"{teacher.logits_weight}, {teacher.hidden_weight}, {teacher.attention_weight})")
    for stage in stages:
        if not stage.training.distills:
            raise RecipeError(f"stage {stage.name!r} is distilled from a teacher: set one of its logits_weight, "
                              "hidden_weight, attention_weight > 0 (all are 0)")
    check_one_mixed_precision({f"stage {s.name}": s.training.mixed_precision for s in stages})
    if selection.held_out and not any(stage.training.eval_every is not None for stage in stages):
        raise RecipeError(f"selection.held_out={selection.held_out} sets training rows aside to pick the kept epoch, but no "
                          "stage evaluates while training (eval_every is null everywhere); set eval_every, or drop `selection`")


def _settings(value: Any, section: str) -> dict[str, Any]:
    """A section of settings (None: none); anything but a mapping raises, naming the `section`."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{section} must be a mapping of settings, got {value!r}")
    return value


def _find(name: str, kind: str) -> Path:
    path = Path(name)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise RecipeError(f"{kind} file {path} does not exist")
        return path
    directory = recipe_dir() / ("profiles" if kind == "profile" else "")
    candidate = directory / f"{name}.yaml"
    if candidate.is_file():
        return candidate
    available = sorted(p.stem for p in directory.glob("*.yaml") if p.stem != "defaults")
    raise RecipeError(f"no {kind} named {name!r}; available: {', '.join(available) or 'none found'} "
                      f"(or pass a .yaml path)")


def _per_task_settings(value: Any, path: Path) -> dict[str, dict[str, Any]]:
    """A profile's `tasks:` mapping, checked: known task names, each mapped to settings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RecipeError(f"profile {path}: `{PROFILE_TASKS_KEY}` must map task names to settings, got {type(value).__name__}")
    for task, settings in value.items():
        try:
            get_task(str(task))
        except ValueError as err:
            raise RecipeError(f"profile {path}: `{PROFILE_TASKS_KEY}.{task}`: {err}") from None
        if not isinstance(settings, dict):
            raise RecipeError(f"profile {path}: `{PROFILE_TASKS_KEY}.{task}` must be a mapping of settings, got {settings!r}")
    return value


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`KEY=VALUE` strings (the CLI's `--set a.b=value`; value parsed as YAML) into the nested dict of
    recipe overrides that `load_recipe` takes; `stages.N.` indexes the stage list.

    Example:
        >>> parse_overrides(["distill.learning_rate=3e-5", "stages.0.quantization.eta=1.0"])
        {'distill': {'learning_rate': 3e-05}, 'stages': {'0': {'quantization': {'eta': 1.0}}}}
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r} is invalid; expected KEY=VALUE, e.g. distill.num_epochs=1")
        node = overrides
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r} conflicts with an earlier --set {'.'.join(parts[:depth + 1])}=..., "
                                 "which gave it a value rather than settings")
        if isinstance(node.get(parts[-1]), dict):
            raise ValueError(f"--set {item!r} conflicts with an earlier --set {key}.<setting>=...; set one or the other")
        node[parts[-1]] = _parse_value(raw)
    return overrides


def _parse_value(raw: str) -> Any:
    """A `--set` value as YAML, except that `3e-5` is a number (YAML 1.1 wants `3.0e-5`)."""
    value = yaml.safe_load(raw)
    if isinstance(value, str):
        try:
            return float(value) if value.strip().lower() not in ("nan", "inf", "-inf", "infinity") else value
        except ValueError:
            return value
    return value


def load_recipe(task_or_path: str, profiles: Sequence[str] = (), overrides: dict[str, Any] | None = None) -> Recipe:
    """defaults.yaml + the task's recipe (a task name or a .yaml path) + profiles, in order + overrides.
    A recipe given by path lies over the `defaults.yaml` beside it, else over the shipped one (so a
    copy of a shipped task recipe, edited elsewhere, keeps the defaults it was written against)."""
    return Recipe.from_dict(*merged_recipe_data(task_or_path, profiles, overrides))


def merged_recipe_data(task_or_path: str, profiles: Sequence[str] = (),
                       overrides: dict[str, Any] | None = None) -> tuple[dict[str, Any], list[str]]:
    """What `load_recipe` validates: the merged settings, unchecked, and the files they came from."""
    recipe_path = _find(task_or_path, "recipe")
    defaults_path = recipe_path.parent / "defaults.yaml"
    if not defaults_path.is_file():
        defaults_path = recipe_dir() / "defaults.yaml"
    data, sources = {}, []
    if defaults_path.is_file() and defaults_path != recipe_path:
        data, sources = _read_yaml(defaults_path), [str(defaults_path)]
    data = merge(data, _read_yaml(recipe_path))
    sources.append(str(recipe_path))
    for profile in profiles:
        profile_path = _find(profile, "profile")
        profile_data = _read_yaml(profile_path)
        per_task = _per_task_settings(profile_data.pop(PROFILE_TASKS_KEY, None), profile_path)
        data = merge(data, profile_data)
        data = merge(data, per_task.get(data.get("task"), {}))
        sources.append(str(profile_path))
    if overrides:
        data = merge(data, overrides)
        sources.append("command line")
    return data, sources
