#!/usr/bin/env bash
# One device call: install the carried wheels, then run the named stages, logs and JSON under $OUT (at most
# 8 files come back from a device call: every stage's stderr goes to one stderr.log).
#   bench/gpu_session.sh check kernels train        (stages: check kernels train lite ab best host cast-ab ablations check-compile compile default interleave spqr gemlite m8probe copies
#                                                    tune decode tinygemm journey scale scale-speed scale-memory
#                                                    scale-memory-both quant-stream scale-tests stages inplace-ab
#                                                    spqr-decode default-ab mma mma-quick b8 auto upre loru xg tail spqr-mma gptq3-mma pdl spqr-layers l2 l2-next spqr-mix)
# Wheels (bitsandbytes, liger-kernel, peft, gemlite) travel in .whl/ (git-ignored): pip download them here first
# (gemlite is an sdist: `pip wheel --no-deps gemlite==0.6.0.post2 -w .whl`).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
# into a folder of its own, ahead of the image's packages (device/README.md's way: a failed install into the
# image's site-packages once left `datasets` missing and the journey failed on its import)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 \
  | grep -v -i warning | tail -2
export PYTHONPATH=/tmp/site:$PYTHONPATH
python3 - <<'PY'
import importlib, torch, triton, transformers, peft
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__, "peft", peft.__version__)
for name in ("datasets", "bitsandbytes", "liger_kernel"):  # the carried wheels: a missing one says so here
    try:
        print(name, getattr(importlib.import_module(name), "__version__", "ok"))
    except Exception as e:  # noqa: BLE001 - report and go on: the stages that need it fail with their own line
        print(name, "NOT IMPORTABLE:", type(e).__name__, e)
