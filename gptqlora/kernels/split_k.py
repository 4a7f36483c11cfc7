"""The end of a split-K program of the decode kernel (gemv.py): deterministic, one launch.

Each program of a column block stores its fp32 partial; the last one to finish (a counter per block, which
it resets to 0 for the next call and the next CUDA-graph replay) sums all partials in a fixed order and
writes y. No zero-filled buffer, no second kernel, no float atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _store_split(acc, out_ptr, part_ptr, lock_ptr, pid_n, pid_k, offs_m, offs_n, m2, M, N, SPLIT,
                 SPLIT_K: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """acc (BM, BN) fp32 of this program -> y[offs_m, offs_n] (rows M, columns N), directly without split-K."""
    out = out_ptr + offs_m[:, None] * N + offs_n[None, :]
    if not SPLIT_K:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m2)
    else:
        tl.store(part_ptr + (pid_k * M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=m2)
        tl.debug_barrier()  # every thread's partial is written before the count below releases them
        done = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
        if done == SPLIT - 1:  # the last split of this column block: sum all partials, in a fixed order
            # CH partials per load. M = 1 or a tile of <= 128 values (kernels/lora_u.py's (M, r)): 16, one round
            # trip for 16 of them instead of a chain of SPLIT dependent L2 reads (call 10: M = 1 layers 1.0-1.35x
            # faster; for lora_u at M = 8, session 20: no change, 11.9-13.0 us, its cost was elsewhere). Decode
            # tiles at M > 1: one by one (4 at a time made the M = 8 layers 5-30% slower in call 10: a (4, 16, BN)
            # tile per thread block)
            CH: tl.constexpr = 16 if BM == 1 or BM * BN <= 128 else 1
            offs_c = tl.arange(0, CH)
            total = tl.zeros((BM, BN), tl.float32)
            for c in range(0, SPLIT, CH):
                ptrs = part_ptr + (((c + offs_c)[:, None, None] * M + offs_m[None, :, None]) * N + offs_n[None, None, :])
                mc = ((c + offs_c) < SPLIT)[:, None, None] & m2[None, :, :]
                total += tl.sum(tl.load(ptrs, mask=mc, other=0, cache_modifier=".cg"), axis=0)
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=m2)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next call (and the next CUDA-graph replay)
