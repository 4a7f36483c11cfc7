#!/usr/bin/env bash
# One device call: install the carried wheels, then run the named stages, logs and JSON under $OUT (at most
# 8 files come back from a device call: every stage's stderr goes to one stderr.log).
#   bench/gpu_session.sh check kernels train        (stages: check kernels train ablations journey
#                                                    scale scale-speed scale-memory quant-stream scale-tests)
# Wheels (bitsandbytes, liger-kernel, peft) travel in .whl/ (git-ignored): pip download them here first.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
python3 -m pip install -q --no-deps --no-index .whl/*.whl 2>&1 | grep -v -i warning | tail -2
python3 - <<'PY'
import torch, triton, transformers, peft
print(torch.cuda.get_device_name(), "torch", torch.__version__, "triton", triton.__version__,
      "transformers", transformers.__version__, "peft", peft.__version__)
PY
for stage in "$@"; do
  t0=$(date +%s)
  case $stage in
    check)     python3 bench/gpu_check.py > "$OUT/gpu_check.json" 2>> "$OUT/stderr.log"; rc=$?
               tail -1 "$OUT/gpu_check.json"; [ $rc = 0 ] || { tail -5 "$OUT/stderr.log"; echo "CHECK FAILED"; } ;;
    kernels)   python3 bench/kernels.py --json "$OUT/kernels.json" > "$OUT/kernels.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; cat "$OUT/kernels.txt" ;;
    train)     python3 bench/train_suite.py --set core --out "$OUT" --budget_s "${TRAIN_BUDGET:-330}" \
                 --profile "--mode gptq --bits 4 --group 128 --liger" --profile "--mode gptq --bits 2 --group 64 --liger" > "$OUT/train.md" 2>> "$OUT/stderr.log"
               grep -v "^ " "$OUT/train.md" | grep "^|" ; tail -3 "$OUT/stderr.log" ;;
    ablations) python3 bench/train_suite.py --set ablations --out "$OUT" > "$OUT/ablations.md" 2>> "$OUT/stderr.log"
               grep "^|" "$OUT/ablations.md" ;;
    journey)   bash bench/journey.sh > "$OUT/journey.log" 2>&1; echo "journey rc=$?"; tail -40 "$OUT/journey.log" ;;
    scale|scale-speed|scale-memory)  # 65B: one stage per device call (each ~6-8 min on an H200)
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