PY
decode_check() {  # gpu_check_decode once per call; status 1 (and a line) if it failed
  if [ ! -f /tmp/decode_check_rc ]; then
    python3 bench/gpu_check_decode.py --budget-s "${DECODE_CHECK_BUDGET:-120}" > "$OUT/gpu_check_decode.json" 2>> "$OUT/stderr.log"
    echo $? > /tmp/decode_check_rc; tail -1 "$OUT/gpu_check_decode.json"
  fi
  [ "$(cat /tmp/decode_check_rc)" = 0 ] || { tail -5 "$OUT/stderr.log"; echo "DECODE CHECK FAILED"; return 1; }
}
mma_stage() {  # $1 probe flags, $2 probe budget, $3 bit widths, $4 decode budget, $5 decode kernels (env overrides)
  python3 bench/gemv_mma_probe.py $1 --json "$OUT/mma.json" --budget-s "${MMA_BUDGET:-$2}" > "$OUT/mma.txt" 2>> "$OUT/stderr.log"
  local rc=$?; grep -E "checks:|FAIL" "$OUT/mma.txt" | head -12; grep '"m": ' "$OUT/mma.txt" | cut -c1-260
  if [ $rc != 0 ]; then tail -5 "$OUT/stderr.log"; echo "MMA CHECKS FAILED: no model run"; return; fi
  python3 bench/decode.py --skip layers --bits "${AB_BITS:-$3}" --batches "${AB_BATCHES:-1,8}" --decode-kernels "${AB_KERNELS:-${5:-triton,mma}}" \
    --no-old-harness --budget-s "${DECODE_BUDGET:-$4}" --json "$OUT/decode_mma.json" \
    > "$OUT/decode_mma.txt" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"; tail -12 "$OUT/decode_mma.txt"
  # the model decoding through it, compiled and graphed (~40 s): last, so a tight budget keeps the 7B figures
  timeout "${CHECK_BUDGET:-70}" python3 bench/gpu_check_decode.py --skip kernel,graphs,generation,spqr --jobs 1 \
    > "$OUT/check_mma.json" 2>> "$OUT/stderr.log"; tail -1 "$OUT/check_mma.json" | cut -c1-400
}
for stage in "$@"; do
  t0=$(date +%s)
  case $stage in
    check)     python3 bench/gpu_check.py > "$OUT/gpu_check.json" 2>> "$OUT/stderr.log"; rc=$?
               tail -1 "$OUT/gpu_check.json"; [ $rc = 0 ] || { tail -5 "$OUT/stderr.log"; echo "CHECK FAILED"; } ;;
    kernels)   python3 bench/kernel_bench.py --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; cat "$OUT/kernels.txt" ;;
    train)     python3 bench/train_suite.py --set core --out "$OUT" --budget_s "${TRAIN_BUDGET:-330}" \
                 --profile "--mode gptq --bits 4 --group 128 --liger" --profile "--mode gptq --bits 2 --group 64 --liger" > "$OUT/train.md" 2>> "$OUT/stderr.log"
               grep -v "^ " "$OUT/train.md" | grep "^|" ; tail -3 "$OUT/stderr.log" ;;
    ab)        python3 bench/train_suite.py --set ab --batches 1x2048 --out "$OUT" > "$OUT/ab.md" 2>> "$OUT/stderr.log"
               grep "^|" "$OUT/ab.md" ;;
    lite)      python3 bench/train_suite.py --set core-lite --out "$OUT" --budget_s "${TRAIN_BUDGET:-330}" > "$OUT/lite.md" 2>> "$OUT/stderr.log"
               grep "^|" "$OUT/lite.md" ;;
    best)      python3 bench/train_suite.py --set best --out "$OUT" > "$OUT/best.md" 2>> "$OUT/stderr.log"
               grep "^|" "$OUT/best.md" ;;
    host)      for c in "--mode gptq --bits 4 --group 128 --liger" "--mode bf16" "--mode nf4"; do
                 python3 bench/train_step.py $c --bs 1 --seq 2048 --steps 3 --host-profile >> "$OUT/host.jsonl" 2>> "$OUT/stderr.log"
               done
               python3 -c "import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l); h=r['host']; print(r['mode'], r['tokens_per_s'], 'tok/s; launches', h['launches'], 'gpu busy', h['gpu_busy_ms'], 'ms of', h['profiled_wall_ms'], '; host enqueue', h['host_enqueue_ms'], 'ms; waits', h['waits'])" "$OUT/host.jsonl" ;;
    check-compile)  # the kernel checks plus compiled training against eager on the GPU (~3 min)
               python3 bench/gpu_check.py --compile > "$OUT/gpu_check_compile.json" 2>> "$OUT/stderr.log" \
                 || { tail -5 "$OUT/stderr.log"; echo "COMPILE CHECK FAILED"; }; tail -1 "$OUT/gpu_check_compile.json" ;;
    compile)   # torch.compile of the decoder blocks, gptqlora and the peers, uncompiled beside them (issue 15);
               # its own call: ~40 s per eager config, ~2 min per compiled one; 1x2048 first (the missed target)
               python3 bench/train_suite.py --set compile --batches "${COMPILE_BATCHES:-1x2048,16x256}" --out "$OUT" \
                 --budget_s "${TRAIN_BUDGET:-400}" > "$OUT/compile.md" 2>> "$OUT/stderr.log"
               grep "^|" "$OUT/compile.md" ;;
    default)   # what finetune does by default on CUDA (compiled blocks + Liger's loss) against the peers (issue 15)
               python3 bench/train_suite.py --set default --batches "${COMPILE_BATCHES:-1x2048,16x256}" --out "$OUT" \
                 --budget_s "${TRAIN_BUDGET:-400}" > "$OUT/default.md" 2>> "$OUT/stderr.log"
               grep "^|" "$OUT/default.md" ;;
    interleave)  # configs run in the order given, peers before and after ours (this host drifts between runs):
               # INTERLEAVE="--mode nf4;--mode gptq --bits 4 --group 128 --liger --compile;--mode nf4" BATCH=16x256
               IFS=';' read -ra configs <<< "${INTERLEAVE:---mode nf4;--mode gptq --bits 4 --group 128 --liger --compile;--mode nf4}"
               bs=${BATCH:-16x256}
               for c in "${configs[@]}"; do
                 python3 bench/train_step.py $c --bs "${bs%x*}" --seq "${bs#*x}" --steps 5 2>> "$OUT/stderr.log" >> "$OUT/interleave.jsonl" \
                   || echo "FAILED: $c"
               done
               python3 -c "import json,sys
