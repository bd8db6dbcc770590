"""The whole ConvS2S model on every backend: the native and Triton backends against the reference.

Each fused backend runs the same model (same seed, same weights) as backend="reference" and must give the same
logits, every attention map (return_attention=True), every parameter gradient and the parameters after one
optimizer step; on right- and left-padded batches, with and without a tied output embedding. The tiny preset
covers every code path (residual projection, even kernel, k = 1, residual distances 0 and 2, attention on a
subset of the decoder layers).

How "the same" is judged: by the tolerance rule (tests/tolerance.py). The fp64 reference model is the truth; a
fused result in dtype d may be off it by at most 2x what the reference backend in dtype d is off it, plus a floor.
That covers fp64 and fp32 models, bf16/fp16 autocast (the reference backend under the same autocast is the
low-precision reference) and model.half() / model.bfloat16() (the reference backend's model in that dtype).

Also: a training-mode step under a fixed seed (the backends draw dropout masks identically: dropout is applied by
the modules, outside the ops, which draw no random numbers), incremental vs full-recompute beam search of
low-precision models, torch.compile(fullgraph=True) of the whole model (Dynamo's graph capture, then inductor),
and a 20-update training run whose loss curve each backend must follow.

The Triton interpreter (TRITON_INTERPRET=1 on CPU) is slow (~1 s per forward + backward of the tiny model at
B = 3 on an idle core), so its shapes stay small.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F

from convs2s.model import ConvS2S
from convs2s.search import beam_search
from tests.tolerance import assert_close_rule

pytestmark = pytest.mark.usefixtures("one_thread")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SRC_V, TGT_V, PAD, EOS = 40, 50, 1, 2


def on(*backends: str) -> list:
    """Parametrize entries, each marked needs_backend(backend, DEVICE) (tests/conftest.py)."""
    return [pytest.param(b, marks=pytest.mark.needs_backend(b, DEVICE.type), id=b) for b in backends]


FUSED = on("native", "triton")


def model(backend: str, dtype: torch.dtype = torch.float32, *, tied: bool = False, train: bool = False) -> ConvS2S:
    """The tiny preset with seed-0 weights (the same for every backend), on DEVICE in `dtype`."""
    torch.manual_seed(0)
    m = ConvS2S.from_preset("tiny", SRC_V, TGT_V, backend=backend, share_decoder_input_output_embed=tied)
    return m.to(DEVICE, dtype).train(train)


def batch(padding: str, B: int = 3, Ts: int = 7, Tt: int = 6):
    """(src (B, Ts), prev_output_tokens (B, Tt), target (B, Tt)) with sentences of several lengths, padded on
    `padding` ("right" | "left"); sources end with EOS."""
    g = torch.Generator().manual_seed(1)
    src_len = [Ts, max(1, Ts - 2), max(1, Ts - 4)][:B] + [Ts] * max(0, B - 3)
    tgt_len = [Tt, max(1, Tt - 3), max(1, Tt - 1)][:B] + [Tt] * max(0, B - 3)
    src = torch.full((B, Ts), PAD)
    tgt = torch.full((B, Tt + 1), PAD)
    for i, (ls, lt) in enumerate(zip(src_len, tgt_len)):
        s = torch.randint(4, SRC_V, (ls,), generator=g)
        s[-1] = EOS
        t = torch.cat([torch.tensor([EOS]), torch.randint(4, TGT_V, (lt,), generator=g)])
        if padding == "right":
            src[i, :ls], tgt[i, :lt + 1] = s, t
        else:
            src[i, Ts - ls:], tgt[i, Tt + 1 - lt - 1:] = s, t
    return src.to(DEVICE), tgt[:, :-1].contiguous().to(DEVICE), tgt[:, 1:].contiguous().to(DEVICE)


def loss_of(logits, attn, target) -> torch.Tensor:
    """Cross-entropy on the logits plus a fixed random weighting of every attention map, so that the
    gradient also flows back through the attention probabilities."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    loss = F.cross_entropy(logits.to(dtype).flatten(0, 1), target.flatten(), ignore_index=PAD)
    g = torch.Generator().manual_seed(2)
    for a in attn:
        loss = loss + (a.to(dtype) * torch.randn(a.shape, generator=g, dtype=dtype).to(a.device)).sum()
    return loss


