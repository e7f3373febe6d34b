"""Local transformers models for sampling and scoring: offline only, tokenizer with a chat template."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoTokenizer


def local_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a directory saved with ``save_pretrained`` (never a hub id: nothing is downloaded)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(
            f"{flag} {path}: not a model directory (no config.json; save one with save_pretrained)"
        )
    return path


def load_tokenizer(path: Path, *, padding_side: str):
    """The tokenizer saved in ``path``, which must have a chat template; pads with EOS if it has no pad."""
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not tokenizer.chat_template:
        raise ValueError(f"{path}: the tokenizer has no chat template")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


def pick_device(device: str | None) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def batches(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]
