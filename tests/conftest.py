import os

import pytest
import torch

# Without a GPU, Triton kernels run in the interpreter on CPU tensors. Set before triton is imported anywhere.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


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
