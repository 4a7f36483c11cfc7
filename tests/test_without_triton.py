"""triton is optional (the `gpu` extra): without it the package imports and a GPTQ-LoRA model trains and
generates on the torch reference path (CPU installs of torch come without triton)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import sys
sys.modules["triton"] = None  # as if not installed: any `import triton` fails
sys.path.insert(0, {tests!r})
import torch
import gptqlora, gptqlora.cli, gptqlora.inference, gptqlora.nn.registry  # noqa: F401
from gptqlora.adapters import GPTQLoraConfig
from tiny import packed_tiny_llama, train_steps
pm = gptqlora.get_peft_model(packed_tiny_llama(bits=4, group_size=32), GPTQLoraConfig(r=4, lora_dropout=0.1))
pm.train()
losses = train_steps(pm, steps=2)
pm.eval()
out = pm.generate(input_ids=torch.tensor([[5, 6, 7]]), max_new_tokens=3, do_sample=False)
assert all(map(lambda v: v == v, losses)) and out.shape == (1, 6), (losses, out.shape)
assert "triton" not in {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
print("ok")
"""


def test_imports_trains_and_generates_without_triton():
    tests = str(Path(__file__).parent)
    r = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=tests)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