rows=[json.loads(l) for l in open(sys.argv[1])]
nf4=[r['tokens_per_s'] for r in rows if r['mode']=='nf4']; bf=[r['tokens_per_s'] for r in rows if r['mode']=='bf16']
for r in rows:
    x=lambda p: f'{r[\"tokens_per_s\"]/p:.2f}x' if p else '-'
    print(r['mode'], r['bs'], 'x', r['seq'], r['tokens_per_s'], 'tok/s, peak', r['peak_gib'], 'GiB; against NF4 runs', x(min(nf4) if nf4 else 0), '-', x(max(nf4) if nf4 else 0), '; bf16', x(max(bf) if bf else 0))" "$OUT/interleave.jsonl" ;;
    ablations) python3 bench/train_suite.py --set ablations --out "$OUT" > "$OUT/ablations.md" 2>> "$OUT/stderr.log"
               grep "^|" "$OUT/ablations.md" ;;
    gemlite)   # GemLite's kernels on our GPTQ layers against ours and bf16 (gemlite's wheel in .whl/)
               timeout "${GEMLITE_TIMEOUT:-200}" python3 bench/gemlite_peer.py --json "$OUT/gemlite.json" > "$OUT/gemlite.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; grep "^|" "$OUT/gemlite.txt" ;;
    spqr)      python3 bench/spqr.py --json "$OUT/spqr.json" > "$OUT/spqr.md" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; cat "$OUT/spqr.md" ;;
    tune)      # decode check (~1 min), then the gemv config sweep (< 4 min): $OUT/gemv_sweep.json is the table
               # to commit as gptqlora/kernels/gemv_configs.json (or to pass as GPTQLORA_GEMV_CONFIGS)
               decode_check || continue
               python3 bench/gemv_sweep.py --json "$OUT/gemv_sweep.json" --budget-s "${SWEEP_BUDGET:-200}" ${SWEEP_ARGS:-} > "$OUT/gemv_sweep.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; grep "^|\|^copy\|configs" "$OUT/gemv_sweep.txt" ;;
    stages)    # issue 16, session 13: the decode loop's loads staged (loop_stages, cp.async) from today's configs
               # (gemv_sweep.py --stages, ~4 min), then the 7B decode with that table against today's (~3.5 min)
               python3 bench/gemv_sweep.py --stages "${STAGES:-1,2,3,4}" --bits "${STAGE_BITS:-4,2}" --ms "${STAGE_MS:-1,8}" \
                 --merge gptqlora/kernels/gemv_configs.json --json "$OUT/stages.json" --budget-s "${SWEEP_BUDGET:-240}" > "$OUT/stages.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; grep "^|\|^copy\|configs" "$OUT/stages.txt" | cut -c1-160
               mkdir -p runs && cp "$OUT/stages.json" runs/stages.json  # kept on a warm machine for the next call
               python3 bench/decode.py --skip layers --bits "${STAGE_BITS:-4,2}" --batches "${DECODE_BATCHES:-1}" --decode-kernels triton,alt \
                 --alt-table "$OUT/stages.json" --no-old-harness --budget-s "${DECODE_BUDGET:-200}" --json "$OUT/decode_stages.json" \
                 > "$OUT/decode_stages.txt" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"; tail -9 "$OUT/decode_stages.txt" ;;
    inplace-ab)  # issue 16, after session 13's reorder of gemv_m1's tile: its configs tuned (~2.5 min), then the 7B
               # one-token A/B against gemv.py at 2 and 4 bit (~3.5 min); the check first, with it as the one-token path
               GPTQLORA_GEMV_M1=inplace DECODE_CHECK_BUDGET=90 decode_check || continue
               python3 bench/gemv_m1_probe.py --kinds inplace --bits "${AB_BITS:-2,4}" --json "$OUT/m1.json" --table "$OUT/m1_table.json" \
                 --budget-s "${PROBE_BUDGET:-150}" > "$OUT/m1.txt" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"
               grep '"kind": "inplace"' "$OUT/m1.txt" | cut -c1-150
               GPTQLORA_GEMV_CONFIGS="$OUT/m1_table.json" python3 bench/decode.py --skip layers --bits "${AB_BITS:-2,4}" --batches 1 \
                 --decode-kernels triton,inplace --no-old-harness --budget-s "${DECODE_BUDGET:-150}" --json "$OUT/decode_inplace.json" \
                 > "$OUT/decode_inplace.txt" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"; tail -8 "$OUT/decode_inplace.txt" ;;
    spqr-decode)  # issue 17: a 7B-shaped SpQR model (3-bit g16, 3-bit stats g16, 1% outliers) + r=8 LoRA at batch 1
               # against GPTQ 3-bit and bf16 in graph_decode's harness (target >= 1.3x bf16 tokens/s); no model starts after the budget
               python3 bench/decode.py --skip layers --bits 3,spqr3 --batches 1 --no-old-harness --budget-s "${DECODE_BUDGET:-200}" \
                 --json "$OUT/decode_spqr.json" > "$OUT/decode_spqr.txt" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"
               tail -8 "$OUT/decode_spqr.txt" ;;
    default-ab)  # issue 16, session 14: the shipped one-token default (gemv_m1 at 2/4 bit) against gemv.py's kernel
               # (GPTQLORA_GEMV_M1=split) in the 7B, with SpQR beside them (~3 min)
               python3 bench/decode.py --skip layers --bits "${AB_BITS:-4,2,spqr3}" --batches 1 --decode-kernels triton,split \
                 --no-old-harness --budget-s "${DECODE_BUDGET:-200}" --json "$OUT/decode_default.json" \
                 > "$OUT/decode_default.txt" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"; tail -8 "$OUT/decode_default.txt" ;;
    mma)       # issue 16, session 15: the tensor-core CUDA decode kernel (kernels/gemv_mma.py): all its checks and per-layer
               # timings against the Triton path and bf16; then, only if every check passed, the 7B at batch 1 and 8 (~8 min)
               mma_stage "" 150 "4,2,spqr3,spqr3-mma" 240 ;;
    auto)      # issue 16, session 19: batches of 2+ routed to the tensor-core kernel by default (gemv_mma.wanted): the
               # probe's quick checks and its 4-bit shapes at M = 2, 4 (~2 min), the generation checks (Triton at batch 1, the
               # default route at 3, ~70 s), the 7B at batch 2, 4, 8 pinned to Triton against the default (~3 min), SpQR via mma
               python3 bench/gemv_mma_probe.py --quick --ms "${AUTO_MS:-2,4}" --json "$OUT/mma.json" --budget-s "${MMA_BUDGET:-130}" \
                 > "$OUT/mma.txt" 2>> "$OUT/stderr.log"; grep -E "checks:|FAIL" "$OUT/mma.txt" | head -12; grep '"m": ' "$OUT/mma.txt" | cut -c1-330
               timeout "${CHECK_BUDGET:-100}" python3 bench/gpu_check_decode.py --skip kernel,graphs,spqr --jobs 1 \
                 > "$OUT/check_gen.json" 2>> "$OUT/stderr.log"; tail -1 "$OUT/check_gen.json" | cut -c1-400
               python3 bench/decode.py --skip layers --bits 4 --batches "${AB_BATCHES:-2,4,8}" --decode-kernels "${AUTO_KERNELS:-triton,default}" \
                 --no-old-harness --budget-s "${DECODE_BUDGET:-200}" --json "$OUT/decode_auto.json" \
                 > "$OUT/decode_auto.txt" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"; tail -12 "$OUT/decode_auto.txt"
               [ "${SPQR_MMA:-1}" = 1 ] && { python3 bench/decode.py --skip layers --bits spqr3,spqr3-mma --batches 1 --no-old-harness \
                 --budget-s "${SPQR_BUDGET:-60}" --json "$OUT/decode_spqr_mma.json" > "$OUT/decode_spqr_mma.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; tail -5 "$OUT/decode_spqr_mma.txt"; } ;;
    xg)        # issue 16, session 20 (measured; XG 0 is gone since): x gathered a packed row per thread against an element per
               # thread and pass; the record is bench/results/gpu-2026-12-07-s20d/
               echo "xg: measured in session 20, the A/B variant removed; see tail" ;;
    tail)      # issue 16, session 20 (written after its device time ran out): the last split summing 4 cells a thread at once
               # (TAIL 1) against one (TAIL 0, the default until this passes): the quick checks, with TAIL 1's output equal to
               # TAIL 0's at every 7B shape, M = 5, 8, 16 (~40 s), then down_proj and gate|up at M = 8 with both (~30 s)
               python3 bench/gemv_mma_probe.py --quick --ms "${TAIL_MS:-8}" --shapes "${TAIL_SHAPES:-3,2}" --json "$OUT/mma.json" \
                 --budget-s "${MMA_BUDGET:-110}" > "$OUT/mma.txt" 2>> "$OUT/stderr.log"; grep -E "checks:|FAIL" "$OUT/mma.txt" | head -12
               grep '"m": ' "$OUT/mma.txt" | python3 -c "import json,sys
