#!/usr/bin/env bash
# The whole journey on one CUDA GPU, as a user runs it, on the bundled tiny model and data:
# scripts/finetune_multi (accelerate launch, one GPU) -> merge --to fp16 -> merge --to gptq -> generate -> chat.
#   bash bench/journey.sh            (prints each command, its time and its last lines; stops at the first failure)
set -euo pipefail
work=$(mktemp -d)
export RUNS_DIR=$work/runs HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
data=$(python3 -c "from gptqlora.data.assets import default_data_files as f; print(','.join(map(str, f())))")
step() {
  echo "\$ $*"; local t0; t0=$(date +%s.%N)
  "$@" > "$work/log" 2>&1 || { tail -30 "$work/log"; echo "FAILED: $*"; exit 1; }
  tail -4 "$work/log"; echo "   ($(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s)"
}
if [[ -z "${JOURNEY_CPU:-}" ]]; then  # JOURNEY_CPU=1: a quick run on the CPU, to test this script
  python3 -c "import torch; assert torch.cuda.is_available(); print('device:', torch.cuda.get_device_name())"
fi
# shellcheck disable=SC2086
if ! (step scripts/finetune_multi demo "$data" --use_gradient_checkpointing ${FINETUNE_ARGS:-}); then
  echo "JOURNEY: finetune failed with the defaults; again with --liger off to test the rest"
  step scripts/finetune_multi demo "$data" --use_gradient_checkpointing --liger off --overwrite ${FINETUNE_ARGS:-}
fi
run=$RUNS_DIR/demo
grep -E "Liger|bf16|cuda|tokens/s|train_runtime" "$work/log" | cut -c1-200 | head -8 || true
step python3 -m gptqlora.cli merge "$run" --to fp16 --out "$work/merged-fp16"
step python3 -c "import sys, torch; from transformers import AutoModelForCausalLM as M; \
m = M.from_pretrained(sys.argv[1], dtype=torch.float16).to('cuda' if torch.cuda.is_available() else 'cpu'); \
print('fp16 merge loads on', m.device)" "$work/merged-fp16"
step python3 -m gptqlora.cli merge "$run" --to gptq --bits 4 --group_size 64 --out "$work/merged-gptq4"
printf 'What is 12 + 7?\nReverse the word "kernel".\n' > "$work/prompts.txt"
step python3 -m gptqlora.cli generate "$run" --prompts "$work/prompts.txt" --max_new_tokens 48
printf 'What is 3 + 4?\n/exit\n' > "$work/chat_in.txt"
step bash -c "python3 -m gptqlora.cli chat '$run' --max_new_tokens 48 < '$work/chat_in.txt'"
step python3 -m gptqlora.cli generate --base "$work/merged-gptq4" --prompts "$work/prompts.txt" --max_new_tokens 48
echo "journey: all steps passed"
