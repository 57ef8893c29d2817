"""`surge-nlp`: the command line. Every subcommand is a thin wrapper over `surge_nlp.pipeline`.

Errors a user can provoke (unknown task, missing split, wrong columns, label or tokenizer mismatch,
unreadable recipe, bad checkpoint) are reported in one line, `surge-nlp: error: ...`, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


EXAMPLES = """examples:
  # the whole pipeline on RTE with the MiniLM teacher on two CPU cores, data from a local mirror
  SURGE_NLP_GLUE_DATASET=../shared/data/glue surge-nlp glue rte --profile cpu --output runs/rte
  # BERT-base at BiT's published scale, multi-step FP -> W1A4 -> W1A2 -> W1A1, pushed to the Hub
  surge-nlp glue mrpc --profile multistep --output runs/mrpc --push-to-hub me/bert-base-mrpc-w1a1
  # distil from a teacher you already fine-tuned; resume a killed run
  surge-nlp distill sst2 --teacher runs/sst2/teacher --output runs/sst2 --resume
  # a recipe value from the command line
  surge-nlp glue cola --profile cpu --set distill.num_epochs=1 --set stages.0.quantization.eta=1.0
  surge-nlp evaluate runs/rte/student --task rte
  surge-nlp predict runs/rte/student --task rte --output runs/rte/submission
  surge-nlp summary runs/rte/student
  surge-nlp plot runs/rte                 # redraw runs/rte/plots/*.png from the logs
