"""Kernels with their references: the Mamba block and the selective scan (PyTorch, Triton)."""
