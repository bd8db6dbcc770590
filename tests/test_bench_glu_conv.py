"""bench/bench_glu_conv.py's plumbing: every implementation's three passes produce rows, and the triton-dwgemm
rows really run the backward with kernels.glu_conv.DW_IMPL = "gemm" (and only they do), restored afterwards.
Timing is stubbed (one call per pass): the numbers come from GPU runs, not from here."""

import pytest
import torch

pytestmark = pytest.mark.needs_backend("triton", "cpu")


def test_dwgemm_rows_use_the_gemm_dw(monkeypatch):
    from convs2s.kernels import glu_conv as K

    from bench import bench_glu_conv as bench
    from bench import common

    calls = []
    real = K._dw_gemm
    monkeypatch.setattr(K, "_dw_gemm", lambda *a: calls.append(current[0]) or real(*a))
    current = [None]

    def one_call(fn, device):
        fn()
        return {"ms": 1.0, "ms_p20": 1.0, "ms_p80": 1.0}, {"ms": 1.0}, None, False
    monkeypatch.setattr(common, "time_pass", one_call)
    monkeypatch.setattr(common, "gemm_rate", lambda *a: 1.0)
    real_op = bench._op

    def tracking_op(impl, retain_graph=False):
        current[0] = impl
        return real_op(impl, retain_graph)
    monkeypatch.setattr(bench, "_op", tracking_op)

    before = K.DW_IMPL
    rows = bench.bench_shape((2, 8, 16, 16, 3), torch.device("cpu"), torch.float32,
                             ["eager", "triton", "triton-dwgemm", "triton"])
    assert K.DW_IMPL == before
    assert {(r["impl"], r["pass"]) for r in rows} == {(i, p) for i in ("eager", "triton", "triton-dwgemm")
                                                      for p in ("fwd", "bwd", "fwd+bwd")}
    assert calls and set(calls) == {"triton-dwgemm"}        # bwd and fwd+bwd of that impl, nothing else
    assert all(r["max_abs_diff_vs_eager"] < 1e-5 for r in rows)
