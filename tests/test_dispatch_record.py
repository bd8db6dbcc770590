"""`auto` on CUDA follows the record of GPU test runs (convs2s/ops/_backend.py GPU_VALIDATED): it picks the fastest
backend recorded for the op and the device's architecture, else the reference; CPU auto is unchanged. No GPU is
needed: the device's capability, the backends' usability and the record are monkeypatched."""

import pytest
import torch

from convs2s.ops import _backend, glu_conv, resolve_backend

RECORD = {"arch": "sm_90", "gpu": "NVIDIA H200", "commit": "0123456", "date": "2026-12-02", "versions": "test",
          "tests": "all passed"}


@pytest.fixture
def gpu(monkeypatch):
    """A pretend CUDA device of capability 9.0 on which every backend is usable; returns a setter for the
    capability."""
    monkeypatch.setattr(_backend, "why_not", lambda backend, device=None: None)
    cap = {"value": (9, 0)}
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap["value"])

    def set_capability(major, minor):
        cap["value"] = (major, minor)
    return set_capability


def record(monkeypatch, entries):
    monkeypatch.setattr(_backend, "GPU_VALIDATED", entries)


@pytest.mark.parametrize("op", ["glu_conv", "conv_attention", "glu_conv_step"])
def test_no_record_means_reference(monkeypatch, gpu, op):
    record(monkeypatch, {})
    assert resolve_backend(op, "auto", "cuda") == "reference"
    chosen, why = _backend.explain_auto(op, "cuda")
    assert chosen == "reference"
    for b in ("triton", "native"):
        assert "has not passed on sm_90" in why[b] and "GPU_VALIDATED" in why[b], why


def test_recorded_backend_is_picked(monkeypatch, gpu):
    record(monkeypatch, {("conv_attention", "triton"): [RECORD]})
    assert resolve_backend("conv_attention", "auto", "cuda") == "triton"
    chosen, why = _backend.explain_auto("conv_attention", "cuda")
    assert chosen == "triton" and "has not passed on sm_90" in why["native"]


def test_record_of_another_architecture_is_not_enough(monkeypatch, gpu):
    record(monkeypatch, {("glu_conv", "triton"): [RECORD]})
    gpu(8, 0)
    assert resolve_backend("glu_conv", "auto", "cuda") == "reference"
    assert "has not passed on sm_80" in _backend.explain_auto("glu_conv", "cuda")[1]["triton"]


def test_fastest_recorded_backend_wins(monkeypatch, gpu):
    record(monkeypatch, {("glu_conv", "triton"): [RECORD], ("glu_conv", "native"): [RECORD]})
    monkeypatch.setitem(_backend.SPEED_ORDER, "glu_conv", ("triton", "native"))
    assert resolve_backend("glu_conv", "auto", "cuda") == "triton"
    assert "'triton' is faster" in _backend.explain_auto("glu_conv", "cuda")[1]["native"]
    monkeypatch.setitem(_backend.SPEED_ORDER, "glu_conv", ("native", "triton"))
    assert resolve_backend("glu_conv", "auto", "cuda") == "native"


def test_recorded_but_unusable_backend_is_skipped(monkeypatch, gpu):
    record(monkeypatch, {("glu_conv", "triton"): [RECORD], ("glu_conv", "native"): [RECORD]})
    monkeypatch.setitem(_backend.SPEED_ORDER, "glu_conv", ("triton", "native"))
    monkeypatch.setattr(_backend, "why_not", lambda b, d=None: "triton is broken here" if b == "triton" else None)
    assert resolve_backend("glu_conv", "auto", "cuda") == "native"
    assert _backend.explain_auto("glu_conv", "cuda")[1]["triton"] == "triton is broken here"


def test_the_committed_record(monkeypatch, gpu):
    """Today's record: Triton glu_conv on sm_90 (the H200 run, 80/81 with the one failure a test tolerance), nothing
    for conv_attention or glu_conv_step: on an H100/H200, auto runs Triton glu_conv and reference attention."""
    (entry,) = _backend.GPU_VALIDATED[("glu_conv", "triton")]
    assert entry["arch"] == "sm_90" and entry["commit"] == "183ad48" and "80 passed, 1 failed" in entry["tests"]
    assert set(_backend.GPU_VALIDATED) == {("glu_conv", "triton")}
    for key, entries in _backend.GPU_VALIDATED.items():
        for e in entries:
            assert set(e) == set(RECORD), (key, e)
    assert resolve_backend("glu_conv", "auto", "cuda") == "triton"
    assert resolve_backend("conv_attention", "auto", "cuda") == "reference"
    assert resolve_backend("glu_conv_step", "auto", "cuda") == "reference"
    assert resolve_backend("glu_conv", "native", "cuda") == "native"   # an explicit backend is not gated


def test_env_still_overrides_auto_on_cuda(monkeypatch, gpu):
    record(monkeypatch, {})
    monkeypatch.setenv("CONVS2S_BACKEND", "triton")
    assert resolve_backend("conv_attention", "auto", "cuda") == "triton"


@pytest.mark.parametrize("built", [True, False])
def test_cpu_auto_unchanged(monkeypatch, built):
    """CPU tensors: native if built, else reference; the GPU record plays no part."""
    record(monkeypatch, {})
    if not built:
        monkeypatch.setattr(_backend, "_native_module", lambda: (None, "not built in this test"))
    elif _backend.why_not("native", "cpu") is not None:
        pytest.skip("the extension is not built here")
    want = "native" if built else "reference"
    for op in ("glu_conv", "conv_attention"):
        assert resolve_backend(op, "auto", "cpu") == want
        assert _backend.explain_auto(op, "cpu")[0] == want


def test_auto_resolution_compiles(monkeypatch):
    """The resolver is a torch.compiler.assume_constant_result: a compiled function with backend='auto' traces
    (fullgraph) and matches eager."""
    x, w = torch.randn(2, 5, 3), torch.randn(3, 3, 8)
    compiled = torch.compile(lambda a, b: glu_conv(a, b), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, w), glu_conv(x, w))
