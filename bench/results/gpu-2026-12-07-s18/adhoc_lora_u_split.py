# Run as it stands on session 18's warm H100, against kernels/lora_u.py as it was before commit 586fad0
# (lora_u(x, A): a program per projection and rank). Today's lora_u is split over K and also takes `locks`.
import torch, triton, triton.language as tl
from gptqlora.kernels.lora_u import lora_u

@triton.jit
def _k(x_ptr, a0, a1, a2, u_ptr, M, K, R: tl.constexpr, BM: tl.constexpr, BK: tl.constexpr):
    p = tl.program_id(0); c = tl.program_id(1)
    a_ptr = a0 if p == 0 else (a1 if p == 1 else a2)
    offs_k = c * BK + tl.arange(0, BK); mk = offs_k < K
    offs_r = tl.arange(0, R); offs_m = tl.arange(0, BM)
    a = tl.load(a_ptr + offs_r[:, None] * K + offs_k[None, :], mask=mk[None, :], other=0.0).to(tl.float32)  # (R, BK)
    for m in range(0, M):
        xv = tl.load(x_ptr + m * K + offs_k, mask=mk, other=0.0).to(tl.float32)
        part = tl.sum(a * xv[None, :], axis=1)  # (R,)
        tl.atomic_add(u_ptr + (p * M + m) * R + offs_r, part, sem="relaxed")

def split(x, A, BK=512):
    m, k = x.shape; r = A[0].shape[0]
    u = torch.zeros(len(A), m, r, device=x.device)
    _k[(len(A), triton.cdiv(k, BK))](x, A[0], A[1], A[2], u, m, k, R=r, BM=2, BK=BK, num_warps=4)
    return u

d = "cuda"
for k in (4096, 11008):
    x = torch.randn(1, k, device=d, dtype=torch.bfloat16)
    A = [torch.randn(8, k, device=d) for _ in range(3)]
    ref = lora_u(x, A)
    for bk in (128, 256, 512):
        err = float((split(x, A, bk) - ref).abs().max())
        t = triton.testing.do_bench_cudagraph(lambda: split(x, A, bk), rep=30)
        print(k, "split BK", bk, "us", round(t * 1e3, 2), "maxerr", err)
