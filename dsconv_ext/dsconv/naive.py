"""The reference DSConv forward: the integer semantics written out once, in float64.

``y[n,o,p] = CDSw[o] * ( sum_b sum_t alpha[o,b,t] * 2^E[n,b,p+t] * S[n,o,b,t,p]
                         + sum_b sum_t KDSb[o,b,t] * 2^E[n,b,p+t] * M[n,b,t,p] )
             + CDSb[o] + bias[o]``

with ``S = sum_{c in b} q[o,c,t] * mantissa[n,c,p+t]`` (an exact integer) and ``M`` the plain sum
of the block's mantissas (the KDS bias multiplies every activation of the block). Zero padding has
mantissa 0. Every integer here is below 2^53, so float64 holds the sums exactly; this is slow and
meant for tests and for reading.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .checks import DSConvCall, check_dsconv2d_args
from .quant_primitives import bfp_quantize, exponent_to_scale

__all__ = [
    "blocked_activations",
    "blocked_weights",
    "channel_epilogue",
    "dsconv2d_reference",
    "tap_window",
]


def blocked_activations(call: DSConvCall, dtype: torch.dtype):
    """The call's input in block floating point, zero-padded and cut into channel blocks:
    mantissas [N, G, nblk, B, Hp, Wp] and scales 2^E [N, G, nblk, Hp, Wp] in ``dtype``. A padded
    pixel or channel is mantissa 0 (a padded pixel's block has E = 0); NaN scales mark blocks
    holding NaN or Inf."""
    x, G, B = call.x, call.groups, call.block_size
    N, Cg, nblk = x.shape[0], call.channels_per_group, call.nblocks
    mant, expo = bfp_quantize(x.float(), B, call.act_bits, G)
    ph, pw = call.padding
    mant = F.pad(mant.to(dtype), (pw, pw, ph, ph))
    scale = F.pad(exponent_to_scale(expo, dtype), (pw, pw, ph, ph), value=1.0)
    Hp, Wp = mant.shape[-2:]
    mant = F.pad(mant.view(N, G, Cg, Hp, Wp), (0, 0, 0, 0, 0, nblk * B - Cg))
    return mant.view(N, G, nblk, B, Hp, Wp), scale.view(N, G, nblk, Hp, Wp)


def blocked_weights(call: DSConvCall, dtype: torch.dtype) -> torch.Tensor:
    """The VQK cut into the same blocks, zero-padded: [G, Og, nblk, B, kh, kw] in ``dtype``."""
    G, B, nblk, Cg = call.groups, call.block_size, call.nblocks, call.channels_per_group
    O, kh, kw = call.out_channels, *call.kernel_size
    q = F.pad(call.intweight.to(dtype).view(G, O // G, Cg, kh, kw), (0, 0, 0, 0, 0, nblk * B - Cg))
    return q.view(G, O // G, nblk, B, kh, kw)


def tap_window(t: torch.Tensor, i: int, j: int, call: DSConvCall) -> torch.Tensor:
    """The [..., Ho, Wo] slice of a zero-padded map that kernel tap (i, j) reads."""
    (sh, sw), _, (dh, dw) = call.conv_params()
    Ho, Wo = call.output_hw
    r0, c0 = i * dh, j * dw
    return t[..., r0 : r0 + sh * (Ho - 1) + 1 : sh, c0 : c0 + sw * (Wo - 1) + 1 : sw]


def channel_epilogue(acc: torch.Tensor, call: DSConvCall) -> torch.Tensor:
    """``CDSw * acc + CDSb + bias`` (each optional), then SiLU if fused, in acc's dtype."""
    shape = (1, -1, 1, 1)
    for t, add in ((call.CDSw, False), (call.CDSb, True), (call.bias, True)):
        if t is not None:
            t = t.to(acc.dtype).view(shape)
            acc = acc + t if add else acc * t
    return F.silu(acc) if call.fuse_silu else acc


def dsconv2d_reference(
    x: torch.Tensor,
    intweight: torch.Tensor,
    alpha: torch.Tensor,
    KDSb: Optional[torch.Tensor] = None,
    CDSw: Optional[torch.Tensor] = None,
    CDSb: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    groups: int = 1,
    block_size: int = 32,
    act_bits: int = 8,
    fuse_silu: bool = False,
    return_int_sums: bool = False,
):
    """DSConv forward by the definition.

    Args:
        x: [N, C, H, W] float activations.
        intweight: [O, C/groups, kh, kw] int8 VQK.
        alpha: [O, nblocks, kh, kw] KDS scales. KDSb: same shape, optional.
        CDSw, CDSb, bias: [O] optional.
        fuse_silu: apply SiLU to the output.
        return_int_sums: also return S as int64 [N, O, nblocks, kh*kw, Ho, Wo] (tests).

    Returns:
        y [N, O, Ho, Wo] in x's dtype (and S if asked).
    """
    call = check_dsconv2d_args(
        x, intweight, alpha, KDSb, CDSw, CDSb, bias, stride, padding, dilation, groups,
        block_size, act_bits, fuse_silu,
    )  # fmt: skip
    N, O = x.shape[0], call.out_channels
    G, Og = groups, O // groups
    kh, kw = call.kernel_size
    nblk = call.nblocks
    Ho, Wo = call.output_hw
    mant, scale = blocked_activations(call, torch.float64)  # [N, G, nblk, B, Hp, Wp], [.., Hp, Wp]
    q = blocked_weights(call, torch.float64)  # [G, Og, nblk, B, kh, kw]
    a = alpha.double().view(G, Og, nblk, kh, kw)
    kb = KDSb.double().view(G, Og, nblk, kh, kw) if KDSb is not None else None

    acc = torch.zeros(N, G, Og, Ho, Wo, dtype=torch.float64, device=x.device)
    sums = []
    for i in range(kh):
        for j in range(kw):
            m_t = tap_window(mant, i, j, call)  # [N, G, nblk, B, Ho, Wo]
            s_t = tap_window(scale, i, j, call)  # [N, G, nblk, Ho, Wo]
            S = torch.einsum("gobc,ngbchw->ngobhw", q[..., i, j], m_t)
            if return_int_sums:
                sums.append(S.reshape(N, O, nblk, Ho, Wo))
            acc += torch.einsum("ngobhw,gob,ngbhw->ngohw", S, a[..., i, j], s_t)
            if kb is not None:
                acc += torch.einsum("gob,ngbhw->ngohw", kb[..., i, j], m_t.sum(3) * s_t)
    y = channel_epilogue(acc.reshape(N, O, Ho, Wo), call).to(x.dtype)
    if return_int_sums:
        return y, torch.stack(sums, dim=3).round().to(torch.int64)
    return y
