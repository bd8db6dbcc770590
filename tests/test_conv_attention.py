"""conv_attention: the PyTorch reference against a per-sentence loop, gradcheck, masking, bad inputs.

The fused backends are tested against this reference in test_conv_attention_triton.py and
test_conv_attention_native.py.
"""

import math

import pytest
import torch

from convs2s.ops import conv_attention, conv_attention_ref


def make_inputs(B=3, Tt=4, Ts=6, C=5, E=7, *, lengths=None, dtype=torch.float64, requires_grad=False):
    """Inputs of the contract; `lengths` gives each sentence's real source length (right padding)."""
    g = [torch.randn(B, Tt, C, dtype=dtype), torch.randn(B, Tt, E, dtype=dtype),
         torch.randn(B, Ts, E, dtype=dtype), torch.randn(B, Ts, E, dtype=dtype)]
    w = [torch.randn(E, C, dtype=dtype) / math.sqrt(C), torch.randn(E, dtype=dtype),
         torch.randn(C, E, dtype=dtype) / math.sqrt(E), torch.randn(C, dtype=dtype)]
    for t in g + w:
        t.requires_grad_(requires_grad)
    mask = None
    if lengths is not None:
        mask = torch.arange(Ts)[None, :] >= torch.tensor(lengths)[:, None]
    x, te, k, v = g
    w_in, b_in, w_out, b_out = w
    return x, te, k, v, mask, w_in, b_in, w_out, b_out


def loop_reference(x, te, k, v, mask, w_in, b_in, w_out, b_out):
    """Independent formulation: one sentence at a time, padding removed by slicing instead of masking."""
    outs, attns = [], []
    Ts = k.shape[1]
    for b in range(x.shape[0]):
        real = torch.arange(Ts) if mask is None else (~mask[b]).nonzero().flatten()
        q = (x[b] @ w_in.T + b_in + te[b]) * math.sqrt(0.5)               # (Tt, E)
        p = torch.softmax(q @ k[b, real].T, dim=-1)                        # (Tt, s)
        ctx = p @ v[b, real] * math.sqrt(len(real))                        # (Tt, E)
        outs.append((ctx @ w_out.T + b_out + x[b]) * math.sqrt(0.5))
        full = torch.zeros(x.shape[1], Ts, dtype=x.dtype)
        full[:, real] = p
        attns.append(full)
    return torch.stack(outs), torch.stack(attns)


@pytest.mark.parametrize("lengths", [None, [6, 6, 6], [6, 1, 3], [2, 5, 4]])
@pytest.mark.parametrize("Tt,Ts", [(1, 6), (4, 6), (9, 6)])
def test_reference_matches_loop(lengths, Tt, Ts):
    args = make_inputs(Tt=Tt, Ts=Ts, lengths=lengths)
    out, attn = conv_attention_ref(*args, need_weights=True)
    want_out, want_attn = loop_reference(*args)
    torch.testing.assert_close(out, want_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attn, want_attn, rtol=1e-12, atol=1e-12)


def test_single_source_position():
    args = make_inputs(Ts=1)
    out, attn = conv_attention_ref(*args, need_weights=True)
    assert torch.equal(attn, torch.ones_like(attn))
    torch.testing.assert_close(out, loop_reference(*args)[0], rtol=1e-12, atol=1e-12)


def test_padding_gets_exactly_zero_probability_and_gradient():
    args = list(make_inputs(lengths=[6, 2, 4], requires_grad=True))
    mask = args[4]
    out, attn = conv_attention_ref(*args, need_weights=True)
    assert torch.all(attn.masked_select(mask[:, None, :].expand_as(attn)) == 0)
    out.square().sum().backward()
    keys, values = args[2], args[3]
    assert torch.all(keys.grad[mask] == 0) and torch.all(values.grad[mask] == 0)
    assert keys.grad[~mask].abs().sum() > 0


def test_need_weights_false_returns_none():
    out, attn = conv_attention(*make_inputs(), backend="reference")
    assert attn is None and out.shape == (3, 4, 5)


@pytest.mark.parametrize("lengths", [None, [6, 1, 4]])
def test_reference_gradcheck(lengths):
    args = make_inputs(B=3, Tt=3, Ts=6, C=3, E=4, lengths=lengths, requires_grad=True)
    mask = args[4]

    def f(x, te, k, v, w_in, b_in, w_out, b_out):
        return conv_attention_ref(x, te, k, v, mask, w_in, b_in, w_out, b_out)[0]

    assert torch.autograd.gradcheck(f, [a for a in args if a is not mask])


# ---- bad inputs --------------------------------------------------------------------------------------------------

def _call(**changes):
    names = ["x", "target_embedding", "encoder_keys", "encoder_values", "src_padding_mask", "w_in", "b_in",
             "w_out", "b_out"]
    args = dict(zip(names, make_inputs(lengths=[6, 3, 2], dtype=torch.float32)))
    args.update(changes)
    return conv_attention(**args, backend="reference")


def test_all_padding_sentence_is_an_error():
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[1] = True
    with pytest.raises(ValueError, match=r"every source position as padding for sentence\(s\) \[1\]"):
        _call(src_padding_mask=mask)


def test_mask_must_be_bool():
    with pytest.raises(TypeError, match="src_padding_mask must be a bool tensor"):
        _call(src_padding_mask=torch.zeros(3, 6, dtype=torch.uint8))


def test_mask_shape():
    with pytest.raises(ValueError, match=r"src_padding_mask must have shape \(B, Ts\) = \(3, 6\), got \(3, 5\)"):
        _call(src_padding_mask=torch.zeros(3, 5, dtype=torch.bool))


def test_mismatched_batch():
    with pytest.raises(ValueError, match=r"target_embedding must have shape \(B, Tt, E\) = \(3, 4, \?\), got \(2, 4, 7\)"):
        _call(target_embedding=torch.randn(2, 4, 7))


def test_mismatched_source_lengths():
    with pytest.raises(ValueError, match=r"encoder_values must have shape \(B, Ts, E\) = \(3, 6, 7\), got \(3, 5, 7\)"):
        _call(encoder_values=torch.randn(3, 5, 7))


def test_mismatched_projection():
    with pytest.raises(ValueError, match=r"w_in must have shape \(E, C\) = \(7, 5\), got \(5, 7\)"):
        _call(w_in=torch.randn(5, 7))


def test_wrong_rank_keys():
    with pytest.raises(ValueError, match=r"encoder_keys must have 3 dimensions, got shape \(6, 7\)"):
        _call(encoder_keys=torch.randn(6, 7))


def test_integer_input():
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        _call(x=torch.ones(3, 4, 5, dtype=torch.long))


def test_mixed_dtype():
    with pytest.raises(TypeError, match="b_out has dtype torch.float64 but x has dtype torch.float32"):
        _call(b_out=torch.randn(5, dtype=torch.float64))


def test_mixed_device():
    with pytest.raises(ValueError, match="encoder_keys is on meta but x is on cpu"):
        _call(encoder_keys=torch.randn(3, 6, 7, device="meta"))
