"""How the head forms its logits, and the chunk sizes the chunked backends work in."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..vocab_parallel import VocabShard


def default_chunk_tokens(vocab: int, device: torch.device) -> int:
    """Rows per chunk so that one fp32 chunk of logits takes ~1 GiB on a GPU, ~256 MiB on a CPU."""
    budget = (1 << 30) if device.type == "cuda" else (256 << 20)
    return max(16, budget // (4 * vocab))


@dataclass(frozen=True)
class HeadOptions:
    """How logits are formed, ``softcap(h W^T + b) / temperature``, which labels count, and, for a head
    sharded over the vocabulary, which rows of it this rank holds (``shard``; None: the whole head)."""

    ignore_index: int = -100
    softcap: float | None = None
    temperature: float = 1.0
    shard: VocabShard | None = None

    def vocab(self, weight) -> int:
        """The head's whole vocabulary V (``weight`` holds this rank's rows of it)."""
        return weight.shape[0] if self.shard is None else self.shard.vocab
