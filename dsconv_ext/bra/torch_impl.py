"""Routed attention in plain PyTorch without the reference's full-size gather.

Each query window needs ``topk`` whole key/value regions. Instead of broadcasting ``kv`` over
the windows and gathering with an element-wise index, the routed regions are copied as
contiguous blocks with ``index_select`` (one copy of each selected region, no index tensor of
the data's size) and handed to ``scaled_dot_product_attention``, whose CPU and CUDA kernels run
an online softmax over key blocks and never hold the whole attention matrix.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["routed_attention_torch"]


def _select_regions(x: torch.Tensor, flat_idx: torch.Tensor, k: int) -> torch.Tensor:
    """``x [B, P, Wk, C]`` -> ``[B*P, K*Wk, C]`` with the routed regions of each window."""
    b, p, wk, c = x.shape
    if x.stride(-1) != 1 or x.stride(2) != c or x.stride(1) != wk * c:
        # A channel slice of a wider tensor: select whole rows of the parent, slice afterwards.
        x = x.contiguous()
    sel = x.reshape(b * p, wk * c).index_select(0, flat_idx)
    return sel.view(b * p, k * wk, c)


def routed_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    r_idx: torch.Tensor,
    r_weight: Optional[torch.Tensor],
    scale: float,
    num_heads: int,
) -> torch.Tensor:
    """Attention of every query window over its routed key/value regions.

    Args:
        q: ``[B, P, Wq, H*Dk]`` queries grouped by window.
        k: ``[B, P, Wk, H*Dk]`` keys grouped by region.
        v: ``[B, P, Wk, H*Dv]`` values grouped by region.
        r_idx: ``[B, P, K]`` routed region indices.
        r_weight: ``[B, P, K]`` soft-routing weights scaling keys and values, or None.
        scale: softmax scale.
        num_heads: ``H``.

    Returns:
        ``[B, P, Wq, H*Dv]``.
    """
    b, p, wq, ck = q.shape
    wk, cv = k.shape[2], v.shape[-1]
    topk = r_idx.shape[-1]
    h = num_heads
    base = torch.arange(b, device=r_idx.device).mul_(p).view(b, 1, 1)
    flat_idx = (r_idx + base).reshape(-1)
    k_sel = _select_regions(k, flat_idx, topk)
    v_sel = _select_regions(v, flat_idx, topk)
    if r_weight is not None:
        w = r_weight.reshape(b * p, topk, 1, 1).to(k_sel.dtype)
        k_sel = (k_sel.view(b * p, topk, wk, ck) * w).view(b * p, topk * wk, ck)
        v_sel = (v_sel.view(b * p, topk, wk, cv) * w).view(b * p, topk * wk, cv)
    qh = q.reshape(b * p, wq, h, ck // h).transpose(1, 2)
    kh = k_sel.view(b * p, topk * wk, h, ck // h).transpose(1, 2)
    vh = v_sel.view(b * p, topk * wk, h, cv // h).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)  # [B*P, H, Wq, Dv]
    return out.transpose(1, 2).reshape(b, p, wq, cv)
