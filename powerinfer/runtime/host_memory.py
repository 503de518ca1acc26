"""Host memory for weights the CPU reads in scattered rows (a hybrid step's cold FFN rows, PowerInfer §5).

Each active cold neuron's rows are a few KB somewhere in GBs of weights. With 4 KB pages nearly every row
costs its own TLB misses and page walks; 2 MB transparent huge pages make them rare. Where the kernel's THP
setting is `madvise` (a common default, `/sys/kernel/mm/transparent_hugepage/enabled`), memory gets huge
pages only if it asks before it is first written: an anonymous mapping advised MADV_HUGEPAGE, then filled.
"""

from __future__ import annotations

import ctypes
import mmap

import torch

HUGE_PAGE = 2 << 20


def huge_page_copy(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous CPU copy of `t` (as `dtype`, default its own) in memory advised for transparent huge
    pages; a plain contiguous copy where that cannot be asked (no MADV_HUGEPAGE, or less than one huge page
    of data)."""
    dtype = dtype or t.dtype
    nbytes = t.numel() * dtype.itemsize
    if not hasattr(mmap, "MADV_HUGEPAGE") or nbytes < HUGE_PAGE:
        return t.detach().to("cpu", dtype).contiguous()
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    region = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = ctypes.c_char.from_buffer(region)
    offset = -ctypes.addressof(start) % HUGE_PAGE  # the first 2 MB boundary: whole huge pages from there
    del start  # releases the buffer export
    try:
        region.madvise(mmap.MADV_HUGEPAGE, offset, size)
    except OSError:  # THP unsupported: ordinary pages, same contents
        pass
    copy = torch.frombuffer(region, dtype=torch.uint8, count=nbytes, offset=offset)  # keeps `region` alive
    return copy.view(dtype).view(t.shape).copy_(t.detach())
