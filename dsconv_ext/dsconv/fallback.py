"""DSConv forward in plain PyTorch, for any device: the path taken when no compiled kernel is.

Same integer semantics as ``naive.dsconv2d_reference`` but vectorised over groups and blocks and
computed in float32: each per-(block, tap) sum of ``q * mantissa`` is an integer of magnitude at
most ``block_size * 128 * 127 < 2^24`` (``block_size <= 1024``), and every partial sum on the way
is an integer of no larger magnitude, so float32 represents all of them exactly whatever the
summation order (TF32 included: its 10-bit mantissa holds the 8-bit operands exactly and it
accumulates in float32). Only the epilogue (alpha, 2^E, KDSb, CDS, bias) rounds.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..quant_primitives import bfp_quantize, exponent_to_scale, num_blocks
from .checks import check_dsconv2d_args, output_size


def dsconv2d_fallback(
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
) -> torch.Tensor:
    """DSConv forward (see ``dsconv_ext.ops.dsconv2d`` for the arguments). Returns x's dtype."""
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
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return _forward(
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
            fuse_silu,
        )


def _forward(
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
    fuse_silu,
):
    N, C, H, W = x.shape
    O, Cg, kh, kw = intweight.shape
    G, Og = groups, O // groups
    nblk = num_blocks(Cg, block_size)
    Bp = nblk * block_size
    Ho, Wo = output_size(H, W, kh, kw, stride, padding, dilation)
    L = Ho * Wo

    mant, expo = bfp_quantize(x, block_size, act_bits, groups)
    scale = exponent_to_scale(expo, torch.float32)
    pads = (padding[1], padding[1], padding[0], padding[0])
    mant = F.pad(mant.float(), pads)
    scale = F.pad(scale, pads, value=1.0)
    Hp, Wp = mant.shape[-2:]
    mant = F.pad(mant.view(N, G, Cg, Hp, Wp), (0, 0, 0, 0, 0, Bp - Cg))
    mant = mant.view(N, G, nblk, block_size, Hp, Wp)
    scale = scale.view(N, G, nblk, Hp, Wp)

    # [G, nblk, Og, B, kh, kw]: blocks outermost so one matmul covers every (group, block).
    q = F.pad(intweight.float().view(G, Og, Cg, kh, kw), (0, 0, 0, 0, 0, Bp - Cg))
    q = q.view(G, Og, nblk, block_size, kh, kw).transpose(1, 2)
    a = alpha.float().view(G, Og, nblk, kh, kw).transpose(1, 2)  # [G, nblk, Og, kh, kw]
    kb = KDSb.float().view(G, Og, nblk, kh, kw) if KDSb is not None else None

    acc = torch.zeros(N, G, Og, L, dtype=torch.float32, device=x.device)
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            rows = slice(r0, r0 + stride[0] * (Ho - 1) + 1, stride[0])
            cols = slice(c0, c0 + stride[1] * (Wo - 1) + 1, stride[1])
            m_t = mant[..., rows, cols].reshape(N, G, nblk, block_size, L)
            s_t = scale[..., rows, cols].reshape(N, G, nblk, 1, L)
            S = torch.matmul(q[..., i, j], m_t)  # [N, G, nblk, Og, L], exact integers
            S.mul_(s_t).mul_(a[..., i, j].unsqueeze(-1))
            acc += S.sum(dim=2)
            if kb is not None:
                acc += torch.matmul(kb[..., i, j], (m_t.sum(3) * s_t.squeeze(3)))
    y = acc.view(N, O, Ho, Wo)
    if CDSw is not None:
        y = y * CDSw.float().view(1, O, 1, 1)
    if CDSb is not None:
        y = y + CDSb.float().view(1, O, 1, 1)
    if bias is not None:
        y = y + bias.float().view(1, O, 1, 1)
    if fuse_silu:
        y = F.silu(y)
    return y.to(x.dtype)
