"""The GLUE pipeline: fine-tune the FP teacher, distil through the recipe's stages, evaluate, save
packed, optionally push to the Hub. The CLI's subcommands are thin wrappers over these functions.

Layout of an output directory (`--resume` continues from whatever it holds):

    teacher/                 fine-tuned FP teacher (save_pretrained) + teacher_metrics.json
    teacher_training/        its trainer checkpoints and log history, settings.json
    stages/<name>/           a stage's trainer checkpoints, log history, settings.json, and on completion
    stages/<name>/final/     the stage's student as a training checkpoint (latent + auxiliary weights)
    student/                 the last stage's student, packed 1-bit (deployable) + tokenizer
    results.json             teacher and student metrics, wall times, sizes, the recipe files and every resolved setting

`settings.json` records what a teacher or stage is made from (the recipe's settings for it, its data,
and for a stage everything upstream); `--resume` refuses to continue or reuse one made otherwise.

Example:
    >>> from surge_nlp.pipeline import run_glue
    >>> from surge_nlp.recipe import load_recipe
    >>> result = run_glue(load_recipe("rte", profiles=["cpu"]), "runs/rte")  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from .atomic import atomic_write, write_json_atomically
from .config import SurgeConfig
from .distill import TrainingConfig, train
from .distill.checkpoints import list_checkpoints
from .distill.setup import has_accelerator_device
from .binarize import from_pretrained
from .binarizers import ActivationQuantizer
from .glue import GlueData, compute_metrics, evaluate_model, get_task, load_glue, make_dataloader
from .recipe import Recipe, Stage, check_one_mixed_precision
from .serialization import set_checkpoint_format
from .models import load_with_fresh_head, may_hold_tokenizer, model_identity, resolve_model
from .shipped import EVAL_BATCH_SIZE, evaluate_shipped
from .integration import surge_linears
from .summary import summary

logger = logging.getLogger(__name__)

class PipelineError(ValueError):
    """Teacher and student (or a model and the task) do not fit together."""


def write_once(write: Callable[[], Any]) -> None:
    """Run `write` on the main process only, then wait for it on every process.

    Under `accelerate launch` every process runs the pipeline (each trains its shard, and the
    trainer keeps the replicas identical); one of them writes each file, and the others read it
    only after it is whole. A single process just writes. The process state is set up as the
    trainer's Accelerator sets it up (accelerate fixes it at the first call), since this may come first.

    If the write fails on the main process, it raises there and every other process raises a
    `RuntimeError` naming the failure, instead of waiting at the barrier until the launcher or the
    process group's timeout (30 minutes with gloo) ends it."""
    state = PartialState(cpu=not has_accelerator_device())
    if state.num_processes == 1:
        write()
        return
    failure: BaseException | None = None
    if state.is_main_process:
        try:
            write()
        except BaseException as error:  # re-raised below, once the others know
            failure = error
    # The broadcast is the barrier: every process leaves it knowing whether the write succeeded.
    outcome = broadcast_object_list([None if failure is None else f"{type(failure).__name__}: {failure}"])[0]
    if failure is not None:
        raise failure
    if outcome is not None:
        raise RuntimeError(f"the main process failed while writing, so this process stops too: {outcome}")


