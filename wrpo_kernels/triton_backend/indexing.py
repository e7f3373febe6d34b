"""Address arithmetic that stays exact past 2^31 elements.

A row (or vocabulary column) index times a row stride overflows int32 once the tensor holds more
than 2^31 elements: a weight [V, H] with V = 262144 and H = 8256, or a chunk of logits [n, V] with
n V > 2^31. Every such product in the kernels goes through :func:`wide_offset`;
tests/wrpo_kernels/triton/test_triton_compile.py checks the compiled IR for any 32-bit product with a stride.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def wide_offset(index, stride):
    """``index * stride`` computed in int64 (``index`` a scalar or a block of indices)."""
    return index.to(tl.int64) * stride
