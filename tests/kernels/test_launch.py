"""kernels/launch.py: the specialization key tells apart what Triton compiles apart; CPU tensors (the
interpreter) always take Triton's own path. The GPU path is checked at real shapes by bench/gpu_check.py."""

import torch

from gptqlora.kernels.launch import FastKernel, _spec


def test_key_separates_what_triton_specializes_on():
    flat = torch.zeros(65, dtype=torch.bfloat16)
    assert _spec(flat[:64]) != _spec(flat[1:])  # 16-byte aligned or not
    assert _spec(flat[:8]) != _spec(flat.float()[:8])  # dtype
    assert len({_spec(v) for v in (1, 16, 17, 2**31, 2**63)}) == 5  # ==1, %16, i32 / i64 / u64
    assert _spec(16) == _spec(32) and _spec(3) == _spec(5)
    assert _spec(0.5) == _spec(2.0)


class Recorder:
    arg_names = ["x", "n", "BLOCK"]

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *a, **k: self.calls.append((grid, a, k)) or "compiled"


def test_cpu_tensors_take_tritons_path_every_time():
    fn = Recorder()
    k = FastKernel(fn)
    x = torch.zeros(4)
    for _ in range(3):
        assert k[(2,)](x, 4, BLOCK=16) == "compiled"
    assert len(fn.calls) == 3 and fn.calls[0] == ((2,), (x, 4), {"BLOCK": 16}) and not k.cache
