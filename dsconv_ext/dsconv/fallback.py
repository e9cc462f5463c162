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

from .checks import DSConvCall, check_dsconv2d_args
from .naive import blocked_activations, blocked_weights, channel_epilogue, tap_window

__all__ = ["dsconv2d_fallback"]


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
    """DSConv forward (see :func:`dsconv_ext.dsconv2d` for the arguments). Returns x's dtype."""
    call = check_dsconv2d_args(
        x, intweight, alpha, KDSb, CDSw, CDSb, bias, stride, padding, dilation, groups,
        block_size, act_bits, fuse_silu,
    )  # fmt: skip
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        return fallback_forward(call)


def fallback_forward(call: DSConvCall) -> torch.Tensor:
    """The fallback on an already validated call."""
    x = call.x
    N, O, G = x.shape[0], call.out_channels, call.groups
    Og, nblk, B = O // G, call.nblocks, call.block_size
    kh, kw = call.kernel_size
    Ho, Wo = call.output_hw
    L = Ho * Wo

    mant, scale = blocked_activations(call, torch.float32)
    # [G, nblk, Og, B, kh, kw]: blocks outermost so one matmul covers every (group, block).
    q = blocked_weights(call, torch.float32).transpose(1, 2)
    a = call.alpha.float().view(G, Og, nblk, kh, kw).transpose(1, 2)  # [G, nblk, Og, kh, kw]
    kb = call.KDSb.float().view(G, Og, nblk, kh, kw) if call.KDSb is not None else None

    acc = torch.zeros(N, G, Og, L, dtype=torch.float32, device=x.device)
    for i in range(kh):
        for j in range(kw):
            m_t = tap_window(mant, i, j, call).reshape(N, G, nblk, B, L)
            s_t = tap_window(scale, i, j, call).reshape(N, G, nblk, 1, L)
            S = torch.matmul(q[..., i, j], m_t)  # [N, G, nblk, Og, L], exact integers
            S.mul_(s_t).mul_(a[..., i, j].unsqueeze(-1))
            acc += S.sum(dim=2)
            if kb is not None:
                acc += torch.matmul(kb[..., i, j], (m_t.sum(3) * s_t.squeeze(3)))
    return channel_epilogue(acc.view(N, O, Ho, Wo), call).to(x.dtype)
