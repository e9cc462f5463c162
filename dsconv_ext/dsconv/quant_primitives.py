"""DSConv quantisation primitives: pure functions, no modules, no kernels.

These define the numbers. Everything else (the PyTorch fallback, the C++ and CUDA kernels, the
modules) is tested against them.

Terms (Nascimento et al., "DSConv: Efficient Convolution Operator", ICCV 2019):

============  ==================================  =============================================
name          shape                               meaning
============  ==================================  =============================================
intweight     (O, I/g, kh, kw) int8               Variable Quantized Kernel (VQK), ``bits`` wide
alpha         (O, nblocks, kh, kw) float32        Kernel Distribution Shift (KDS) scale
KDSb          (O, nblocks, kh, kw) float32        optional KDS bias: W ~ alpha * q + KDSb
CDSw, CDSb    (O,) float32                        optional Channel Distribution Shift
mantissa      (N, C, H, W) int8                   block-floating-point activation mantissas
exponent      (N, groups * nblocks, H, W) int32   one shared power of two per activation block
============  ==================================  =============================================

Blocks cut the input channels *of each group* into runs of ``block_size`` consecutive channels
(the last one may be shorter): ``nblocks = ceil((I / groups) / block_size)``.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "MAX_BLOCK_SIZE",
    "NONFINITE_EXPONENT",
    "check_bits",
    "check_block_size",
    "num_blocks",
    "quantize_weight",
    "dequantize_weight",
    "bfp_quantize",
    "bfp_dequantize",
    "exponent_to_scale",
    "pack_intweight",
    "unpack_intweight",
    "packed_bits",
    "fake_quantize_weight",
    "fake_quantize_bfp",
    "FAKE_QUANT_BACKENDS",
    "FAKE_QUANT_ENV",
    "FUSED_DTYPES",
    "fake_quant_backend",
    "fake_quantize_bfp_fused",
    "fake_quantize_weight_fused",
]

# Per-block integer sums must stay exact in float32 (the fallback) and int32 (the kernels):
# |q| <= 128 and |mantissa| <= 127, so a block of B channels sums to at most B * 16256, which is
# below 2**24 for B <= 1032. 1024 keeps a margin and is a power of two.
MAX_BLOCK_SIZE = 1024

# Exponent given to an activation block that holds a NaN or an Inf. Its mantissas are 0 and its
# scale is NaN, so every output that reads the block is NaN: non-finite activations propagate
# instead of turning into finite garbage.
NONFINITE_EXPONENT = 2**31 - 1


def check_bits(bits: int, name: str = "bits") -> int:
    if isinstance(bits, bool) or not isinstance(bits, int):
        raise TypeError(f"{name} must be an int in [2, 8], got {bits!r}")
    if not 2 <= bits <= 8:
        raise ValueError(f"{name} must be in [2, 8], got {bits}")
    return bits


def check_block_size(block_size: int, name: str = "block_size") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{name} must be an int in [1, {MAX_BLOCK_SIZE}], got {block_size!r}")
    if not 1 <= block_size <= MAX_BLOCK_SIZE:
        raise ValueError(f"{name} must be in [1, {MAX_BLOCK_SIZE}], got {block_size}")
    return block_size


def num_blocks(channels_per_group: int, block_size: int) -> int:
    """Number of channel blocks in one group: ``ceil(channels_per_group / block_size)``."""
    return -(-channels_per_group // block_size)


def _pad_channels(t: torch.Tensor, dim: int, multiple: int) -> torch.Tensor:
    extra = (-t.shape[dim]) % multiple
    if extra == 0:
        return t
    pad = [0, 0] * (t.dim() - 1 - dim) + [0, extra]
    return F.pad(t, pad)


def _fit_kds(w, q, valid, kds_bias: bool):
    """Least-squares KDS per block: alpha (and beta) minimising |w - alpha q - beta|^2."""
    sum_q2 = (q * q).sum(dim=2)
    sum_wq = (w * q).sum(dim=2)
    alpha = torch.where(sum_q2 > 0, sum_wq / sum_q2.clamp_min(1), torch.zeros_like(sum_q2))
    beta = torch.zeros_like(alpha)
    if kds_bias:
        n = valid.sum(dim=2)
        sum_q = (q * valid).sum(dim=2)
        sum_w = (w * valid).sum(dim=2)
        denom = n * sum_q2 - sum_q * sum_q
        # denom == 0 when every q in the block is equal: the slope is undetermined, keep the
        # plain fit and let the bias absorb the mean residual.
        alpha = torch.where(
            denom > 0, (n * sum_wq - sum_q * sum_w) / denom.clamp_min(1e-300), alpha
        )
        beta = (sum_w - alpha * sum_q) / n
    return alpha, beta


def _block_sse(w, q, alpha, beta, valid):
    return (((w - alpha.unsqueeze(2) * q - beta.unsqueeze(2)) * valid) ** 2).sum(dim=2)


@torch.no_grad()
def quantize_weight(
    weight: torch.Tensor,
    bits: int = 8,
    block_size: int = 32,
    kds_bias: bool = False,
    refine_steps: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Split a float conv weight into the VQK and the Kernel Distribution Shift.

    For each (output channel, block, tap) the block is scaled by its max |w| so the integers use the
    full range, rounded half-to-even, clamped to ``[-2^(bits-1), 2^(bits-1)-1]`` (the paper's code
    omits the clamp), and ``alpha`` is the least-squares fit ``sum(w q) / sum(q^2)``. With
    ``kds_bias`` the fit is ``w ~ alpha q + KDSb`` (ordinary least squares per block).

    ``refine_steps > 0`` then alternates re-rounding ``q = round((w - KDSb) / alpha)`` and
    re-fitting, keeping a block's new fit only where its squared error drops (never worse). It
    trades clipping of the largest weights for a finer step; on Gaussian 3x3 weights, block 32,
    4 steps cut the weight error by 33% at 2 bits, 9% at 3, 3% at 4 and 1.5% at 8 bits.

    Args:
        weight: [O, I/g, kh, kw] float conv weight.
        bits: VQK width, 2..8.
        block_size: input channels per block, 1..1024.
        kds_bias: also fit a KDS bias.
        refine_steps: alternating refinement iterations (0: the paper's single pass).

    Returns:
        intweight [O, I/g, kh, kw] int8, alpha [O, nblocks, kh, kw] float32,
        KDSb [O, nblocks, kh, kw] float32 or None.
    """
    check_bits(bits)
    check_block_size(block_size)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [O, I/g, kh, kw], got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight contains NaN or Inf; cannot quantise it")
    if isinstance(refine_steps, bool) or not isinstance(refine_steps, int) or refine_steps < 0:
        raise ValueError(f"refine_steps must be an int >= 0, got {refine_steps!r}")
    O, Cg, kh, kw = weight.shape
    nblk = num_blocks(Cg, block_size)
    w = _pad_channels(weight.detach().double(), 1, block_size).view(O, nblk, block_size, kh, kw)
    # Padded channels are not part of the block: mask them out of the fit's counts.
    valid = _pad_channels(
        torch.ones(1, Cg, 1, 1, dtype=torch.float64, device=w.device), 1, block_size
    ).view(1, nblk, block_size, 1, 1)
    qmax = 2 ** (bits - 1) - 1
    qmin = -(2 ** (bits - 1))
    wmax = w.abs().amax(dim=2, keepdim=True)
    step = torch.where(wmax > 0, wmax / qmax, torch.ones_like(wmax))
    q = torch.round(w / step).clamp_(qmin, qmax)
    alpha, beta = _fit_kds(w, q, valid, kds_bias)
    if refine_steps:
        err = _block_sse(w, q, alpha, beta, valid)
        for _ in range(refine_steps):
            a = alpha.unsqueeze(2)
            ok = a.abs() > 0
            q_new = (
                torch.where(
                    ok, torch.round((w - beta.unsqueeze(2)) / torch.where(ok, a, 1.0)), q
                ).clamp_(qmin, qmax)
                * valid
            )
            a_new, b_new = _fit_kds(w, q_new, valid, kds_bias)
            err_new = _block_sse(w, q_new, a_new, b_new, valid)
            better = err_new < err
            q = torch.where(better.unsqueeze(2), q_new, q)
            alpha = torch.where(better, a_new, alpha)
            beta = torch.where(better, b_new, beta)
            err = torch.minimum(err, err_new)
    intweight = q.view(O, nblk * block_size, kh, kw)[:, :Cg].to(torch.int8).contiguous()
    kdsb = beta.float().contiguous() if kds_bias else None
    return intweight, alpha.float().contiguous(), kdsb


