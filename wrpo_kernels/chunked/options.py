"""How the head forms its logits, and the dtypes and chunk sizes the chunked backends work in."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else is accumulated in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def default_chunk_tokens(vocab: int, device: torch.device) -> int:
    """Rows per chunk so that one fp32 chunk of logits takes ~1 GiB on a GPU, ~256 MiB on a CPU."""
    budget = (1 << 30) if device.type == "cuda" else (256 << 20)
    return max(16, budget // (4 * vocab))


@dataclass(frozen=True)
class HeadOptions:
    """How logits are formed, ``softcap(h W^T + b) / temperature``, and which labels count."""

    ignore_index: int = -100
    softcap: float | None = None
    temperature: float = 1.0
