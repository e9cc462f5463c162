"""Random DSConv problems shared by the reference, fallback, kernel, module and mutation tests.

Every generator here makes cases that can fail: the convolution term (and the KDSb term, when a
case has one) moves the output by at least ``VISIBILITY`` (50) times the tolerance of the
comparison the tests use (dsconv_compare.py), checked by the generator itself
(``check_visible``). Two things used to hide the convolution, and are now built out:

- a CDSb or bias of ~1 next to activations of 1e-30..1e-42: the convolution vanished in float32.
  The shifts are now drawn on the scale of the case's own convolution (``_finish``);
- subnormal outputs (activations near 1e-42 and a few channels) below the comparison's absolute
  tolerance: alpha and KDSb are then scaled by a power of two until the largest convolution output
  is 2^12 times that tolerance, which for the kernel comparison is 2^-129 (still subnormal:
  tiny activations, subnormal alpha * 2^E products and subnormal outputs stay covered).

KDSb, when drawn, gets a random part on the scale of ``alpha * 2^(bits-1)`` on top of the
least-squares fit: the fitted bias alone is the mean quantisation residual, often too small to
see (and exactly 0 for one-channel blocks), so a kernel that ignored KDSb passed.

Generating a case runs the reference a few times, so each generator is memoised on its
arguments and hands out fresh copies. A failing case names its generator and seed.
"""

import functools
import math

import torch
from dsconv_compare import ATOL, BRUTE_ATOL, BRUTE_RTOL, RTOL, VISIBILITY, tolerance, visibility

from dsconv_ext import dsconv2d_reference
from dsconv_ext.dsconv.quant_primitives import num_blocks, quantize_weight

TENSOR_KEYS = ("x", "intweight", "alpha", "KDSb", "CDSw", "CDSb", "bias")