"""


def _recipe(args: argparse.Namespace):
    from .glue import get_task
    from .recipe import load_recipe, merge, merged_recipe_data, parse_overrides

    get_task(args.task)
    overrides = parse_overrides(args.set)
    stage_overrides = overrides.pop("stages", None)
    for key in ("dataset", "max_train_samples", "max_eval_samples", "model"):
        value = getattr(args, key, None)
        if value is not None:
            overrides[key] = value
    if isinstance(stage_overrides, dict):
        # `stages.N.x=...` edits stage N of the merged recipe instead of replacing the list; the
        # recipe is validated once, after the edit (a half-edited one may not be valid yet).
        stages = merged_recipe_data(args.recipe or args.task, args.profile, overrides)[0].get("stages")
        if not isinstance(stages, list) or not all(isinstance(stage, dict) for stage in stages):
            raise ValueError(f"--set stages.N...: the recipe's `stages` must be a list of mappings, got {stages!r}")
        for index, change in stage_overrides.items():
            if not index.isdigit() or not 0 <= int(index) < len(stages):
                raise ValueError(f"--set stages.{index}: the recipe has {len(stages)} stage(s); allowed indices: "
                                 f"0 to {len(stages) - 1}")
            if not isinstance(change, dict):
                raise ValueError(f"--set stages.{index}={change!r}: a stage is edited key by key, e.g. "
                                 f"stages.{index}.training.num_epochs=2")
            stages[int(index)] = merge(stages[int(index)], change)
        overrides["stages"] = stages
    elif stage_overrides is not None:
        overrides["stages"] = stage_overrides  # `--set stages=[...]` replaces the list; the recipe checks it
    recipe = load_recipe(args.recipe or args.task, args.profile, overrides)
    if recipe.task != args.task:
        source = f"recipe {args.recipe} is for" if args.recipe else "--set gives"
        raise ValueError(f"{source} task {recipe.task!r}, not the task argument {args.task!r}")
    return recipe


def _positive_int(text: str) -> int:
    value = int(text) if text.lstrip("-").isdigit() else None
    if value is None or value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}; allowed values: an integer >= 1")
    return value


def _is_main_process() -> bool:
    # Under `accelerate launch` every process runs the command; only the first prints the results.
    return int(os.environ.get("RANK", "0")) == 0


def _write_plots(run_dir: str | Path) -> list[Path]:
    from .plots import plot_run

    return plot_run(run_dir)


def cmd_plot(args: argparse.Namespace) -> None:
    for path in _write_plots(args.run_dir):
        print(path)


def _print_table(result) -> None:
    rows = [("teacher (FP)", "32-32-32", result.teacher["metrics"])]
    rows += [(f"student {s['name']}", s["bits"], s["metrics"]) for s in result.stages]
    shipped = getattr(result, "shipped", None)
    if shipped:
        bits = result.stages[-1]["bits"]
        rows.append(("  packed, reloaded", bits, shipped["packed"]))
        if shipped["deployed"] is not None:
            rows.append(("  deployed (kernels)", bits, shipped["deployed"]))
    print(f"\n{'model':<22} {'W-E-A':<9} {'split':<24} metrics (x100)")
    for name, bits, metrics in rows:
        for split, values in metrics.items():
            shown = "  ".join(f"{k}={100 * v:.2f}" for k, v in values.items())
            print(f"{name:<22} {bits:<9} {split:<24} {shown}")
    for split, fraction in ((shipped or {}).get("agreement") or {}).items():
        print(f"packed and deployed predict identically on {100 * fraction:.2f}% of {split}")
    speed = (shipped or {}).get("speed")
    if speed:
        print(f"deployed speed: {speed['speedup']:.2f}x the FP32 teacher ({1000 * speed['deployed_s_per_batch']:.0f} vs "
              f"{1000 * speed['reference_s_per_batch']:.0f} ms per dev batch of {speed['batch_size']}, {speed['threads']} threads)")


def cmd_glue(args: argparse.Namespace) -> None:
    from .pipeline import run_glue
    from .summary import summary

    recipe = _recipe(args)
    result = run_glue(recipe, args.output, teacher_path=args.teacher, resume=args.resume, push_to_hub=args.push_to_hub,
                      report_to=args.report_to, progress=not args.quiet)
    if not _is_main_process():
        return
    _write_plots(args.output)
    _print_table(result)
    from transformers import AutoModelForSequenceClassification

    student = AutoModelForSequenceClassification.from_pretrained(result.student_dir).eval()
    if (result.shipped or {}).get("deployed") is not None:
        # Summarize what ships and runs: the deployed form, whose layers are on the binary kernels.
        from .deploy import deploy

        student, form = deploy(student), "deployed"
    else:
        form = "packed (kernels unavailable here: simulated)"
    print(f"\nstudent as {form}:")
    print(summary(student, print_fn=None).format(layers=args.layers))
    print(f"\npacked student: {result.student_dir}\nresults: {Path(args.output) / 'results.json'}\nplots: {Path(args.output) / 'plots'}")


def cmd_finetune(args: argparse.Namespace) -> None:
    from .pipeline import finetune_teacher

    _, _, info = finetune_teacher(_recipe(args), Path(args.output), resume=args.resume, report_to=args.report_to,
                                  progress=not args.quiet)
    if _is_main_process():
        print(json.dumps(info["metrics"], indent=2))
        print(f"teacher: {Path(args.output) / 'teacher'}")


def cmd_distill(args: argparse.Namespace) -> None:
    from .models import resolve_model
    from .pipeline import check_tokenizers, distill_stages, load_teacher, ship_student
    from transformers import AutoTokenizer

    recipe = _recipe(args)
    teacher, tokenizer, teacher_info = load_teacher(recipe, args.teacher)
    start = resolve_model(args.student or args.teacher)
    if args.student:
        from transformers import AutoModelForSequenceClassification

        from .pipeline import check_labels

        check_labels(AutoModelForSequenceClassification.from_pretrained(start), recipe.task, "student")
        check_tokenizers(tokenizer, AutoTokenizer.from_pretrained(start), args.teacher, args.student)
    output = Path(args.output)
    student, stages = distill_stages(recipe, teacher, start, tokenizer, output, resume=args.resume, report_to=args.report_to,
                                     progress=not args.quiet, teacher_source=args.teacher)
    result = ship_student(recipe, student, tokenizer, teacher, teacher_info, stages, output)
    if _is_main_process():
        _write_plots(output)
        _print_table(result)
        print(f"packed student: {result.student_dir}\nresults: {output / 'results.json'}")


def _load_for_task(path: str, task: str):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from .glue import get_task
    from .models import may_hold_tokenizer, resolve_model
    from .pipeline import check_labels

    get_task(task)
    model = AutoModelForSequenceClassification.from_pretrained(resolve_model(path))
    check_labels(model, task, "model")
    if not may_hold_tokenizer(resolve_model(path)):
        raise ValueError(f"{path} has no tokenizer files; save the model's tokenizer beside it (tokenizer.save_pretrained)")
    return model, AutoTokenizer.from_pretrained(resolve_model(path))


def _device(args: argparse.Namespace):
    """--device, else the first GPU where there is one (a QQP or MNLI test set on CPU cores takes hours)."""
    import torch

    if args.device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise ValueError(f"--device {args.device!r} is invalid; allowed values: cpu, cuda, cuda:N, mps, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU is available here; use --device cpu")
    return device


def _eval_length(args: argparse.Namespace, model, tokenizer) -> int:
    """--max-seq-length, else the length the model was trained at: its tokenizer's model_max_length (which the
    pipeline saves beside a student) where that is below the task's default, else the task's default."""
    from .glue import get_task

    if args.max_seq_length is None:
        return min(get_task(args.task).max_seq_length, tokenizer.model_max_length)
    positions = getattr(model.config, "max_position_embeddings", None)
    if positions is not None and args.max_seq_length > positions:
        raise ValueError(f"--max-seq-length {args.max_seq_length} is invalid; allowed values: 1 to the model's "
                         f"max_position_embeddings ({positions})")
    tokenizer.model_max_length = max(tokenizer.model_max_length, args.max_seq_length)  # a trained length, not the model's limit
    return args.max_seq_length


def cmd_evaluate(args: argparse.Namespace) -> None:
    from .glue import agreement, load_glue, metrics_of, predictions_by_split

    device = _device(args)
    model, tokenizer = _load_for_task(args.model, args.task)
    data = load_glue(args.task, tokenizer, dataset=args.dataset, max_seq_length=_eval_length(args, model, tokenizer),
                     max_eval_samples=args.max_eval_samples, splits=("validation",))
    simulated = predictions_by_split(args.task, model.to(device), data, tokenizer, args.batch_size)
    metrics = metrics_of(args.task, simulated, data)
    if args.deploy:
        from .deploy import deploy
        from .kernels import ops

        if not ops.available():
            raise ValueError(f"--deploy: the binary kernels cannot be built here ({ops.unavailable_reason()})")
        deployed = predictions_by_split(args.task, deploy(model.cpu().eval()), data, tokenizer, args.batch_size)  # CPU kernels
        metrics = {"simulated": metrics, "deployed": metrics_of(args.task, deployed, data),
                   "identical_predictions": agreement(simulated, deployed)}
    print(json.dumps(_json_safe(metrics), indent=2, allow_nan=False))


def _json_safe(value):
    """Metrics with NaN or infinite values as null, and a warning naming them (json.dumps writes `NaN`,
    which is not JSON: a constant prediction has no correlation, for instance)."""
    import math

    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        print(f"warning: a metric is {value} (e.g. a correlation of constant predictions); printed as null", file=sys.stderr)
        return None
    return value


def cmd_predict(args: argparse.Namespace) -> None:
    from .glue import load_glue, predict_to_submission

    device = _device(args)
    model, tokenizer = _load_for_task(args.model, args.task)
    data = load_glue(args.task, tokenizer, dataset=args.dataset, max_seq_length=_eval_length(args, model, tokenizer),
                     max_eval_samples=args.max_eval_samples, splits=("test",))
    for path in predict_to_submission(args.task, model.to(device), data, tokenizer, args.output, batch_size=args.batch_size):
        print(path)
    if args.max_eval_samples is not None:
        print(f"note: --max-eval-samples {args.max_eval_samples} kept only the first test rows of each split; the GLUE "
              "server needs every row, so these files are for a check, not a submission", file=sys.stderr)


def cmd_summary(args: argparse.Namespace) -> None:
    import transformers

    from .models import resolve_model
    from .summary import summary

    path = resolve_model(args.model)
    # The checkpoint's own class (its classifier counts, and nothing is reported as unexpected), else AutoModel.
    architectures = getattr(transformers.AutoConfig.from_pretrained(path), "architectures", None) or []
    model_class = getattr(transformers, architectures[0], None) if architectures else None
    summary((model_class or transformers.AutoModel).from_pretrained(path), seq_len=args.seq_len)


def _shipped_profiles() -> list[str]:
    # Read from the package data without importing surge_nlp.recipe (and torch) to build the parser.
    from importlib import resources

    folder = resources.files("surge_nlp").joinpath("recipes", "glue", "profiles")
    return sorted(entry.name[:-len(".yaml")] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="surge-nlp", description="SURGE 1-bit BERT: distil, evaluate and package binarized GLUE models.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars (training, data preparation, weight loading)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def recipe_args(p: argparse.ArgumentParser, teacher_required: bool | None) -> None:
        p.add_argument("task", help="GLUE task: cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte, wnli")
        p.add_argument("--recipe", help="a recipe .yaml (default: the shipped TASK recipe, surge_nlp/recipes/glue/TASK.yaml); "
                       "it lies over the defaults.yaml beside it, else over the shipped defaults.yaml")
        p.add_argument("--profile", action="append", default=[], help="overlay a profile (repeatable): "
                       f"{', '.join(_shipped_profiles())}, or a .yaml")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe value, e.g. distill.num_epochs=1")
        p.add_argument("--dataset", help="GLUE dataset: Hub id or local mirror (default $SURGE_NLP_GLUE_DATASET or nyu-mll/glue)")
        p.add_argument("--max-train-samples", type=int, help="keep the first N training examples")
        p.add_argument("--max-eval-samples", type=int, help="keep the first N validation examples")
        p.add_argument("--output", required=True, help="output directory")
        p.add_argument("--resume", action="store_true", help="continue a killed run from its last checkpoint")
        p.add_argument("--report-to", default="none", choices=["none", "tensorboard", "wandb", "mlflow", "all"],
                       help="experiment tracker for every logged value (default: none; the JSONL log is always written)")
        if teacher_required is not None:
            p.add_argument("--teacher", required=teacher_required, help="fine-tuned FP teacher (path or Hub id)")

    p = sub.add_parser("glue", help="the whole pipeline: fine-tune the teacher (unless --teacher), distil, evaluate, save packed",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipe_args(p, teacher_required=False)
    p.add_argument("--model", help="base model (path or Hub id; default: the recipe's); any registered family "
                                   "(BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT, DeBERTa-v2/v3, ModernBERT)")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the packed student with a model card")
    p.add_argument("--layers", action="store_true", help="print the per-layer table of the student summary, not only its totals")
    p.set_defaults(func=cmd_glue)

    p = sub.add_parser("finetune", help="fine-tune the full-precision teacher only")
    recipe_args(p, teacher_required=None)
    p.add_argument("--model", help="base model (path or Hub id; default: the recipe's)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("distill", help="distil a binarized student from a fine-tuned teacher")
    recipe_args(p, teacher_required=True)
    p.add_argument("--student", help="initialise the student from this model (default: the teacher's weights)")
    p.set_defaults(func=cmd_distill)

    for name, func, text in (("evaluate", cmd_evaluate, "validation metrics of a model"),
                             ("predict", cmd_predict, "write GLUE-submission files for the test split")):
        p = sub.add_parser(name, help=text)
        p.add_argument("model", help="model directory or Hub id (SURGE checkpoints need no extra flag)")
        p.add_argument("--task", required=True)
        p.add_argument("--dataset", help="GLUE dataset: Hub id or local mirror")
        p.add_argument("--max-eval-samples", type=int)
        p.add_argument("--batch-size", type=int, default=64)
        p.add_argument("--max-seq-length", type=_positive_int, help="tokens per input after truncation (default: the length the "
                       "model was trained at, as its tokenizer's model_max_length says, at most the task's default: "
                       "64 CoLA/SST-2, 128 otherwise)")
        p.add_argument("--device", help="where the model runs: cpu, cuda, cuda:N, ... (default: a CUDA GPU if there is "
                       "one, else the CPU; --deploy's kernels always run on the CPU)")
        if name == "evaluate":
            p.add_argument("--deploy", action="store_true",
                           help="also evaluate surge_nlp.deploy(model) on the binary kernels; prints both")
        if name == "predict":
            p.add_argument("--output", required=True, help="directory for the .tsv files")
        p.set_defaults(func=func)

    p = sub.add_parser("plot", help="(re)draw the PNG plots of a run from its logs into RUN_DIR/plots")
    p.add_argument("run_dir", help="output directory of surge-nlp glue / distill")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("summary", help="bits, parameters, memory and binary MACs of a model")
    p.add_argument("model", help="model directory or Hub id")
    p.add_argument("--seq-len", type=_positive_int, default=128, help="sequence length for the attention MAC count")
    p.set_defaults(func=cmd_summary)
    return parser


def _silence_progress_bars() -> None:
    import datasets
    import huggingface_hub
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def main(argv: list[str] | None = None) -> int:
    import surge_nlp  # noqa: F401  (registers quant_method "surge" before any checkpoint loads)

    args = build_parser().parse_args(argv)
    if args.quiet:
        _silence_progress_bars()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, OSError, KeyError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if isinstance(err, KeyError):  # str(KeyError) is only the quoted key
            message = f"missing key {message} (in a file or setting this command read)"
        print(f"surge-nlp: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
