"""The fused ops, their PyTorch references, and backend discovery.

    glu_conv(x, weight, bias=None, residual=None, *, causal=False, backend="auto")
    glu_conv_step(x, conv_state, weight, bias=None, residual=None, *, backend="auto")
    conv_attention(x, target_embedding, encoder_keys, encoder_values, src_padding_mask,
                   w_in, b_in, w_out, b_out, *, need_weights=False, backend="auto")

See each function's docstring for its shape contract.
"""

from ._backend import BACKENDS, BackendUnavailableError, available_backends, resolve_backend
from .conv_attention import conv_attention, conv_attention_ref
from .glu_conv import conv1d_weight_to_tbc, glu_conv, glu_conv_ref, tbc_weight_to_conv1d
from .glu_conv_step import glu_conv_step, glu_conv_step_ref

__all__ = [
    "BACKENDS", "BackendUnavailableError", "available_backends", "resolve_backend",
    "glu_conv", "glu_conv_ref", "conv1d_weight_to_tbc", "tbc_weight_to_conv1d",
    "glu_conv_step", "glu_conv_step_ref",
    "conv_attention", "conv_attention_ref",
]
