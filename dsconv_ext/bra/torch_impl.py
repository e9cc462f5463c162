"""Routed attention in plain PyTorch without the reference's full-size gather.

Each query window needs ``topk`` whole key/value regions. Instead of broadcasting ``kv`` over
the windows and gathering with an element-wise index (an int64 index as large as the data), the
routed regions are copied as contiguous blocks with ``index_select`` and handed to
``scaled_dot_product_attention``, whose CPU and CUDA kernels run an online softmax over key
blocks and never hold the whole attention matrix.

:func:`linear_cl` runs fp32 CPU projections through oneDNN (as a channels-last 1x1
convolution): on the AMD CPUs we measured, MKL's sgemm (behind ``F.linear``) reached a third of
oneDNN's speed.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["linear_cl", "routed_attention_torch"]

CHUNK_BYTES = 64 << 20


_ONEDNN = torch.backends.mkldnn.is_available()  # read once: torch.compile cannot trace the query


def _onednn_ok(x: torch.Tensor) -> bool:
    return _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32


def linear_cl(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear`` over the last dim; fp32 CPU tensors go through oneDNN's 1x1 convolution.

    Args:
        x: ``[..., K]``.
        weight: ``[N, K]``.
        bias: ``[N]`` or None.

    Returns:
        ``[..., N]`` (contiguous).
    """
    if not _onednn_ok(x) or x.numel() == 0:
        return F.linear(x, weight, bias)
    lead, k = x.shape[:-1], x.shape[-1]
    rows = x.reshape(-1, k)
    # [1, K, M, 1] with channels-last strides: the rows are the pixels of a 1-wide image, so the
    # convolution reads and writes the row-major matrices directly.
    img = rows.contiguous().view(1, -1, 1, k).permute(0, 3, 1, 2)
    out = F.conv2d(img, weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(*lead, weight.shape[0])


_WS = threading.local()


def _workspace(numel: int, like: torch.Tensor) -> torch.Tensor:
    """A per-thread scratch buffer reused across calls (no autograd): fresh multi-MB buffers
    are page-faulted in on every call, which is slow, and very slow when the cores are shared."""
    buf = getattr(_WS, "buf", None)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        # A normal tensor even when made under torch.inference_mode (ultralytics' predict): an
        # inference tensor cannot be written outside it, and a later call under no_grad would
        # fail on `out=`.
        with torch.inference_mode(False):
            buf = torch.empty(
                max(numel, CHUNK_BYTES // like.element_size()), dtype=like.dtype, device=like.device
            )
        _WS.buf = buf
    return buf[:numel]


def _attend(q, kv, flat_idx, w, scale, h, scratch):
    """SDPA of ``q [G, Wq, Ck]`` over the ``[G*K]`` regions ``flat_idx`` of ``kv [R, Wk, Ckv]``."""
    g, wq, ck = q.shape
    wk, ckv = kv.shape[1], kv.shape[2]
    cv = ckv - ck
    topk = flat_idx.numel() // g
    # One contiguous copy per routed region. Selecting along dim 1 of a [1, R, Wk*Ckv] view
    # takes index_select's plain memcpy loop; its dim-0 path iterates in parallel chunks and
    # ran 3-100x slower whenever the cores were shared.
    rows = kv.view(1, kv.shape[0], -1)
    if scratch:
        sel = _workspace(flat_idx.numel() * wk * ckv, kv)
        torch.index_select(rows, 1, flat_idx, out=sel.view(1, -1, wk * ckv))
    else:
        sel = rows.index_select(1, flat_idx)
    sel = sel.view(-1, wk, ckv)
    if w is not None:
        sel = sel * w.reshape(-1, 1, 1).to(sel.dtype)
    sel = sel.view(g, topk * wk, ckv)
    qh = q.unflatten(-1, (h, ck // h)).transpose(1, 2)
    kh = sel[..., :ck].unflatten(-1, (h, ck // h)).transpose(1, 2)
    vh = sel[..., ck:].unflatten(-1, (h, cv // h)).transpose(1, 2)
    if ck != cv:
        # The fused SDPA kernels need equal head sizes: zero-pad q/k (logits unchanged) or v
        # (padding dropped from the output).
        d = max(ck, cv) // h
        qh, kh = F.pad(qh, (0, d - ck // h)), F.pad(kh, (0, d - ck // h))
        vh = F.pad(vh, (0, d - cv // h))
    out = F.scaled_dot_product_attention(qh, kh, vh, scale=scale)  # [G, H, Wq, D]
    return out[..., : cv // h].transpose(1, 2).reshape(g, wq, cv)


def routed_attention_torch(
    q: torch.Tensor,
    kv: torch.Tensor,
    r_idx: torch.Tensor,
    r_weight: Optional[torch.Tensor],
    scale: float,
    num_heads: int,
    chunk_bytes: int = CHUNK_BYTES,
) -> torch.Tensor:
    """Attention of every query window over its routed key/value regions.

    Args:
        q: ``[B, P, Wq, H*Dk]`` queries grouped by window.
        kv: ``[B, P, Wk, H*Dk + H*Dv]`` keys then values, grouped by region.
        r_idx: ``[B, P, K]`` routed region indices.
        r_weight: ``[B, P, K]`` soft-routing weights scaling keys and values, or None.
        scale: softmax scale.
        num_heads: ``H``.
        chunk_bytes: on CPU without autograd, windows are processed in groups whose selected
            regions take about this much memory, copied into a scratch buffer kept per thread
            (a fresh multi-MB buffer is page-faulted in on every call). Few large groups: each
            op is a parallel region, and with the cores shared every region waits for the
            slowest thread (16 MB groups ran 3x slower than 64 MB ones on a busy 2-core box).

    Returns:
        ``[B, P, Wq, H*Dv]``.
    """
    b, p, wq, ck = q.shape
    wk, ckv = kv.shape[2], kv.shape[3]
    topk = r_idx.shape[-1]
    base = torch.arange(0, b * p, p, device=r_idx.device).view(b, 1, 1)
    flat_idx = (r_idx + base).reshape(b * p, topk)
    w = None if r_weight is None else r_weight.reshape(b * p, topk)
    q, kv = q.reshape(b * p, wq, ck), kv.reshape(b * p, wk, ckv).contiguous()
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, kv, w))
    per_window = topk * wk * ckv * kv.element_size()
    g = max(1, min(b * p, chunk_bytes // max(per_window, 1)))
    # Tracing exporters (ONNX, jit.trace) would bake the reused buffer in as a 64 MB constant.
    scratch = not (
        grad
        or q.device.type != "cpu"
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
    )
    if not scratch:
        # Autograd would keep every chunk's copy anyway (and sum a full-size gradient per
        # chunk); GPUs have a caching allocator and prefer one big launch.
        g = b * p
    outs = [
        _attend(
            q[i : i + g],
            kv,
            flat_idx[i : i + g].reshape(-1),
            None if w is None else w[i : i + g],
            scale,
            num_heads,
            scratch,
        )
        for i in range(0, b * p, g)
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(b, p, wq, ckv - ck)
