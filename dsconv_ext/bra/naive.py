"""Reference Bi-Level Routing Attention in plain PyTorch.

This is the algorithm of the BiFormer code that the YOLO11 add-on ships, kept on purpose as it is:
the routed key/value regions are gathered through an index expanded to the full
``[B, P, topk, Wk, C]`` size (``topk`` copies of every region) and the whole attention matrix is
built. It is the test oracle and the benchmark baseline; the fast backends must agree with it.

Layout used by every backend of the attention core: pixels grouped by window,
``[B, P, W, C]`` with ``P = n_win**2`` windows of ``W`` pixels and channels last, heads being
contiguous channel groups (head ``m`` owns channels ``m*D:(m+1)*D``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["bra_forward_naive", "kv_gather_naive", "routed_attention_naive"]


def kv_gather_naive(
    kv: torch.Tensor, r_idx: torch.Tensor, r_weight: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Select the routed regions of ``kv`` for every query window.

    Args:
        kv: ``[B, P, Wk, C]`` region-grouped keys and/or values.
        r_idx: ``[B, P, K]`` indices of the ``K`` regions routed to each query window.
        r_weight: optional ``[B, P, K]`` routing weights that scale the selected regions.

    Returns:
        ``[B, P, K, Wk, C]``: ``out[b, p, t] = kv[b, r_idx[b, p, t]] * r_weight[b, p, t]``.
    """
    b, p, wk, c = kv.shape
    k = r_idx.shape[-1]
    # The seed's gather: broadcast kv over the query windows and gather with a full-size index.
    sel = torch.gather(
        kv.view(b, 1, p, wk, c).expand(-1, p, -1, -1, -1),
        dim=2,
        index=r_idx.view(b, p, k, 1, 1).expand(-1, -1, -1, wk, c),
    )
    if r_weight is not None:
        sel = r_weight.view(b, p, k, 1, 1) * sel
    return sel


def _dense_attention(q, k_sel, v_sel, scale, num_heads):
    """Dense softmax attention of ``q [B, P, Wq, H*Dk]`` over ``[B, P, K, Wk, H*D]`` selections."""
    b, p, wq, ck = q.shape
    kw = k_sel.shape[2] * k_sel.shape[3]
    cv = v_sel.shape[-1]
    h = num_heads
    qh = q.reshape(b * p, wq, h, ck // h).transpose(1, 2)
    kh = k_sel.reshape(b * p, kw, h, ck // h).permute(0, 2, 3, 1)
    vh = v_sel.reshape(b * p, kw, h, cv // h).transpose(1, 2)
    attn = torch.softmax((qh * scale) @ kh, dim=-1)  # [B*P, H, Wq, K*Wk]
    out = (attn @ vh).transpose(1, 2).reshape(b, p, wq, cv)
    return out, attn


def routed_attention_naive(
    q: torch.Tensor,
    kv: torch.Tensor,
    r_idx: torch.Tensor,
    r_weight: Optional[torch.Tensor],
    scale: float,
    num_heads: int,
    return_attn: bool = False,
):
    """Attention of every query window over the key/value regions routed to it.

    Args:
        q: ``[B, P, Wq, H*Dk]`` queries grouped by window.
        kv: ``[B, P, Wk, H*Dk + H*Dv]`` keys then values, grouped by region.
        r_idx: ``[B, P, K]`` routed region indices (int64).
        r_weight: ``[B, P, K]`` routing weights scaling keys and values (soft routing) or None.
        scale: softmax scale applied to ``q @ k^T``.
        num_heads: ``H``.
        return_attn: also return the ``[B*P, H, Wq, K*Wk]`` attention matrix.

    Returns:
        ``[B, P, Wq, H*Dv]`` (and the attention matrix when asked).
    """
    ck = q.shape[-1]
    kv_sel = kv_gather_naive(kv, r_idx, r_weight)
    out, attn = _dense_attention(q, kv_sel[..., :ck], kv_sel[..., ck:], scale, num_heads)
    return (out, attn) if return_attn else out


def bra_forward_naive(mod, x: torch.Tensor, ret_attn_mask: bool = False):
    """The seed's ``BiLevelRoutingAttention.forward``, step for step, on ``mod``'s parameters.

    Args:
        mod: a :class:`dsconv_ext.bra.BiLevelRoutingAttention`.
        x: ``[N, C, H, W]`` input.
        ret_attn_mask: return ``(out [N, H, W, C], r_weight, r_idx, attn)`` like the seed.

    Returns:
        ``[N, C, H, W]`` (a channels-last-strided view, as the seed returns).
    """
    x = x.permute(0, 2, 3, 1)  # NHWC
    n, h_in, w_in, c = x.shape
    nw = mod.n_win
    pad_r = pad_b = 0
    if mod.auto_pad:
        # Padded pixels are zeros *before* the projection, so they carry the qkv bias and take
        # part in the window means, the keys and the values: a quirk kept for equal numbers.
        pad_r = (nw - w_in % nw) % nw
        pad_b = (nw - h_in % nw) % nw
        x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    h, w = x.shape[1:3]
    wh, ww = h // nw, w // nw
    p2 = nw * nw
    qk = mod.qk_dim

    # Windows: [N, P, wh, ww, C] with P ordered (row j, column i).
    x = x.reshape(n, nw, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(n, p2, wh, ww, c)
    q, kv = mod.qkv(x)
    q_pix = q.reshape(n, p2, wh * ww, qk)
    ckv = kv.shape[-1]
    kv_pix = mod.kv_down(kv.reshape(n * p2, wh, ww, ckv).permute(0, 3, 1, 2))
    kv_pix = kv_pix.permute(0, 2, 3, 1).reshape(n, p2, -1, ckv)
    q_win, k_win = q.mean([2, 3]), kv[..., :qk].mean([2, 3])

    v_img = kv[..., qk:].reshape(n, nw, nw, wh, ww, c).permute(0, 5, 1, 3, 2, 4)
    lepe = mod.lepe(v_img.reshape(n, c, h, w).contiguous()).permute(0, 2, 3, 1)

    r_weight, r_idx = mod.router(q_win, k_win)
    kv_sel = mod.kv_gather(r_idx=r_idx, r_weight=r_weight, kv=kv_pix)
    k_sel, v_sel = kv_sel.split([qk, mod.dim], dim=-1)
    out, attn = _dense_attention(q_pix, k_sel, v_sel, mod.scale, mod.num_heads)

    out = out.reshape(n, nw, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(n, h, w, c)
    out = mod.wo(out + lepe)
    if pad_r > 0 or pad_b > 0:
        out = out[:, :h_in, :w_in, :].contiguous()
    if ret_attn_mask:
        return out, r_weight, r_idx, attn
    return out.permute(0, 3, 1, 2)
