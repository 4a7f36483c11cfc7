#!/usr/bin/env bash
# One device call: install the carried wheels, then run the named stages, logs and JSON under $OUT (at most
# 8 files come back from a device call: every stage's stderr goes to one stderr.log).
#   bench/gpu_session.sh check kernels train        (stages: check kernels train ablations decode journey)
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
    decode)    python3 bench/gpu_check_decode.py > "$OUT/gpu_check_decode.json" 2>> "$OUT/stderr.log"; rc=$?
               tail -1 "$OUT/gpu_check_decode.json"
               if [ $rc = 0 ]; then python3 bench/decode.py --json "$OUT/decode.json" > "$OUT/decode.txt" 2>> "$OUT/stderr.log" \
                 || tail -5 "$OUT/stderr.log"; tail -15 "$OUT/decode.txt"; else tail -5 "$OUT/stderr.log"; echo "DECODE CHECK FAILED"; fi ;;
    journey)   bash bench/journey.sh > "$OUT/journey.log" 2>&1; echo "journey rc=$?"; tail -40 "$OUT/journey.log" ;;
  esac
  echo "== $stage took $(( $(date +%s) - t0 )) s"
done
