"""Fused QAT fake quantisation of DSConv2d in Triton: activations to block floating point, the
shadow weight to VQK + KDS. Each is one kernel (one read, one write) instead of the several
elementwise PyTorch ops, a float64 pass and a host sync (``bool(isfinite(x).all())``) that
:func:`~dsconv_ext.dsconv.quant_primitives.fake_quantize_bfp` and
:func:`~dsconv_ext.dsconv.quant_primitives.fake_quantize_weight` cost per layer and call.

The numbers are the primitives' exactly (tests/test_dsconv_fake_quant_triton.py compares bits):

* :func:`bfp_fake_quant` = ``bfp_dequantize(*bfp_quantize(x, B, m, G), B, G).to(x.dtype)``:
  per (sample, channel block, pixel), ``E = floor(log2 max|x|) - (m - 2)`` (0 for an all-zero
  block), ``mantissa = clamp(round_half_even(x / 2^E), +-(2^(m-1) - 1))``, out = ``mantissa *
  2^E``; a block holding a NaN or an Inf is NaN throughout.
* :func:`weight_fake_quant` = ``dequantize_weight(*quantize_weight(w, bits, B)).to(w.dtype)``
  without KDS bias: per (output channel, block, tap), ``step = max|w| / qmax``, ``q =
  clamp(round_half_even(w / step))``, ``alpha = float32(sum(w q) / sum(q^2))`` in float64, out =
  ``float32(q) * alpha``. Both float64 sums are exact whatever their order (see the kernel), so
  the result does not depend on the reduction order. Unlike ``quantize_weight``, which raises on a
  NaN / Inf weight (a host sync per layer and call), a (block, tap) holding one is NaN here.

Exactness on the GPU does not depend on compiler flags: exponents come from the float's bits and
an int -> float conversion (never from log2, frexp or a subnormal intermediate), powers of two
are built from bits and applied in two normal-range steps (so no 2^E below 2^-126 is ever formed
as a float), and rounding is integer truncation plus a comparison (libdevice's rint would be
linked in its flush-to-zero flavour by Triton). Triton emits IEEE ``mul.f32`` (no ``.ftz``), so
the one multiply whose result may be subnormal (``mantissa * 2^E`` for a subnormal block) is
exact there as it is on the CPU; the ahead-of-time compile test checks the PTX for ``.ftz``.

Layouts: any strides (channels-last included); the output has x's (w's) memory format.
Grids are one-dimensional (CUDA allows 2^31 - 1 blocks on x, 65535 on y and z).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton
from triton import knobs

# Kernels are decorated at import: with TRITON_INTERPRET=1 set by then they run on CPU tensors.
INTERPRETED = bool(knobs.runtime.interpret)

__all__ = [
    "INTERPRETED",
    "bfp_fake_quant",
    "bfp_launch_meta",
    "weight_fake_quant",
    "weight_launch_meta",
]

# Channels of one block held in registers at once. Wider blocks (block_size > 64) take two
# passes over the block (max, then quantise), re-reading it from L2, in 32 x 32 chunks (ptxas for
# sm_90 spilled 4 bytes of the bfloat16 two-pass kernel at 64 x 32 and 32 x 64).
_MAX_CHUNK_C = 64
_TWO_PASS_CHUNK = 32
# Elements per program of the activation kernel: channels x pixels = 2048 is 16 values a thread
# over 4 warps (ptxas: 60-100 registers, no spills; 64 x 128 tiles took 150 registers).
_TILE = 2048
_NUM_WARPS = 4


# fmt: off
@triton.jit
def _pow2(k):
    """2^k as a float32, built from its bits: k must lie in [-126, 127] (a normal float)."""
    return ((k + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _floor_log2(a):
    """floor(log2 a) for a finite float32 a > 0, subnormals included, from the bits alone.
    (Garbage for a == 0; callers select E = 0 there.)"""
    bits = a.to(tl.int32, bitcast=True)
    biased = (bits >> 23) & 0xFF
    frac = bits & 0x7FFFFF
    # A subnormal is frac * 2^-149; frac < 2^23 converts to a float32 exactly (and normal), whose
    # exponent field is floor(log2 frac).
    frac_log2 = ((frac.to(tl.float32).to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
    return tl.where(biased > 0, biased - 127, frac_log2 - 149)


@triton.jit
def _round_half_even(y):
    """round-half-to-even of a float (float32 or float64) with |y| < 2^30, as an int32.

    Truncation toward zero (an exact conversion), then floor, then the remainder d = y - floor(y),
    exact in y's precision, decides: up when d > 1/2, or d == 1/2 and floor is odd."""
    t = y.to(tl.int32)
    fl = tl.where(t.to(y.dtype) > y, t - 1, t)
    d = y - fl.to(y.dtype)
    up = (d > 0.5) | ((d == 0.5) & ((fl & 1) != 0))
    return fl + up.to(tl.int32)