for l in sys.stdin:
    r = json.loads(l); print({k: r.get(k) for k in ('shape', 'm', 'mma_picked_us', 'mma_tail_us', 'mma_no_adapter_us', 'mma_no_adapter_tail_us', 'lora_u_us', 'triton_us', 'bf16_us', 'best_cfg', 'mma_best_us')})" ;;
    pdl)       # issue 16, after session 20: the tensor-core kernel launched to overlap the u launch before it (programmatic
               # dependent launch, PDL 1) against after it: the quick checks (PDL 1's output equal to PDL 0's at the 7B shapes,
               # M = 5, 8, 16; graph-captured in the timings), the four shapes at M = 8 and 1 (~2.5 min), the 7B at batch 8 (~3 min), with `narrow`
               # (2-8 rows in 128-column blocks of the fewest splits) and `tail` (TAIL 1) beside; PDL_KERNELS and
               # AB_BATCHES=1,8 with `mmapdl` add the one-row A/B (the tensor-core kernel overlapping u, against Triton)
               python3 bench/gemv_mma_probe.py --quick --ms 8,1 --json "$OUT/mma.json" --budget-s "${MMA_BUDGET:-180}" \
                 > "$OUT/mma.txt" 2>> "$OUT/stderr.log"; grep -E "checks:|FAIL" "$OUT/mma.txt" | head -12
               grep '"m": ' "$OUT/mma.txt" | python3 -c "import json,sys
