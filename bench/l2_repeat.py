"""Is the L2-ahead gain a property of the model build or of the captured graph? (issue 16, session 25)

Session 25's 7B A/Bs at batch 1 (H100) gave the one-token kernel asking L2 for the next launch's weights
(GPTQLORA_L2_AHEAD=8) either ~+10-22% or ~-6-9% against none, model build by model build, while none stayed
within 276-286 tokens/s. Here one model is built and decoded several times, each time with a fresh capture
(forget_decoders), alternating none and the given setting; then a second build the same way. If the spread is
within a build, the capture (its buffers' addresses) decides; if between builds, the weights' placement.

    python bench/l2_repeat.py --json $OUT/l2_repeat.json [--bits 4] [--builds 2] [--reps 3] [--l2 8,end,1,0]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.append(str(Path(__file__).parent))

import decode  # noqa: E402
from gptqlora.graph_decode import forget_decoders  # noqa: E402
from gptqlora.kernels import gemv_m1  # noqa: E402

ENVS = gemv_m1.L2_ENVS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--builds", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3, help="none/ahead pairs per build")
    ap.add_argument("--l2", default="8,end,1,0,0", help="MB,end|start,evict_last,own evict_first,own words first")
    ap.add_argument("--budget-s", type=float, default=300)
    ap.add_argument("--json")
    a = ap.parse_args()

    device = torch.device("cuda")
    timer = decode.Timer(device)
    t0, rows = time.time(), []
    os.environ[decode.gemv_mma.ENV] = "0"  # the Triton kernels, as decode.py's gptqB kinds
    for build in range(a.builds):
        if time.time() - t0 > a.budget_s:
            break
        model = decode.build(f"gptq{a.bits}", "7b", device)
        for rep in range(a.reps):
            for name, env in (("none", ("0", "end", "1", "0", "0")), ("ahead", tuple(a.l2.split(",")))):
                if time.time() - t0 > a.budget_s:
                    break
                os.environ.update(dict(zip(ENVS, env)))
                forget_decoders(model)
                torch._dynamo.reset()
                tps = decode.decode_rate(model, 1, 32, 64, "same harness", timer, device)  # decode.py's defaults
                rows.append(dict(build=build, rep=rep, variant=name, env=env, tokens_per_s=round(tps, 1)))
                print(json.dumps(rows[-1]), flush=True)
        del model
        torch.cuda.empty_cache()
    if a.json:
        Path(a.json).write_text(json.dumps(dict(device=torch.cuda.get_device_name(), rows=rows), indent=1))


if __name__ == "__main__":
    main()
