"""Give freed host memory back to the OS between blocks.

glibc raises its mmap threshold after large frees, so later block-sized tensors come from the heap, which
fragments and is not returned: resident memory then creeps up block after block. `malloc_trim` after each
block returns it, so a streamed quantization really holds about one block.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import functools


@functools.lru_cache(maxsize=1)
def _libc():
    name = ctypes.util.find_library("c")
    try:
        lib = ctypes.CDLL(name) if name else None
        return lib if lib is not None and hasattr(lib, "malloc_trim") else None
    except OSError:
        return None


def release_freed_memory() -> None:
    gc.collect()
    lib = _libc()
    if lib is not None:  # glibc only; elsewhere a no-op
        lib.malloc_trim(0)