@triton.jit
def _cast_out(x, DTYPE: tl.constexpr):
    """float32 x in the output dtype, rounded to nearest even as torch's .to(dtype) does. bfloat16
    by the bits (the float32 bits plus 0x7FFF plus the kept lowest bit, NaN kept quiet): Triton's
    interpreter rounds float32 -> bfloat16 conversions half up, the GPU to nearest even."""
    if DTYPE == tl.bfloat16:
        nan = x != x
        bits = tl.where(nan, 0, x.to(tl.int32, bitcast=True))
        r = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        r = tl.where(nan, 0x7FC0, r)
        return r.to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def _bfp_block_exponent(amax, MANT_BITS: tl.constexpr):
    """E of a block with finite max |x| = amax >= 0: floor(log2 amax) - (m - 2), 0 when amax == 0.
    The zero test is on the bits, so no flush-to-zero setting can turn a subnormal max into 0."""
    nonzero = amax.to(tl.int32, bitcast=True) != 0
    return tl.where(nonzero, _floor_log2(amax) - (MANT_BITS - 2), 0)


@triton.jit
def _bfp_values(v, finite, e, MANT_BITS: tl.constexpr):
    """mantissa * 2^E for values v (float32) of blocks with exponents e (broadcast over channels).

    E lies in [-155, 121]. x / 2^E is x * 2^h * 2^(-E-h) with h = floor(-E/2): both factors are
    normal floats and each product is exact while it stays normal (bfp_quantize does the same two
    multiplies). Back, mantissa * 2^a * 2^(E-a) with a = floor(E/2): the first product is normal
    (1 <= |mantissa| < 2^7), and the second's exact value is a float32 (a multiple of 2^-149 of at
    most 7 significant bits, or x itself when E < -149), so it is exact too."""
    LIM: tl.constexpr = (1 << (MANT_BITS - 1)) - 1
    h = (-e) >> 1  # arithmetic shift: floor, also for negative values
    y = tl.where(finite, v, 0.0) * _pow2(h) * _pow2(-e - h)
    q = _round_half_even(y)
    q = tl.minimum(tl.maximum(q, -LIM), LIM)
    a = e >> 1
    return q.to(tl.float32) * _pow2(a) * _pow2(e - a)


