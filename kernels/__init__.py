"""Triton kernels and their plain-PyTorch references (no engine imports)."""
