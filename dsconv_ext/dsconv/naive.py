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

from ..quant_primitives import bfp_quantize, exponent_to_scale, num_blocks
from .checks import check_dsconv2d_args, output_size


def _taps(t: torch.Tensor, i: int, j: int, Ho: int, Wo: int, stride, dilation) -> torch.Tensor:
    """The [.., Ho, Wo] slice of a padded map that kernel tap (i, j) reads."""
    r0, c0 = i * dilation[0], j * dilation[1]
    return t[
        ...,
        r0 : r0 + stride[0] * (Ho - 1) + 1 : stride[0],
        c0 : c0 + stride[1] * (Wo - 1) + 1 : stride[1],
    ]


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
    stride, padding, dilation = check_dsconv2d_args(
        x,
        intweight,
        alpha,
        KDSb,
        CDSw,
        CDSb,
        bias,
        stride,
        padding,
        dilation,
        groups,
        block_size,
        act_bits,
    )
    N, C, H, W = x.shape
    O, Cg, kh, kw = intweight.shape
    G, Og = groups, O // groups
    nblk = num_blocks(Cg, block_size)
    Bp = nblk * block_size
    Ho, Wo = output_size(H, W, kh, kw, stride, padding, dilation)

    mant, expo = bfp_quantize(x.float(), block_size, act_bits, groups)
    scale = exponent_to_scale(expo)  # [N, G*nblk, H, W] float64
    pads = (padding[1], padding[1], padding[0], padding[0])
    mant = F.pad(mant.double(), pads)
    scale = F.pad(scale, pads, value=1.0)  # a padded pixel is a zero block: E = 0

    mant = mant.view(N, G, Cg, *mant.shape[-2:])
    mant = F.pad(mant, (0, 0, 0, 0, 0, Bp - Cg)).view(N, G, nblk, block_size, *mant.shape[-2:])
    scale = scale.view(N, G, nblk, *scale.shape[-2:])
    q = F.pad(intweight.double().view(G, Og, Cg, kh, kw), (0, 0, 0, 0, 0, Bp - Cg))
    q = q.view(G, Og, nblk, block_size, kh, kw)
    a = alpha.double().view(G, Og, nblk, kh, kw)
    kb = KDSb.double().view(G, Og, nblk, kh, kw) if KDSb is not None else None

    acc = torch.zeros(N, G, Og, Ho, Wo, dtype=torch.float64, device=x.device)
    sums = []
    for i in range(kh):
        for j in range(kw):
            m_t = _taps(mant, i, j, Ho, Wo, stride, dilation)  # [N, G, nblk, B, Ho, Wo]
            s_t = _taps(scale, i, j, Ho, Wo, stride, dilation)  # [N, G, nblk, Ho, Wo]
            S = torch.einsum("gobc,ngbchw->ngobhw", q[..., i, j], m_t)
            if return_int_sums:
                sums.append(S.reshape(N, O, nblk, Ho, Wo))
            acc += torch.einsum("ngobhw,gob,ngbhw->ngohw", S, a[..., i, j], s_t)
            if kb is not None:
                acc += torch.einsum("gob,ngbhw->ngohw", kb[..., i, j], m_t.sum(3) * s_t)
    y = acc.reshape(N, O, Ho, Wo)
    if CDSw is not None:
        y = y * CDSw.double().view(1, O, 1, 1)
    if CDSb is not None:
        y = y + CDSb.double().view(1, O, 1, 1)
    if bias is not None:
        y = y + bias.double().view(1, O, 1, 1)
    if fuse_silu:
        y = F.silu(y)
    y = y.to(x.dtype)
    if return_int_sums:
        return y, torch.stack(sums, dim=3).round().to(torch.int64)
    return y
