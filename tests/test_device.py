"""convs2s.device.resolve_device, the one device resolution of train, translate, evaluate and plot-attention: a
missing GPU or an unknown name is one readable ValueError."""

import pytest
import torch

from convs2s import device as D
from convs2s.distributed import init_distributed


def test_auto_and_cpu():
    assert D.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert D.resolve_device("cpu") == torch.device("cpu")
    assert D.resolve_device(" CPU ") == torch.device("cpu")
    assert D.resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.fixture()
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_without_cuda_is_a_clear_error(no_cuda):
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(ValueError, match=rf"device '{name}' requested but CUDA is not available .*--device cpu"):
            D.resolve_device(name)
    assert D.resolve_device("auto") == torch.device("cpu")


def test_cuda_index_past_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert D.resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match=r"'cuda:2' requested but only 2 GPU\(s\) are visible \(cuda:0 to cuda:1\)"):
        D.resolve_device("cuda:2")


def test_unknown_and_unsupported_names():
    with pytest.raises(ValueError, match="unknown device 'gpu'; use auto, cpu, cuda or cuda:N"):
        D.resolve_device("gpu")
    with pytest.raises(ValueError, match="unknown device 'cuda:x'"):
        D.resolve_device("cuda:x")
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        D.resolve_device("meta")


def test_training_resolves_through_it(no_cuda):
    with pytest.raises(ValueError, match="CUDA is not available"):
        init_distributed("cuda")
    assert init_distributed("auto")[1] == torch.device("cpu")


def test_autocast_for():
    with D.autocast_for(torch.device("cpu")):
        assert not torch.is_autocast_enabled("cpu")
