"""Packed layouts and how packed layers are stored in checkpoints. Imports nothing else of gptqlora.

- `names`: the GPTQ format names and bit widths (no torch: the command-line help shows them).
- `gptq`: the GPTQ bit layout (pack/unpack of codes and zero points, v1/v2 zero conventions, shape specs).
- `base`: `PackedFormat`, what every stored format provides (tensor names, checks, read/write conversions).
- `gptq_files`: the GPTQ formats `gptq` (v1), `gptq_v2` and `gptq_v2_float_zeros`.
- `spqr`: SpQR layers (codes in small groups, quantized group statistics, CSR fp16 outliers).
"""