def run(m: ConvS2S, src, tgt_in, tgt_out, autocast: torch.dtype | None = None, seed: int = 5) -> dict:
    """One forward + backward: {"logits", "attn.i", "grad.<parameter name>"} (detached)."""
    m.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    with torch.autocast(DEVICE.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        logits, attn = m(src, None, tgt_in, return_attention=True)
        loss = loss_of(logits, attn, tgt_out)
    loss.backward()
    out = {"logits": logits.detach()}
    out.update({f"attn.{i}": a.detach() for i, a in enumerate(attn)})
    out.update({f"grad.{n}": p.grad.detach().clone() for n, p in m.named_parameters()})
    return out


def assert_all_close(fused: dict, lowp_ref: dict, ref64: dict, dtype: torch.dtype) -> None:
    assert fused.keys() == ref64.keys() == lowp_ref.keys()
    for name in ref64:
        assert_close_rule(name, fused[name], lowp_ref[name], ref64[name], dtype)


def params(m: ConvS2S) -> dict:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


# ---- fp64 / fp32: logits, attention, gradients ----------------------------------------------------------------

@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_forward_backward_match_reference(backend, dtype, tied, padding):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton runs fp32/fp16/bf16 (the fp64 refusal is tested below)")
    data = batch(padding)
    ref64 = run(model("reference", torch.float64, tied=tied), *data)
    lowp = ref64 if dtype == torch.float64 else run(model("reference", dtype, tied=tied), *data)
    fused = run(model(backend, dtype, tied=tied), *data)
    assert len([k for k in ref64 if k.startswith("attn.")]) == 2       # tiny: attention on layers 1 and 3
    assert_all_close(fused, lowp, ref64, dtype)


@pytest.mark.parametrize("backend", FUSED)
def test_train_mode_same_seed_same_dropout(backend):
    """Dropout masks come from the modules (F.dropout), not the ops: with one seed every backend drops the same
    units, so training-mode results agree as closely as eval-mode ones."""
    data = batch("right")
    ref64 = run(model("reference", torch.float64, train=True), *data)
    lowp = run(model("reference", torch.float32, train=True), *data)
    fused = run(model(backend, torch.float32, train=True), *data)
    eval_out = run(model("reference", torch.float64), *data)
    assert (ref64["logits"] - eval_out["logits"]).abs().max() > 0.1     # dropout really acted
    assert_all_close(fused, lowp, ref64, torch.float32)


@pytest.mark.needs_backend("triton", DEVICE.type)
@pytest.mark.parametrize("attention", [True, False], ids=["attention", "no_attention"])
def test_triton_refuses_a_float64_model_with_a_clear_error(attention):
    """Triton runs fp32/fp16/bf16: an fp64 model is refused by name, not computed wrongly (without attention
    layers the model calls glu_conv only, so its refusal is what stops the forward)."""
    m = ConvS2S.from_preset("tiny", SRC_V, TGT_V, backend="triton", decoder_attention=attention)
    src, tgt_in, _ = batch("right")
    with pytest.raises(TypeError, match="triton backend of (glu_conv|conv_attention) runs .*got torch.float64"):
        m.to(DEVICE, torch.float64)(src, None, tgt_in)


# ---- one optimizer step ---------------------------------------------------------------------------------------

def _step(m: ConvS2S, data, optimizer: str) -> dict:
    opt = (torch.optim.Adam(m.parameters(), lr=5e-4) if optimizer == "adam"
           else torch.optim.SGD(m.parameters(), lr=0.25, momentum=0.99, nesterov=True))
    run(m, *data)
    torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)                # as convs2s train does
    opt.step()
    return params(m)


