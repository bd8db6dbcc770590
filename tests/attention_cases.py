"""Shared by the fused conv_attention tests (tests/test_conv_attention_{triton,native}.py): fp64 inputs in the op
contract's order, source masks from spans, and the check of a backend's output, attention weights and every
input's gradient against the fp64 reference under tests/tolerance.py's rule."""

from __future__ import annotations

import math

import torch

from convs2s.ops import conv_attention, conv_attention_ref
from tests.tolerance import assert_close_rule

INPUTS = ("x", "target_embedding", "encoder_keys", "encoder_values", "w_in", "b_in", "w_out", "b_out")


def mask_from(Ts: int, spans) -> torch.Tensor | None:
    """(B, Ts) bool, True = padding, from one (first real, last real + 1) span per sentence; None: no mask."""
    if spans is None:
        return None
    pos = torch.arange(Ts)[None, :]
    lo = torch.tensor([s[0] for s in spans])[:, None]
    hi = torch.tensor([s[1] for s in spans])[:, None]
    return (pos < lo) | (pos >= hi)


def make_inputs(B, Tt, Ts, C, E) -> dict[str, torch.Tensor]:
    """fp64 CPU tensors named as INPUTS. Keys are scaled so that scores spread over a few units: a softmax that is
    neither uniform nor one-hot."""
    return {
        "x": torch.randn(B, Tt, C, dtype=torch.float64),
        "target_embedding": torch.randn(B, Tt, E, dtype=torch.float64),
        "encoder_keys": torch.randn(B, Ts, E, dtype=torch.float64) / E ** 0.25,
        "encoder_values": torch.randn(B, Ts, E, dtype=torch.float64),
        "w_in": torch.randn(E, C, dtype=torch.float64) / math.sqrt(C),
        "b_in": torch.randn(E, dtype=torch.float64),
        "w_out": torch.randn(C, E, dtype=torch.float64) / math.sqrt(E),
        "b_out": torch.randn(C, dtype=torch.float64),
    }


def op_args(t, mask):
    """The op's positional arguments from the named inputs and a mask."""
    return (t["x"], t["target_embedding"], t["encoder_keys"], t["encoder_values"], mask, t["w_in"], t["b_in"],
            t["w_out"], t["b_out"])


def run(fn, t, mask, need_weights, gout, gattn, dtype, device, **kw):
    """(out, attn, {input: grad}) of fn on copies of t in `dtype` on `device`, results on `device`;
    loss = <out, gout> (+ <attn, gattn>)."""
    leaves = {n: v.detach().to(device, dtype).requires_grad_() for n, v in t.items()}
    m = None if mask is None else mask.to(device)
    out, attn = fn(*op_args(leaves, m), need_weights=need_weights, **kw)
    loss = (out.double() * gout.to(device)).sum()
    if gattn is not None:
        loss = loss + (attn.double() * gattn.to(device)).sum()
    grads = torch.autograd.grad(loss, list(leaves.values()))
    return out, attn, dict(zip(leaves, grads))


def check_against_reference(backend, t, mask, dtype, device, need_weights=True, attn_in_loss=True):
    """`backend`'s op vs the fp64 reference, the same-dtype PyTorch reference on `device` setting the tolerance;
    padded source positions must get exactly zero probability and key/value gradient."""
    device = torch.device(device)
    B, Tt, C = t["x"].shape
    gout = torch.randn(B, Tt, C, dtype=torch.float64)
    gattn = torch.randn(B, Tt, t["encoder_keys"].shape[1], dtype=torch.float64) if attn_in_loss else None
    o64, a64, g64 = run(conv_attention_ref, t, mask, True, gout, gattn, torch.float64, "cpu")
    ol, al, gl = run(conv_attention_ref, t, mask, True, gout, gattn, dtype, device)
    of, af, gf = run(conv_attention, t, mask, need_weights, gout, gattn, dtype, device, backend=backend)
    assert of.dtype == dtype and of.device.type == device.type
    assert_close_rule("out", of, ol, o64, dtype)
    if need_weights:
        assert af.dtype == dtype and af.shape == a64.shape
        assert_close_rule("attn", af, al, a64, dtype)
    else:
        assert af is None
    for name in INPUTS:
        assert gf[name].shape == t[name].shape, name
        assert_close_rule("d" + name, gf[name], gl[name], g64[name], dtype)
    if mask is not None:
        pad = mask.to(device)
        if need_weights:
            assert torch.all(af.masked_select(pad[:, None, :]) == 0)
        assert torch.all(gf["encoder_keys"][pad] == 0)
        assert torch.all(gf["encoder_values"][pad] == 0)
