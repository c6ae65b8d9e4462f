"""Large packed weights in 2 MiB pages, which one decode step streams faster than 4 KiB ones.

Batch-1 decode reads each weight once per token, front to back. Over 4 KiB pages a 168 MB int8 head crosses 41,000
page boundaries a token: each one a TLB miss, and a point where the CPU's prefetcher stops and starts again. Linux
backs memory with 2 MiB pages ("transparent huge pages") where a program asks for them (madvise MADV_HUGEPAGE) or
everywhere (the setting `always`); PyTorch's CPU allocator does not ask unless THP_MEM_ALLOC_ENABLE=1 is set before
torch is imported. `in_huge_pages` copies one large tensor into memory that asks. Measured in one process on a
2-core AMD EPYC, the two copies alternated: our int8 kernel on the 262,144 x 640 head 7.45 -> 5.37 ms (median of 25),
our int4 kernel on the int4 table 4.75 -> 4.38 ms, float32 x @ W 33.3 -> 30.9 ms. The same values either way: only
where they sit in memory changes.

The packed heads (`kernels.PackedInt8Head`, `kernels.PackedInt4TiedTable`) use it; the decoder's linears, 0.2-1.3
MB each, would waste most of a 2 MiB page apiece and are left where they are.
"""

from __future__ import annotations

import mmap
import re
from functools import cache
from pathlib import Path

import torch

from .measure import tensor_bytes

HUGE_PAGE = 2 * 2**20  # bytes: the x86-64 and arm64 transparent huge page
MIN_BYTES = 8 * 2**20  # smaller tensors stay put: the page they would take could go unused


@cache
def thp_mode() -> str | None:
    """The kernel's transparent huge page setting, 'always', 'madvise' or 'never'; None where there is none (not
    Linux, or a kernel built without it)."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return None
    found = re.search(r"\[(\w+)\]", text)
    return found.group(1) if found else None


def available() -> bool:
    """Whether asking for huge pages can give them here: Linux with THP set to 'always' or 'madvise'."""
    return thp_mode() in ("always", "madvise") and hasattr(mmap, "MADV_HUGEPAGE")


def in_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A copy of the contiguous CPU tensor `t` in 2 MiB-aligned anonymous memory advised as huge pages, or `t`
    itself where that does not apply (another device, under `MIN_BYTES`, not contiguous, `available()` False).
    The copy keeps its memory alive for as long as it lives (torch.frombuffer holds the mapping)."""
    nbytes = tensor_bytes(t)
    if t.device.type != "cpu" or nbytes < MIN_BYTES or not t.is_contiguous() or not available():
        return t
    # private and anonymous (a shared mapping is shmem, which has a THP setting of its own); one spare huge page to
    # align the start
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # (nbytes + HUGE_PAGE,)
    start = -raw.data_ptr() % HUGE_PAGE
    region.madvise(mmap.MADV_HUGEPAGE)  # the kernel backs each aligned 2 MiB of it with one page where it can
    out = raw[start:start + nbytes].view(t.dtype).view(t.shape)
    return out.copy_(t)  # the first touch, after the advice