def dequantize_weight(
    intweight: torch.Tensor,
    alpha: torch.Tensor,
    kdsb: Optional[torch.Tensor] = None,
    *,
    block_size: int,
) -> torch.Tensor:
    """Float weight ``alpha * q (+ KDSb)`` expanded to [O, I/g, kh, kw] (float32).

    ``block_size`` is required: the shapes alone do not determine it (40 channels in 3 blocks
    may be blocks of 14, 15, ... or 19)."""
    check_block_size(block_size)
    O, Cg, kh, kw = intweight.shape
    if alpha.shape[1] != num_blocks(Cg, block_size):
        raise ValueError(
            f"alpha has {alpha.shape[1]} blocks, but {Cg} channels in blocks of {block_size} "
            f"make {num_blocks(Cg, block_size)}"
        )
    a = alpha.float().repeat_interleave(block_size, dim=1)[:, :Cg]
    w = intweight.float() * a
    if kdsb is not None:
        w = w + kdsb.float().repeat_interleave(block_size, dim=1)[:, :Cg]
    return w


@torch.no_grad()
def bfp_quantize(
    x: torch.Tensor, block_size: int = 32, mant_bits: int = 8, groups: int = 1
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Block floating point: one power of two per (sample, channel block, pixel).

    With ``M`` the block's max |x|: ``E = floor(log2 M) - (mant_bits - 2)`` (``E = 0`` when
    ``M == 0``) and ``mantissa = clamp(round_half_even(x / 2^E), -(2^(m-1)-1), 2^(m-1)-1)``.
    A block holding NaN or Inf gets mantissas 0 and exponent ``NONFINITE_EXPONENT``.

    Args:
        x: [N, C, H, W] float activations.
        block_size: channels per block within each group.
        mant_bits: mantissa width m, 2..8.
        groups: conv groups; blocks never straddle a group boundary.

    Returns:
        mantissa [N, C, H, W] int8, exponent [N, groups * nblocks, H, W] int32.
    """
    check_bits(mant_bits, "mant_bits")
    check_block_size(block_size)
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    N, C, H, W = x.shape
    if C % groups:
        raise ValueError(f"channels ({C}) must be divisible by groups ({groups})")
    Cg = C // groups
    nblk = num_blocks(Cg, block_size)
    xd = x.detach().float().reshape(N, groups, Cg, H, W)
    xd = _pad_channels(xd, 2, block_size).reshape(N, groups, nblk, block_size, H, W)
    all_finite = bool(torch.isfinite(xd).all())
    if not all_finite:
        finite_x = torch.isfinite(xd)
        finite = finite_x.all(dim=3)
        xd = torch.where(finite_x, xd, torch.zeros_like(xd))
    amax = xd.abs().amax(dim=3)
    _, e = torch.frexp(amax)  # amax = f * 2^e with f in [0.5, 1), so floor(log2 amax) = e - 1
    expo = torch.where(amax > 0, (e - 1) - (mant_bits - 2), torch.zeros_like(e)).to(torch.int32)
    lim = 2 ** (mant_bits - 1) - 1
    # x * 2^-E in two power-of-two steps: each factor fits in float32 even for subnormal blocks
    # (E down to -155), and scaling by a power of two is exact while the result stays finite,
    # which it does (|x * 2^-E| < 2^(m-1)). So this float32 product is exact.
    half = torch.div(-expo, 2, rounding_mode="floor")
    f1 = torch.pow(2.0, half.float()).unsqueeze(3)
    f2 = torch.pow(2.0, (-expo - half).float()).unsqueeze(3)
    m = torch.round(xd * f1 * f2).clamp_(-lim, lim)
    if not all_finite:
        m = torch.where(finite.unsqueeze(3), m, torch.zeros_like(m))
        expo = torch.where(finite, expo, torch.full_like(expo, NONFINITE_EXPONENT))
    mant = m.reshape(N, groups, nblk * block_size, H, W)[:, :, :Cg].reshape(N, C, H, W)
    return mant.to(torch.int8), expo.reshape(N, groups * nblk, H, W)


def exponent_to_scale(exponent: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """``2^E`` as floats, NaN where the block was non-finite."""
    scale = torch.pow(2.0, exponent.clamp(max=1023).to(torch.float64))
    scale = torch.where(exponent == NONFINITE_EXPONENT, torch.full_like(scale, math.nan), scale)
    return scale.to(dtype)


def bfp_dequantize(
    mantissa: torch.Tensor, exponent: torch.Tensor, block_size: int, groups: int = 1
) -> torch.Tensor:
    """Float activations ``mantissa * 2^E`` [N, C, H, W] (float32; NaN in non-finite blocks)."""
    N, C, H, W = mantissa.shape
    Cg = C // groups
    nblk = exponent.shape[1] // groups
    scale = exponent_to_scale(exponent).reshape(N, groups, nblk, 1, H, W)
    scale = scale.expand(N, groups, nblk, block_size, H, W).reshape(N, groups, -1, H, W)
    return (
        (mantissa.double().reshape(N, groups, Cg, H, W) * scale[:, :, :Cg])
        .reshape(N, C, H, W)
        .float()
    )


def packed_bits(bits: int) -> int:
    """Storage width of one VQK integer in a checkpoint: 2, 4 or 8 bits."""
    check_bits(bits)
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def pack_intweight(intweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack a VQK for storage: 4 values a byte for bits=2, 2 a byte for bits 3-4, else as is.

    Values are stored offset by ``2^(width-1)`` so they are unsigned; the result is a flat uint8
    tensor (shape is kept by the caller).
    """
    width = packed_bits(bits)
    flat = intweight.reshape(-1).to(torch.int16)
    if width == 8:
        return flat.to(torch.int8).view(torch.uint8).clone()
    per_byte = 8 // width
    u = (flat + (1 << (width - 1))).to(torch.uint8)
    u = F.pad(u, (0, (-u.numel()) % per_byte)).view(-1, per_byte)
    out = torch.zeros(u.shape[0], dtype=torch.uint8, device=u.device)
    for i in range(per_byte):
        out |= u[:, i] << (i * width)
    return out


