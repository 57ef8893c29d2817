"""Run by tests/test_distill.py: distil a tiny SURGE student from a tiny teacher for a few steps,
then write what each process ended with to OUT_DIR/rank_<i>.json (its device, a digest of every
parameter and buffer, the eval metrics, the log history).

Usage (2 CPU processes, gloo): CUDA_VISIBLE_DEVICES= accelerate launch --multi_gpu --num_processes 2 \
    tests/helpers/ddp_train.py OUT_DIR [--mixed-precision bf16]
One process (on the GPU if there is one): python tests/helpers/ddp_train.py OUT_DIR --mixed-precision fp16
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from transformers import BertConfig, BertForSequenceClassification

import surge_nlp
from surge_nlp.distill import TrainingConfig, train

NUM_TRAIN, NUM_EVAL, SEQ_LEN, VOCAB = 24, 7, 10, 120


def tiny_model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=VOCAB, num_labels=2))


def examples(count: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        input_ids = torch.randint(3, VOCAB, (SEQ_LEN,), generator=g)
        mask = torch.ones(SEQ_LEN, dtype=torch.long)
        mask[int(torch.randint(6, SEQ_LEN + 1, (1,), generator=g)):] = 0
        rows.append({"input_ids": input_ids, "attention_mask": mask, "labels": input_ids[0] % 2})
    return rows


def state_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().float().numpy().tobytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--mixed-precision", default="no")
    args = parser.parse_args()

    teacher = tiny_model(seed=0)
    student = surge_nlp.binarize(tiny_model(seed=0), surge_nlp.SurgeConfig(estimator="surge"))
    config = TrainingConfig(learning_rate=1e-3, batch_size=4, num_epochs=1, max_steps=3, log_every=1,
                            checkpoint_every=2, attention_weight=1.0, ground_truth_weight=0.5,
                            mixed_precision=args.mixed_precision)
    train_loader = torch.utils.data.DataLoader(examples(NUM_TRAIN, seed=1), batch_size=4, shuffle=True)
    eval_loader = torch.utils.data.DataLoader(examples(NUM_EVAL, seed=2), batch_size=2)

    def count_and_accuracy(predictions: np.ndarray, references: np.ndarray) -> dict[str, float]:
        return {"count": len(references), "accuracy": float((predictions == references).mean())}

    result = train(student, train_loader, config, teacher=teacher, eval_loader=eval_loader,
                   metric_fn=count_and_accuracy, output_dir=args.out_dir / "run", progress=False)
    state = PartialState()
    report = {"world_size": state.num_processes, "device": str(next(student.parameters()).device),
              "digest": state_digest(student), "metrics": result.metrics, "steps": result.steps,
              "log_history": result.log_history}
    (args.out_dir / f"rank_{state.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