@pytest.mark.parametrize("optimizer", ["adam", "nag"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_one_optimizer_step_gives_the_same_parameters(backend, dtype, optimizer):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("Triton runs fp32/fp16/bf16")
    data = batch("right")
    before = params(model("reference", torch.float64))
    ref64 = _step(model("reference", torch.float64), data, optimizer)
    lowp = ref64 if dtype == torch.float64 else _step(model("reference", dtype), data, optimizer)
    fused = _step(model(backend, dtype), data, optimizer)
    assert max((ref64[n] - before[n]).abs().max() for n in before) > 1e-4    # the step moved the weights
    assert_all_close(fused, lowp, ref64, dtype)


# ---- low precision: autocast, model.half() / model.bfloat16() --------------------------------------------------

TRITON_BF16_ATTENTION = (
    "Triton conv_attention in bf16 (interpreter): the model's attention maps have 1.9-2.2x the mean error of the "
    "reference backend's bf16 maps against fp64 (e.g. 4.5e-4 vs 2.3e-4); with glu_conv on the reference backend "
    "the ratio stays 1.9-2.0, so it comes from the attention op")

@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_autocast_within_tolerance_rule(backend, amp, padding, request):
    """An fp32 model under autocast: judged against the fp64 model, with the reference backend under the same
    autocast as the low-precision reference."""
    if backend == "triton" and amp == torch.bfloat16 and DEVICE.type == "cpu":
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=TRITON_BF16_ATTENTION))
    data = batch(padding)
    ref64 = run(model("reference", torch.float64), *data)
    lowp = run(model("reference", torch.float32), *data, autocast=amp)
    fused = run(model(backend, torch.float32), *data, autocast=amp)
    assert fused["logits"].dtype == amp
    assert_all_close(fused, lowp, ref64, amp)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_low_precision_model_within_tolerance_rule(backend, dtype, request):
    """model.half() / model.bfloat16() without autocast: forward + backward in that dtype, parameters too."""
    if backend == "triton" and dtype == torch.bfloat16 and DEVICE.type == "cpu":
        request.applymarker(pytest.mark.xfail(strict=True, raises=AssertionError, reason=TRITON_BF16_ATTENTION))
    data = batch("right")
    ref64 = run(model("reference", torch.float64), *data)
    lowp = run(model("reference", dtype), *data)
    fused = run(model(backend, dtype), *data)
    assert all(v.dtype == dtype for v in fused.values())
    assert_all_close(fused, lowp, ref64, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("backend", FUSED)
def test_low_precision_model_incremental_search_agrees(backend, dtype):
    """beam_search of a model.half() / model.bfloat16() model: incremental decoding finds the hypotheses that
    recomputing the whole prefix finds, with scores that agree to a few units of the dtype's precision."""
    src = batch("right", B=2, Ts=5)[0]
    m = model(backend, dtype)
    inc = beam_search(m, src, beam=2, nbest=2, max_len=4, incremental=True)
    full = beam_search(m, src, beam=2, nbest=2, max_len=4, incremental=False)
    tol = 8 * torch.finfo(dtype).eps
    for hi, hf in zip(inc, full):
        assert len(hi) == len(hf) == 2
        for a, b in zip(hi, hf):
            assert a.tokens.tolist() == b.tokens.tolist()
            assert abs(a.score - b.score) <= tol * max(1.0, abs(b.score)), (a.score, b.score)
            torch.testing.assert_close(a.positional_scores.float(), b.positional_scores.float(), rtol=tol, atol=tol)


# ---- torch.compile ----------------------------------------------------------------------------------------------

COMPILE_BACKENDS = on("reference", "native")


@pytest.mark.parametrize("backend", COMPILE_BACKENDS)
def test_compile_inductor_equals_eager(backend):
    """torch.compile(model, fullgraph=True) with inductor (C++ codegen on CPU): no graph break (fullgraph raises
    on one), and forward (logits, attention) and backward (every parameter gradient) equal eager within fp32's
    tolerance rule (fp64 eager as the truth, fp32 eager as the low-precision reference). One shape, one
    compilation per backend, as it costs: 470 s (reference) and 200 s (native) of wall time with a cold inductor
    cache on this project's 2-core machine at load 16, 48 s and 29 s with inductor's on-disk cache warm."""
    torch._dynamo.reset()
    data = batch("right")
    ref64 = run(model(backend, torch.float64), *data)
    eager = run(model(backend), *data)
    t0 = time.perf_counter()
    out = run(torch.compile(model(backend), fullgraph=True), *data)
    print(f"inductor compile + first fwd/bwd ({backend}): {time.perf_counter() - t0:.1f} s")
    out = {k.replace("_orig_mod.", ""): v for k, v in out.items()}
    assert_all_close(out, eager, ref64, torch.float32)


# ---- a short training run ---------------------------------------------------------------------------------------

def _curve(backend: str, dtype: torch.dtype, updates: int = 20) -> torch.Tensor:
    """Loss after each of `updates` Adam updates (clip 0.1, dropout on) of the tiny model on a fixed set of 4
    synthetic batches, cycled; the same seed for every backend."""
    m = model(backend, dtype, train=True)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    batches = [batch(p, B=4, Ts=8 + i, Tt=7 + i) for i, p in enumerate(["right", "left"] * 2)]
    torch.manual_seed(3)
    losses = []
    for i in range(updates):
        src, tgt_in, tgt_out = batches[i % len(batches)]
        loss = F.cross_entropy(m(src, None, tgt_in).float().flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 0.1)
        opt.step()
        losses.append(loss.detach().double())
    return torch.stack(losses)


@pytest.mark.needs_backend("native", DEVICE.type)
def test_training_curve_native_follows_reference():
    """20 updates: native's fp32 loss curve stays as close to the fp64 reference curve as the fp32 reference's
    does (tolerance rule at every step), and the loss fell (the run learned something)."""
    ref64 = _curve("reference", torch.float64)
    lowp = _curve("reference", torch.float32)
    fused = _curve("native", torch.float32)
    assert ref64[-4:].mean() < ref64[:4].mean() - 0.1
    assert_close_rule("loss curve", fused, lowp, ref64, torch.float32)
