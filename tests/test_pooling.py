"""The exact pooling stand-ins (dsconv_ext.yolo.pooling) against PyTorch's own ops:
bit-identical outputs, NaN/Inf included, the fallbacks for autograd and ONNX, and which layers
replace_pooling() takes over."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dsconv_ext
from dsconv_ext.yolo import pooling
from dsconv_ext.yolo.convert import replace_pooling
from dsconv_ext.yolo.pooling import NearestUpsample, SeparableMaxPool2d

needs_kernel = pytest.mark.skipif(
    dsconv_ext.dsconv2d_backend("cpu") != "kernel", reason="the compiled CPU kernel is not loaded"
)


@pytest.fixture(params=["op", "torch"])
def pool_path(request, monkeypatch):
    """The stand-ins on the compiled ops (where they load) and on their PyTorch passes."""
    if request.param == "torch":
        monkeypatch.setattr(pooling, "_pool_op_available", lambda: False)
        monkeypatch.setattr(pooling, "_upsample_op_available", lambda: False)
    elif not (pooling._pool_op_available() and pooling._upsample_op_available()):
        pytest.skip("the compiled pooling ops are not loaded")
    return request.param


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit, NaNs in the same places."""
    return (
        a.shape == b.shape
        and torch.equal(torch.isnan(a), torch.isnan(b))
        and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    )


def _random_input(g: torch.Generator, shape, specials: bool) -> torch.Tensor:
    x = torch.randn(*shape, generator=g)
    # ties: repeated values, where max_pool2d and a running maximum must still agree
    x = torch.where(torch.rand(*shape, generator=g) < 0.2, x.round(), x)
    if specials:
        flat = x.view(-1)
        idx = torch.randint(0, flat.numel(), (4,), generator=g)
        flat[idx] = torch.tensor([math.nan, math.inf, -math.inf, -0.0])
    return x