def _copy(case, device="cpu"):
    return {
        k: (v.clone().to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()
    }


def _ri(g):
    def ri(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    return ri


def _reads_input(size, k, stride, pad, dil, taps=None):
    """Whether some output reads an input pixel along one axis (not only zero padding) through
    one of ``taps`` (default: any tap)."""
    out = (size + 2 * pad - dil * (k - 1) - 1) // stride + 1
    taps = range(k) if taps is None else taps
    return any(0 <= o * stride - pad + i * dil < size for o in range(out) for i in taps)


def _grow(size, k, stride, pad, dil):
    """``size``, grown until some output reads an input pixel: a case whose every output reads
    only padding has no convolution to see (those outputs are still covered: the borders of
    every padded case read only padding at some taps, often all of them)."""
    while not _reads_input(size, k, stride, pad, dil):
        size += 1
    return size


def _visible_kdsb(kdsb, alpha, bits, g):
    """The fitted KDSb plus a random part the output can show (see the module docstring)."""
    if kdsb is None:
        return None
    extra = torch.randn(alpha.shape, generator=g) * alpha * 2.0 ** (bits - 1) * 0.25
    return (kdsb + extra).contiguous()


def _conv_only(case):
    c = {k: v for k, v in case.items() if k not in ("CDSw", "CDSb", "bias")}
    return dsconv2d_reference(**dict(c, fuse_silu=False))


def check_visible(case, what, rtol=RTOL, atol=ATOL):
    """Assert that the convolution term, and the KDSb term if any, each move the output by at
    least VISIBILITY times the comparison's tolerance: ``max |ref - ref(alpha=0, KDSb=0)|`` and
    ``max |ref - ref(KDSb=0)|``, over the outputs finite in both. With ``rtol = atol = 0`` (the
    exact tests) any nonzero move will do."""
    ref = dsconv2d_reference(**case)
    tol = tolerance(ref, rtol, atol)
    no_conv = dict(case, alpha=torch.zeros_like(case["alpha"]), KDSb=None)
    v = visibility(ref, dsconv2d_reference(**no_conv), tol)
    assert v >= VISIBILITY, (
        f"{what}: the convolution moves the output by only {v:.3g}x the tolerance {tol:.3g}"
    )
    if case.get("KDSb") is not None:
        vk = visibility(ref, dsconv2d_reference(**dict(case, KDSb=None)), tol)
        assert vk >= VISIBILITY, (
            f"{what}: KDSb moves the output by only {vk:.3g}x the tolerance {tol:.3g}"
        )
    return ref


def _finish(case, shifts, what, rtol=RTOL, atol=ATOL):
    """Scale the case so that its convolution is visible (module docstring), add the channel
    shifts ``shifts`` (CDSw as drawn; CDSb and bias drawn in [-0.5, 0.5), times the largest
    |convolution| of their output channel) and check it."""
    conv = _conv_only(case)
    fin = torch.isfinite(conv)
    assert fin.any(), f"{what}: every output is NaN"
    cmax = conv[fin].abs().max().item()
    assert cmax > 0, f"{what}: the convolution is zero everywhere"
    floor = 2.0**12 * atol
    if cmax < floor:  # subnormal outputs: see the module docstring
        scale = 2.0 ** math.ceil(math.log2(floor / cmax))
        case["alpha"] = case["alpha"] * scale
        if case.get("KDSb") is not None:
            case["KDSb"] = case["KDSb"] * scale
        conv = _conv_only(case)
        cmax = conv[torch.isfinite(conv)].abs().max().item()
    # Per output channel, on the scale of that channel's convolution, at most half of it: a
    # shift that dwarfs the convolution hides it, and with a fused SiLU a large negative one
    # also pushes every output into SiLU's flat tail.
    fin = torch.isfinite(conv)
    per_o = torch.where(fin, conv.abs(), torch.zeros_like(conv)).amax(dim=(0, 2, 3))
    per_o = torch.where(per_o > 0, per_o, torch.full_like(per_o, cmax))
    for k, v in shifts.items():
        case[k] = v if k == "CDSw" else (v * per_o).float()
    check_visible(case, what, rtol, atol)
    return case


def random_case(seed: int, max_c: int = 24, max_hw: int = 9, max_n: int = 3, device="cpu"):
    """A random dsconv2d call: dict of keyword arguments for dsconv2d / dsconv2d_reference."""
    return _copy(_random_case(seed, max_c, max_hw, max_n), device)


@functools.cache
def _random_case(seed, max_c, max_hw, max_n):
    g = torch.Generator().manual_seed(seed)
    ri = _ri(g)
    groups = [1, 1, 1, 2, 3, 4][ri(0, 5)]
    depthwise = ri(0, 7) == 0
    Cg = 1 if depthwise else ri(1, max(1, max_c // groups))
    C = Cg * (groups if not depthwise else ri(1, 6))
    if depthwise:
        groups = C
    Og = 1 if depthwise and ri(0, 1) else ri(1, 4)
    O = Og * groups
    kh, kw = ri(1, 3), ri(1, 3)
    stride = (ri(1, 2), ri(1, 3))
    dilation = (ri(1, 2), ri(1, 2))
    padding = (ri(0, 2), ri(0, 2))
    H = ri(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), max_hw)
    W = ri(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), max_hw)
    H = _grow(H, kh, stride[0], padding[0], dilation[0])
    W = _grow(W, kw, stride[1], padding[1], dilation[1])
    block_size = [1, 2, 3, 4, 5, 8, 16, 32, 64][ri(0, 8)]
    bits, act_bits = ri(2, 8), ri(2, 8)
    x = torch.randn(ri(1, max_n), C, H, W, generator=g) * 3 ** ri(-2, 2)
    w = torch.randn(O, Cg, kh, kw, generator=g)
    kds = ri(0, 2) == 0
    q, alpha, kdsb = quantize_weight(w, bits, block_size, kds_bias=kds)
    assert alpha.shape[1] == num_blocks(Cg, block_size)
    shifts = {}
    if ri(0, 1):
        shifts["CDSw"] = torch.rand(O, generator=g) + 0.5
        shifts["CDSb"] = torch.rand(O, generator=g) - 0.5
    if ri(0, 1):
        shifts["bias"] = torch.rand(O, generator=g) - 0.5
    case = dict(
        x=x,
        intweight=q,
        alpha=alpha,
        KDSb=_visible_kdsb(kdsb, alpha, bits, g),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        block_size=block_size,
        act_bits=act_bits,
        fuse_silu=bool(ri(0, 1)),
    )
    return _finish(case, shifts, f"random_case({seed}, {max_c}, {max_hw}, {max_n})")


def integer_exact_case(seed: int, device="cpu"):
    """A case whose output IS the per-block integer sum: integer activations with every block's
    max |x| in [64, 127] (so E = 0 at 8 mantissa bits), alpha = 1, no shifts."""
    return _copy(_integer_exact_case(seed), device)


@functools.cache
def _integer_exact_case(seed):
    case = random_case(seed)
    x = case["x"]
    g = torch.Generator().manual_seed(seed + 10_000)
    xi = torch.randint(-127, 128, x.shape, generator=g).float()
    # Force the first channel of every block in every group to a large value.
    C = x.shape[1]
    Cg = C // case["groups"]
    B = case["block_size"]
    for grp in range(case["groups"]):
        for b0 in range(0, Cg, B):
            xi[:, grp * Cg + b0] = torch.randint(64, 128, xi[:, 0].shape, generator=g).float()
    case.update(
        x=xi,
        alpha=torch.ones_like(case["alpha"]),
        KDSb=None,
        act_bits=8,
        fuse_silu=False,
    )
    for k in ("CDSw", "CDSb", "bias"):
        case.pop(k, None)
    check_visible(case, f"integer_exact_case({seed})", 0.0, 0.0)
    return case


def wide_case(seed, exact=False):
    """Larger problems than random_case: several bands and pixel tiles, int8 blocks of many
    channels, uneven block splits, big kernels, strides, tiny / huge / subnormal activations."""
    return _copy(_wide_case(seed, exact))


@functools.cache
def _wide_case(seed, exact):
    g = torch.Generator().manual_seed(10_000 + seed)
    ri = _ri(g)
    kind = ri(0, 9)
    if kind == 0:  # depthwise, maybe with a channel multiplier
        groups = ri(1, 40)
        Cg, Og = 1, ri(1, 3)
    else:
        groups = [1, 1, 1, 2, 3, 4][ri(0, 5)]
        Cg, Og = ri(1, 72 // groups), ri(1, 24)
    kh, kw = [(3, 3), (3, 3), (1, 1), (5, 5), (2, 3), (1, 4)][ri(0, 5)]
    if exact:  # every partial sum below 2^24, so that float32 holds it exactly
        Cg = min(Cg, (2**24 - 1) // (kh * kw * 127 * 128))
    C, O = Cg * groups, Og * groups
    stride = (ri(1, 3), ri(1, 3))
    dilation = (ri(1, 2), ri(1, 2))
    padding = (ri(0, 3), ri(0, 3))
    H = ri(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), 40)
    W = ri(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), 40)
    H = _grow(H, kh, stride[0], padding[0], dilation[0])
    W = _grow(W, kw, stride[1], padding[1], dilation[1])
    block_size = [1, 2, 3, 4, 5, 7, 8, 16, 31, 32, 33, 64, 1024][ri(0, 12)]
    bits, act_bits = ri(2, 8), ri(2, 8)
    N = ri(1, 3)
    # Down to subnormal blocks; not up to float32's limit, where float32 accumulation overflows
    # while the float64 reference does not.
    scale = [1.0, 1.0, 1e-3, 1e3, 1e-39, 1e-30, 1e-42, 1e30][ri(0, 7)]
    x = torch.randn(N, C, H, W, generator=g) * scale
    if ri(0, 3) == 0:
        x = torch.nn.functional.silu(x)
    w = torch.randn(O, Cg, kh, kw, generator=g)
    q, alpha, kdsb = quantize_weight(w, bits, block_size, kds_bias=ri(0, 2) == 0)
    case = dict(x=x, intweight=q, alpha=alpha, KDSb=_visible_kdsb(kdsb, alpha, bits, g),
                stride=stride, padding=padding, dilation=dilation, groups=groups,
                block_size=block_size, act_bits=act_bits, fuse_silu=bool(ri(0, 1)))  # fmt: skip
    shifts = {}
    if ri(0, 1):
        shifts["CDSw"] = torch.rand(O, generator=g) + 0.5
        shifts["CDSb"] = torch.rand(O, generator=g) - 0.5
    if ri(0, 1):
        shifts["bias"] = torch.rand(O, generator=g) - 0.5
    if not exact:
        return _finish(case, shifts, f"wide_case({seed})")
    # Integer activations with each block's max |x| in [64, 127]: E = 0 at 8 bits, and with
    # alpha = 1 the output is the sum of the per-(block, tap) integer sums.
    xi = torch.randint(-127, 128, x.shape, generator=g).float()
    for grp in range(groups):
        for b0 in range(0, Cg, block_size):
            xi[:, grp * Cg + b0] = torch.randint(64, 128, xi[:, 0].shape, generator=g).float()
    case.update(x=xi, alpha=torch.ones_like(alpha), KDSb=None, act_bits=8, fuse_silu=False)
    check_visible(case, f"wide_case({seed}, exact=True)", 0.0, 0.0)
    return case


def dw_case(seed):
    """A random depthwise conv: groups == C, 1..3 outputs per channel."""
    return _copy(_dw_case(seed))


@functools.cache
def _dw_case(seed):
    g = torch.Generator().manual_seed(20_000 + seed)
    ri = _ri(g)
    C, Og = ri(1, 12), [1, 1, 1, 2, 3][ri(0, 4)]
    kh, kw = [(3, 3), (3, 3), (3, 3), (1, 1), (5, 5), (2, 3), (3, 1), (7, 7)][ri(0, 7)]
    stride = [(1, 1), (1, 1), (2, 2), (1, 2), (2, 1), (3, 3)][ri(0, 5)]
    dilation = [(1, 1), (1, 1), (1, 1), (2, 2), (1, 3), (2, 1), (3, 1)][ri(0, 6)]
    padding = (ri(0, 3), ri(0, 3))
    if ri(0, 2) == 0:  # the Detect head's geometry, which AVX-512 runs in its own tile
        kh, kw, stride, dilation = 3, 3, (1, 1), (ri(1, 2), 1)
    big = ri(0, 4) == 0  # several bands per channel
    hmax = 130 if big else 30
    H = ri(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), hmax)
    W = ri(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), hmax)
    H = _grow(H, kh, stride[0], padding[0], dilation[0])
    W = _grow(W, kw, stride[1], padding[1], dilation[1])
    N = ri(1, 3)
    scale = [1.0, 1.0, 1.0, 1e-3, 1e3, 1e-39, 1e-42, 1e-30, 1e30][ri(0, 8)]
    x = torch.randn(N, C, H, W, generator=g) * scale
    if ri(0, 2) == 0:
        x = torch.nn.functional.silu(x)
    if ri(0, 5) == 0:  # exact zeros, values at the top of a binade and subnormals mixed in
        # at random places (a periodic pattern can line up with the stride, so that a tap reads
        # nothing else)
        def spots(every):
            return torch.rand(x.shape, generator=g) * every < 1

        x[spots(ri(2, 7))] = 0.0
        x[spots(ri(3, 9))] = 2.0 ** ri(-140, 20) * (2 - 2.0 ** -ri(1, 9))
        x[spots(ri(3, 9))] = 2.0**-149 * ri(1, 2**20)
    if ri(0, 5) == 0:  # NaN / Inf propagate to exactly the outputs that read them
        for _ in range(ri(1, 3)):
            x[ri(0, N - 1), ri(0, C - 1), ri(0, H - 1), ri(0, W - 1)] = [
                math.nan,
                math.inf,
                -math.inf,
            ][ri(0, 2)]
    block = [1, 8, 32][ri(0, 2)]  # any block size: a depthwise block is one channel
    bits = ri(2, 8)
    q, alpha, kdsb = quantize_weight(
        torch.randn(C * Og, 1, kh, kw, generator=g), bits, block, kds_bias=ri(0, 2) == 0
    )
    case = dict(x=x, intweight=q, alpha=alpha, KDSb=_visible_kdsb(kdsb, alpha, bits, g),
                stride=stride, padding=padding, dilation=dilation, groups=C, block_size=block,
                act_bits=ri(2, 8), fuse_silu=bool(ri(0, 1)))  # fmt: skip
    shifts = {}
    if ri(0, 1):
        shifts["CDSw"] = torch.rand(C * Og, generator=g) + 0.5
        shifts["CDSb"] = torch.rand(C * Og, generator=g) - 0.5
    if ri(0, 1):
        shifts["bias"] = torch.rand(C * Og, generator=g) - 0.5
    return _finish(case, shifts, f"dw_case({seed})")


