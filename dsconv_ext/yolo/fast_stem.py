"""A faster float stem for converted YOLO models on CPU.

``quantize`` keeps the image stem in float (see :func:`dsconv_ext.yolo.convert.eligible`): the
first conv reads the 3 RGB channels, so it has no integer dot product to speed up. oneDNN is slow
on it all the same: yolo11n's 3 -> 16 stem at 640 px took ~2.2 ms plus ~0.5 ms for the SiLU of a
~26 ms converted forward at 2 threads (AMD EPYC Zen 4), several times what its arithmetic needs.
The compiled op ``stem_conv2d`` (csrc/cpu/stem_conv_cpu.cpp) is a direct convolution with the
SiLU fused: each tile of output pixels and channels (AVX-512: 16 x 16; AVX2: 24 x 4, from input
rows split into their stride phases once per row band) is made in registers.

Same maths, not the same rounding order: outputs agree with ``F.conv2d`` to float rounding (the
tests bound the difference from a float64 reference). Autograd, tracing (ONNX, OpenVINO and
TorchScript export), non-float32 or non-CPU tensors, and CPU paths where the op was not measured
faster than oneDNN (the portable C++ one; see :data:`FASTER_THAN_ONEDNN`) get the inherited
forward.
"""

from __future__ import annotations

import functools
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from ultralytics.nn.modules.conv import Conv

from .._loader import cpu_op_available
from ..dsconv.checks import pair

__all__ = [
    "FastStemConv",
    "STEM_MAX_CHANNELS",
    "stem_conv2d",
    "stem_conv2d_reference",
    "use_fast_stem",
]

# Convs reading at most this many channels take the op: its cost grows with the input channels
# while oneDNN's blocked kernels pay off from a few dozen.
STEM_MAX_CHANNELS = 4


def stem_conv2d_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    stride=1,
    padding=0,
    fuse_silu: bool = False,
) -> torch.Tensor:
    """``silu(conv2d(x, weight, bias, stride, padding))`` (SiLU only with ``fuse_silu``): the
    definition the op is tested against."""
    y = F.conv2d(x, weight, bias, pair(stride, "stride"), pair(padding, "padding"))
    return F.silu(y) if fuse_silu else y


def _fake(x, weight, bias, stride, padding, fuse_silu):
    torch._check(x.dim() == 4 and weight.dim() == 4, lambda: "x and weight must be 4-D")
    ho = (x.shape[2] + 2 * padding[0] - weight.shape[2]) // stride[0] + 1
    wo = (x.shape[3] + 2 * padding[1] - weight.shape[3]) // stride[1] + 1
    return x.new_empty((x.shape[0], weight.shape[0], ho, wo))


@functools.cache
def _kernel_available() -> bool:
    """Whether the compiled CPU op exists (loads the library and registers its fake kernel)."""
    return cpu_op_available("stem_conv2d", _fake)


# CPU paths whose stem kernel was measured faster than oneDNN's conv + SiLU at 2 threads: AVX-512
# 1.5-2.0x (AMD Zen 4); AVX2 1.3-1.7x on an AVX2-only CPU (AMD Zen 3, yolo11n / yolo11s stems,
# batch 1 and 8, bench_conv.py, 2026-12-07). The portable loop is far slower than oneDNN.
FASTER_THAN_ONEDNN = ("avx512_vnni", "amx", "amx_model", "avx2")


@functools.cache
def kernel_is_faster() -> bool:
    """Whether ``FastStemConv`` takes the op on this CPU path (:data:`FASTER_THAN_ONEDNN`).
    Memoised: ``DSCONV_EXT_CPU_ISA`` is read once per process for this."""
    if not _kernel_available():
        return False
    try:
        return torch.ops.dsconv_ext.cpu_isa() in FASTER_THAN_ONEDNN
    except RuntimeError:  # DSCONV_EXT_CPU_ISA forces a path this machine lacks
        return False


