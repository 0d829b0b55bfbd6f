"""Triton kernels for CUDA GPUs, one module per kernel, each with the signature of its PyTorch twin in
`kernels/torch_ref`. `attention` gathers the op table's entries; importing it needs the `triton` package."""
