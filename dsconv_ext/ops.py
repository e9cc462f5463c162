"""Python entry points of the compiled DSConv op, the fake kernels of the library's ops, and the
dispatch to them.

``dsconv2d`` validates its arguments (clear Python errors), then runs
``torch.ops.dsconv_ext.dsconv2d`` when a compiled kernel exists for the tensors' device, and the
PyTorch fallback otherwise. Choose with ``DSCONV_EXT_DSCONV_BACKEND=auto|kernel|fallback``.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

from ._loader import load_library
from .dsconv.checks import check_dsconv2d_args, output_size
from .dsconv.fallback import dsconv2d_fallback

__all__ = ["dsconv2d", "dsconv2d_backend", "dsconv_backend_report"]

BACKENDS = ("auto", "kernel", "fallback")
_OP = "dsconv_ext::dsconv2d"
_OUT_OP = "dsconv_ext::dsconv2d_out"
_DFL_OP = "dsconv_ext::dfl_expectation"
_fake_registered = False
_warned: set = set()


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake(_OP)
    def _(
        x,
        intweight,
        alpha,
        KDSb,
        CDSw,
        CDSb,
        bias,
        stride,
        padding,
        dilation,
        groups,
        block_size,
        act_bits,
        fuse_silu,
    ):
        torch._check(x.dim() == 4, lambda: "x must be 4-D")
        torch._check(intweight.dtype == torch.int8, lambda: "intweight must be int8")
        N, _, H, W = x.shape
        O, _, kh, kw = intweight.shape
        Ho, Wo = output_size(H, W, kh, kw, stride, padding, dilation)
        return x.new_empty((N, O, Ho, Wo))

    @torch.library.register_fake(_OUT_OP)
    def _(*args):  # writes its last argument, returns nothing
        return None

    if hasattr(torch.ops.dsconv_ext, "dfl_expectation"):  # (libraries built before it lack it)

        @torch.library.register_fake(_DFL_OP)
        def _(x, weight):  # dsconv_ext/yolo/fast_dfl.py
            torch._check(x.dim() == 3, lambda: "x must be 3-D")
            return x.new_empty((x.shape[0], 4, x.shape[2]))

    _fake_registered = True


@functools.cache
def _kernel_for(device_type: str) -> Tuple[bool, str]:
    """Whether a compiled kernel serves this device type, and if not, why (memoised: the answer
    cannot change once the library is loaded, and the dispatcher query costs ~10 us a call)."""
    status = load_library()
    if not status.loaded:
        return False, status.reason
    _register_fake()
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if key is None:
        return False, f"no kernel is written for device type '{device_type}'"
    if not torch._C._dispatch_has_kernel_for_dispatch_key(_OP, key):
        why = (
            "the library was built without CUDA (nvcc missing or DSCONV_EXT_CUDA=0)"
            if key == "CUDA"
            else "the library has no CPU kernel"
        )
        return False, why
    return True, ""


def _requested_backend() -> str:
    b = os.environ.get("DSCONV_EXT_DSCONV_BACKEND", "auto").lower()
    if b not in BACKENDS:
        raise ValueError(f"DSCONV_EXT_DSCONV_BACKEND must be one of {BACKENDS}, got {b!r}")
    return b


def dsconv2d_backend(device: torch.device | str = "cpu") -> str:
    """'kernel' or 'fallback': what ``dsconv2d`` runs for tensors on ``device``."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    requested = _requested_backend()
    if requested == "fallback":
        return "fallback"
    ok, why = _kernel_for(device_type)
    if ok:
        return "kernel"
    if requested == "kernel":
        raise RuntimeError(
            f"DSCONV_EXT_DSCONV_BACKEND=kernel but no kernel for {device_type}: {why}"
        )
    if device_type not in _warned:
        _warned.add(device_type)
        warnings.warn(
            f"dsconv_ext: no compiled DSConv kernel for {device_type} ({why}); running "
            "the slower PyTorch fallback",
            RuntimeWarning,
            stacklevel=3,
        )
    return "fallback"