@triton.jit
def _bfp_fake_quant_kernel(
    X, Y, HW, W, CG, NBLK, GROUPS,
    sxn, sxc, sxh, sxw, syn, syc, syh, syw,
    BLOCK: tl.constexpr, MANT_BITS: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr, ONE_PASS: tl.constexpr, X_FLAT: tl.constexpr, Y_FLAT: tl.constexpr,
):
    # One program per (sample, group, block, tile of BLOCK_P pixels), pixel tiles fastest.
    pid = tl.program_id(0).to(tl.int64)
    n_pt = tl.cdiv(HW, BLOCK_P)
    pt = pid % n_pt
    row = pid // n_pt
    b = row % NBLK
    ng = row // NBLK
    g = ng % GROUPS
    n = ng // GROUPS
    c_first = g * CG + b * BLOCK
    length = tl.minimum(BLOCK, CG - b * BLOCK)  # the group's last block may be shorter

    offs_p = pt * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    mask_p = offs_p < HW
    # Spatial offsets: one multiply where H and W flatten into one stride (NCHW and NHWC dense).
    if X_FLAT:
        xo = offs_p * sxw
    else:
        xo = (offs_p // W) * sxh + (offs_p % W) * sxw
    if Y_FLAT:
        yo = offs_p * syw
    else:
        yo = (offs_p // W) * syh + (offs_p % W) * syw
    x_base = X + n * sxn + c_first * sxc
    y_base = Y + n * syn + c_first * syc
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)

    if ONE_PASS:
        mask = (offs_c < length)[:, None] & mask_p[None, :]
        v = tl.load(x_base + offs_c[:, None] * sxc + xo[None, :], mask=mask, other=0.0)
        v = v.to(tl.float32)
        finite = tl.abs(v) < float("inf")  # False for NaN and +-Inf
        amax = tl.max(tl.where(finite, tl.abs(v), 0.0), axis=0)
        block_ok = tl.min(finite.to(tl.int32), axis=0) != 0  # masked slots load 0: finite
        e = _bfp_block_exponent(amax, MANT_BITS)
        out = _bfp_values(v, finite, e[None, :], MANT_BITS)
        out = tl.where(block_ok[None, :], out, float("nan"))
        tl.store(y_base + offs_c[:, None] * syc + yo[None, :],
                 _cast_out(out, Y.dtype.element_ty), mask=mask)
    else:
        amax = tl.zeros([BLOCK_P], dtype=tl.float32)
        bad = tl.zeros([BLOCK_P], dtype=tl.int32)
        for c0 in range(0, length, BLOCK_C):
            cc = c0 + offs_c
            mask = (cc < length)[:, None] & mask_p[None, :]
            v = tl.load(x_base + cc[:, None] * sxc + xo[None, :], mask=mask, other=0.0)
            v = v.to(tl.float32)
            finite = tl.abs(v) < float("inf")
            amax = tl.maximum(amax, tl.max(tl.where(finite, tl.abs(v), 0.0), axis=0))
            bad = tl.maximum(bad, tl.max((~finite).to(tl.int32), axis=0))
        e = _bfp_block_exponent(amax, MANT_BITS)
        block_ok = bad == 0
        for c0 in range(0, length, BLOCK_C):
            cc = c0 + offs_c
            mask = (cc < length)[:, None] & mask_p[None, :]
            v = tl.load(x_base + cc[:, None] * sxc + xo[None, :], mask=mask, other=0.0)
            v = v.to(tl.float32)
            finite = tl.abs(v) < float("inf")
            out = _bfp_values(v, finite, e[None, :], MANT_BITS)
            out = tl.where(block_ok[None, :], out, float("nan"))
            tl.store(y_base + cc[:, None] * syc + yo[None, :],
                     _cast_out(out, Y.dtype.element_ty), mask=mask)


@triton.jit
def _weight_values(w, QMAX: tl.constexpr, QMIN: tl.constexpr):
    """Per tap (axis 1) of one block (axis 0) of float64 weights: q (int32) and alpha (float64).

    sum(q^2) is a sum of small integers. sum(w q) is exact in float64 too: a term with q != 0 has
    |w| >= step / 2 = max|w| / (2 qmax) >= max|w| / 2^8, so every such term is a multiple of
    ulp(max|w|) * 2^-8 (or of 2^-149) below 2^18 max|w| over at most 1024 terms: fewer than 53
    significant bits. Hence alpha is the correctly rounded quotient whatever the summation order,
    the same float64 number quantize_weight computes."""
    wmax = tl.max(tl.abs(w), axis=0)
    step = tl.where(wmax > 0, wmax / QMAX, 1.0)
    q = _round_half_even(w / step[None, :])
    q = tl.minimum(tl.maximum(q, QMIN), QMAX)
    qd = q.to(tl.float64)
    sum_q2 = tl.sum(qd * qd, axis=0)
    sum_wq = tl.sum(w * qd, axis=0)
    alpha = tl.where(sum_q2 > 0, sum_wq / tl.maximum(sum_q2, 1.0), 0.0)
    return q, alpha


@triton.jit
def _weight_fake_quant_kernel(
    Wt, Out, CG, T, NBLK,
    BLOCK: tl.constexpr, QMAX: tl.constexpr, QMIN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, ONE_PASS: tl.constexpr,
):
    # One program per (output channel, block); w and out are contiguous [O, CG, T].
    pid = tl.program_id(0).to(tl.int64)
    b = pid % NBLK
    o = pid // NBLK
    length = tl.minimum(BLOCK, CG - b * BLOCK)
    base = o * CG * T + b * BLOCK * T
    offs_c = tl.arange(0, BLOCK_C).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    mask_t = offs_t < T
    if ONE_PASS:
        mask = (offs_c < length)[:, None] & mask_t[None, :]
        offs = base + offs_c[:, None] * T + offs_t[None, :]
        w = tl.load(Wt + offs, mask=mask, other=0.0).to(tl.float64)
        finite = tl.abs(w) < float("inf")
        tap_ok = tl.min(finite.to(tl.int32), axis=0) != 0
        q, alpha = _weight_values(tl.where(finite, w, 0.0), QMAX, QMIN)
        # dequantize_weight: float32(q) * float32(alpha), a float32 product.
        out = q.to(tl.float32) * alpha.to(tl.float32)[None, :]
        out = tl.where(tap_ok[None, :], out, float("nan"))
        tl.store(Out + offs, _cast_out(out, Out.dtype.element_ty), mask=mask)
    else:
        # Wide blocks: max, then the sums, then the values, one chunk of channels at a time.
        wmax = tl.zeros([BLOCK_T], dtype=tl.float64)
        bad = tl.zeros([BLOCK_T], dtype=tl.int32)
        for c0 in range(0, length, BLOCK_C):
            cc = c0 + offs_c
            mask = (cc < length)[:, None] & mask_t[None, :]
            w = tl.load(Wt + base + cc[:, None] * T + offs_t[None, :], mask=mask,
                        other=0.0).to(tl.float64)
            finite = tl.abs(w) < float("inf")
            wmax = tl.maximum(wmax, tl.max(tl.where(finite, tl.abs(w), 0.0), axis=0))
            bad = tl.maximum(bad, tl.max((~finite).to(tl.int32), axis=0))
        step = tl.where(wmax > 0, wmax / QMAX, 1.0)
        sum_q2 = tl.zeros([BLOCK_T], dtype=tl.float64)
        sum_wq = tl.zeros([BLOCK_T], dtype=tl.float64)
        for c0 in range(0, length, BLOCK_C):
            cc = c0 + offs_c
            mask = (cc < length)[:, None] & mask_t[None, :]
            w = tl.load(Wt + base + cc[:, None] * T + offs_t[None, :], mask=mask,
                        other=0.0).to(tl.float64)
            w = tl.where(tl.abs(w) < float("inf"), w, 0.0)
            q = _round_half_even(w / step[None, :])
            qd = tl.minimum(tl.maximum(q, QMIN), QMAX).to(tl.float64)
            sum_q2 += tl.sum(qd * qd, axis=0)
            sum_wq += tl.sum(w * qd, axis=0)
        alpha = tl.where(sum_q2 > 0, sum_wq / tl.maximum(sum_q2, 1.0), 0.0).to(tl.float32)
        for c0 in range(0, length, BLOCK_C):
            cc = c0 + offs_c
            mask = (cc < length)[:, None] & mask_t[None, :]
            offs = base + cc[:, None] * T + offs_t[None, :]
            w = tl.load(Wt + offs, mask=mask, other=0.0).to(tl.float64)
            w = tl.where(tl.abs(w) < float("inf"), w, 0.0)
            q = _round_half_even(w / step[None, :])
            q = tl.minimum(tl.maximum(q, QMIN), QMAX)
            out = q.to(tl.float32) * alpha[None, :]
            out = tl.where((bad == 0)[None, :], out, float("nan"))
            tl.store(Out + offs, _cast_out(out, Out.dtype.element_ty), mask=mask)
# fmt: on


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _flat_hw(t: torch.Tensor) -> bool:
    """Whether (h, w) -> h * stride(2) + w * stride(3) equals p * stride(3) for p = h * W + w."""
    return t.shape[2] == 1 or t.stride(2) == t.shape[3] * t.stride(3)


def bfp_launch_meta(x: torch.Tensor, block_size: int, groups: int) -> dict:
    """Grid size and compile-time parameters of the activation kernel for ``x`` (also used by
    the ahead-of-time compile test)."""
    N, C, H, W = x.shape
    Cg = C // groups
    nblk = -(-Cg // block_size)
    width = min(block_size, Cg)
    one_pass = width <= _MAX_CHUNK_C
    block_c = _pow2_at_least(width) if one_pass else _TWO_PASS_CHUNK
    block_p = min(1024, _TILE // block_c) if one_pass else _TWO_PASS_CHUNK
    tiles = N * groups * nblk * triton.cdiv(H * W, block_p)
    return dict(
        grid=(tiles,), nblk=nblk, BLOCK_C=block_c, BLOCK_P=block_p, ONE_PASS=one_pass,
        X_FLAT=_flat_hw(x), num_warps=_NUM_WARPS,
    )  # fmt: skip


def weight_launch_meta(w: torch.Tensor, block_size: int) -> dict:
    O, Cg, kh, kw = w.shape
    nblk = -(-Cg // block_size)
    width = min(block_size, Cg)
    one_pass = width * _pow2_at_least(kh * kw) <= 1024
    block_c = _pow2_at_least(width) if one_pass else max(1, 1024 // _pow2_at_least(kh * kw))
    return dict(
        grid=(O * nblk,), nblk=nblk, BLOCK_C=min(block_c, 1024),
        BLOCK_T=_pow2_at_least(kh * kw), ONE_PASS=one_pass, num_warps=_NUM_WARPS,
    )  # fmt: skip


_MAX_GRID_X = 2**31 - 1


@triton_op("dsconv_ext_fq::bfp_fake_quant", mutates_args=())
def bfp_fake_quant(x: torch.Tensor, block_size: int, mant_bits: int, groups: int) -> torch.Tensor:
    """Block-floating-point fake quantisation of ``x`` [N, C, H, W] (float32 / float16 /
    bfloat16), in x's dtype and memory format. No gradient of its own: see
    :func:`dsconv_ext.dsconv.quant_primitives.fake_quantize_bfp_fused`."""
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    N, C, H, W = x.shape
    meta = bfp_launch_meta(x, block_size, groups)
    if meta["grid"][0] > _MAX_GRID_X:
        raise ValueError(f"bfp_fake_quant: {tuple(x.shape)} needs too many programs")
    wrap_triton(_bfp_fake_quant_kernel)[meta["grid"]](
        x, y, H * W, W, C // groups, meta["nblk"], groups,
        *x.stride(), *y.stride(),
        BLOCK=block_size, MANT_BITS=mant_bits, BLOCK_C=meta["BLOCK_C"], BLOCK_P=meta["BLOCK_P"],
        ONE_PASS=meta["ONE_PASS"], X_FLAT=meta["X_FLAT"], Y_FLAT=_flat_hw(y),
        num_warps=meta["num_warps"],
    )  # fmt: skip
    return y


@triton_op("dsconv_ext_fq::weight_fake_quant", mutates_args=())
def weight_fake_quant(weight: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """VQK + KDS fake quantisation (no KDS bias) of a conv weight [O, I/g, kh, kw], in its dtype,
    contiguous. No gradient of its own: see
    :func:`dsconv_ext.dsconv.quant_primitives.fake_quantize_weight_fused`."""
    w = weight.contiguous()
    out = torch.empty_like(w)
    if w.numel() == 0:
        return out
    O, Cg, kh, kw = w.shape
    meta = weight_launch_meta(w, block_size)
    wrap_triton(_weight_fake_quant_kernel)[meta["grid"]](
        w, out, Cg, kh * kw, meta["nblk"],
        BLOCK=block_size, QMAX=2 ** (bits - 1) - 1, QMIN=-(2 ** (bits - 1)),
        BLOCK_C=meta["BLOCK_C"], BLOCK_T=meta["BLOCK_T"], ONE_PASS=meta["ONE_PASS"],
        num_warps=meta["num_warps"],
    )  # fmt: skip
    return out
