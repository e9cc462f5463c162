"""Python entry points of the compiled DSConv ops, their fake kernels, and the dispatch to them.

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

from .._loader import load_library
from .checks import check_dsconv2d_args, check_out, output_size, plane_dense
from .fallback import fallback_forward

__all__ = ["dsconv2d", "dsconv2d_backend", "dsconv_backend_report", "kernel_for"]

BACKENDS = ("auto", "kernel", "fallback")
_OP = "dsconv_ext::dsconv2d"
_OUT_OP = "dsconv_ext::dsconv2d_out"
_fake_registered = False
_warned: set = set()


def _register_fake() -> None:
    global _fake_registered
    if _fake_registered:
        return

    @torch.library.register_fake(_OP)
    def _(x, intweight, *params):  # params: the schema's arguments after intweight
        torch._check(x.dim() == 4, lambda: "x must be 4-D")
        torch._check(intweight.dtype == torch.int8, lambda: "intweight must be int8")
        stride, padding, dilation = params[5:8]
        Ho, Wo = output_size(*x.shape[2:], *intweight.shape[2:], stride, padding, dilation)
        return x.new_empty((x.shape[0], intweight.shape[0], Ho, Wo))

    @torch.library.register_fake(_OUT_OP)
    def _(*args):  # writes its last argument, returns nothing
        return None

    _fake_registered = True


@functools.cache
def kernel_for(device_type: str) -> Tuple[bool, str]:
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
    ok, why = kernel_for(device_type)
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
            and each [Ho, Wo] plane dense, planes apart in (image, channel) order (a channel
            slice; one level of a [N, O, anchors] buffer viewed as [N, O, Ho, Wo]), the kernel
            stores into it directly; otherwise the result is computed and copied in.

    Returns:
        [N, O, Ho, Wo] in x's dtype (``out`` when given). A NaN or Inf activation makes every
        output that reads its block NaN.
    """
    call = check_dsconv2d_args(
        x, intweight, alpha, KDSb, CDSw, CDSb, bias, stride, padding, dilation, groups,
        block_size, act_bits, fuse_silu,
    )  # fmt: skip
    if out is not None:
        check_out(out, call)
    if dsconv2d_backend(x.device) == "fallback":
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            y = fallback_forward(call)
        return y if out is None else out.copy_(y)
    args = call.op_args(float_params=True)
    if out is not None and x.is_cpu and x.dtype == torch.float32 and plane_dense(out):
        torch.ops.dsconv_ext.dsconv2d_out(*args, out)
        return out
    if not (x.dtype == torch.float32 or x.is_cuda):  # the CUDA kernel takes fp16 / bf16 too
        args[0] = x.float()
    y = torch.ops.dsconv_ext.dsconv2d(*args)
    y = y if y.dtype == x.dtype else y.to(x.dtype)
    return y if out is None else out.copy_(y)


def _cpu_allocator_state() -> str:
    """What the first CPU call does (did) to glibc's malloc: csrc/cpu/c_allocator.cpp."""
    if not hasattr(torch.ops.dsconv_ext, "cpu_allocator_state"):
        return "left alone (library without the settle)"
    return torch.ops.dsconv_ext.cpu_allocator_state()


def dsconv_backend_report() -> Dict[str, Dict[str, str]]:
    """Per device type: which backend runs dsconv2d and why (for ``python -m dsconv_ext info``)."""
    status = load_library()
    report: Dict[str, Dict[str, str]] = {}
    for dev in ("cpu", "cuda"):
        ok, why = kernel_for(dev)
        entry = {"backend": "kernel" if ok else "fallback", "why": why}
        if ok and dev == "cpu" and hasattr(torch.ops.dsconv_ext, "cpu_isa"):
            try:
                entry["isa"] = torch.ops.dsconv_ext.cpu_isa()
            except RuntimeError as e:  # DSCONV_EXT_CPU_ISA forces a path this machine lacks
                entry["isa"] = f"unavailable: {str(e).splitlines()[0]}"
                report[dev] = entry
                continue
            if hasattr(torch.ops.dsconv_ext, "cpu_amx_layers"):
                amx_layers = torch.ops.dsconv_ext.cpu_amx_layers()
                if amx_layers:
                    entry["amx_layers"] = amx_layers
            if hasattr(torch.ops.dsconv_ext, "cpu_avx2_layouts"):
                avx2_layouts = torch.ops.dsconv_ext.cpu_avx2_layouts()
                if avx2_layouts:
                    entry["avx2_layouts"] = avx2_layouts
            entry["allocator"] = _cpu_allocator_state()
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
