"""The GPTQ format names and bit widths, without torch: the command-line help shows them (`--bits`,
`--format`), and `gptqlora COMMAND --help` must not wait for torch. `gptqlora.formats.gptq` re-exports them."""

SUPPORTED_BITS = (2, 3, 4, 8)
FORMAT_V1 = "gptq"
FORMAT_V2 = "gptq_v2"
# gptqlora's own: v2 with float zeros [G, N] in `zeros` where an exact QA-LoRA merge moved them off the
# integers; other GPTQ loaders do not read it (its name makes them refuse rather than misread).
FORMAT_V2_FLOAT_ZEROS = "gptq_v2_float_zeros"
