"""The quantization solvers by name (`--method`): each quantizes one linear layer's weight.

    solver = SOLVERS[name](linear.weight)      # W [N, K]
    if solver.needs_inputs:
        solver.add_batch(x)                    # for each calibration input the layer sees
    result = solver.quantize(bits=..., group_size=..., sym=..., desc_act=..., static_groups=...,
                             damp=..., mse=..., min_zero=..., group_aware=...)   # -> QuantResult
"""

from gptqlora.quant.gptq import GPTQ
from gptqlora.quant.quantizer import RTN
from gptqlora.quant.spqr import SpQR

SOLVERS = {"gptq": GPTQ, "rtn": RTN, "spqr": SpQR}  # spqr takes more options: QuantizeOptions.solver_options
