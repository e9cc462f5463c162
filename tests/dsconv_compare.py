"""How DSConv outputs are compared with the reference, shared by the tests and by the mutation
test (test_dsconv_mutations.py), which runs these very functions on deliberately broken outputs
to measure what the tests can catch.

``close`` is the comparison of every float32 path against ``dsconv2d_reference`` (kernels,
fallback): same NaN positions, same infinities, and elsewhere
``max |y - ref| <= rtol * max |ref| + atol``. The exact tests use ``torch.equal``.
"""

from __future__ import annotations

from typing import Optional

import torch

RTOL = 1e-5  # relative to max |ref|
# Plus a few hundred subnormal steps: outputs of tiny activations can be subnormal, where float32
# has no relative precision left (the reference rounds once from float64, the kernel per step).
ATOL = 256 * 2.0**-149

# The reference (float64, rounded once to float32) against the brute-force loops (float64):
# one float32 rounding, so much tighter.
BRUTE_RTOL = 1e-6
BRUTE_ATOL = 2.0**-149

# How many times over the comparison's tolerance every generated case's convolution term (and
# KDSb term, when the case has one) must move the output (asserted by the case generators in
# dsconv_cases.py): a kernel that drops or doubles the convolution must fail.
VISIBILITY = 50


def tolerance(ref: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> float:
    """The largest error ``close`` allows against ``ref``."""
    fin = torch.isfinite(ref)
    scale = ref[fin].abs().max().item() if fin.any() else 0.0
    return rtol * scale + atol


def close(
    y: torch.Tensor, ref: torch.Tensor, rtol: float = RTOL, atol: float = ATOL
) -> Optional[str]:
    """None when ``y`` is as close to ``ref`` as the tests require, else what differs."""
    if y.shape != ref.shape or y.dtype != ref.dtype:
        return f"shape/dtype {tuple(y.shape)} {y.dtype} != {tuple(ref.shape)} {ref.dtype}"
    if not torch.equal(torch.isnan(y), torch.isnan(ref)):
        return "NaN pattern differs"
    inf = torch.isinf(ref)
    if not torch.equal(y[inf], ref[inf]) or torch.isinf(y[~inf]).any():
        return "infinities differ"
    fin = torch.isfinite(ref)
    if not fin.any():
        return None
    err = (y[fin].double() - ref[fin].double()).abs().max().item()
    tol = tolerance(ref, rtol, atol)
    if not err <= tol:  # NaN-safe
        scale = ref[fin].abs().max().item()
        return f"max err {err:.3g} > tolerance {tol:.3g} (max |ref| {scale:.3g})"
    return None


def assert_close(y, ref, what, rtol: float = RTOL, atol: float = ATOL):
    msg = close(y, ref, rtol, atol)
    assert msg is None, f"{msg}: {what}"


def exact(y: torch.Tensor, ref: torch.Tensor) -> Optional[str]:
    """The exact tests' comparison (integer sums): bit-identical, NaNs in the same places."""
    if y.shape != ref.shape or y.dtype != ref.dtype:
        return f"shape/dtype {tuple(y.shape)} {y.dtype} != {tuple(ref.shape)} {ref.dtype}"
    if not torch.equal(y.nan_to_num(), ref.nan_to_num()) or not torch.equal(
        torch.isnan(y), torch.isnan(ref)
    ):
        return "not bit-identical"
    return None


def visibility(ref: torch.Tensor, without: torch.Tensor, tol: float) -> float:
    """``max |ref - without|`` over the outputs finite in both, in units of ``tol`` (0 where
    there are none)."""
    fin = torch.isfinite(ref) & torch.isfinite(without)
    if not fin.any():
        return 0.0
    diff = (ref[fin].double() - without[fin].double()).abs().max().item()
    return diff / tol if tol > 0 else (float("inf") if diff > 0 else 0.0)