def _save_atomically(model: nn.Module, directory: Path, tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """save_pretrained into a temporary folder, then rename: a killed run never leaves a half checkpoint."""
    with atomic_write(directory) as temporary:
        model.save_pretrained(temporary)
        if tokenizer is not None:
            tokenizer.save_pretrained(temporary)


def sequence_length(recipe: Recipe) -> int:
    """The length the recipe's models train at: its `max_seq_length`, else the task's."""
    return recipe.max_seq_length or get_task(recipe.task).max_seq_length


def with_trained_length(tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> PreTrainedTokenizerBase:
    """A copy of `tokenizer` whose `model_max_length` is the length the student was trained at, as it is
    saved beside the student: `tokenizer(..., truncation=True)` then cuts where training did, and
    `surge-nlp evaluate`/`predict` evaluate at it."""
    shipped = copy.deepcopy(tokenizer)
    shipped.model_max_length = max_seq_length
    return shipped


def _save_with_json(model: nn.Module, directory: Path, json_name: str, info: dict[str, Any],
                    tokenizer: PreTrainedTokenizerBase | None = None) -> None:
    """The model folder, then its JSON record (whose presence marks the folder complete), written once."""
    def write() -> None:
        _save_atomically(model, directory, tokenizer)
        write_json_atomically(directory / json_name, info)
    write_once(write)


SETTINGS_FILE = "settings.json"


# Bookkeeping that does not change what a training makes.
_BOOKKEEPING_FIELDS = ("checkpoint_every", "keep_checkpoints", "log_every")


def _training_settings(config: TrainingConfig) -> dict[str, Any]:
    return {key: value for key, value in config.to_dict().items() if key not in _BOOKKEEPING_FIELDS}


def _data_settings(recipe: Recipe, config: TrainingConfig) -> dict[str, Any]:
    """The recipe's settings that decide which rows a training learns from (and, when it evaluates
    while training, selects on)."""
    settings = {"task": recipe.task, "dataset": recipe.dataset, "max_seq_length": recipe.max_seq_length,
                "max_train_samples": recipe.max_train_samples, "selection": recipe.selection.to_dict()}
    if config.eval_every is not None:
        settings["max_eval_samples"] = recipe.max_eval_samples
    return settings


def teacher_settings(recipe: Recipe) -> dict[str, Any]:
    """What the fine-tuned teacher is made from."""
    return {"model": model_identity(recipe.model), "training": _training_settings(recipe.teacher),
            **_data_settings(recipe, recipe.teacher)}


def _stage_settings(recipe: Recipe, stage: Stage, teacher: dict[str, Any], upstream: list[dict[str, Any]]) -> dict[str, Any]:
    """What a stage's student is made from: its own settings, its data, the teacher, the earlier stages."""
    return {"stage": stage.name, "quantization": stage.quantization.to_dict(), "training": _training_settings(stage.training),
            "keep_shifts": stage.keep_shifts, "augmentation": recipe.augmentation.to_dict(),
            **_data_settings(recipe, stage.training), "teacher": teacher, "earlier_stages": upstream}


def check_and_record_settings(directory: Path, settings: dict[str, Any], what: str, resume: bool) -> None:
    """With `resume`, refuse to continue or reuse the `what` in `directory` when it was made with other
    settings (a directory from before this record is not checked); then record `settings` there.
    Without `resume`, a directory that holds checkpoints keeps its record (the trainer refuses to
    start over it, and a `--resume` after that must still compare with what the checkpoints are)."""
    settings = json.loads(json.dumps(settings, default=str))  # as JSON gives it back
    path = directory / SETTINGS_FILE
    if resume and path.is_file():
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise PipelineError(f"--resume: {path} is unreadable ({err}); remove {directory} to redo the {what}") from None
        changed = sorted(key for key in set(saved) | set(settings) if saved.get(key) != settings.get(key))
        if changed:
            raise PipelineError(f"--resume: the {what} in {directory} was made with other settings than this recipe's "
                                f"(differing: {', '.join(changed)}; recorded in {path}); resume with the recipe it was "
                                "made with, or choose a new output directory")
    if not resume and list_checkpoints(directory):
        return
    write_once(lambda: write_json_atomically(path, settings))


def check_tokenizers(teacher_tokenizer: PreTrainedTokenizerBase, student_tokenizer: PreTrainedTokenizerBase,
                     teacher: str, student: str) -> None:
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise PipelineError(f"tokenizer mismatch: the teacher ({teacher}) and the student ({student}) use different "
                            "vocabularies; distil between models that share a tokenizer")


def set_label_names(model: nn.Module, task_name: str) -> None:
    """Give a model of the task's label count the task's label names (and STS-B's regression type),
    e.g. a teacher fine-tuned elsewhere whose config says LABEL_0, LABEL_1."""
    labels = get_task(task_name).label_config()
    if model.config.num_labels == labels.pop("num_labels"):
        for key, value in labels.items():
            setattr(model.config, key, value)


def check_labels(model: nn.Module, task_name: str, what: str) -> None:
    """PipelineError unless the model has the task's label count and, where its config names the
    classes, the task's classes in the task's order (e.g. an MNLI model whose id 0 is contradiction,
    where GLUE's id 0 is entailment, would be distilled and scored with every label swapped)."""
    task = get_task(task_name)
    if model.config.num_labels != task.num_labels:
        raise PipelineError(f"label count mismatch: the {what} has {model.config.num_labels} labels, task "
                            f"{task.name} needs {task.num_labels}; use a {what} fine-tuned on {task.name}")
    id2label = getattr(model.config, "id2label", None) or {}
    names = [str(id2label.get(i, id2label.get(str(i), ""))).lower() for i in range(task.num_labels)]
    expected = [name.lower() for name in task.label_names]
    # Only a permutation of the task's own class names is a sure mismatch; generic names (LABEL_0) pass.
    if expected and names != expected and sorted(names) == sorted(expected):
        raise PipelineError(f"label order mismatch: the {what}'s classes by id are {names}, task {task.name}'s are "
                            f"{expected}; its predictions would be read as the wrong classes. Use a {what} whose "
                            "label ids follow the GLUE dataset's, or permute its classifier rows to match")


def load_data(recipe: Recipe, tokenizer: PreTrainedTokenizerBase, splits: tuple[str, ...] = ("train", "validation")) -> GlueData:
    """The recipe's splits; with `recipe.selection`, part of train is held out to select checkpoints on."""
    data = load_glue(recipe.task, tokenizer, dataset=recipe.dataset, max_seq_length=recipe.max_seq_length,
                     max_train_samples=recipe.max_train_samples, max_eval_samples=recipe.max_eval_samples, splits=splits)
    if recipe.selection.enabled and data.train is not None:
        train, held_out = recipe.selection.split(data.train)
        data = dataclasses.replace(data, train=train, held_out=held_out)
    return data


def validation_metrics(recipe: Recipe, model: nn.Module, data: GlueData, tokenizer, batch_size: int = EVAL_BATCH_SIZE) -> dict[str, dict[str, float]]:
    return evaluate_model(recipe.task, model, data, tokenizer, batch_size=batch_size)


def _train_stage(model: nn.Module, config: TrainingConfig, data: GlueData, tokenizer, output_dir: Path,
                 teacher: nn.Module | None, resume: bool, report_to: str | list[str] | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Train one stage. With `config.eval_every`, the task's first validation split (or the held-out
    training rows, `data.selection_split`) is evaluated while training and the stage ends with the
    weights of its best main metric (`keep_best`)."""
    loader = make_dataloader(data.train, tokenizer, batch_size=config.batch_size, shuffle=True, seed=config.seed)
    task = data.task
    eval_loader = metric_fn = None
    if config.eval_every is not None:
        selected_on, eval_split = data.selection_split()
        eval_loader = make_dataloader(eval_split, tokenizer, batch_size=EVAL_BATCH_SIZE)
        metric_fn = lambda predictions, references: compute_metrics(task, predictions, references)  # noqa: E731
    result = train(model, loader, config, teacher=teacher, output_dir=output_dir, resume=resume,
                   eval_loader=eval_loader, metric_fn=metric_fn, best_metric=task.main_metric, report_to=report_to,
                   progress=progress)
    # Every call's training seconds (a resumed run's too), unless a checkpoint from before that record was resumed.
    wall = result.wall_time_s if result.total_wall_time_s is None else result.total_wall_time_s
    info: dict[str, Any] = {"steps": result.steps, "wall_time_s": wall, "seed": config.seed,
                            "selected": result.selected, "best_step": result.best_step}
    if eval_loader is not None:
        # every metric (and the loss) at each evaluation, on the split named by `selected_on`
        info.update(eval_history=result.eval_history, selected_on=selected_on)
    return info


def finetune_teacher(recipe: Recipe, output_dir: Path, resume: bool = False,
                     report_to: str | list[str] | None = None, progress: bool = True) -> tuple[nn.Module, PreTrainedTokenizerBase, dict]:
    """Fine-tune `recipe.model` on the task's labels; saved to `output_dir/teacher`."""
    task = get_task(recipe.task)
    teacher_dir = output_dir / "teacher"
    model_path = resolve_model(recipe.model)
    check_and_record_settings(output_dir / "teacher_training", teacher_settings(recipe), "teacher", resume)
    if resume and (teacher_dir / "teacher_metrics.json").is_file():
        logger.info("resume: teacher already fine-tuned in %s", teacher_dir)
        teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
        return teacher, AutoTokenizer.from_pretrained(teacher_dir), json.loads((teacher_dir / "teacher_metrics.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    data = load_data(recipe, tokenizer)
    torch.manual_seed(recipe.teacher.seed)  # the classifier head's initialisation
    teacher = load_with_fresh_head(model_path, **task.label_config())
    info = _train_stage(teacher, recipe.teacher, data, tokenizer, output_dir / "teacher_training", None, resume, report_to, progress)
    info["metrics"] = validation_metrics(recipe, teacher, data, tokenizer)
    info["model"] = recipe.model
    _save_with_json(teacher, teacher_dir, "teacher_metrics.json", info, tokenizer)
    return teacher, tokenizer, info


def inherit_weights(student: nn.Module, previous: nn.Module, keep_shifts: bool = True) -> None:
    """Start a stage's student from the previous stage's: every tensor both have (latent and
    auxiliary weights, embeddings, head). An activation quantizer whose bit width is the same keeps
    its scale and shift; one whose bit width changes re-calibrates its scale alpha on the first batch
    and, with `keep_shifts` (BiT's chain keeps what it learned), keeps the learned shift beta, else
    starts it at 0. A new auxiliary branch starts from the latent weights."""
    source = previous.state_dict()
    previous_quantizers = {name: module for name, module in previous.named_modules() if isinstance(module, ActivationQuantizer)}
    dropped: set[str] = set()
    for name, quantizer in student.named_modules():
        earlier = previous_quantizers.get(name)
        if isinstance(quantizer, ActivationQuantizer) and earlier is not None and earlier.bits != quantizer.bits:
            dropped |= {f"{name}.alpha", f"{name}.initialized"} | (set() if keep_shifts else {f"{name}.beta"})
    target = student.state_dict()
    copy = {key: value for key, value in source.items()
            if key in target and target[key].shape == value.shape and key not in dropped}
    student.load_state_dict(copy, strict=False)
    for name, module in surge_linears(student).items():
        aux = [f"{name}.{key}" for key in ("aux_weight", "aux_u", "aux_v") if getattr(module, key) is not None]
        if aux and not all(key in copy for key in aux):
            module.init_auxiliary_from_weight()


@dataclass
class PipelineResult:
    task: str
    teacher: dict[str, Any]
    stages: list[dict[str, Any]] = field(default_factory=list)
    student_dir: str | None = None
    summary: dict[str, Any] | None = None
    # What is shipped, measured: the packed student reloaded from disk, and its deployed form.
    shipped: dict[str, Any] | None = None

    @property
    def student(self) -> dict[str, Any]:
        return self.stages[-1]


def distill_stages(recipe: Recipe, teacher: nn.Module, teacher_dir: str | Path, tokenizer, output_dir: Path,
                   resume: bool = False, report_to: str | list[str] | None = None,
                   progress: bool = True, teacher_source: str | None = None) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Run the recipe's stages; stage 1's student starts from `teacher_dir`'s weights, each later
    one from the previous student, which is also its teacher. Completed stages are reloaded on resume
    (when made with the same settings: `check_and_record_settings`). `teacher_source` names a teacher
    loaded from elsewhere than `teacher_dir` (the CLI's `distill --teacher T --student S`)."""
    if Path(teacher_dir) == output_dir / "teacher":
        teacher_identity = teacher_settings(recipe)
    else:  # by content, not by the path as typed
        teacher_identity = {"teacher": model_identity(teacher_source or str(teacher_dir)), "start": model_identity(str(teacher_dir))}
    upstream: list[dict[str, Any]] = []
    data = load_data(recipe, tokenizer)
    if recipe.augmentation.enabled:  # the teacher scores every added input; their labels are never read
        # Each added task is capped as the task's own training set is (`max_train_samples`), so a
        # bounded profile stays bounded (QNLI alone has 105k pairs).
        others = [load_glue(name, tokenizer, dataset=recipe.dataset, splits=("train",),
                            max_seq_length=sequence_length(recipe),
                            max_train_samples=recipe.max_train_samples).train
                  for name in recipe.augmentation.other_tasks]
        held_out = []  # the inputs the student is scored on: none of them is distilled on
        if others:
            scored = load_glue(recipe.task, tokenizer, dataset=recipe.dataset, splits=("validation", "test"),
                               max_seq_length=sequence_length(recipe))
            held_out = [ids for split in (*scored.validation.values(), *scored.test.values()) for ids in split["input_ids"]]
        data = dataclasses.replace(data, train=recipe.augmentation.apply(data.train, tokenizer.all_special_ids, others, held_out))
    stages_info: list[dict[str, Any]] = []
    current_teacher, previous = teacher, None
    for stage in recipe.stages:
        stage_dir = output_dir / "stages" / stage.name
        final = stage_dir / "final"
        settings = _stage_settings(recipe, stage, teacher_identity, upstream)
        check_and_record_settings(stage_dir, settings, f"stage {stage.name!r}", resume)
        upstream = [*upstream, {key: value for key, value in settings.items() if key not in ("teacher", "earlier_stages")}]
        if resume and (final / "stage.json").is_file():
            logger.info("resume: stage %s already done", stage.name)
            student = AutoModelForSequenceClassification.from_pretrained(final)
            info = json.loads((final / "stage.json").read_text())
        else:
            student = build_student(teacher_dir, stage, previous)
            set_label_names(student, recipe.task)
            info = _train_stage(student, stage.training, data, tokenizer, stage_dir, current_teacher, resume, report_to, progress)
            info.update(name=stage.name, bits=stage.quantization.bits_label, estimator=stage.quantization.estimator,
                        train_examples=len(data.train), metrics=validation_metrics(recipe, student, data, tokenizer))
            set_checkpoint_format(student, "training")
            _save_with_json(student, final, "stage.json", info)
        stages_info.append(info)
        current_teacher = previous = student.eval()
    return previous, stages_info


def build_student(teacher_dir: str | Path, stage: Stage, previous: nn.Module | None) -> nn.Module:
    torch.manual_seed(stage.training.seed)
    # A copy: the model's config changes (checkpoint_format) must not leak into the recipe.
    quantization = SurgeConfig.from_dict(stage.quantization.to_dict())
    student = from_pretrained(teacher_dir, quantization)  # refuses a teacher saved with a different SurgeConfig
    if previous is not None:
        inherit_weights(student, previous, keep_shifts=stage.keep_shifts)
    return student


def ship_student(recipe: Recipe, student: nn.Module, tokenizer: PreTrainedTokenizerBase, teacher: nn.Module,
                 teacher_info: dict[str, Any], stages: list[dict[str, Any]], output_dir: Path) -> PipelineResult:
    """Save the last stage's student packed to `output_dir/student`, measure what is shipped
    (`evaluate_shipped`, against the teacher's speed) and write every number to `results.json`.
    Under `accelerate launch` the main process alone measures (processes timed side by side would
    slow each other), and the others read its numbers back."""
    set_checkpoint_format(student, "packed")
    write_once(lambda: _save_atomically(student, output_dir / "student", with_trained_length(tokenizer, sequence_length(recipe))))
    report = summary(student, print_fn=None)
    results_path = output_dir / "results.json"

    def measure_and_write() -> None:
        shipped = evaluate_shipped(recipe, output_dir / "student", tokenizer, reference=teacher)
        write_json_atomically(results_path, {
            "task": recipe.task, "recipe": recipe.sources, "resolved_recipe": recipe.to_dict(),
            "augmentation": recipe.augmentation.to_dict(),
            "selection": recipe.selection.to_dict(), "teacher": teacher_info, "stages": stages,
            "student_dir": str(output_dir / "student"), "summary": report.totals, "shipped": shipped})

    write_once(measure_and_write)
    shipped = json.loads(results_path.read_text())["shipped"]
    return PipelineResult(recipe.task, teacher_info, stages, str(output_dir / "student"), report.totals, shipped)


def run_glue(recipe: Recipe, output_dir: str | Path, teacher_path: str | None = None, resume: bool = False,
             push_to_hub: str | None = None, report_to: str | list[str] | None = None,
             progress: bool = True) -> PipelineResult:
    """The whole pipeline; returns (and writes to results.json) every measured number."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if teacher_path is None:
        # The teacher's fine-tuning and the stages run in this process: one mixed precision for all.
        check_one_mixed_precision({"teacher": recipe.teacher.mixed_precision,
                                   **{f"stage {stage.name}": stage.training.mixed_precision for stage in recipe.stages}})
        teacher, tokenizer, teacher_info = finetune_teacher(recipe, output_dir, resume, report_to, progress)
        teacher_dir: str | Path = output_dir / "teacher"
    else:
        teacher, tokenizer, teacher_info = load_teacher(recipe, teacher_path)
        teacher_dir = resolve_model(teacher_path)
    student, stages = distill_stages(recipe, teacher, teacher_dir, tokenizer, output_dir, resume, report_to, progress,
                                     teacher_source=teacher_path)

    result = ship_student(recipe, student, tokenizer, teacher, teacher_info, stages, output_dir)
    if push_to_hub:
        from .hub import push_to_hub as push

        metrics = next(iter(result.student["metrics"].values()))
        speedup = (result.shipped.get("speed") or {}).get("speedup")
        write_once(lambda: push(student, push_to_hub, metrics=metrics, task=recipe.task, base_model=recipe.model, speedup=speedup,
                                tokenizer=with_trained_length(tokenizer, sequence_length(recipe))))
    return result


def _check_borrowed_tokenizer(teacher: nn.Module, tokenizer: PreTrainedTokenizerBase, teacher_path: str, model: str) -> None:
    """A teacher saved without tokenizer files is given the recipe model's tokenizer: refuse one that
    cannot be the teacher's (ids past its vocabulary, another padding id, e.g. BERT's for a RoBERTa)."""
    vocab_size, pad_id = getattr(teacher.config, "vocab_size", None), getattr(teacher.config, "pad_token_id", None)
    problems = []
    if vocab_size is not None and len(tokenizer) > vocab_size:
        problems.append(f"{len(tokenizer)} tokens for an embedding of {vocab_size}")
    if pad_id is not None and tokenizer.pad_token_id is not None and tokenizer.pad_token_id != pad_id:
        problems.append(f"padding id {tokenizer.pad_token_id} where the teacher's is {pad_id}")
    if problems:
        raise PipelineError(f"the teacher {teacher_path} has no tokenizer files, and the recipe model's ({model}) does not "
                            f"fit it ({'; '.join(problems)}); save the teacher's tokenizer beside it, or set `model` "
                            "to the teacher's base model")
    logger.warning("the teacher %s has no tokenizer files; using the recipe model's (%s)", teacher_path, model)


def load_teacher(recipe: Recipe, teacher_path: str) -> tuple[nn.Module, PreTrainedTokenizerBase, dict]:
    """A fine-tuned FP teacher from disk or the Hub, checked against the task and the recipe's tokenizer."""
    path = resolve_model(teacher_path)
    teacher = AutoModelForSequenceClassification.from_pretrained(path)
    check_labels(teacher, recipe.task, "teacher")
    tokenizer = None
    if may_hold_tokenizer(path):
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except (OSError, ValueError):
            pass
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(resolve_model(recipe.model))
        _check_borrowed_tokenizer(teacher, tokenizer, teacher_path, recipe.model)
    data = load_data(recipe, tokenizer, splits=("validation",))
    return teacher, tokenizer, {"model": teacher_path, "metrics": validation_metrics(recipe, teacher, data, tokenizer)}


__all__ = ["PipelineError", "PipelineResult", "build_student", "check_labels", "check_tokenizers",
           "check_and_record_settings", "distill_stages", "evaluate_shipped", "finetune_teacher", "ship_student", "teacher_settings", "inherit_weights", "load_teacher", "resolve_model", "run_glue", "set_label_names",
           "write_json_atomically", "write_once"]
