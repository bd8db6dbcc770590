"""Test-wide setup and the markers every test file uses instead of pasted skip preambles.

    @pytest.mark.needs_cuda                       skip without a CUDA GPU
    @pytest.mark.needs_backend(backend, device)   skip where `backend` cannot run `device` tensors here (the
                                                  reason from convs2s.ops.available_backends); under CI=true a
                                                  backend that is missing altogether (triton not importable, the
                                                  extension not built) FAILS the test instead
    backend_param(backend, device, *values)       a parametrize entry (backend, device, *values) with those marks
"""

import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. Set before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False

from convs2s.ops import available_backends  # noqa: E402  (after TRITON_INTERPRET is set)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def backend_unusable(backend: str, device: str) -> str | None:
    """None if `backend` runs `device` tensors here, else why not ("cuda" without a GPU is always unusable)."""
    if device == "cuda" and not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return available_backends(device)[backend]


def backend_param(backend: str, device: str = "cpu", *values, id: str | None = None):
    """pytest.param(backend, device, *values) marked needs_backend(backend, device) (and needs_cuda for "cuda")."""
    marks = [pytest.mark.needs_backend(backend, device)] + ([pytest.mark.needs_cuda] if device == "cuda" else [])
    return pytest.param(backend, device, *values, marks=marks, id=id)


def pytest_configure(config):
    config.addinivalue_line("markers", "needs_cuda: skip unless a CUDA GPU is present")
    config.addinivalue_line("markers", "needs_backend(backend, device='cpu'): skip unless the backend runs device "
                                       "tensors here; under CI=true a missing backend fails")


def pytest_runtest_setup(item):
    if item.get_closest_marker("needs_cuda") is not None and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    for mark in item.iter_markers("needs_backend"):
        backend = mark.args[0]
        device = mark.args[1] if len(mark.args) > 1 else mark.kwargs.get("device", "cpu")
        why = backend_unusable(backend, device)
        if why is None:
            continue
        # Missing altogether (not usable on any device here) is what CI must not skip; a backend that runs here,
        # only not on this device (CPU tensors on a GPU machine, outside the interpreter), skips everywhere.
        missing = available_backends()[backend]
        if missing is not None and in_ci():
            pytest.fail(f"backend {backend!r} is unavailable ({missing}); CI=true makes this a failure, not a skip")
        pytest.skip(f"backend {backend!r} on {device}: {why}")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture()
def one_thread():
    """torch on one thread for the test: on this 2-core machine shared with other jobs, two OpenMP threads made a
    tiny training step ~15x slower (0.24 s vs 0.016 s, fwd+bwd of the tiny preset on 1000 tokens). Files whose
    tests run whole commands use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
