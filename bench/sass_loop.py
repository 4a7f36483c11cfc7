"""Instructions per code in the main loop of the one-token decode kernels, from an offline sm_90 compile (no GPU).

    python bench/sass_loop.py                     # gemv1.py and gemv.py's M = 1 path, 4 and 2 bit, act-order + LoRA

Triton compiles for a GPUTarget without a device and ships nvdisasm; the longest backward branch of the SASS is
the K loop, so its instruction count over the codes a thread handles per trip is the kernel's issue cost per
code. Decoding is bound by that rate (docs/benchmarks.md, "Why the kernel is slow"), so this is the number a
kernel change must lower before any GPU time is spent on it. Integer arguments are compiled as divisible by 16,
as Triton specializes them at run time for 7B shapes.
"""

from __future__ import annotations

import argparse
import collections
import inspect
import os
import re
import subprocess
import tempfile

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns without it; 1 is what 3.6 (the GPU) does
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from gptqlora.kernels.gemv import _gemv_kernel  # noqa: E402
from gptqlora.kernels.gemv1 import _gemv1_kernel  # noqa: E402

COMMON = dict(x_ptr="*bf16", qweight_ptr="*i32", zeros_ptr="*i32", scales_ptr="*fp16", a_ptr="*bf16", b_ptr="*bf16",
              out_ptr="*bf16", part_ptr="*fp32", lock_ptr="*i32", K="i32", N="i32", R="i32", GROUP="i32",
              lora_scale="fp32", SPLIT="i32", M="i32", SG="i32")


def sass(fn, consts: dict, num_warps: int) -> str:
    params = list(inspect.signature(fn.fn).parameters)
    signature = {p: "constexpr" if p in consts else COMMON.get(p, "*i32") for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p not in consts and p != "lora_scale"}
    src = ASTSource(fn=fn, signature=signature, constexprs={(params.index(k),): v for k, v in consts.items()}, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        return subprocess.run([nvdisasm, "-c", path], capture_output=True, text=True, check=True).stdout


def loop_ops(text: str) -> collections.Counter:
    """Opcode counts of the longest loop (a label and the farthest backward branch to it)."""
    lines = text.splitlines()
    labels = {ln.strip()[:-1]: i for i, ln in enumerate(lines) if re.match(r"^\.L_x_\d+:$", ln.strip())}
    spans = [(i - labels[m.group(1)], labels[m.group(1)], i) for i, ln in enumerate(lines)
             if (m := re.search(r"BRA `\((\.L_x_\d+)\)", ln)) and labels.get(m.group(1), i) < i]
    _, a, b = max(spans)
    ops = re.findall(r"^\s+/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", "\n".join(lines[a:b + 1]), re.M)
    return collections.Counter(op.split(".")[0] for op in ops)


def rows(bits_list) -> list[dict]:
    out = []
    for bits in bits_list:
        per = 32 // bits
        cases = [
            ("gemv1.py", _gemv1_kernel, dict(BITS=bits, FLOAT_ZEROS=False, HAS_PERM=True, HAS_LORA=True, SPLIT_K=True,
                                             BW=4, BN=512, BR=8), 1, 4 * per * 512 // 32, "BW 4, BN 512, 1 warp"),
            ("gemv.py M = 1", _gemv_kernel, dict(SPQR=False, SBITS=1, BITS=bits, FLOAT_ZEROS=False, SORTED=True,
                                                 HAS_PERM=True, HAS_LORA=True, SPLIT_K=True, BM=1, BK=128, BN=256,
                                                 BR=16, F32_DOT=False), 4, 128 * 256 // 128, "BK 128, BN 256, 4 warps"),
        ]
        for name, fn, consts, warps, codes, tile in cases:
            ops = loop_ops(sass(fn, consts, warps))
            n = sum(ops.values())
            out.append(dict(kernel=name, bits=bits, tile=tile, instructions=n, codes=codes, per_code=round(n / codes, 2),
                            top=", ".join(f"{op} {c}" for op, c in ops.most_common(5))))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", default="4,2")
    a = ap.parse_args(argv)
    print("| kernel | bits | tile | instructions per trip | codes per thread per trip | per code | top opcodes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows(map(int, a.bits.split(","))):
        print(f"| {r['kernel']} | {r['bits']} | {r['tile']} | {r['instructions']} | {r['codes']} | {r['per_code']} | {r['top']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
