"""The box decoder of converted YOLO heads: the compiled ``dfl_expectation`` op (every SIMD path),
the PyTorch fallback and ``FastDFL`` against an independent float64 reference (the definition,
written out here) and ultralytics' ``DFL``; opcheck; bad input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import dsconv_ext
from dsconv_ext.yolo.fast_dfl import FastDFL, dfl_expectation, dfl_expectation_reference

needs_kernel = pytest.mark.skipif(
    dsconv_ext.dsconv2d_backend("cpu") != "kernel", reason="the compiled CPU kernel is not loaded"
)


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    c1 = (16, 8, 1, 5, 32)[seed % 5]
    shape = (1 + seed % 3, 4 * c1, (1, 15, 16, 17, 1025, 8400)[seed % 6])
    x = torch.randn(*shape, generator=g) * (0.5 + 4 * (seed % 4))
    w = torch.arange(c1, dtype=torch.float32) if seed % 2 else torch.randn(c1, generator=g)
    return x, w


def _reference(x, w) -> torch.Tensor:
    """``y[b, s, a] = sum_i softmax_i(x[b, s*c1 + i, a]) * w[i]`` in float64 numpy, summed bin by
    bin: shares no code with the package (whose reference uses torch's softmax and matmul)."""
    xs, ws = x.detach().double().numpy(), w.detach().double().numpy().reshape(-1)
    c1 = ws.size
    nb, _, na = xs.shape
    y = np.empty((nb, 4, na))
    for b in range(nb):
        for s in range(4):
            bins = xs[b, s * c1 : (s + 1) * c1]  # [c1, A]
            top = bins.max(axis=0)  # softmax is shift-invariant: keeps exp finite
            num = np.zeros(na)
            den = np.zeros(na)
            for i in range(c1):
                e = np.exp(bins[i] - top)
                num += e * ws[i]
                den += e
            y[b, s] = num / den
    return torch.from_numpy(y)


def test_independent_reference_by_hand():
    """The reference itself on a case worked out by hand: bins (0, ln 3) -> softmax (1/4, 3/4),
    weights (2, 6) -> 0.5 + 4.5 = 5; equal bins -> the mean weight 4."""
    x = torch.zeros(1, 8, 2, dtype=torch.float64)
    x[0, 1, 0] = float(np.log(3.0))
    w = torch.tensor([2.0, 6.0], dtype=torch.float64)
    y = _reference(x, w)
    assert torch.allclose(y[0, 0], torch.tensor([5.0, 4.0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(y[0, 1:], torch.full((3, 2), 4.0, dtype=torch.float64), atol=1e-12)


@needs_kernel
def test_op_matches_reference(isa):
    """The op against the float64 softmax expectation: exp to ~2 ulp and a different summation
    order, so |error| <= 1e-5 * max |weight| (+ relative 1e-5)."""
    for seed in range(40):
        x, w = _case(seed)
        got = torch.ops.dsconv_ext.dfl_expectation(x, w)
        want = _reference(x, w).float()
        atol = 1e-5 * float(w.abs().max().clamp_min(1))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=atol, msg=f"{isa}, seed {seed}")


@needs_kernel
def test_op_non_finite_bins(isa):
    """A side with a NaN or +inf bin, or with every bin -inf, is NaN (as softmax gives); -inf
    bins beside finite ones weigh nothing."""
    w = torch.arange(16, dtype=torch.float32)
    x = torch.zeros(1, 64, 40)
    x[0, 3, 1] = float("nan")  # side 0, anchor 1
    x[0, 16 + 5, 2] = float("inf")  # side 1, anchor 2
    x[0, 32:48, 3] = float("-inf")  # side 2, anchor 3: every bin
    x[0, 48:63, 4] = float("-inf")  # side 3, anchor 4: all but the last bin
    got = torch.ops.dsconv_ext.dfl_expectation(x, w)
    nan = torch.isnan(got)
    assert nan[0, 0, 1] and nan[0, 1, 2] and nan[0, 2, 3] and int(nan.sum()) == 3, isa
    assert got[0, 3, 4] == 15.0
    finite = ~nan
    finite[0, 3, 4] = False
    assert torch.equal(got[finite], torch.full_like(got[finite], 7.5)), isa  # uniform: mean bin


@needs_kernel
def test_op_opcheck():
    x, w = _case(3)
    torch.library.opcheck(torch.ops.dsconv_ext.dfl_expectation.default, (x, w))


@needs_kernel
def test_op_rejects_bad_input():
    op = torch.ops.dsconv_ext.dfl_expectation
    w = torch.arange(16, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="x must be float32"):
        op(torch.zeros(1, 64, 8, dtype=torch.float64), w)
    with pytest.raises(RuntimeError, match="weight must be float32"):
        op(torch.zeros(1, 64, 8), w.double())
    with pytest.raises(RuntimeError, match="x must be 3-D"):
        op(torch.zeros(64, 8), w)
    with pytest.raises(RuntimeError, match="4 \\* c1 = 64 channels"):
        op(torch.zeros(1, 60, 8), w)


def test_wrapper_rejects_bad_input():
    w = torch.arange(16, dtype=torch.float32)
    with pytest.raises(ValueError, match="x must be 3-D"):
        dfl_expectation(torch.zeros(64, 8), w)
    with pytest.raises(ValueError, match="4 \\* c1 channels"):
        dfl_expectation(torch.zeros(1, 63, 8), w)
    with pytest.raises(TypeError, match="floating point"):
        dfl_expectation(torch.zeros(1, 64, 8, dtype=torch.int32), w)
    with pytest.raises(TypeError, match="must be tensors"):
        dfl_expectation([0.0], w)


def test_wrapper_other_dtypes_take_the_reference():
    """float64 takes the PyTorch fallback (``dfl_expectation_reference``): float64 rounding."""
    for seed in range(6):
        x, w = _case(seed)
        got = dfl_expectation(x.double(), w.double())
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, _reference(x, w), rtol=1e-12, atol=1e-12)


def test_package_reference_matches_independent_reference():
    """The PyTorch fallback in float32 (what runs without the compiled op)."""
    for seed in range(12):
        x, w = _case(seed)
        got = dfl_expectation_reference(x, w)
        atol = 1e-5 * float(w.abs().max().clamp_min(1))
        torch.testing.assert_close(got.double(), _reference(x, w), rtol=1e-5, atol=atol)


def test_fast_dfl_matches_ultralytics_dfl():
    """FastDFL (the converted models' box decoder) against ultralytics' DFL: float rounding;
    with autograd on it is the inherited forward."""
    from ultralytics.nn.modules.block import DFL

    for seed in range(6):
        x, _ = _case(seed)
        c1 = x.shape[1] // 4
        ref = DFL(c1)
        fast = copy.deepcopy(ref)
        fast.__class__ = FastDFL
        with torch.no_grad():
            want, got = ref(x), fast(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * c1, msg=f"seed {seed}")
        # and the definition: DFL's weights are the bin indices 0..c1-1
        exact = _reference(x, torch.arange(c1, dtype=torch.float64))
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5 * c1)
    x.requires_grad_(True)
    assert torch.equal(fast(x), ref(x))
