"""Bi-Level Routing Attention (BiFormer, CVPR 2023) as a YOLO11 add-on module.

``BiLevelRoutingAttention`` is a drop-in for the module of the YOLO11 BiFormer add-on: same
constructor, parameter names (``state_dict`` loads unchanged) and numbers. Only the attention core
changes with the backend:

- ``reference``: the original gather-everything algorithm (:mod:`dsconv_ext.bra.naive`).
- ``torch``: region copies + ``scaled_dot_product_attention`` (:mod:`dsconv_ext.bra.torch_impl`).
- ``triton``: fused gather-attention kernels (:mod:`dsconv_ext.bra.triton_kernels`).

``backend='auto'`` picks ``triton`` for CUDA tensors when Triton works there, else ``torch``; the
``DSCONV_EXT_BRA_BACKEND`` environment variable forces one when the constructor says ``auto``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .backend import resolve_backend, routed_attention
from .naive import bra_forward_naive, kv_gather_naive
from .torch_impl import linear_cl

__all__ = ["BiLevelRoutingAttention", "KVGather", "QKVLinear", "TopkRouting"]

_KV_MODES = ("ada_avgpool", "ada_maxpool", "maxpool", "avgpool", "identity")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _traced() -> bool:
    """Whether a tracing exporter records this call (``torch.jit.trace``, which OpenVINO's
    PyTorch frontend and ultralytics' TorchScript export use, or the TorchScript ONNX exporter).

    Those graphs must hold plain ops, each projection one ``F.linear``. The CPU path's
    :func:`linear_cl` (a channels-last 1x1 convolution, then a ``reshape`` to the sizes of its
    input) broke OpenVINO: its graph transformations (``apply_moc_transformations``, also
    run by the CPU plugin on dynamic shapes) give the window-padded map cropped back to the input
    size (``out[:, :h_in, :w_in]``) the symbolic sizes of the padded map, so the ``reshape``
    after the output projection asked for the padded size (``[1, 14, 14, C]`` from 64 pixels at
    8 x 8) and shape inference failed. ``F.linear`` needs no reshape there.
    """
    return torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


class TopkRouting(nn.Module):
    """Region-to-region routing: top-k of window-mean affinities.

    Args:
        qk_dim (int): query/key channels.
        topk (int): regions routed to each window.
        qk_scale (float | None): logit scale, ``qk_dim ** -0.5`` when None.
        param_routing (bool): a learnable linear on the window means before the affinity.
        diff_routing (bool): let gradients flow into the window means.
    """

    def __init__(self, qk_dim, topk=4, qk_scale=None, param_routing=False, diff_routing=False):
        super().__init__()
        self.topk = topk
        self.qk_dim = qk_dim
        self.scale = qk_scale or qk_dim**-0.5
        self.diff_routing = diff_routing
        self.emb = nn.Linear(qk_dim, qk_dim) if param_routing else nn.Identity()
        self.routing_act = nn.Softmax(dim=-1)

    def forward(self, query: Tensor, key: Tensor) -> Tuple[Tensor, Tensor]:
        """``[N, P, C]`` window means -> weights and indices ``[N, P, topk]``."""
        if not self.diff_routing:
            query, key = query.detach(), key.detach()
        logit = (self.emb(query) * self.scale) @ self.emb(key).transpose(-2, -1)  # [N, P, P]
        topk_logit, topk_index = torch.topk(logit, k=self.topk, dim=-1)
        return self.routing_act(topk_logit), topk_index


class KVGather(nn.Module):
    """Gather the routed key/value regions (the reference, expanded-index gather).

    Args:
        mul_weight (str): 'none', 'soft' (scale by the routing weight) or 'hard' (not implemented
            in the original either: raises at call time).
    """

    def __init__(self, mul_weight="none"):
        super().__init__()
        if mul_weight not in ("none", "soft", "hard"):
            raise ValueError(f"mul_weight must be 'none', 'soft' or 'hard', got {mul_weight!r}")
        self.mul_weight = mul_weight

    def forward(self, r_idx: Tensor, r_weight: Tensor, kv: Tensor) -> Tensor:
        """``kv [N, P, Wk, C]`` -> ``[N, P, topk, Wk, C]``."""
        if self.mul_weight == "hard":
            raise NotImplementedError("differentiable hard routing is not implemented")
        return kv_gather_naive(kv, r_idx, r_weight if self.mul_weight == "soft" else None)


class QKVLinear(nn.Module):
    """One linear producing ``q [.., qk_dim]`` and ``kv [.., qk_dim + dim]``."""

    def __init__(self, dim, qk_dim, bias=True):
        super().__init__()
        self.dim = dim
        self.qk_dim = qk_dim
        self.qkv = nn.Linear(dim, qk_dim + qk_dim + dim, bias=bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        return self.qkv(x).split([self.qk_dim, self.qk_dim + self.dim], dim=-1)


class _ZeroLepe(nn.Module):
    """``side_dwconv=0``: no local enhancement (a module, not a lambda, so the model pickles)."""

    def forward(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


class BiLevelRoutingAttention(nn.Module):
    """Bi-Level Routing Attention: each window attends to its ``topk`` most related regions.

    The ``[N, C, H, W]`` map is zero-padded to a multiple of ``n_win`` and cut into
    ``n_win x n_win`` windows. Window means route each window to ``topk`` regions; every pixel
    then attends to the pixels of those regions (optionally pooled, ``kv_downsample_mode``). A
    depth-wise conv of the values (``side_dwconv``) is added before the output projection.

    Args:
        dim (int): channels C (in and out).
        n_win (int): windows per side.
        num_heads (int): attention heads; must divide ``dim`` and ``qk_dim``.
        qk_dim (int | None): query/key channels, ``dim`` when None.
        qk_scale (float | None): softmax scale, ``qk_dim ** -0.5`` when None.
        kv_per_win (int): pooled side of each key/value region for 'ada_*pool' modes.
        kv_downsample_ratio (int): pooling stride for 'maxpool' / 'avgpool'.
        kv_downsample_kernel: unused (kept for the original signature).
        kv_downsample_mode (str): 'identity', 'ada_avgpool', 'ada_maxpool', 'maxpool', 'avgpool'.
        topk (int): routed regions per window, at most ``n_win**2``.
        param_attention (str): 'qkvo' (output linear) or 'qkv' (none).
        param_routing (bool): learnable routing embedding (needs ``diff_routing``).
        diff_routing (bool): differentiable routing (only usable with ``soft_routing``).
        soft_routing (bool): scale keys and values by the routing weights.
        side_dwconv (int): kernel of the local-enhancement depth-wise conv, 0 for none.
        auto_pad (bool): pad to a multiple of ``n_win`` (else the size must divide).
        backend (str): 'auto', 'reference', 'torch' or 'triton' (keyword only).
    """

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
        *,
        backend="auto",
    ):
        super().__init__()
        self.dim = dim
        self.n_win = n_win
        self.num_heads = num_heads
        self.qk_dim = qk_dim or dim
        if self.qk_dim % num_heads or dim % num_heads:
            raise ValueError(
                f"num_heads={num_heads} must divide dim={dim} and qk_dim={self.qk_dim}"
            )
        if not 1 <= topk <= n_win * n_win:
            raise ValueError(f"topk={topk} must be in [1, n_win**2={n_win * n_win}]")
        if param_routing and not diff_routing:
            raise ValueError("param_routing=True needs diff_routing=True")
        self.scale = qk_scale or self.qk_dim**-0.5

        self.lepe = (
            nn.Conv2d(dim, dim, side_dwconv, 1, side_dwconv // 2, groups=dim)
            if side_dwconv > 0
            else _ZeroLepe()
        )
        self.topk = topk
        self.param_routing = param_routing
        self.diff_routing = diff_routing
        self.soft_routing = soft_routing
        self.router = TopkRouting(
            qk_dim=self.qk_dim,
            qk_scale=self.scale,
            topk=self.topk,
            diff_routing=self.diff_routing,
            param_routing=self.param_routing,
        )
        mul_weight = "soft" if soft_routing else "hard" if diff_routing else "none"
        self.kv_gather = KVGather(mul_weight=mul_weight)

        self.param_attention = param_attention
        if param_attention not in ("qkvo", "qkv"):
            raise ValueError(f"param_attention must be 'qkvo' or 'qkv', got {param_attention!r}")
        self.qkv = QKVLinear(self.dim, self.qk_dim)
        self.wo = nn.Linear(dim, dim) if param_attention == "qkvo" else nn.Identity()

        self.kv_downsample_mode = kv_downsample_mode
        self.kv_per_win = kv_per_win
        self.kv_downsample_ratio = kv_downsample_ratio
        self.kv_downsample_kernel = kv_downsample_kernel
        if kv_downsample_mode in ("fracpool", "conv"):
            raise NotImplementedError(
                f"kv_downsample_mode={kv_downsample_mode!r} is not implemented"
            )
        if kv_downsample_mode not in _KV_MODES:
            raise ValueError(
                f"kv_downsample_mode must be one of {_KV_MODES}, got {kv_downsample_mode!r}"
            )
        if kv_downsample_mode.startswith("ada_"):
            if kv_per_win is None:
                raise ValueError(f"kv_downsample_mode={kv_downsample_mode!r} needs kv_per_win")
            pool = (
                nn.AdaptiveAvgPool2d
                if kv_downsample_mode == "ada_avgpool"
                else nn.AdaptiveMaxPool2d
            )
            self.kv_down = pool(kv_per_win)
        elif kv_downsample_mode in ("maxpool", "avgpool"):
            if kv_downsample_ratio is None:
                raise ValueError(
                    f"kv_downsample_mode={kv_downsample_mode!r} needs kv_downsample_ratio"
                )
            pool = nn.MaxPool2d if kv_downsample_mode == "maxpool" else nn.AvgPool2d
            self.kv_down = pool(kv_downsample_ratio) if kv_downsample_ratio > 1 else nn.Identity()
        else:
            self.kv_down = nn.Identity()

        self.attn_act = nn.Softmax(dim=-1)
        self.auto_pad = auto_pad
        resolve_backend(backend)  # validate the name early
        self.backend = backend

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_win={self.n_win}, num_heads={self.num_heads}, topk={self.topk}, "
            f"kv_downsample_mode={self.kv_downsample_mode!r}, backend={self.backend!r}"
        )

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be a 4-D [N, C, H, W] tensor, got {shape}")
        if x.shape[1] != self.dim:
            raise ValueError(f"x must have dim={self.dim} channels (x.shape[1]), got {x.shape[1]}")
        if x.dtype not in _DTYPES:
            raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")
        h, w = x.shape[2:]
        nw = self.n_win
        if not self.auto_pad and (h % nw or w % nw):
            raise ValueError(
                f"with auto_pad=False, H={h} and W={w} must be multiples of n_win={nw}"
            )
        if self.kv_downsample_mode in ("maxpool", "avgpool") and self.kv_downsample_ratio > 1:
            wh, ww = -(-h // nw), -(-w // nw)
            if min(wh, ww) < self.kv_downsample_ratio:
                raise ValueError(
                    f"windows of {wh}x{ww} pixels (H={h}, W={w}, n_win={nw}) are smaller than "
                    f"kv_downsample_ratio={self.kv_downsample_ratio}"
                )

    def forward(self, x: Tensor, ret_attn_mask: bool = False):
        """``[N, C, H, W]`` -> ``[N, C, H, W]``.

        With ``ret_attn_mask=True`` returns, like the original, ``(out [N, H, W, C],
        r_weight [N, P, topk], r_idx [N, P, topk], attn [N*P, heads, Wq, topk*Wk])`` computed by
        the reference backend (the fast backends never build ``attn``).
        """
        self._check_input(x)
        if self.kv_gather.mul_weight == "hard":
            raise NotImplementedError(
                "diff_routing=True without soft_routing ('hard' routing) is not implemented"
            )
        traced = _traced()
        # Tracing exporters record the torch backend's ops (a Triton launch has no graph form).
        backend = "torch" if traced and self.backend != "reference" else None
        backend = backend or resolve_backend(self.backend, x)
        if ret_attn_mask or backend == "reference":
            return bra_forward_naive(self, x, ret_attn_mask)
        if backend == "torch" and x.device.type == "cpu" and not traced and self._split_batch(x):
            # Inference on large CPU maps: one image at a time keeps the temporaries cache- and
            # allocator-friendly (fresh multi-MB buffers are page-faulted in on every call);
            # small maps go whole, where per-op overheads dominate instead.
            out = torch.cat([self._forward_fast(xi, backend) for xi in x.split(1)])
            return out.permute(0, 3, 1, 2)
        return self._forward_fast(x, backend, traced).permute(0, 3, 1, 2)

    def _split_batch(self, x: Tensor) -> bool:
        if x.shape[0] < 2 or (
            torch.is_grad_enabled()
            and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        ):
            return False
        nw = self.n_win
        pixels = -(-x.shape[2] // nw) * -(-x.shape[3] // nw) * nw * nw
        return pixels * (2 * self.qk_dim + self.dim) * x.element_size() >= 16 << 20

    def _forward_fast(self, x: Tensor, backend: str, traced: bool = False) -> Tensor:
        """The fast path; returns NHWC ``[N, H, W, C]`` (contiguous).

        ``traced``: the graph of a tracing exporter (ONNX, OpenVINO) is recorded. Then the
        projections are plain ``F.linear`` (see :func:`_traced`) and the pad / crop to whole
        windows is always in the graph (amounts computed from the traced sizes, zero when the
        size divides), so that a model exported with dynamic sizes pads at every size. Eager
        calls are unchanged.
        """
        n, c, h_in, w_in = x.shape
        nw, qk = self.n_win, self.qk_dim
        linear = F.linear if traced else linear_cl
        pad_r = (nw - w_in % nw) % nw if self.auto_pad else 0
        pad_b = (nw - h_in % nw) % nw if self.auto_pad else 0
        padded = (self.auto_pad and traced) or bool(pad_r or pad_b)
        if padded:
            x = F.pad(x, (0, pad_r, 0, pad_b))
        h, w = x.shape[2:]
        wh, ww = h // nw, w // nw
        p2, wq = nw * nw, wh * ww

        # NCHW -> window-grouped pixels [N, P, Wq, C] in one copy; the projection then yields
        # window-grouped q / k / v with channels last, the layout of the attention core.
        xw = x.reshape(n, c, nw, wh, nw, ww).permute(0, 2, 4, 3, 5, 1).reshape(n, p2, wq, c)
        # q and kv as two dense tensors (two products on row slices of the one weight): the CPU
        # gathers then copy whole contiguous rows, which stays fast when the cores are shared.
        wt, bias = self.qkv.qkv.weight, self.qkv.qkv.bias
        q = linear(xw, wt[:qk], None if bias is None else bias[:qk])
        kv = linear(xw, wt[qk:], None if bias is None else bias[qk:])
        r_weight, r_idx = self.router(q.mean(2), kv[..., :qk].mean(2))
        if not isinstance(self.kv_down, nn.Identity):
            ckv = kv.shape[-1]
            kv_pix = self.kv_down(kv.reshape(n * p2, wh, ww, ckv).permute(0, 3, 1, 2))
            kv_pix = kv_pix.permute(0, 2, 3, 1).reshape(n, p2, -1, ckv)
        else:
            kv_pix = kv

        # Values back to pixels, channels last, for the depth-wise conv (runs channels-last).
        v_img = kv[..., qk:].reshape(n, nw, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
        v_img = v_img.reshape(n, h, w, c).permute(0, 3, 1, 2)
        lepe = None if isinstance(self.lepe, _ZeroLepe) else self.lepe(v_img)

        out = routed_attention(
            q,
            kv_pix,
            r_idx,
            r_weight if self.soft_routing else None,
            self.scale,
            self.num_heads,
            backend=backend,
        )
        # One pass back to pixels that also adds the local enhancement (NHWC result).
        out = out.view(n, nw, nw, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
        if lepe is not None:
            # The pixel-ordered operand first: the sum then comes out pixel-ordered (NHWC).
            out = lepe.permute(0, 2, 3, 1).reshape(n, nw, wh, nw, ww, c) + out
        out = out.reshape(n, h, w, c)
        if padded:
            out = out[:, :h_in, :w_in]
        if isinstance(self.wo, nn.Linear):
            return linear(out, self.wo.weight, self.wo.bias)
        return out.contiguous()

    def backend_for(self, x: Optional[Tensor] = None) -> str:
        """The backend that a call on ``x`` (or on a CPU tensor) would run."""
        return resolve_backend(self.backend, x)
