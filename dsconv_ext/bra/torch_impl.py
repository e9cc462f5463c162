"""Routed attention on CPU (and on GPUs without Triton) without the reference's full gather.

Eager fp32 CPU inference runs a fused C++ kernel (``cpu_attention.cpp``, AVX-512, compiled on
first use): per window and head it reads the routed regions in place and keeps logits in L2.
Everything else (autograd, other dtypes and devices, tracing/export, no AVX-512 or no compiler)
takes the PyTorch path below.

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

import glob
import logging
import os
import sys
import threading
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = [
    "cpu_kernel_status",
    "eager_cpu_inference",
    "linear_cl",
    "routed_attention_torch",
    "scratch",
    "to_windows",
]

CPU_KERNEL_ENV = "DSCONV_EXT_BRA_CPU_KERNEL"
_CPU_NAME = "dsconv_ext_bra_cpu"
_CPU_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cpu_attention.cpp")
_cpu_kernel: Optional[object] = None  # None: not tried yet; False: unavailable; else the op
_cpu_why = "not built yet (compiled on the first CPU inference call)"
_cpu_lock = threading.Lock()


def eager_cpu_inference(x: torch.Tensor, grad: bool) -> bool:
    """True for plain eager CPU inference, where the buffer reuse and the fused C++ kernel apply.

    Never while tracing, scripting, exporting (ONNX, torch.export) or compiling: tracers would
    bake the reused buffers in as constants and cannot see into the C++ kernel.
    """
    return not (
        grad
        or x.device.type != "cpu"
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


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


def scratch(name: str, numel: int, like: torch.Tensor) -> torch.Tensor:
    """A flat per-thread buffer ``name`` of at least ``numel`` elements, reused across calls.

    Only for CPU inference temporaries that never leave the caller (no autograd, never
    returned): a fresh multi-MB tensor is page-faulted in on every call (the allocator hands big
    blocks back to the OS), which cost ~15% of the BRA layer here.
    """
    pool = _WS.__dict__.setdefault("pool", {})
    buf = pool.get(name)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = pool[name] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return buf[:numel]


def to_windows(x: torch.Tensor, n_win: int, hp: int, wp: int, out: torch.Tensor) -> torch.Tensor:
    """Zero-pad ``x [N, C, H, W]`` to ``hp x wp`` and group it by window in one copy.

    Returns ``out`` viewed as ``[N, n_win**2, wh*ww, C]`` (window ``j*n_win + i``, row-major
    pixels, channels last), ``out`` being a flat buffer of ``N*hp*wp*C`` elements.
    """
    n, c, h, w = x.shape
    nw, wh, ww = n_win, hp // n_win, wp // n_win
    o = out.view(n, nw, nw, wh, ww, c)
    if h != hp or w != wp:
        o.zero_()
    jf, rh = divmod(h, wh)
    if_, rw = divmod(w, ww)
    # The valid pixels are at most four boxes: full windows, and the partial last window row /
    # column / corner.
    for j0, nj, hh in ((0, jf, wh), (jf, 1, rh)):
        for i0, ni, wc in ((0, if_, ww), (if_, 1, rw)):
            if nj and ni and hh and wc:
                src = x[:, :, j0 * wh : j0 * wh + nj * hh, i0 * ww : i0 * ww + ni * wc]
                src = src.reshape(n, c, nj, hh, ni, wc).permute(0, 2, 4, 3, 5, 1)
                o[:, j0 : j0 + nj, i0 : i0 + ni, :hh, :wc].copy_(src)
    return o.view(n, nw * nw, wh * ww, c)


def _kernel_disabled() -> bool:
    return os.environ.get(CPU_KERNEL_ENV, "1").strip().lower() in ("0", "false", "off", "no")


def cpu_kernel_status() -> str:
    """'loaded', or why the fused C++ inference kernel is not in use."""
    if _kernel_disabled():
        return f"disabled by {CPU_KERNEL_ENV}=0"
    if _cpu_kernel is None and _cached_build():
        return "built (loaded on the first CPU inference call)"
    return "loaded" if _cpu_kernel else _cpu_why


def _cpp_extension():
    # The build is CPU-only: torch's guess at CUDA_HOME (logged on import) would only mislead.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    import torch.utils.cpp_extension as cpp_extension

    return cpp_extension


def _cached_build() -> bool:
    get_default_build_root = _cpp_extension().get_default_build_root
    pattern = os.path.join(get_default_build_root(), "*", _CPU_NAME, _CPU_NAME + ".so")
    return bool(glob.glob(pattern))


def _load_cpu_kernel():
    """The fused AVX-512 inference kernel (``cpu_attention.cpp``), compiled on first use."""
    global _cpu_kernel, _cpu_why
    if _cpu_kernel is not None:
        return _cpu_kernel or None
    with _cpu_lock:
        if _cpu_kernel is not None:
            return _cpu_kernel or None
        _cpu_kernel = False
        if not os.path.isfile(_CPU_SRC):
            _cpu_why = f"source missing from the installed package ({_CPU_SRC})"
            return None
        if torch.backends.cpu.get_cpu_capability() != "AVX512":
            _cpu_why = "needs an AVX-512 CPU"
            return None
        try:
            if not hasattr(torch.ops.dsconv_ext_bra_cpu, "attn_fwd"):
                load = _cpp_extension().load
                if not _cached_build():
                    print(
                        "dsconv_ext: compiling the fused BiLevelRoutingAttention CPU kernel on "
                        "first use (under a minute, cached afterwards)",
                        file=sys.stderr,
                        flush=True,
                    )
                load(
                    name=_CPU_NAME,
                    sources=[_CPU_SRC],
                    extra_cflags=["-O3", "-mavx512f", "-mfma"],
                    is_python_module=False,
                    verbose=False,
                )
            _cpu_kernel = torch.ops.dsconv_ext_bra_cpu.attn_fwd
            _cpu_why = "loaded"
        except Exception as e:  # no compiler, no headers...: keep working on SDPA
            _cpu_why = f"build failed ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
            warnings.warn(
                f"dsconv_ext: {_cpu_why}; BRA uses scaled_dot_product_attention", stacklevel=3
            )
        return _cpu_kernel or None


def _attend(q, kv, flat_idx, w, scale, h, reuse):
    """SDPA of ``q [G, Wq, Ck]`` over the ``[G*K]`` regions ``flat_idx`` of ``kv [R, Wk, Ckv]``."""
    g, wq, ck = q.shape
    wk, ckv = kv.shape[1], kv.shape[2]
    cv = ckv - ck
    topk = flat_idx.numel() // g
    # One contiguous copy per routed region. Selecting along dim 1 of a [1, R, Wk*Ckv] view
    # takes index_select's plain memcpy loop; its dim-0 path iterates in parallel chunks and
    # ran 3-100x slower whenever the cores were shared.
    rows = kv.view(1, kv.shape[0], -1)
    if reuse:
        sel = scratch("gather", flat_idx.numel() * wk * ckv, kv)
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
    fused: Optional[bool] = None,
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
        fused: eager fp32 CPU inference runs the fused C++ kernel (``cpu_attention.cpp``)
            when it builds (None: if available and ``DSCONV_EXT_BRA_CPU_KERNEL`` is not 0;
            True: required; False: never).

    Returns:
        ``[B, P, Wq, H*Dv]``.
    """
    b, p, wq, ck = q.shape
    wk, ckv = kv.shape[2], kv.shape[3]
    topk = r_idx.shape[-1]
    grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, kv, r_weight)
    )
    reuse = eager_cpu_inference(q, grad)
    fusable = reuse and q.dtype == kv.dtype == torch.float32 and ckv - ck <= 128 * num_heads
    if fusable and (fused or (fused is None and not _kernel_disabled())):
        kernel = _load_cpu_kernel()
        if kernel is None and fused:
            raise RuntimeError(f"fused CPU kernel unavailable: {_cpu_why}")
        if kernel is not None:
            return kernel(q, kv, r_idx, r_weight, scale, num_heads)
    base = torch.arange(0, b * p, p, device=r_idx.device).view(b, 1, 1)
    flat_idx = (r_idx + base).reshape(b * p, topk)
    w = None if r_weight is None else r_weight.reshape(b * p, topk)
    q, kv = q.reshape(b * p, wq, ck), kv.reshape(b * p, wk, ckv).contiguous()
    per_window = topk * wk * ckv * kv.element_size()
    g = max(1, min(b * p, chunk_bytes // max(per_window, 1)))
    if not reuse:
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
            reuse,
        )
        for i in range(0, b * p, g)
    ]
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.view(b, p, wq, ckv - ck)