for l in sys.stdin:
    r = json.loads(l); print({k: r.get(k) for k in ('shape', 'm', 'picked_upre', 'mma_pdl_us', 'mma_tail_us', 'lora_u_us', 'mma_no_adapter_us', 'triton_us', 'bf16_us')})"
               python3 bench/decode.py --skip layers --bits 4 --batches "${AB_BATCHES:-8}" --decode-kernels "${PDL_KERNELS:-default,pdl,narrow,tail}" --no-old-harness \
                 --budget-s "${DECODE_BUDGET:-230}" --json "$OUT/decode_pdl.json" > "$OUT/decode_pdl.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; tail -6 "$OUT/decode_pdl.txt" ;;
    gptq3-mma) # issue 16, after session 20: 3-bit GPTQ through the tensor-core kernel in 4-bit slots (GPTQLORA_GEMV_MMA=1; the
               # batch-2+ default keeps 3 bit on Triton until this is timed: gemv_mma.AUTO_BITS), the 7B at batch 8 and 2 against
               # Triton (~4 min). The quick checks of `tail` (or `mma-quick`) cover 3-bit layers through the kernel
               python3 bench/decode.py --skip layers --bits 3 --batches "${AB_BATCHES:-8,2}" --decode-kernels triton,mma --no-old-harness \
                 --budget-s "${DECODE_BUDGET:-200}" --json "$OUT/decode_gptq3_mma.json" > "$OUT/decode_gptq3_mma.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; tail -8 "$OUT/decode_gptq3_mma.txt" ;;
    spqr-mma)  # issue 17, after session 20: SpQR through the tensor-core kernel, each split adding its own outliers from shared
               # memory (was: split 0 walked every outlier of its columns) and the statistics decoded in the kernel from their
               # codes (was: decoded fp16 scales and fp32 zeros read, 3 bits a weight), against SpQR's default, the 7B at batch
               # 1 and 8 (~3 min).
               # Run after `tail` (or `mma-quick`): their quick checks cover the SpQR layers through this kernel
               # After session 21: spqr3-mma stages the statistics in shared memory (SSTATS 1, 256-row splits),
               # spqr3-mmareg is session 21's kernel (registers, 128-row splits); after session 22 spqr3-default is that
               # (SpQR's default since), spqr3-mmaraw stages the raw statistics (SSTATS 2), spqr3-mmaopre also reads
               # the outliers' offsets before the barrier (OPRE 1), spqr3-sib SpQR's siblings in one launch each
               # (GPTQLORA_SPQR_SIBLINGS=1). ~80 s a model: SPQR_BATCHES=1 fits one call
               # After session 24 the default is SSTATS 2 (raw staging); spqr3-mmadec is the SSTATS 1 it replaced
               python3 bench/decode.py --skip layers --bits "${SPQR_KINDS:-spqr3-default,spqr3-mmadec,spqr3-sib}" --batches "${SPQR_BATCHES:-1,8}" --no-old-harness \
                 --budget-s "${SPQR_BUDGET:-150}" --json "$OUT/decode_spqr_mma.json" > "$OUT/decode_spqr_mma.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; tail -8 "$OUT/decode_spqr_mma.txt" ;;
    l2)        # issue 16, session 25: each one-token launch asking L2 for the next launch's weights (GPTQLORA_L2_AHEAD,
               # kernels/gemv_m1.ahead_config): chains of 7B blocks per variant (bench/l2_ahead.py, outputs bit-equal to
               # no prefetch, ~2-3 min), then the 7B at batch 1 with the chain's best 4-bit variant against none (~3 min)
               python3 bench/l2_ahead.py --bits "${L2_BITS:-4,2}" --json "$OUT/l2_ahead.json" --budget-s "${L2_BUDGET:-200}" \
                 > "$OUT/l2_ahead.txt" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"; cut -c1-300 "$OUT/l2_ahead.txt"
               BENCH_L2=$(python3 -c "import json; r = [x for x in json.load(open('$OUT/l2_ahead.json'))['rows'] if x.get('bits') == 4
                 and x.get('equal_to_off') and x['env']['GPTQLORA_L2_AHEAD'] != '0']