def test_max_pool_matches_max_pool2d(pool_path):
    for seed in range(150):
        g = torch.Generator().manual_seed(seed)
        ri = lambda lo, hi, g=g: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
        kh, kw = ri(1, 7), ri(1, 7)
        ph, pw = ri(0, kh // 2), ri(0, kw // 2)
        H, W = ri(kh, 23), ri(kw, 23)
        shape = (ri(1, 2), ri(1, 9), H, W) if seed % 5 else (ri(1, 9), H, W)  # batched or not
        x = _random_input(g, shape, specials=seed % 3 == 0)
        if seed % 4 == 0 and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        pool = SeparableMaxPool2d((kh, kw), (ph, pw))
        with torch.inference_mode():
            got = pool(x)
        want = F.max_pool2d(x, (kh, kw), 1, (ph, pw))
        assert _same(got, want), f"{pool_path}, seed {seed}: k=({kh},{kw}) p=({ph},{pw}) {shape}"


@needs_kernel
def test_max_pool_op_every_path_and_destination(isa):
    """The op on each SIMD path against max_pool2d, written into a fresh tensor and into a channel
    slice of a larger buffer whose other slice is the input (SPPF's case; at batch 2 the slices'
    byte ranges interleave)."""
    op = torch.ops.dsconv_ext.max_pool2d_s1_out
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        ri = lambda lo, hi, g=g: int(torch.randint(lo, hi + 1, (1,), generator=g))  # noqa: E731
        kh, kw = ri(1, 7), ri(1, 7)
        ph, pw = ri(0, kh // 2), ri(0, kw // 2)
        n, c, h, w = ri(1, 2), ri(1, 6), ri(kh, 25), ri(kw, 25)
        x = _random_input(g, (n, c, h, w), specials=seed % 2 == 0)
        want = F.max_pool2d(x, (kh, kw), 1, (ph, pw))
        got = torch.full_like(want, 7.0)
        op(x, [kh, kw], [ph, pw], got)
        msg = f"{isa}, seed {seed}: k=({kh},{kw}) p=({ph},{pw}) {(n, c, h, w)}"
        assert _same(got, want), msg
        if (kh, kw) == (2 * ph + 1, 2 * pw + 1):  # size-keeping: SPPF's slices of one buffer
            buf = torch.full((n, 2 * c, h, w), 7.0)
            buf[:, :c] = x
            op(buf[:, :c], [kh, kw], [ph, pw], buf[:, c:])
            assert _same(buf[:, c:], want) and _same(buf[:, :c], x), msg


@needs_kernel
def test_max_pool_op_opcheck_and_bad_input():
    op = torch.ops.dsconv_ext.max_pool2d_s1_out
    x = torch.randn(2, 3, 9, 8)
    torch.library.opcheck(op.default, (x, [3, 5], [1, 2], torch.empty(2, 3, 9, 8)))
    out = torch.empty(1, 3, 8, 8)
    cases = [
        ((x[:1].double(), [3, 3], [1, 1], out), "x and out must be float32"),
        ((x[0], [3, 3], [1, 1], out), "x must be 4-D"),
        ((x[:1, :, :8], [0, 3], [0, 1], out), "kernel_size must be >= 1"),
        ((x[:1, :, :8], [3, 3], [2, 1], out), "padding must be between 0 and kernel_size / 2"),
        ((x[:1, :, :8], [3, 3], [1, 1], torch.empty(1, 3, 8, 7)), "out must have shape"),
        (
            (x[:1, :, :8], [3, 3], [1, 1], torch.empty(1, 8, 8, 3).permute(0, 3, 1, 2)),
            "must hold each image's",
        ),
        ((torch.randn(1, 1, 2, 2), [5, 5], [0, 0], out), "smaller than the kernel"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)


def test_forward_into_writes_the_slice(pool_path):
    x = _random_input(torch.Generator().manual_seed(3), (2, 4, 11, 13), specials=True)
    buf = torch.zeros(2, 12, 11, 13)
    pool = SeparableMaxPool2d(5, 2)
    with torch.inference_mode():
        got = pool.forward_into(x, buf[:, 4:8])
    assert got.data_ptr() == buf[:, 4:8].data_ptr()
    assert _same(buf[:, 4:8], F.max_pool2d(x, 5, 1, 2))
    assert not buf[:, :4].any() and not buf[:, 8:].any()


def test_max_pool_sppf_case_and_nan_propagation():
    x = torch.randn(1, 128, 20, 20, generator=torch.Generator().manual_seed(1))
    x[0, 3, 7, 7] = math.nan
    x[0, 4, 0, 0] = math.inf
    pool = SeparableMaxPool2d(5, 2)
    with torch.no_grad():
        got = pool(pool(pool(x)))  # SPPF applies it three times
    want = F.max_pool2d(F.max_pool2d(F.max_pool2d(x, 5, 1, 2), 5, 1, 2), 5, 1, 2)
    assert _same(got, want)
    assert torch.isnan(got[0, 3]).sum() == 13 * 13  # the NaN spread over the 13x13 window


def test_max_pool_gradients_follow_max_pool2d():
    """With autograd recording, ties must route the gradient as max_pool2d does: it runs it."""
    x = torch.tensor([[[[1.0, 1.0, 0.0], [2.0, 2.0, 2.0], [0.0, 1.0, 1.0]]]], requires_grad=True)
    y = SeparableMaxPool2d(3, 1)(x)
    (gx,) = torch.autograd.grad(y.square().sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.max_pool2d(x2, 3, 1, 1).square().sum(), x2)
    assert torch.equal(gx, want)


def test_nearest_upsample_matches_interpolate(pool_path):
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        s = 1 + seed % 4
        shape = (1 + seed % 2, 1 + seed % 7, 1 + seed % 11, (2, 3, 8, 13, 20)[seed % 5])
        x = _random_input(g, shape, specials=seed % 3 == 0)
        if seed % 4 == 1:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            got = NearestUpsample(s)(x)
        want = F.interpolate(x, scale_factor=float(s), mode="nearest")
        assert _same(got, want), f"{pool_path}, seed {seed}: scale {s} shape {shape}"


@needs_kernel
def test_upsample_op_every_path_and_destination(isa):
    """The op on each path against interpolate, into a fresh tensor and into a channel slice of
    a larger buffer (the Concat it feeds), at widths around the 8-lane AVX2 loop."""
    op = torch.ops.dsconv_ext.upsample_nearest_out
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        s = (2, 2, 3, 1)[seed % 4]
        n, c, h, w = 1 + seed % 2, 1 + seed % 5, 1 + seed % 6, (1, 7, 8, 9, 16, 23, 40)[seed % 7]
        x = _random_input(g, (n, c, h, w), specials=seed % 2 == 0)
        want = F.interpolate(x, scale_factor=float(s), mode="nearest")
        got = torch.full_like(want, 7.0)
        op(x, s, got)
        msg = f"{isa}, seed {seed}: scale {s} {(n, c, h, w)}"
        assert _same(got, want), msg
        buf = torch.full((n, c + 3, h * s, w * s), 7.0)
        op(x, s, buf[:, 1 : 1 + c])
        assert _same(buf[:, 1 : 1 + c], want) and (buf[:, :1] == 7).all(), msg
        assert (buf[:, 1 + c :] == 7).all(), msg


@needs_kernel
def test_upsample_op_opcheck_and_bad_input():
    op = torch.ops.dsconv_ext.upsample_nearest_out
    x = torch.randn(2, 3, 5, 9)
    torch.library.opcheck(op.default, (x, 2, torch.empty(2, 3, 10, 18)))
    out = torch.empty(2, 3, 10, 18)
    cases = [
        ((x.double(), 2, out), "x and out must be float32"),
        ((x[0], 2, out), "x must be 4-D"),
        ((x, 0, out), "scale must be >= 1"),
        ((x, 3, out), "out must have shape"),
        ((x, 2, torch.empty(2, 18, 10, 3).permute(0, 3, 2, 1)), "must hold each image's"),
    ]
    for args, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(*args)


def test_nearest_upsample_gradient():
    x = torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    w = torch.randn(2, 3, 8, 10, generator=torch.Generator().manual_seed(1))
    (got,) = torch.autograd.grad((NearestUpsample(2)(x) * w).sum(), x)
    (want,) = torch.autograd.grad((F.interpolate(x, scale_factor=2.0) * w).sum(), x)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "layer, replaced",
    [
        (nn.MaxPool2d(5, 1, 2), True),  # SPPF
        (nn.MaxPool2d((3, 5), 1, (1, 2)), True),
        (nn.MaxPool2d(3, 1, 0), True),
        (nn.MaxPool2d(2), False),  # stride defaults to the kernel size
        (nn.MaxPool2d(3, 2, 1), False),
        (nn.MaxPool2d(3, 1, 1, dilation=2), False),
        (nn.MaxPool2d(3, 1, 1, ceil_mode=True), False),
        (nn.MaxPool2d(3, 1, 1, return_indices=True), False),
        (nn.AvgPool2d(3, 1, 1), False),
        (nn.Upsample(scale_factor=2, mode="nearest"), True),
        (nn.Upsample(scale_factor=3.0), True),
        (nn.Upsample(scale_factor=1.5), False),
        (nn.Upsample(scale_factor=(2, 3)), False),
        (nn.Upsample(size=(8, 8)), False),
        (nn.Upsample(scale_factor=2, mode="bilinear"), False),
    ],
)
def test_replace_pooling_takes_only_exact_cases(layer, replaced):
    model = nn.Sequential(nn.Identity(), layer)
    x = torch.randn(1, 2, 9, 9, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model(x)
    names = replace_pooling(model)
    assert names == (["1"] if replaced else [])
    assert (type(model[1]) is not type(layer)) == replaced
    with torch.no_grad():
        got = model(x)
    if isinstance(want, tuple):  # return_indices
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    else:
        assert _same(got, want)


def test_constructor_errors_name_the_argument():
    with pytest.raises(ValueError, match="padding"):
        SeparableMaxPool2d(3, 2)
    with pytest.raises(ValueError, match="kernel"):
        SeparableMaxPool2d(0, 0)
    with pytest.raises(ValueError, match="scale_factor"):
        NearestUpsample(1.5)
    with pytest.raises(ValueError, match="cannot stand in"):
        SeparableMaxPool2d.from_module(nn.MaxPool2d(3, 2, 1))
    with pytest.raises(ValueError, match="cannot stand in"):
        NearestUpsample.from_module(nn.Upsample(scale_factor=2, mode="bilinear"))


def test_onnx_export_keeps_the_original_ops(tmp_path):
    onnx = pytest.importorskip("onnx")
    model = nn.Sequential(SeparableMaxPool2d(5, 2), NearestUpsample(2)).eval()
    path = tmp_path / "pools.onnx"
    torch.onnx.export(model, (torch.randn(1, 4, 10, 10),), str(path), dynamo=False)
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "MaxPool" in ops and "Resize" in ops and "Max" not in ops


def test_replaced_layers_load_with_weights_only(tmp_path):
    """A converted model is saved as a pickled module: the stand-ins must load through torch's
    restricted unpickler (ULTRALYTICS_SAFE_LOAD=1) given dsconv_ext's safe globals."""
    from dsconv_ext.yolo.registry import safe_globals

    model = nn.Sequential(nn.MaxPool2d(5, 1, 2), nn.Upsample(scale_factor=2.0))
    model[0].f, model[0].i = -1, 9  # ultralytics' bookkeeping on top-level layers is kept
    assert replace_pooling(model) == ["0", "1"]
    assert (model[0].f, model[0].i) == (-1, 9) and "type" not in vars(model[1])
    torch.save(model, tmp_path / "m.pt")
    with torch.serialization.safe_globals([nn.Sequential, *safe_globals()]):
        back = torch.load(tmp_path / "m.pt", weights_only=True)
    x = torch.randn(1, 3, 6, 6)
    with torch.no_grad():
        assert torch.equal(back(x), model(x))
