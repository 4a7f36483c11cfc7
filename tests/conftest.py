import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():  # the Triton kernels run in Triton's interpreter on CPU tensors
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when a kernel is defined, so before any import

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(1)  # token-by-token decoding is much slower with 2 threads on a busy 2-core machine


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """A saved tiny random LLaMA with a character tokenizer."""
    from tiny import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny") / "fp")


@pytest.fixture(scope="session")
def tiny_run(tiny_dir, tmp_path_factory) -> Path:
    """A run folder (4-bit tiny base + a random adapter) for tests that only read it."""
    from runs import make_run

    return make_run(tiny_dir, tmp_path_factory.mktemp("runs") / "run1")
