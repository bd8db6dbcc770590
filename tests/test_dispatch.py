"""Backend discovery and dispatch: available_backends, CONVS2S_BACKEND, clear errors, no silent fallback."""

import pytest
import torch

from convs2s.ops import BACKENDS, BackendUnavailableError, _backend, available_backends, glu_conv, resolve_backend


def _args():
    return torch.randn(2, 5, 3), torch.randn(3, 3, 8), None, None


def test_available_backends_reports_every_backend():
    avail = available_backends()
    assert set(avail) == set(BACKENDS)
    assert avail["reference"] is None
    for why in avail.values():
        assert why is None or (isinstance(why, str) and why)


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match="backend must be one of"):
        glu_conv(*_args(), backend="cudnn")


def test_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot run cpu tensors"):
        glu_conv(*_args(), backend="triton")


def test_native_unbuilt_raises(monkeypatch):
    monkeypatch.setattr(_backend, "_native_module", lambda: (None, "not built in this test"))
    with pytest.raises(BackendUnavailableError, match="not built in this test"):
        glu_conv(*_args(), backend="native")


def test_missing_op_implementation_raises(monkeypatch):
    monkeypatch.setattr(_backend, "_lookup", lambda op, b: None if b == "native" else _backend._IMPLS[(op, b)])
    monkeypatch.setattr(_backend, "why_not", lambda b, d=None: None)
    with pytest.raises(BackendUnavailableError, match="op 'glu_conv' has no 'native' implementation"):
        glu_conv(*_args(), backend="native")


def test_env_overrides_auto(monkeypatch):
    calls = []
    monkeypatch.setitem(_backend._IMPLS, ("glu_conv", "reference"),
                        lambda *a: calls.append("reference") or torch.zeros(2, 5, 4))
    monkeypatch.setenv("CONVS2S_BACKEND", "reference")
    glu_conv(*_args())
    assert calls == ["reference"]


def test_env_override_to_unavailable_backend_raises(monkeypatch):
    monkeypatch.setenv("CONVS2S_BACKEND", "native")
    monkeypatch.setattr(_backend, "_native_module", lambda: (None, "not built in this test"))
    with pytest.raises(BackendUnavailableError, match="not built in this test"):
        glu_conv(*_args())


def test_explicit_argument_is_not_overridden_by_env(monkeypatch):
    monkeypatch.setenv("CONVS2S_BACKEND", "native")
    monkeypatch.setattr(_backend, "_native_module", lambda: (None, "not built"))
    assert glu_conv(*_args(), backend="reference").shape == (2, 5, 4)


def test_auto_on_cpu_never_picks_triton(monkeypatch):
    monkeypatch.setattr(_backend, "_native_module", lambda: (None, "not built"))
    assert resolve_backend("glu_conv", "auto", "cpu") == "reference"


@pytest.mark.needs_backend("native", "cpu")
def test_resolve_backend_names_what_auto_runs():
    assert resolve_backend("glu_conv", "auto", "cpu") == "native"
    assert resolve_backend("glu_conv", "reference", torch.device("cpu")) == "reference"
    assert resolve_backend("glu_conv", "native", "cpu") == "native"


def test_resolve_backend_explicit_unavailable_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot run cpu tensors"):
        resolve_backend("glu_conv", "triton", "cpu")
