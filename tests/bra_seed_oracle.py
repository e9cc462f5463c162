"""An independent oracle of the YOLO11 BiFormer add-on's BiLevelRoutingAttention.

Written for the tests from the original module's description (not copied): the same parameter
names, so its ``state_dict`` is what a checkpoint of the original holds, and the same steps
(pad, window split, qkv, optional kv pooling, window-mean routing, gather, softmax attention,
depth-wise "lepe" conv on the values, output linear, crop). The gather is a plain Python loop over
windows, unlike the package's expanded-index reference, so the two check each other.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


class _Holder(nn.Module):
    """A bare container so that parameter names come out as in the original (``qkv.qkv.*``)."""


class SeedOracleBRA(nn.Module):
    def __init__(
        self,
        dim,
        n_win=7,
        num_heads=8,
        qk_dim=None,
        qk_scale=None,
        kv_per_win=4,
        kv_downsample_ratio=4,
        kv_downsample_kernel=None,
        kv_downsample_mode="identity",
        topk=4,
        param_attention="qkvo",
        param_routing=False,
        diff_routing=False,
        soft_routing=False,
        side_dwconv=3,
        auto_pad=True,
    ):
        super().__init__()
        self.dim, self.n_win, self.heads, self.topk = dim, n_win, num_heads, topk
        self.qk = qk_dim or dim
        self.scale = qk_scale or self.qk**-0.5
        self.soft, self.diff, self.auto_pad = soft_routing, diff_routing, auto_pad
        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, padding=side_dwconv // 2, groups=dim)
            if side_dwconv > 0
            else None
        )
        self.router = _Holder()
        self.router.emb = nn.Linear(self.qk, self.qk) if param_routing else nn.Identity()
        self.qkv = _Holder()
        self.qkv.qkv = nn.Linear(dim, 2 * self.qk + dim)
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()
        pools = {
            "ada_avgpool": lambda: nn.AdaptiveAvgPool2d(kv_per_win),
            "ada_maxpool": lambda: nn.AdaptiveMaxPool2d(kv_per_win),
            "maxpool": lambda: nn.MaxPool2d(kv_downsample_ratio),
            "avgpool": lambda: nn.AvgPool2d(kv_downsample_ratio),
        }
        pooled = kv_downsample_mode in pools and (
            kv_downsample_mode.startswith("ada_") or kv_downsample_ratio > 1
        )
        self.kv_down = pools[kv_downsample_mode]() if pooled else nn.Identity()

    def forward(self, x, ret_attn_mask=False):
        nw, qk, c = self.n_win, self.qk, self.dim
        x = rearrange(x, "n c h w -> n h w c")
        h0, w0 = x.shape[1:3]
        if self.auto_pad:
            x = F.pad(x, (0, 0, 0, (-w0) % nw, 0, (-h0) % nw))
        n, hp, wp, _ = x.shape
        wh, ww = hp // nw, wp // nw
        win = rearrange(x, "n (j h) (i w) c -> n (j i) h w c", j=nw, i=nw)
        qkv = self.qkv.qkv(win)
        q, k_full, v_full = qkv[..., :qk], qkv[..., qk : 2 * qk], qkv[..., 2 * qk :]
        kv = self.kv_down(rearrange(qkv[..., qk:], "n p h w c -> (n p) c h w"))
        kv = rearrange(kv, "(n p) c h w -> n p (h w) c", n=n)

        qw, kw = q.mean([2, 3]), k_full.mean([2, 3])
        if not self.diff:
            qw, kw = qw.detach(), kw.detach()
        logits = (self.router.emb(qw) * self.scale) @ self.router.emb(kw).transpose(1, 2)
        top_logit, r_idx = logits.topk(self.topk, dim=-1)
        r_weight = top_logit.softmax(-1)

        q = rearrange(q, "n p h w (m d) -> n p m (h w) d", m=self.heads)
        outs, attns = [], []
        for b in range(n):
            for p in range(nw * nw):
                sel = kv[b, r_idx[b, p]]  # [topk, Wk, C]
                if self.soft:
                    sel = sel * r_weight[b, p].view(-1, 1, 1)
                sel = sel.reshape(-1, sel.shape[-1])
                k = rearrange(sel[:, :qk], "l (m d) -> m l d", m=self.heads)
                v = rearrange(sel[:, qk:], "l (m d) -> m l d", m=self.heads)
                a = torch.einsum("mqd,mkd->mqk", q[b, p] * self.scale, k).softmax(-1)
                outs.append(torch.einsum("mqk,mkd->qmd", a, v).reshape(wh * ww, c))
                attns.append(a)
        out = torch.stack(outs).view(n, nw, nw, wh, ww, c)
        out = rearrange(out, "n j i h w c -> n (j h) (i w) c")
        if self.lepe is not None:
            v_img = rearrange(v_full, "n (j i) h w c -> n c (j h) (i w)", j=nw, i=nw)
            out = out + rearrange(self.lepe(v_img), "n c h w -> n h w c")
        out = self.wo(out)[:, :h0, :w0]
        if ret_attn_mask:
            return out, r_weight, r_idx, torch.stack(attns)
        return rearrange(out, "n h w c -> n c h w")