print(','.join(min(r, key=lambda x: x['chain_us'])['env'].values()) if r else '16,end,1,0')" 2>> "$OUT/stderr.log")
               echo "7B A/B with BENCH_L2=$BENCH_L2"; export BENCH_L2
               python3 bench/decode.py --skip layers --bits 4 --batches "${AB_BATCHES:-1}" --decode-kernels triton,l2 --no-old-harness \
                 --budget-s "${DECODE_BUDGET:-200}" --json "$OUT/decode_l2.json" > "$OUT/decode_l2.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; tail -6 "$OUT/decode_l2.txt" ;;
    l2-next)   # issue 16, after session 25 (prepared, not run): own words asked of L2 first (GPTQLORA_L2_SELF) in the chains,
               # then whether the 8-MB-ahead outcome is fixed per model build or varies per capture (bench/l2_repeat.py: one
               # build decoded 3 times none/ahead alternating, a second build likewise, ~4 min), then SELF on the 7B (~1.5 min)
               python3 bench/l2_ahead.py --bits 4,2 --variants off,self,end8,self_end8,off --json "$OUT/l2_chain.json" \
                 --budget-s 100 > "$OUT/l2_chain.txt" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"; cut -c1-300 "$OUT/l2_chain.txt"
               python3 bench/l2_repeat.py --builds 2 --reps 3 --json "$OUT/l2_repeat.json" --budget-s "${L2_BUDGET:-220}" \
                 > "$OUT/l2_repeat.txt" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"; cat "$OUT/l2_repeat.txt"
               python3 bench/l2_repeat.py --builds 1 --reps 2 --l2 0,end,1,0,1 --json "$OUT/l2_self.json" --budget-s 60 \
                 > "$OUT/l2_self.txt" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"; cat "$OUT/l2_self.txt" ;;
    spqr-mix)  # issue 17, after session 25 (prepared, not run): the 3.994-bit SpQR mix (4-bit g64, q/k_proj 3-bit g128, 0.01%
               # outliers; closer to fp16 than GPTQ 4 bit g128 on held-out text): the probe's quick checks, which hold its
               # layers' groups (~1.5 min), then the 7B with it against the 3-bit g16 default and bf16, batch 1 then 8 (~4 min)
               python3 bench/gemv_mma_probe.py --quick --skip-timing --json "$OUT/mma_checks.json" > "$OUT/mma_checks.txt" \
                 2>> "$OUT/stderr.log"; rc=$?; grep -E "checks:|FAIL" "$OUT/mma_checks.txt" | head -8
               if [ $rc != 0 ]; then tail -5 "$OUT/stderr.log"; echo "MMA CHECKS FAILED: no model run"; else
               python3 bench/decode.py --skip layers --bits spqrmix-default,spqr3-default --batches "${SPQR_BATCHES:-1,8}" --no-old-harness \
                 --budget-s "${SPQR_BUDGET:-200}" --json "$OUT/decode_spqr_mix.json" > "$OUT/decode_spqr_mix.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; tail -8 "$OUT/decode_spqr_mix.txt"; fi ;;
    spqr-layers) # issue 17, session 21: SpQR layers per call at the 7B's shapes, M = 1 and 8: the default (Triton) against
               # the tensor-core kernel, with and without outliers and the adapter (which part makes the kernel slower)
               # after the quick checks (~3 min)
               python3 bench/gemv_mma_probe.py --quick --spqr --ms "${SPQR_MS:-1,8}" --json "$OUT/mma_spqr.json" \
                 --budget-s "${MMA_BUDGET:-170}" > "$OUT/mma_spqr.txt" 2>> "$OUT/stderr.log"; grep -E "checks:|FAIL" "$OUT/mma_spqr.txt" | head -8
               grep '"spqr_shape"' "$OUT/mma_spqr.txt" | cut -c1-400 ;;
    loru)      # issue 16, session 20: the quick tensor-core checks (u Bᵀ added at the store now the only u-once way, ~30 s),
               # then kernels/lora_u.py's variants against each other and cuBLAS, M = 1..16, per 7B sibling group (~2.5 min)
               python3 bench/gemv_mma_probe.py --quick --skip-timing --json "$OUT/mma.json" > "$OUT/mma.txt" 2>> "$OUT/stderr.log"
               grep -E "checks:|FAIL" "$OUT/mma.txt" | head -12
               python3 bench/lora_u_probe.py --json "$OUT/lora_u.json" --budget-s "${PROBE_BUDGET:-150}" > "$OUT/lora_u.txt" \
                 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"; cut -c1-330 "$OUT/lora_u.txt" ;;
    upre)      # issue 16, after session 19: the tensor-core kernel's adapter variants (UPRE 0/1/2) and lora_u alone at every 7B
               # shape, M = 8 and 1 (~2.5 min); then the 7B at batch 8 through the default with --profile 8 (kernels by GPU time
               # per token: is ~1.7 ms of the step outside the linears, as session 19 estimated?) (~2 min)
               python3 bench/gemv_mma_probe.py --quick --ms 8,1 --json "$OUT/mma.json" --budget-s "${MMA_BUDGET:-150}" \
                 > "$OUT/mma.txt" 2>> "$OUT/stderr.log"; grep -E "checks:|FAIL" "$OUT/mma.txt" | head -12; grep '"m": ' "$OUT/mma.txt" | cut -c1-400
               python3 bench/decode.py --skip layers --bits 4 --batches 8 --decode-kernels default --profile 8 --no-old-harness \
                 --budget-s "${DECODE_BUDGET:-120}" --json "$OUT/decode_profile8.json" > "$OUT/decode_profile8.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; tail -30 "$OUT/decode_profile8.txt" ;;
    mma-quick) # issue 16, session 17: the tensor-core kernel with the adapter's u computed once per call (kernels/lora_u.py):
               # quick checks (~65 s), the 4-bit shapes timed (two first, the rest as the budget allows) with and without the adapter, the 7B at 4 bit (~7 min)
               # and the Triton default with u once per call (lorau), batch 1 (AB_BATCHES=1,8 adds batch 8)
               AB_BATCHES=${AB_BATCHES:-1} mma_stage --quick 120 4 230 triton,lorau,mma ;;
    b8)        # issue 16: the 7B at batch 8, bf16 against the Triton default and the tensor-core kernel (~4 min)
               python3 bench/decode.py --skip layers --bits "${AB_BITS:-4}" --batches 8 --decode-kernels "${AB_KERNELS:-triton,mma}" \
                 --no-old-harness --budget-s "${DECODE_BUDGET:-200}" --json "$OUT/decode_b8.json" > "$OUT/decode_b8.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; tail -8 "$OUT/decode_b8.txt" ;;
    tinygemm)  # issue 16: PyTorch's int4 kernel (bench/tinygemm_peer.py) against ours and bf16, one layer (~2 min)
               python3 bench/tinygemm_probe.py --json "$OUT/tinygemm_probe.json" ${PROBE_ARGS:-} > "$OUT/tinygemm_probe.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; grep "^|" "$OUT/tinygemm_probe.txt" | grep -v "ikt\|^| shape\|^|---" | cut -c1-110 ;;
    m8probe)   # issue 16: two other designs for the M = 2..16 decode kernel against today's (bench/gemv_m8_probe.py, ~4 min)
               python3 bench/gemv_m8_probe.py --json "$OUT/m8_probe.json" --budget-s "${PROBE_BUDGET:-240}" > "$OUT/m8_probe.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; grep -v "^{" "$OUT/m8_probe.txt"
               python3 -c "import json,sys
for r in json.load(open(sys.argv[1]))['rows']: print(r['shape'], r['bits'], r['m'], r['kind'], r['best_us'], 'us', r['x_today'], 'x today', r['x_bf16'], 'x bf16', r['best'], r['failed'], 'failed', (r['first_error'] or '')[:80])" "$OUT/m8_probe.json" ;;
    copies)    # issue 15: where the training step's device copies come from (gptq2 compiled + Liger, 16x256)
               python3 bench/train_step.py --mode gptq --bits 2 --group 64 --liger --compile --bs 16 --seq 256 --steps 3 \
                 --copy-sources > "$OUT/copies.json" 2>> "$OUT/stderr.log" || tail -5 "$OUT/stderr.log"
               python3 -c "import json,sys
