"""FLOP accounting of dsconv_ext's layers for ``model.info()`` (ultralytics counts with thop).

thop has no rule for ``DSConv2d`` (its int8 kernel is a custom op that thop's hooks cannot see),
so without help a DSConv model reports only the FLOPs of its float layers. Ultralytics calls
``thop.profile`` without custom rules; :func:`counting_rules` swaps in a ``thop.profile`` that
adds ours for the duration of one ``get_flops`` call.

BiLevelRoutingAttention gets a rule too: depending on the backend its products are child
modules, functional calls that thop >= 2.2 sees (``F.linear``, ``matmul``, SDPA), functional
calls it does not see (a 1x1 ``conv2d`` for a projection) or fused kernels, so the rule states the
cost of the algorithm (:func:`bra_macs`) instead of relying on what the implementation shows.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import torch

__all__ = [
    "bra_macs",
    "count_bra",
    "count_dsconv2d",
    "counting_rules",
    "custom_ops",
    "dsconv2d_macs",
]

_lock = threading.RLock()


def dsconv2d_macs(m, out_shape) -> int:
    """Multiply-accumulates of one DSConv2d call producing ``out_shape`` ``[N, O, Ho, Wo]``.

    Integer products ``N*O*Ho*Wo * (C/g)*kh*kw`` (thop's convention for a float conv), plus one
    multiply-add per (block, tap) and output element that scales each block's integer sum by its
    KDS ``alpha`` and activation exponent.
    """
    n, o, ho, wo = out_shape
    kh, kw = m.kernel_size if isinstance(m.kernel_size, (tuple, list)) else (m.kernel_size,) * 2
    cin_g = m.in_channels // m.groups
    nblocks = -(-cin_g // m.block_size)
    return n * o * ho * wo * kh * kw * (cin_g + nblocks)


def count_dsconv2d(m, x, y) -> None:
    """thop rule for DSConv2d."""
    m.total_ops += dsconv2d_macs(m, y.shape)


def bra_macs(m, h: int, w: int, batch: int = 1) -> int:
    """Multiply-accumulates of ``BiLevelRoutingAttention`` ``m`` on a ``[batch, dim, h, w]`` map.

    The qkv projection and the depth-wise local-enhancement conv run on the map padded to a
    multiple of ``n_win``; the routing product on window means; the routed attention (q.k and
    p.v, each query over ``topk`` regions of ``wk`` keys); the output projection on real pixels.
    The routing softmax is counted as thop counts softmax (exp, add, div per element); pooling,
    gathers and copies are not multiply-adds.
    """
    nw = m.n_win
    hp = -(-h // nw) * nw if m.auto_pad else h
    wp = -(-w // nw) * nw if m.auto_pad else w
    wh, ww = hp // nw, wp // nw
    c, qk, p2, wq = m.dim, m.qk_dim, nw * nw, wh * ww
    mode = m.kv_downsample_mode
    if mode.startswith("ada_"):
        wk = m.kv_per_win**2
    elif mode in ("maxpool", "avgpool") and m.kv_downsample_ratio > 1:
        wk = (wh // m.kv_downsample_ratio) * (ww // m.kv_downsample_ratio)
    else:
        wk = wq
    macs = hp * wp * c * (2 * qk + c)  # qkv
    macs += p2 * p2 * qk + p2 * (3 * m.topk - 1)  # routing logits + their softmax
    macs += p2 * wq * m.topk * wk * (qk + c)  # q.k and p.v
    ks = getattr(m.lepe, "kernel_size", (0, 0))
    macs += hp * wp * c * ks[0] * ks[1]  # depth-wise lepe
    if m.param_attention == "qkvo":
        macs += h * w * c * c  # output projection
    return batch * macs


def count_bra(m, x, y) -> None:
    """thop rule for BiLevelRoutingAttention: the whole module costs :func:`bra_macs`, however its
    forward is written (fused kernels, functional projections or child modules).

    thop still runs the rules of the children it calls; their share is subtracted here. Child
    totals accumulate over a profiling run, which thop starts by zeroing every total (ours too),
    so the children's count before this call is 0 on our first call of a run, else what we saw
    last time.
    """
    kids = sum(float(getattr(c, "total_ops", 0)) for c in m.modules() if c is not m)
    before = m.__dict__.get("_dsconv_ext_kids", 0.0) if m.total_ops else 0.0
    m.__dict__["_dsconv_ext_kids"] = kids
    n, _, h, w = x[0].shape
    m.total_ops += bra_macs(m, h, w, n) - (kids - before)


def custom_ops() -> dict:
    """thop ``custom_ops`` for our layers."""
    from ..dsconv.module import DSConv2d

    rules = {DSConv2d: count_dsconv2d}
    try:
        from ..bra import BiLevelRoutingAttention
    except ImportError:  # pragma: no cover
        return rules
    rules[BiLevelRoutingAttention] = count_bra
    return rules


@contextlib.contextmanager
def counting_rules():
    """Make ``thop.profile`` use our rules (merged under any the caller passes) meanwhile."""
    try:
        import thop
    except ImportError:
        yield
        return
    rules = custom_ops()
    with _lock:
        original = thop.profile

        @functools.wraps(original)
        def profile(model, inputs, *args, custom_ops=None, **kwargs):
            # ultralytics profiles on torch.empty: costs do not depend on values, but our layers'
            # quantisers would see whatever garbage (NaN, 1e38) the memory held.
            inputs = [torch.zeros_like(t) if torch.is_tensor(t) else t for t in inputs]
            return original(
                model, inputs, *args, custom_ops={**rules, **(custom_ops or {})}, **kwargs
            )

        thop.profile = profile
        try:
            yield
        finally:
            thop.profile = original
