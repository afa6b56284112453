"""Shared fixtures: a tiny tokenizer and tiny teacher/student models built offline in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import yaml  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = REPO / "data" / "kdcore-instruct"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``{tokenizer, student, teacher, teacher_wide}`` directories: one 512-token byte-level BPE,
    a 2-layer student, a 3-layer teacher, and a teacher whose head has 64 padding columns."""
    from kdcore.tiny import instruction_texts, tiny_causal_lm, train_byte_bpe

    root = tmp_path_factory.mktemp("tiny")
    tok = train_byte_bpe(instruction_texts(DATA_DIR), root / "tokenizer", vocab_size=512)
    tiny_causal_lm(tok, root / "student", arch="llama", hidden=32, layers=2, seed=1)
    tiny_causal_lm(tok, root / "teacher", arch="llama", hidden=48, layers=3, seed=2)
    tiny_causal_lm(tok, root / "teacher_wide", arch="gpt2", hidden=48, layers=2, vocab_size=len(tok) + 64, seed=3)
    return root


@pytest.fixture
def make_config(tiny_dir, tmp_path):
    """Write a tiny-run config (overridable by a nested dict) and return its path."""

    def make(extra=None, name="config.yaml"):
        cfg = {
            "schema_version": 1,
            "run": {"output_dir": str(tmp_path / "run"), "seed": 3},
            "teacher": {"path": str(tiny_dir / "teacher")},
            "student": {"path": str(tiny_dir / "student")},
            "task": {"name": "instruction", "data_dir": str(DATA_DIR), "max_length": 96, "max_prompt_length": 64,
                     "max_examples": 32},
            "criterion": {"name": "fkl", "temperature": 2.0},
            "objective": {"kd_weight": 0.5},
            "train": {"max_steps": 2, "micro_batch_size": 4, "grad_accum": 1, "lr": 1e-3, "eval_at_start": False},
            "eval": {"max_examples": 8},
        }
        for key, value in (extra or {}).items():
            same_component = not (isinstance(value, dict) and "name" in value and value["name"] != cfg.get(key, {}).get("name"))
            if isinstance(value, dict) and isinstance(cfg.get(key), dict) and same_component:
                cfg[key].update(value)
            else:
                cfg[key] = value
        path = tmp_path / name
        path.write_text(yaml.safe_dump(cfg))
        return path

    return make


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory):
    """The cross-tokenizer pair of tools/make_tiny_pair.py: teacher (GPT-2, byte BPE), student
    (Llama, SentencePiece BPE) and student_same (Llama, the teacher's tokenizer)."""
    from kdcore.tiny import make_tiny_pair

    return make_tiny_pair(tmp_path_factory.mktemp("pair"), DATA_DIR)


@pytest.fixture(scope="session")
def repo_like_cwd(tiny_pair, tmp_path_factory):
    """A working directory where shipped configs' relative paths resolve: ``data`` and
    ``configs`` link to the repository and ``runs/tiny-pair`` to the tiny pair."""
    root = tmp_path_factory.mktemp("cwd")
    (root / "data").symlink_to(REPO / "data")
    (root / "configs").symlink_to(REPO / "configs")
    (root / "runs").mkdir()
    (root / "runs" / "tiny-pair").symlink_to(tiny_pair["teacher"].parent)
    return root