def stem_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    fuse_silu: bool = False,
) -> torch.Tensor:
    """:func:`stem_conv2d_reference` (a dense conv, groups 1, no dilation, stride 1 or 2), on the
    compiled CPU op for float32 CPU tensors outside autograd and in PyTorch otherwise.

    Raises:
        TypeError / ValueError naming the argument for a wrong type, dtype, shape or option;
        ValueError for a non-finite weight or bias (on the op, NaN would spread into the zero
        padding differently from ``F.conv2d``).
    """
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"stem_conv2d: {name} must be a tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"stem_conv2d: {name} must be floating point, got {t.dtype}")
        if t.dim() != 4:
            raise ValueError(f"stem_conv2d: {name} must be 4-D, got shape {tuple(t.shape)}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"stem_conv2d: weight {tuple(weight.shape)} must read x's {x.shape[1]} channels "
            "(groups = 1)"
        )
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(
            f"stem_conv2d: bias must be a tensor of shape [{weight.shape[0]}], got "
            f"{tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__}"
        )
    s, p = pair(stride, "stride"), pair(padding, "padding")
    if any(v not in (1, 2) for v in s):
        raise ValueError(f"stem_conv2d: stride must be 1 or 2, got {s}")
    if any(v < 0 for v in p):
        raise ValueError(f"stem_conv2d: padding must be >= 0, got {p}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not bool(torch.isfinite(t).all()):
            raise ValueError(f"stem_conv2d: {name} must be finite (no NaN or Inf)")
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if (
        all(t.is_cpu and t.dtype is torch.float32 for t in tensors)
        and not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))
        and _kernel_available()
    ):
        return torch.ops.dsconv_ext.stem_conv2d(x, weight, bias, list(s), list(p), fuse_silu)
    return stem_conv2d_reference(x, weight, bias, s, p, fuse_silu)


class FastStemConv(Conv):
    """A fused ultralytics ``Conv`` (``act(conv(x))``) whose conv reads few channels: its forward
    is the ``stem_conv2d`` op, SiLU included, outside autograd and export on the CPU paths of
    :data:`FASTER_THAN_ONEDNN`."""

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if (
            type(x) is torch.Tensor  # not a tracer's proxy
            and x.is_cpu
            and x.dtype is torch.float32
            and x.dim() == 4
            and not (torch.is_grad_enabled() and (x.requires_grad or conv.weight.requires_grad))
            and not torch.jit.is_scripting()
            and not torch.jit.is_tracing()  # OpenVINO's and TorchScript's exporters trace
            and not torch.onnx.is_in_onnx_export()
            and conv.weight.dtype is torch.float32
            and kernel_is_faster()
        ):
            return torch.ops.dsconv_ext.stem_conv2d(
                x, conv.weight, conv.bias, conv.stride, conv.padding, type(self.act) is nn.SiLU
            )
        return self.act(conv(x))

    @staticmethod
    def replaces(m: nn.Module) -> bool:
        """Whether ``m`` is a fused ultralytics ``Conv`` the op computes: a plain ``nn.Conv2d``
        reading at most :data:`STEM_MAX_CHANNELS` channels, groups 1, no dilation, stride 1 or
        2, zero padding, then SiLU or nothing."""
        conv = getattr(m, "conv", None)
        return (
            type(m) is Conv
            and not hasattr(m, "bn")
            and getattr(m, "forward", None) == m.forward_fuse  # ultralytics' fuse() sets it
            and type(conv) is nn.Conv2d
            and conv.in_channels <= STEM_MAX_CHANNELS
            and conv.groups == 1
            and tuple(conv.dilation) == (1, 1)
            and conv.padding_mode == "zeros"
            and not isinstance(conv.padding, str)
            and all(s in (1, 2) for s in conv.stride)
            and type(m.act) in (nn.SiLU, nn.Identity)
            and bool(torch.isfinite(conv.weight).all())
            and (conv.bias is None or bool(torch.isfinite(conv.bias).all()))
        )


def use_fast_stem(model: nn.Module) -> List[str]:
    """Give every fused ultralytics ``Conv`` of ``model`` that :meth:`FastStemConv.replaces`
    the faster forward (class swap, so ``isinstance`` and ``state_dict`` are unchanged), in
    place; returns the names changed."""
    changed: List[str] = []
    for name, m in model.named_modules():
        if FastStemConv.replaces(m):
            m.__class__ = FastStemConv
            m.forward = m.forward_fuse  # the instance attribute fuse() set, now bound anew
            changed.append(name)
    return changed


# The op's fake kernel is registered with this module, for torch.compile and opcheck callers.
_kernel_available()
