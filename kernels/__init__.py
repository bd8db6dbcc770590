"""Triton kernels, one file per op. Installed as the package `convs2s.kernels` (see setup.py)."""