def dsconv2d(
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
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """DSConv forward with integer accumulation.

    Args:
        x: [N, C, H, W] float32 / float16 / bfloat16 activations (quantised to block floating
            point with ``act_bits`` mantissa bits inside).
        intweight: [O, C/groups, kh, kw] int8 VQK.
        alpha: [O, nblocks, kh, kw] KDS scale, ``nblocks = ceil((C/groups) / block_size)``.
        KDSb: optional KDS bias, shape of ``alpha``.
        CDSw, CDSb, bias: optional [O] channel scale, channel shift and bias.
        stride, padding, dilation: int or pair. groups: conv groups.
        fuse_silu: apply SiLU to the output (a fused Conv+BN+SiLU).
        out: optional [N, O, Ho, Wo] tensor of x's dtype and device, not overlapping x, to write
            the result into (e.g. a channel slice of a concatenation buffer). On CPU with float32
            and each image's [O, Ho, Wo] dense, the kernel stores into it directly; otherwise the
            result is computed and copied in.

    Returns:
        [N, O, Ho, Wo] in x's dtype (``out`` when given). A NaN or Inf activation makes every
        output that reads its block NaN.
    """
    stride, padding, dilation = check_dsconv2d_args(
        x,
        intweight,
        alpha,
        KDSb,
        CDSw,
        CDSb,
        bias,
        stride,
        padding,
        dilation,
        groups,
        block_size,
        act_bits,
    )
    if out is not None:
        _check_out(out, x, intweight, stride, padding, dilation)
    if dsconv2d_backend(x.device) == "fallback":
        y = dsconv2d_fallback(
            x,
            intweight,
            alpha,
            KDSb,
            CDSw,
            CDSb,
            bias,
            stride,
            padding,
            dilation,
            groups,
            block_size,
            act_bits,
            fuse_silu,
        )
        return y if out is None else out.copy_(y)
    native = x.dtype == torch.float32 or x.is_cuda  # the CUDA kernel takes fp16 / bf16 too
    xk = x if native else x.float()
    params = (
        intweight,
        alpha.float(),
        *(None if t is None else t.float() for t in (KDSb, CDSw, CDSb, bias)),
        list(stride),
        list(padding),
        list(dilation),
        groups,
        block_size,
        act_bits,
        fuse_silu,
    )
    if out is not None and x.is_cpu and x.dtype == torch.float32 and per_image_dense(out):
        torch.ops.dsconv_ext.dsconv2d_out(x, *params, out)
        return out
    y = torch.ops.dsconv_ext.dsconv2d(xk, *params)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if out is None else out.copy_(y)


def _check_out(out, x, intweight, stride, padding, dilation) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"dsconv2d: out must be a torch.Tensor, got {type(out).__name__}")
    if out.device != x.device:
        raise ValueError(f"dsconv2d: out must be on x's device {x.device}, got {out.device}")
    if out.dtype != x.dtype:
        raise TypeError(f"dsconv2d: out must have x's dtype {x.dtype}, got {out.dtype}")
    N, _, H, W = x.shape
    O, _, kh, kw = intweight.shape
    shape = (N, O, *output_size(H, W, kh, kw, stride, padding, dilation))
    if tuple(out.shape) != shape:
        raise ValueError(f"dsconv2d: out must have shape {list(shape)}, got {list(out.shape)}")
    if _spans_overlap(out, x):
        raise ValueError("dsconv2d: out must not overlap x")


def _spans_overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory spans of two non-empty tensors intersect (conservative)."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        last = sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
        return t.data_ptr(), t.data_ptr() + t.element_size() * (1 + last)

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def per_image_dense(out: torch.Tensor) -> bool:
    """Whether each image's [O, Ho, Wo] of a 4-D ``out`` is dense (any image stride): the
    layouts the CPU kernel stores into directly."""
    N, O, Ho, Wo = out.shape
    return (
        (Wo == 1 or out.stride(3) == 1)
        and (Ho == 1 or out.stride(2) == Wo)
        and (O == 1 or out.stride(1) == Ho * Wo)
        and (N == 1 or out.stride(0) >= O * Ho * Wo)
    )


def dsconv_backend_report() -> Dict[str, Dict[str, str]]:
    """Per device type: which backend runs dsconv2d and why (for ``python -m dsconv_ext info``)."""
    status = load_library()
    report: Dict[str, Dict[str, str]] = {}
    for dev in ("cpu", "cuda"):
        ok, why = _kernel_for(dev)
        entry = {"backend": "kernel" if ok else "fallback", "why": why}
        if ok and dev == "cpu" and hasattr(torch.ops.dsconv_ext, "cpu_isa"):
            entry["isa"] = torch.ops.dsconv_ext.cpu_isa()
        if ok and dev == "cuda" and hasattr(torch.ops.dsconv_ext, "cuda_archs"):
            entry["archs"] = torch.ops.dsconv_ext.cuda_archs()
        if ok:
            entry["library"] = f"{status.how}: {status.path}"
        if dev == "cuda" and not torch.cuda.is_available():
            entry["note"] = "no CUDA device on this machine"
        if _requested_backend() == "fallback":
            entry["backend"], entry["why"] = "fallback", "DSCONV_EXT_DSCONV_BACKEND=fallback"
        report[dev] = entry
    return report
