"""The float stem of converted YOLO models: the compiled ``stem_conv2d`` op (every SIMD path and
the portable one), the Python wrapper and ``FastStemConv`` against an independent float64
reference (zero padding and a sum over taps written out here) and ``F.conv2d``; opcheck; bad
input."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn

import dsconv_ext
from dsconv_ext.yolo.fast_stem import (
    FastStemConv,
    stem_conv2d,
    stem_conv2d_reference,
    use_fast_stem,
)

needs_kernel = pytest.mark.skipif(
    dsconv_ext.dsconv2d_backend("cpu") != "kernel", reason="the compiled CPU kernel is not loaded"
)

U = 2.0**-24  # float32 unit roundoff


def _reference(x, w, b, stride, padding):
    """Float64 numpy: the zero-padded input, then for every (channel, ky, kx) tap the strided
    window times the weight, summed into each output channel. Shares no code with the package."""
    xs, ws = x.detach().double().numpy(), w.detach().double().numpy()
    (sh, sw), (ph, pw) = stride, padding
    n, c, h, wd = xs.shape
    o, _, kh, kw = ws.shape
    xp = np.zeros((n, c, h + 2 * ph, wd + 2 * pw))
    xp[:, :, ph : ph + h, pw : pw + wd] = xs
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    y = np.zeros((n, o, ho, wo))
    if b is not None:
        y += b.detach().double().numpy()[None, :, None, None]
    with np.errstate(invalid="ignore"):  # inf - inf: NaN, as the tests expect
        _sum_taps(y, xp, ws, stride, ho, wo)
    return torch.from_numpy(y)


def _sum_taps(y, xp, ws, stride, ho, wo):
    (sh, sw), (_, c, kh, kw) = stride, ws.shape
    for ci in range(c):
        for ky in range(kh):
            for kx in range(kw):
                win = xp[:, ci, ky : ky + sh * (ho - 1) + 1 : sh, kx : kx + sw * (wo - 1) + 1 : sw]
                y += ws[None, :, ci, ky, kx, None, None] * win[:, None]


def _silu64(y):
    return y / (1 + torch.exp(-y))


def _case(seed: int):
    """Shapes around the tiles (16 / 8 channels and pixels per vector), borders and strides."""
    g = torch.Generator().manual_seed(seed)
    c = 1 + seed % 4
    o = (16, 17, 5, 32, 1, 40, 8, 33)[seed % 8]
    k = (3, 3, 1, 5, 7, 2, 3, 3)[seed % 8]
    s = 1 + (seed // 2) % 2
    p = (seed // 3) % (k // 2 + 1) if k > 1 else 0
    h, wd = ((37, 45), (19, 16), (5, 7), (33, 64), (8, 8), (9, 31), (64, 65), (2, 17))[seed % 8]
    h, wd = max(h, k - 2 * p), max(wd, k - 2 * p)
    n = 1 + (seed % 5 == 0)
    x = torch.randn(n, c, h, wd, generator=g) * (0.3 + 3 * (seed % 3))
    w = torch.randn(o, c, k, k, generator=g)
    b = torch.randn(o, generator=g) if seed % 4 else None
    return x, w, b, (s, s), (p, p)


def _check(got, x, w, b, stride, padding, silu, msg):
    """|got - exact| <= gamma_n * sum |terms| (float32 summation of n = C kh kw + 1 terms, any
    order, with or without FMA), then for the SiLU 1.1 times that (|silu'| < 1.1) plus the fused
    SiLU's 1e-5 relative (docs/semantics.md)."""
    exact = _reference(x, w, b, stride, padding)
    mag = _reference(x.abs(), w.abs(), None if b is None else b.abs(), stride, padding)
    n = w[0].numel() + 1
    atol = n * U / (1 - n * U) * mag
    if silu:
        exact, atol = _silu64(exact), 1.1 * atol + 1e-5 * _silu64(exact).abs()
    assert got.shape == exact.shape, msg
    err = (got.double() - exact).abs()
    bad = err > atol + 1e-30
    assert not bool(bad.any()), (
        f"{msg}: {int(bad.sum())} outputs off, worst {float((err - atol).max()):.3g} over tol"
    )


def test_independent_reference_by_hand():
    """The reference on a case worked out by hand: x = [[1, 2], [3, 4]], a 2x2 kernel of ones,
    padding 1, stride 1 gives the window sums [[1, 3, 2], [4, 10, 6], [3, 7, 4]] (+ bias 0.5);
    stride 2 keeps the corners [[1, 2], [3, 4]]."""
    x = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    w = torch.ones(1, 1, 2, 2)
    want = torch.tensor([[1.0, 3, 2], [4, 10, 6], [3, 7, 4]], dtype=torch.float64) + 0.5
    assert torch.equal(_reference(x, w, torch.tensor([0.5]), (1, 1), (1, 1))[0, 0], want)
    got = _reference(x, w, None, (2, 2), (1, 1))[0, 0]
    assert torch.equal(got, torch.tensor([[1.0, 2], [3, 4]], dtype=torch.float64))


@needs_kernel
@pytest.mark.parametrize("silu", [False, True])
def test_op_matches_reference(isa, silu):
    for seed in range(32):
        x, w, b, s, p = _case(seed)
        got = torch.ops.dsconv_ext.stem_conv2d(x, w, b, list(s), list(p), silu)
        _check(got, x, w, b, s, p, silu, f"{isa}, seed {seed}, silu {silu}")


@needs_kernel
def test_op_yolo_stems(isa):
    """The stems of YOLO11 n/s/m/l/x (3 -> 16/32/64 channels, 3x3, stride 2, padding 1) at a
    size with a tail of 16-pixel tiles, SiLU fused."""
    g = torch.Generator().manual_seed(5)
    x = torch.rand(1, 3, 130, 98, generator=g)
    for o in (16, 32, 64):
        w, b = torch.randn(o, 3, 3, 3, generator=g) * 0.3, torch.randn(o, generator=g)
        got = torch.ops.dsconv_ext.stem_conv2d(x, w, b, [2, 2], [1, 1], True)
        _check(got, x, w, b, (2, 2), (1, 1), True, f"{isa}, {o} channels")


@needs_kernel
def test_op_non_finite_inputs(isa):
    """NaN and +-Inf inputs reach exactly the outputs whose window holds them, as in float64."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(1, 3, 21, 40, generator=g)
    x[0, 0, 0, 0] = float("nan")  # a corner: only the first output pixel reads it
    x[0, 1, 10, 17] = float("inf")
    x[0, 2, 20, 39] = float("-inf")
    x[0, 2, 5, 33] = float("inf")
    x[0, 1, 5, 33] = float("-inf")  # inf - inf: NaN where both are read
    w, b = torch.randn(17, 3, 3, 3, generator=g), torch.randn(17, generator=g)
    for s in ((1, 1), (2, 2)):
        got = torch.ops.dsconv_ext.stem_conv2d(x, w, b, list(s), [1, 1], False)
        want = _reference(x, w, b, s, (1, 1))
        assert torch.equal(torch.isnan(got), torch.isnan(want)), (isa, s)
        assert torch.equal(torch.isposinf(got), torch.isposinf(want)), (isa, s)
        assert torch.equal(torch.isneginf(got), torch.isneginf(want)), (isa, s)
        assert 0 < int(torch.isnan(want).sum()) < want.numel() // 4, s
        finite = torch.isfinite(want)
        torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-4)


@needs_kernel
def test_op_strided_input():
    """Non-contiguous inputs (channels-last, a crop) give the contiguous input's result."""
    x, w, b, s, p = _case(1)
    op = torch.ops.dsconv_ext.stem_conv2d
    want = op(x, w, b, list(s), list(p), True)
    assert torch.equal(
        op(x.to(memory_format=torch.channels_last), w, b, list(s), list(p), True), want
    )
    big = torch.zeros(x.shape[0], x.shape[1], x.shape[2] + 3, x.shape[3] + 5)
    big[:, :, 1 : 1 + x.shape[2], 2 : 2 + x.shape[3]] = x
    crop = big[:, :, 1 : 1 + x.shape[2], 2 : 2 + x.shape[3]]
    assert torch.equal(op(crop, w, b, list(s), list(p), True), want)


@needs_kernel
def test_op_opcheck():
    x, w, b, s, p = _case(3)
    torch.library.opcheck(
        torch.ops.dsconv_ext.stem_conv2d.default, (x, w, b, list(s), list(p), True)
    )


@needs_kernel
def test_op_rejects_bad_input():
    op = torch.ops.dsconv_ext.stem_conv2d
    x, w, b = torch.zeros(1, 3, 8, 8), torch.zeros(4, 3, 3, 3), torch.zeros(4)
    cases = [
        ((x.double(), w, b, [1, 1], [1, 1], False), "x and weight must be float32"),
        ((x, w.half(), b, [1, 1], [1, 1], False), "x and weight must be float32"),
        ((x[0], w, b, [1, 1], [1, 1], False), "x must be 4-D"),
        ((x, w[0], b, [1, 1], [1, 1], False), "weight must be 4-D"),
        ((x, torch.zeros(4, 2, 3, 3), b, [1, 1], [1, 1], False), "weight must read x's 3 channels"),
        ((x, w, b, [3, 1], [1, 1], False), "stride must be 1 or 2"),
        ((x, w, b, [1, 1], [-1, 0], False), "padding must be >= 0"),
        ((x, w, torch.zeros(5), [1, 1], [1, 1], False), "bias must have shape \\[4\\]"),
        ((x, w, b.double(), [1, 1], [1, 1], False), "bias must be a float32 CPU tensor"),
        ((torch.zeros(1, 3, 2, 2), w, b, [1, 1], [0, 0], False), "smaller than the kernel"),
        ((x, w.clone().fill_(float("nan")), b, [1, 1], [1, 1], False), "weight must be finite"),
        ((x, w, b.clone().fill_(float("inf")), [1, 1], [1, 1], False), "bias must be finite"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)
    assert op(torch.zeros(0, 3, 8, 8), w, b, [1, 1], [1, 1], True).shape == (0, 4, 8, 8)


def test_wrapper_rejects_bad_input():
    x, w = torch.zeros(1, 3, 8, 8), torch.zeros(4, 3, 3, 3)
    with pytest.raises(TypeError, match="x must be a tensor"):
        stem_conv2d([0.0], w)
    with pytest.raises(TypeError, match="weight must be floating point"):
        stem_conv2d(x, w.int())
    with pytest.raises(ValueError, match="x must be 4-D"):
        stem_conv2d(x[0], w)
    with pytest.raises(ValueError, match="must read x's 3 channels"):
        stem_conv2d(x, torch.zeros(4, 2, 3, 3))
    with pytest.raises(ValueError, match="bias must be a tensor of shape \\[4\\]"):
        stem_conv2d(x, w, torch.zeros(3))
    with pytest.raises(ValueError, match="stride must be 1 or 2"):
        stem_conv2d(x, w, stride=3)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        stem_conv2d(x, w, padding=-1)
    with pytest.raises(ValueError, match="weight must be finite"):
        stem_conv2d(x, w.clone().fill_(float("nan")))


def test_wrapper_matches_reference():
    """The wrapper (op on float32 CPU, PyTorch otherwise) and the package's PyTorch reference
    against the independent one; float64 takes the reference with float64 rounding."""
    for seed in range(8):
        x, w, b, s, p = _case(seed)
        for silu in (False, True):
            _check(stem_conv2d(x, w, b, s, p, silu), x, w, b, s, p, silu, f"seed {seed}")
            _check(stem_conv2d_reference(x, w, b, s, p, silu), x, w, b, s, p, silu, f"{seed}")
        got = stem_conv2d(x.double(), w.double(), None if b is None else b.double(), s, p)
        torch.testing.assert_close(got, _reference(x, w, b, s, p), rtol=1e-12, atol=1e-12)


def _fused_conv(c1=3, c2=16, k=3, s=2, act=True, seed=0):
    from ultralytics.nn.modules.conv import Conv

    torch.manual_seed(seed)
    m = Conv(c1, c2, k, s, act=act).eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
        m.bn.running_var.uniform_(0.5, 2)
    model = nn.Sequential(m)
    from ultralytics.utils.torch_utils import fuse_conv_and_bn

    m.conv = fuse_conv_and_bn(m.conv, m.bn)
    del m.bn
    m.forward = m.forward_fuse
    return model


@pytest.mark.filterwarnings("ignore:`torch.jit.trace")
def test_fast_stem_conv_matches_ultralytics_conv():
    """use_fast_stem swaps a fused ultralytics Conv's class (state_dict unchanged); its forward
    agrees with the original to float rounding; autograd and tracing take the original path."""
    for act in (True, False):
        model = _fused_conv(act=act)
        ref = copy.deepcopy(model)
        assert use_fast_stem(model) == ["0"]
        assert (
            type(model[0]) is FastStemConv
            and model[0].state_dict().keys() == ref[0].state_dict().keys()
        )
        x = torch.rand(2, 3, 50, 67)
        with torch.no_grad():
            got, want = model(x), ref(x)
        conv = ref[0].conv
        _check(got, x, conv.weight, conv.bias, (2, 2), (1, 1), act, f"act {act}")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        xg, xr = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        y = model(xg)
        assert y.grad_fn is not None
        y.sum().backward()
        ref(xr).sum().backward()
        assert torch.equal(xg.grad, xr.grad)
        traced = torch.jit.trace(model, x, check_trace=False)
        graph = str(traced.inlined_graph)
        assert "stem_conv2d" not in graph and "aten::_convolution" in graph


def test_fast_stem_takes_the_op_only_where_it_can():
    from ultralytics.nn.modules.conv import Conv

    from dsconv_ext import DSConv2d

    assert not FastStemConv.replaces(Conv(3, 16, 3, 2))  # not fused (BN still there)
    for kwargs in ({"c1": 8}, {"s": 3}):
        assert use_fast_stem(_fused_conv(**kwargs)) == [], kwargs
    m = _fused_conv()
    m[0].act = nn.ReLU()
    assert use_fast_stem(m) == []
    m = _fused_conv()
    m[0].conv.dilation = (2, 2)
    assert use_fast_stem(m) == []
    m = _fused_conv()
    with torch.no_grad():
        m[0].conv.weight[0, 0, 0, 0] = float("inf")
    assert use_fast_stem(m) == []
    m = _fused_conv()
    m[0].conv = DSConv2d.from_float(m[0].conv)
    assert use_fast_stem(m) == []


@needs_kernel
def test_fast_stem_conv_runs_the_op(monkeypatch):
    """Outside autograd on a SIMD path the module calls the op (counted), not oneDNN."""
    from dsconv_ext.yolo import fast_stem

    if not fast_stem.kernel_is_faster():
        pytest.skip("the portable path keeps oneDNN for the stem")
    calls = []
    real = torch.ops.dsconv_ext.stem_conv2d

    class Spy:
        def __call__(self, *a):
            calls.append(a[5])
            return real(*a)

    monkeypatch.setattr(torch.ops.dsconv_ext, "stem_conv2d", Spy())
    model = _fused_conv()
    use_fast_stem(model)
    with torch.inference_mode():
        model(torch.rand(1, 3, 32, 32))
    assert calls == [True]