r=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print(r['mode'], r['tokens_per_s'], 'tok/s')
for c in r['copy_sources']: print(c['count'], c['gpu_ms'], 'ms', c['op'], c['kind'], c['shapes'][:90], '|', c['frames'][:300])" "$OUT/copies.json" ;;
    decode)    # the check once per call (skipped after `tune`); this call's sweep table if there is one
               decode_check || continue
               [ -f "$OUT/gemv_sweep.json" ] && export GPTQLORA_GEMV_CONFIGS="$OUT/gemv_sweep.json"
               python3 bench/decode.py --json "$OUT/decode.json" ${DECODE_ARGS:-} > "$OUT/decode.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; tail -15 "$OUT/decode.txt" ;;
    cast-ab)   # the LoRA cast cache on and off (kernels/quant_lora.py), gptq4 + Liger at 1x2048, same process order each call
               for cache in 1 0 1 0; do  # alternated: this host drifts by tens of % between runs
                 GPTQLORA_LORA_CAST_CACHE=$cache python3 bench/train_step.py --mode gptq --bits 4 --group 128 --liger --bs 1 --seq 2048 \
                   2>> "$OUT/stderr.log" | sed "s/^{/{\"cast_cache\": $cache, /" >> "$OUT/cast_ab.jsonl"
               done
               python3 -c "import json,sys
