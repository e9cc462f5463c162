"""A faster Distribution Focal Loss decoder for the Detect heads of converted models.

Ultralytics' ``DFL.forward`` takes the softmax over the 16 bins of a transposed view and then a
1x1 convolution with the weights 0..15 for the expected distance. On a 640 px image that is
(1, 64, 8400) -> (1, 4, 8400): a strided softmax and a oneDNN call on a 16 x 1 x 1 kernel, ~0.43 ms
of a ~19 ms converted yolo11n forward at 2 threads. The compiled op ``dfl_expectation``
(csrc/cpu/dfl_cpu.cpp) reads each bin once per pass; without it, a softmax over the contiguous
bins and a matmul with the same weights (~0.23 ms).

Same maths, not the same rounding order: outputs agree to float rounding (the tests bound the
difference from a float64 reference). Autograd, tracing (ONNX, OpenVINO and TorchScript export)
and TorchScript get the inherited forward.
"""

from __future__ import annotations

import functools
from typing import List

import torch
import torch.nn as nn
from ultralytics.nn.modules.block import DFL

from .._loader import cpu_op_available

__all__ = ["FastDFL", "dfl_expectation", "dfl_expectation_reference", "use_fast_dfl"]


def dfl_expectation_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``y[b, s, a] = sum_i softmax_i(x[b, s * c1 + i, a]) * weight[i]`` for ``x`` of shape
    [B, 4 * c1, A]: the expected box distance of each side (the definition the op is tested
    against)."""
    b, _, a = x.shape
    c1 = weight.numel()
    p = x.view(b, 4, c1, a).softmax(2)
    return torch.matmul(weight.reshape(1, 1, 1, c1).to(p.dtype), p).view(b, 4, a)


def _fake(x, weight):
    torch._check(x.dim() == 3, lambda: "x must be 3-D")
    return x.new_empty((x.shape[0], 4, x.shape[2]))


@functools.cache
def _kernel_available() -> bool:
    """Whether the compiled CPU op exists (loads the library and registers its fake kernel)."""
    return cpu_op_available("dfl_expectation", _fake)


def dfl_expectation(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """:func:`dfl_expectation_reference`, on the compiled CPU op for float32 CPU tensors (NaN
    where a side has a NaN or +inf bin, as softmax gives) and in PyTorch otherwise."""
    if not isinstance(x, torch.Tensor) or not isinstance(weight, torch.Tensor):
        raise TypeError("dfl_expectation: x and weight must be tensors")
    if x.dim() != 3:
        raise ValueError(f"dfl_expectation: x must be 3-D [B, 4 * c1, A], got {tuple(x.shape)}")
    c1 = weight.numel()
    if c1 < 1 or x.shape[1] != 4 * c1:
        raise ValueError(
            f"dfl_expectation: x must have 4 * c1 channels for a weight of c1 = {c1} bins, "
            f"got {x.shape[1]}"
        )
    if not x.is_floating_point() or not weight.is_floating_point():
        raise TypeError(
            f"dfl_expectation: x and weight must be floating point, got {x.dtype} and "
            f"{weight.dtype}"
        )
    if weight.device != x.device:
        raise ValueError(
            f"dfl_expectation: weight must be on x's device {x.device}, got {weight.device}"
        )
    if (
        x.is_cpu
        and x.dtype is torch.float32
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
        and _kernel_available()
    ):
        return torch.ops.dsconv_ext.dfl_expectation(x, weight.reshape(c1).float())
    return dfl_expectation_reference(x, weight)


class FastDFL(DFL):
    """``DFL`` whose forward is :func:`dfl_expectation` outside autograd and export."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            (torch.is_grad_enabled() and x.requires_grad)
            or torch.jit.is_scripting()
            or torch.jit.is_tracing()  # OpenVINO's and TorchScript's exporters trace
            or torch.onnx.is_in_onnx_export()
            or x.dim() != 3
            or self.conv.bias is not None
        ):
            return super().forward(x)
        return dfl_expectation(x, self.conv.weight.reshape(self.c1))


def use_fast_dfl(model: nn.Module) -> List[str]:
    """Give every ultralytics ``DFL`` of ``model`` the faster forward (class swap, so
    ``isinstance`` and ``state_dict`` are unchanged), in place; returns the names changed."""
    changed: List[str] = []
    for name, m in model.named_modules():
        if type(m) is DFL:
            m.__class__ = FastDFL
            changed.append(name)
    return changed


# The op's fake kernel is registered with this module, for torch.compile and opcheck callers.
_kernel_available()
