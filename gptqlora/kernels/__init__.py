"""Kernels for y = x @ dequant(W): torch reference and autograd glue (fused Triton kernels go here)."""
