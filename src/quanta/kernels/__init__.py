"""Triton kernels, one op per file, each with its `*_ref` PyTorch twin in the same file."""
