"""conftest.py's needs_backend / needs_cuda markers: skip where a backend cannot run, and under CI=true fail when a
backend is missing altogether (issue 19: a CI run that silently skipped the Triton tests would pass untested)."""

import pytest
import torch

from tests import conftest


class _Item:
    """The part of a pytest item that pytest_runtest_setup reads."""

    def __init__(self, *marks):
        self.marks = marks

    def get_closest_marker(self, name):
        return next((m for m in self.marks if m.name == name), None)

    def iter_markers(self, name):
        return (m for m in self.marks if m.name == name)


def _needs(backend, device="cpu"):
    return _Item(pytest.mark.needs_backend(backend, device).mark)


def _avail(monkeypatch, triton_any, triton_cpu):
    """available_backends as conftest sees it: triton usable on some device here or not, and on CPU tensors."""
    def fake(device=None):
        why = triton_any if device is None else triton_cpu
        return {"reference": None, "native": None, "triton": why}
    monkeypatch.setattr(conftest, "available_backends", fake)


def test_missing_backend_skips_outside_ci(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    _avail(monkeypatch, "triton is not importable", "triton is not importable")
    with pytest.raises(pytest.skip.Exception, match="triton is not importable"):
        conftest.pytest_runtest_setup(_needs("triton"))


@pytest.mark.parametrize("ci", ["true", "1", "TRUE"])
def test_missing_backend_fails_in_ci(monkeypatch, ci):
    monkeypatch.setenv("CI", ci)
    _avail(monkeypatch, "triton is not importable", "triton is not importable")
    with pytest.raises(pytest.fail.Exception, match="CI=true makes this a failure"):
        conftest.pytest_runtest_setup(_needs("triton"))


def test_backend_present_but_not_for_this_device_skips_in_ci(monkeypatch):
    # A GPU machine outside the interpreter: triton runs CUDA tensors, not CPU ones. That is no missing backend.
    monkeypatch.setenv("CI", "true")
    _avail(monkeypatch, None, "Triton kernels run on CUDA tensors")
    with pytest.raises(pytest.skip.Exception, match="CUDA tensors"):
        conftest.pytest_runtest_setup(_needs("triton"))


def test_usable_backend_runs(monkeypatch):
    monkeypatch.setenv("CI", "true")
    _avail(monkeypatch, None, None)
    conftest.pytest_runtest_setup(_needs("triton"))


def test_needs_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(pytest.skip.Exception, match="needs a CUDA GPU"):
        conftest.pytest_runtest_setup(_Item(pytest.mark.needs_cuda.mark))
    with pytest.raises(pytest.skip.Exception, match="needs a CUDA GPU"):
        conftest.pytest_runtest_setup(_needs("native", "cuda"))


def test_backend_param_marks():
    p = conftest.backend_param("triton", "cuda", 3)
    assert p.values == ("triton", "cuda", 3)
    assert {m.name for m in p.marks} == {"needs_backend", "needs_cuda"}
    assert [m.args for m in p.marks if m.name == "needs_backend"] == [("triton", "cuda")]
