"""``torch.autograd.Function`` around the fused Triton routed-attention kernels."""

from __future__ import annotations

from typing import Optional

import torch

from .triton_kernels import bra_attention_bwd, bra_attention_fwd

__all__ = ["RoutedAttentionTriton", "routed_attention_triton"]


def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    # The kernels take any strides over [B, P, W] but need contiguous channels.
    return t if t.stride(-1) == 1 else t.contiguous()


class RoutedAttentionTriton(torch.autograd.Function):
    """Fused gather-attention: forward saves only its inputs, the output and the log-sum-exp."""

    @staticmethod
    def forward(ctx, q, kv, r_idx, r_weight, scale, num_heads):
        q, kv = _channels_contiguous(q), _channels_contiguous(kv)
        r_idx = r_idx.to(torch.int32).contiguous()
        if r_weight is not None:
            r_weight = r_weight.contiguous()
        out, lse = bra_attention_fwd(q, kv, r_idx, r_weight, scale, num_heads)
        ctx.save_for_backward(q, kv, r_idx, r_weight, out, lse)
        ctx.scale, ctx.num_heads = scale, num_heads
        return out

    @staticmethod
    def backward(ctx, do):
        q, kv, r_idx, r_weight, out, lse = ctx.saved_tensors
        need_dw = r_weight is not None and ctx.needs_input_grad[3]
        do = _channels_contiguous(do)
        dq, dkv, dw = bra_attention_bwd(
            do, q, kv, r_idx, r_weight, out, lse, ctx.scale, ctx.num_heads, need_dw
        )
        return dq, dkv, None, dw.to(r_weight.dtype) if need_dw else None, None, None


def routed_attention_triton(
    q: torch.Tensor,
    kv: torch.Tensor,
    r_idx: torch.Tensor,
    r_weight: Optional[torch.Tensor],
    scale: float,
    num_heads: int,
) -> torch.Tensor:
    """Routed attention on the fused Triton kernels (forward and backward).

    Args:
        q: ``[B, P, Wq, H*Dk]`` fp16 / bf16 / fp32 queries grouped by window.
        kv: ``[B, P, Wk, H*Dk + H*Dv]`` keys then values grouped by region, q's dtype.
        r_idx: ``[B, P, K]`` routed region indices.
        r_weight: ``[B, P, K]`` soft-routing weights, or None.
        scale: softmax scale.
        num_heads: ``H``.

    Returns:
        ``[B, P, Wq, H*Dv]`` in q's dtype.
    """
    if q.dtype != kv.dtype:
        raise TypeError(f"q and kv must share a dtype, got {q.dtype} and {kv.dtype}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"triton backend needs float16, bfloat16 or float32, got {q.dtype}")
    return RoutedAttentionTriton.apply(q, kv, r_idx, r_weight, float(scale), int(num_heads))
