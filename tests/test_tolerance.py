"""tests/tolerance.py's rule itself: what it lets through and what it must catch."""

import pytest
import torch

from tests.tolerance import FLOOR, MEAN_MIN_ELEMENTS, assert_close_rule


def _ref(n=4096, scale=2.0):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, dtype=torch.float64, generator=g) * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_correctly_rounded_result_passes(dtype):
    ref64 = _ref()
    assert_close_rule("rounded", ref64.to(dtype), ref64.to(dtype), ref64, dtype)


@pytest.mark.parametrize("off", [0.02, 0.025, 0.03])
def test_bf16_result_uniformly_off_by_percent_fails_on_the_mean(off):
    """A bf16 result uniformly 2-3 % off: the max check alone passes it (values below 1/2 in magnitude, as a
    GLU's outputs mostly are: 3 % of them is within the bf16 floor of 1.6e-2), the mean check must not."""
    ref64 = (torch.rand(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) - 0.5)
    fused = (ref64 * (1 + off)).to(torch.bfloat16)
    lowp = ref64.to(torch.bfloat16)
    f_max = (fused.double() - ref64).abs().max().item()
    r_max = (lowp.double() - ref64).abs().max().item()
    scale = max(1.0, ref64.abs().max().item())
    assert f_max <= 2 * r_max + FLOOR[torch.bfloat16] * scale, "the max check alone would pass it"
    with pytest.raises(AssertionError, match="mean error"):
        assert_close_rule("off", fused, lowp, ref64, torch.bfloat16)


def test_floor_still_widens_the_max_check():
    """One element a few bf16 ulps off, the rest as accurate as the reference: the max floor lets it through."""
    ref64 = _ref()
    lowp = ref64.to(torch.bfloat16)
    fused = lowp.clone()
    fused[7] = (ref64[7] + 0.01).to(torch.bfloat16)        # |error| ~0.01 > 2 x the reference's worst (~0.008)
    fused[8] = (ref64[8] - 0.01).to(torch.bfloat16)
    # ... and the mean error of the rest improves by rounding a few elements better than the reference does.
    better = (fused.double() - ref64).abs() > 0
    assert better.sum() > 100
    assert_close_rule("outlier", fused, lowp, ref64, torch.bfloat16)


def test_max_error_beyond_floor_fails():
    ref64 = _ref()
    lowp = ref64.to(torch.float32)
    fused = lowp.clone()
    fused[3] += 1e-3
    with pytest.raises(AssertionError, match="max error"):
        assert_close_rule("spike", fused, lowp, ref64, torch.float32)


def test_non_finite_fails():
    ref64 = _ref()
    fused = ref64.float()
    fused[0] = float("nan")
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close_rule("nan", fused, ref64.float(), ref64, torch.float32)


def test_shape_mismatch_fails():
    ref64 = _ref()
    with pytest.raises(AssertionError, match="shape"):
        assert_close_rule("shape", ref64[:-1].float(), ref64.float(), ref64, torch.float32)


def test_empty_tensors_pass():
    empty = torch.zeros(0, 3, dtype=torch.float64)
    assert_close_rule("empty", empty.float(), empty.float(), empty, torch.float32)


def test_small_outputs_are_judged_by_the_max_check():
    """A one-element fp32 result 2.6 ulps off while torch's is 0.6 ulps off: within the max floor, and too few
    elements for a mean to say more than the max does."""
    ref64 = torch.tensor([0.8854], dtype=torch.float64)
    lowp = (ref64 + 0.6 * 5.96e-8).float()
    fused = (ref64 + 2.6 * 5.96e-8).float()
    assert_close_rule("one", fused, lowp, ref64, torch.float32)


def test_a_systematic_offset_fails_at_the_smallest_size_the_mean_check_covers():
    ref64 = (torch.rand(MEAN_MIN_ELEMENTS, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) - 0.5)
    with pytest.raises(AssertionError, match="mean error"):
        assert_close_rule("off", (ref64 * 1.02).to(torch.bfloat16), ref64.to(torch.bfloat16), ref64, torch.bfloat16)