def brute_case(seed: int):
    """A small problem for the brute-force loops (tests/brute_force.py), over the geometries the
    kernels care about: several blocks with a partial last one, groups, depthwise with a channel
    multiplier, strides, dilations, padding; activations at 1 and near 1e-39, subnormal ones,
    NaN and Inf. Sizes keep a case under ~20k multiply-adds (the loops are Python)."""
    return _copy(_brute_case(seed))


@functools.cache
def _brute_case(seed):
    g = torch.Generator().manual_seed(30_000 + seed)
    ri = _ri(g)
    kind = ["wide", "wide", "grouped", "depthwise"][seed % 4]
    if kind == "wide":  # more channels than one block, the last block partial (mostly)
        groups, block = 1, [2, 3, 4, 5, 8, 16][ri(0, 5)]
        Cg, Og = ri(block + 1, min(40, 3 * block + 1)), ri(1, 4)
    elif kind == "grouped":
        groups, block = ri(2, 4), [1, 2, 3, 4, 8][ri(0, 4)]
        Cg, Og = ri(1, 2 * block + 1), ri(1, 3)
    else:  # depthwise, channel multiplier 1..3
        groups, block = ri(1, 8), [1, 8, 32][ri(0, 2)]
        Cg, Og = 1, ri(1, 3)
    C, O = Cg * groups, Og * groups
    kh, kw = [(3, 3), (3, 3), (1, 1), (2, 3), (3, 1)][ri(0, 4)]
    stride = (ri(1, 2), ri(1, 3))
    dilation = (ri(1, 2), ri(1, 2))
    padding = (ri(0, 2), ri(0, 2))
    span_h, span_w = dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1
    H = ri(max(1, span_h - 2 * padding[0]), span_h + 2 * stride[0])
    W = ri(max(1, span_w - 2 * padding[1]), span_w + 2 * stride[1])
    H = _grow(H, kh, stride[0], padding[0], dilation[0])
    W = _grow(W, kw, stride[1], padding[1], dilation[1])
    N = ri(1, 2)
    what = ["unit", "unit", "1e-39", "subnormal", "mixed"][ri(0, 4)]
    x = torch.randn(N, C, H, W, generator=g)
    if what == "1e-39":  # around the normal / subnormal boundary (2^-126 ~ 1.2e-38)
        x = x * 1e-39
    elif what == "subnormal":  # subnormal integers of 2^-149
        x = torch.randint(-(2**12), 2**12, x.shape, generator=g).float() * 2.0**-149
    elif what == "mixed":  # a subnormal pixel beside unit ones in the same blocks
        x.view(-1)[:: ri(2, 5)] *= 1e-40
    if ri(0, 3) == 0 and N == 2:  # one non-finite activation, in image 0 (image 1 stays finite)
        x[0, ri(0, C - 1), ri(0, H - 1), ri(0, W - 1)] = [
            math.nan,
            math.inf,
            -math.inf,
        ][ri(0, 2)]
    bits = ri(2, 8)
    q, alpha, kdsb = quantize_weight(
        torch.randn(O, Cg, kh, kw, generator=g), bits, block, kds_bias=ri(0, 1) == 0
    )
    case = dict(x=x, intweight=q, alpha=alpha, KDSb=_visible_kdsb(kdsb, alpha, bits, g),
                stride=stride, padding=padding, dilation=dilation, groups=groups,
                block_size=block, act_bits=ri(2, 8), fuse_silu=bool(ri(0, 1)))  # fmt: skip
    shifts = {}
    if ri(0, 1):
        shifts["CDSw"] = torch.rand(O, generator=g) + 0.5
        shifts["CDSb"] = torch.rand(O, generator=g) - 0.5
    if ri(0, 1):
        shifts["bias"] = torch.rand(O, generator=g) - 0.5
    return _finish(case, shifts, f"brute_case({seed})", BRUTE_RTOL, BRUTE_ATOL)