for l in open(sys.argv[1]):
    r=json.loads(l); print('cast cache', r['cast_cache'], r['tokens_per_s'], 'tok/s, step', r['step_s'], 's, peak', r['peak_gib'], 'GiB, losses', r['losses'])" "$OUT/cast_ab.jsonl" ;;
    journey)   bash bench/journey.sh > "$OUT/journey.log" 2>&1; echo "journey rc=$?"; tail -40 "$OUT/journey.log" ;;
    scale|scale-speed|scale-memory|scale-memory-both)  # 65B: one stage per device call (each ~6-8 min on an H200)
               set_name=${stage#scale-}; [ "$set_name" = scale ] && set_name=memory-target
               python3 bench/scale.py --set "$set_name" --out "$OUT" > "$OUT/$stage.md" 2>> "$OUT/stderr.log"
               grep "^|" "$OUT/$stage.md"; tail -3 "$OUT/stderr.log" ;;
    quant-stream) python3 bench/quant_stream.py --out /tmp/quant_stream > "$OUT/quant_stream.txt" 2>> "$OUT/stderr.log"
               echo "quant_stream rc=$?"; tail -2 "$OUT/quant_stream.txt" ;;
    scale-tests) python3 -m pytest -q tests/train/test_checkpointing.py tests/train/test_report_and_optim.py \
                 tests/train/test_loss.py 2>&1 | tail -5 ;;
  esac
  echo "== $stage took $(( $(date +%s) - t0 )) s"
done
