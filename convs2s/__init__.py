"""convs2s: ConvS2S (Gehring et al. 2017) with fused GLU-convolution and multi-step attention kernels."""

__version__ = "0.1.0"
