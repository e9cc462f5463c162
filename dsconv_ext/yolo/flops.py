"""FLOP accounting of dsconv_ext's layers for ``model.info()`` (ultralytics counts with thop).

thop has no rule for ``DSConv2d`` (its int8 kernel is a custom op that thop's hooks cannot see),
so without help a DSConv model reports only the FLOPs of its float layers. Ultralytics calls
``thop.profile`` without custom rules; :func:`counting_rules` swaps in a ``thop.profile`` that
adds ours for the duration of one ``get_flops`` call.

BiLevelRoutingAttention needs no rule with thop >= 2.2: its projections are ``nn.Linear`` /
``F.linear`` calls, the routing product a ``matmul`` and the routed attention
``scaled_dot_product_attention``, all of which thop counts as functional products.
``bra_macs`` is the independent formula the tests check thop's count against.
"""

from __future__ import annotations

import contextlib
import functools
import threading

__all__ = ["bra_macs", "count_dsconv2d", "counting_rules", "custom_ops", "dsconv2d_macs"]

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

    Counts the qkv projection and the local-enhancement conv on the padded map, the window
    routing product, the routed attention (q.k and p.v over ``topk`` regions) and the output
    projection on the cropped map; softmax, pooling and copies are not multiply-adds.
    Only ``kv_downsample_mode='identity'`` is covered.
    """
    if m.kv_downsample_mode != "identity":
        raise NotImplementedError("bra_macs covers kv_downsample_mode='identity' only")
    nw = m.n_win
    hp = -(-h // nw) * nw if m.auto_pad else h
    wp = -(-w // nw) * nw if m.auto_pad else w
    px, pad_px = h * w, hp * wp
    c, qk = m.dim, m.qk_dim
    p2, wq = nw * nw, (hp // nw) * (wp // nw)
    macs = pad_px * c * (2 * qk + c)  # qkv
    macs += p2 * p2 * qk  # routing logits of window means
    macs += p2 * wq * m.topk * wq * (qk + c)  # q.k and p.v: each query sees topk*wq keys
    ks = getattr(m.lepe, "kernel_size", (0, 0))
    macs += pad_px * c * ks[0] * ks[1]  # depth-wise lepe on the padded map
    if m.param_attention == "qkvo":
        macs += px * c * c  # output projection on real pixels
    return batch * macs


def custom_ops() -> dict:
    """thop ``custom_ops`` for our layers."""
    from ..modules.dsconv import DSConv2d

    return {DSConv2d: count_dsconv2d}


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
        def profile(*args, custom_ops=None, **kwargs):
            return original(*args, custom_ops={**rules, **(custom_ops or {})}, **kwargs)

        thop.profile = profile
        try:
            yield
        finally:
            thop.profile = original
