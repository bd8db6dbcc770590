"""convs2s: ConvS2S (Gehring et al. 2017) with fused GLU-convolution and multi-step attention kernels."""

# torch first: the compiled extension convs2s._C links against libc10/libtorch, which only an imported torch
# puts in the process (importing convs2s._C on its own fails with "libc10.so: cannot open shared object file").
import torch  # noqa: F401

__version__ = "0.1.0"