def unpack_intweight(packed: torch.Tensor, bits: int, shape) -> torch.Tensor:
    """Inverse of :func:`pack_intweight`; returns int8 of ``shape``."""
    width = packed_bits(bits)
    numel = math.prod(shape)
    if width == 8:
        return packed.view(torch.int8)[:numel].reshape(shape).clone()
    per_byte = 8 // width
    mask = (1 << width) - 1
    parts = [((packed >> (i * width)) & mask) for i in range(per_byte)]
    u = torch.stack(parts, dim=1).reshape(-1)[:numel].to(torch.int16)
    return (u - (1 << (width - 1))).to(torch.int8).reshape(shape)


class _StraightThrough(torch.autograd.Function):
    """Forward returns the quantised value, backward passes the gradient through unchanged."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, quantised: torch.Tensor) -> torch.Tensor:
        return quantised

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None


def fake_quantize_weight(
    weight: torch.Tensor, bits: int, block_size: int, kds_bias: bool = False
) -> torch.Tensor:
    """``dequantize_weight(quantize_weight(w))`` with a straight-through gradient (for QAT)."""
    q, alpha, kdsb = quantize_weight(weight, bits, block_size, kds_bias)
    wq = dequantize_weight(q, alpha, kdsb, block_size=block_size).to(weight.dtype)
    return _StraightThrough.apply(weight, wq)


def fake_quantize_bfp(
    x: torch.Tensor, block_size: int, mant_bits: int, groups: int = 1
) -> torch.Tensor:
    """``bfp_dequantize(bfp_quantize(x))`` with a straight-through gradient (for QAT)."""
    with torch.autocast(x.device.type, enabled=False):
        mant, expo = bfp_quantize(x, block_size, mant_bits, groups)
        xq = bfp_dequantize(mant, expo, block_size, groups).to(x.dtype)
    return _StraightThrough.apply(x, xq)


# ------------------------------------------------------------------ fused (Triton) fake quant
# The same numbers as fake_quantize_bfp / fake_quantize_weight (bit for bit), each one Triton
# kernel (dsconv_ext/dsconv/fake_quant_triton.py) instead of a chain of PyTorch ops with a host
# sync. DSConv2d's QAT forward takes them for CUDA tensors; DSCONV_EXT_FAKE_QUANT=torch forces
# the PyTorch primitives, =triton forces the kernels (on CPU tensors under TRITON_INTERPRET=1).

FAKE_QUANT_ENV = "DSCONV_EXT_FAKE_QUANT"
FAKE_QUANT_BACKENDS = ("auto", "torch", "triton")
FUSED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_triton_ok: Dict[Tuple[str, Optional[int]], str] = {}


def _triton_interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def _fused_status(device: torch.device) -> str:
    """'ok' when the fused kernels can run on ``device``, else why not (cached per device)."""
    key = (device.type, device.index)
    if key in _triton_ok:
        return _triton_ok[key]
    why = "ok"
    if device.type == "cuda":
        if torch.version.hip is None and torch.cuda.get_device_capability(device) < (7, 5):
            why = "Triton needs CUDA compute capability 7.5 or newer"
    elif device.type == "cpu":
        if not _triton_interpret_env():
            why = "CPU tensors need TRITON_INTERPRET=1 (set before importing triton)"
    else:
        why = f"no Triton fake quantisation for {device.type} tensors"
    if why == "ok":
        try:
            from . import fake_quant_triton
        except Exception as e:  # CPU-only torch builds ship no triton
            why = f"triton not importable ({type(e).__name__}: {e})"
        else:
            if device.type == "cpu" and not fake_quant_triton.INTERPRETED:
                why = "the kernels were decorated before TRITON_INTERPRET=1 was set"
    _triton_ok[key] = why
    return why


def fake_quant_backend(x: torch.Tensor) -> str:
    """'triton' or 'torch': which fake quantisation DSConv2d's QAT forward runs for input ``x``.

    ``DSCONV_EXT_FAKE_QUANT``: ``auto`` (default: the Triton kernels for float32 / float16 /
    bfloat16 CUDA tensors where Triton runs, else PyTorch), ``torch`` or ``triton`` (an error
    where the kernels cannot run)."""
    env = os.environ.get(FAKE_QUANT_ENV, "").strip().lower() or "auto"
    if env not in FAKE_QUANT_BACKENDS:
        raise ValueError(f"{FAKE_QUANT_ENV} must be one of {FAKE_QUANT_BACKENDS}, got {env!r}")
    if env == "torch":
        return "torch"
    if env == "auto":
        if x.is_cuda and x.dtype in FUSED_DTYPES and _fused_status(x.device) == "ok":
            return "triton"
        return "torch"
    why = _fused_status(x.device)
    if why != "ok":
        raise RuntimeError(f"{FAKE_QUANT_ENV}=triton cannot run on {x.device} tensors: {why}")
    if x.dtype not in FUSED_DTYPES:
        raise TypeError(f"{FAKE_QUANT_ENV}=triton needs float32/16 or bfloat16, got {x.dtype}")
    return "triton"


def fake_quant_report() -> dict:
    """Which fake quantisation a training DSConv2d runs per device kind (for ``info``): the
    device's entry says ``triton`` or ``torch`` and, for ``torch`` where Triton was possible,
    why not."""
    env = os.environ.get(FAKE_QUANT_ENV, "").strip().lower() or "auto"
    report = {"cpu": {"backend": "torch"}}
    if env not in FAKE_QUANT_BACKENDS:
        report["error"] = f"{FAKE_QUANT_ENV} must be one of {FAKE_QUANT_BACKENDS}, got {env!r}"
        return report
    if env == "torch":
        report["cuda"] = {"backend": "torch", "why": f"{FAKE_QUANT_ENV}=torch"}
    elif not torch.cuda.is_available():
        report["cuda"] = {"backend": "triton", "note": "expected; no CUDA device here"}
    else:
        why = _fused_status(torch.device("cuda", torch.cuda.current_device()))
        report["cuda"] = {"backend": "triton"} if why == "ok" else {"backend": "torch", "why": why}
    return report


class _FusedStraightThrough(torch.autograd.Function):
    """Forward runs a fused fake quantiser ``op(x, *args)``, backward passes the gradient through
    unchanged (the straight-through estimator of fake_quantize_bfp / fake_quantize_weight).
    Nothing is saved for backward."""

    @staticmethod
    def forward(x: torch.Tensor, op, *args) -> torch.Tensor:
        return op(x, *args)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.num_args = len(inputs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (grad,) + (None,) * (ctx.num_args - 1)


def fake_quantize_bfp_fused(
    x: torch.Tensor, block_size: int, mant_bits: int, groups: int = 1
) -> torch.Tensor:
    """:func:`fake_quantize_bfp` as one Triton kernel: bit-identical values (float32, float16 or
    bfloat16 ``x``, any memory format, kept), straight-through gradient."""
    check_bits(mant_bits, "mant_bits")
    check_block_size(block_size)
    if x.dim() != 4 or x.shape[1] % groups:
        raise ValueError(f"x must be [N, C, H, W] with C divisible by {groups}, got {x.shape}")
    from .fake_quant_triton import bfp_fake_quant

    return _FusedStraightThrough.apply(x, bfp_fake_quant, block_size, mant_bits, groups)


def fake_quantize_weight_fused(weight: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """:func:`fake_quantize_weight` without KDS bias as one Triton kernel: bit-identical values,
    straight-through gradient. A (block, tap) holding a NaN / Inf weight comes out NaN instead of
    raising (raising would need a host sync per layer and call)."""
    check_bits(bits)
    check_block_size(block_size)
    if weight.dim() != 4:
        raise ValueError(f"weight must be 4-D [O, I/g, kh, kw], got shape {tuple(weight.shape)}")
    from .fake_quant_triton import weight_fake_quant

    return _FusedStraightThrough.apply(weight, weight_fake_quant, bits, block_size)
