"""Exact, faster stand-ins for two pooling layers of YOLO11 on CPU.

With the torch of ``requirements.txt`` on this project's CPU (2 threads), two layers that do
almost no arithmetic cost more than a tenth of a converted yolo11n forward:

- ``nn.MaxPool2d(5, 1, 2)`` of SPPF on a contiguous NCHW tensor (1 x 128 x 20 x 20): ~1.1 ms a
  call, three calls a forward; the same pool as two separable passes of running maxima over
  shifted views takes ~0.06 ms;
- ``nn.Upsample(scale_factor=2, mode="nearest")`` (1 x 256 x 20 x 20): ~0.54 ms; repeating
  columns, then rows, takes ~0.09 ms.

Both replacements give bit-identical outputs (a maximum and a copy round nothing; NaN propagates
as in ``max_pool2d``). On float32 CPU tensors the max pool is the compiled op
``max_pool2d_s1_out`` (csrc/cpu/max_pool_cpu.cpp: the same two passes in one call, ~0.06 ms
instead of ~0.16-0.22 ms inside a converted yolo11n at 2 threads), which can also write into a
channel slice of SPPF's concatenation (``forward_into``). The upsampling is likewise one pass
of the compiled op ``upsample_nearest_out`` (csrc/cpu/upsample_cpu.cpp) on float32 CPU tensors
outside autograd. The max pool takes over only where no gradient is recorded (ties would route
gradients differently from ``max_pool2d``), and both call the original functional op while
traced (ONNX and OpenVINO export), so that exported graphs keep their MaxPool / Resize nodes.
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._loader import cpu_op_available
from ..dsconv.checks import pair, per_image_dense

__all__ = ["NearestUpsample", "SeparableMaxPool2d"]


def _writes_out(*args) -> None:
    """Fake kernel of both ops here: they write their ``out`` argument and return nothing."""


@functools.cache
def _pool_op_available() -> bool:
    return cpu_op_available("max_pool2d_s1_out", _writes_out)


@functools.cache
def _upsample_op_available() -> bool:
    return cpu_op_available("upsample_nearest_out", _writes_out)


def _running_max(x: torch.Tensor, k: int, pad: int, dim: int) -> torch.Tensor:
    """Max over windows of ``k`` along ``dim`` (stride 1), the input padded by ``pad`` on each
    side with -inf (``max_pool2d``'s implicit padding)."""
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        fill = x.new_full(shape, float("-inf"))
        x = torch.cat([fill, x, fill], dim=dim)
    n = x.shape[dim] - k + 1
    out = x.narrow(dim, 0, n)
    for i in range(1, k):
        out = torch.maximum(out, x.narrow(dim, i, n))
    return out


class SeparableMaxPool2d(nn.Module):
    """``nn.MaxPool2d(kernel_size, stride=1, padding)`` as a max over rows then over columns."""

    def __init__(self, kernel_size, padding=0):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.padding = pair(padding, "padding")
        for k, p in zip(self.kernel_size, self.padding):
            if k < 1 or not 0 <= p <= k // 2:
                raise ValueError(
                    f"SeparableMaxPool2d: kernel_size {self.kernel_size} and padding "
                    f"{self.padding} must have kernel >= 1 and 0 <= padding <= kernel // 2"
                )

    @classmethod
    def from_module(cls, pool: nn.MaxPool2d) -> SeparableMaxPool2d:
        if not cls.replaces(pool):
            raise ValueError(f"SeparableMaxPool2d cannot stand in for {pool}")
        return cls(pool.kernel_size, pool.padding)

    @staticmethod
    def replaces(pool: nn.Module) -> bool:
        """Whether ``pool`` is an ``nn.MaxPool2d`` this module computes exactly."""
        if type(pool) is not nn.MaxPool2d:
            return False
        k, p = pair(pool.kernel_size, "kernel_size"), pair(pool.padding, "padding")
        return (
            pair(pool.stride, "stride") == (1, 1)
            and pair(pool.dilation, "dilation") == (1, 1)
            and not pool.ceil_mode
            and not pool.return_indices
            and all(0 <= pi <= ki // 2 for ki, pi in zip(k, p))
        )

    def _plain(self, x: torch.Tensor) -> bool:
        """Whether ``x`` must take ``max_pool2d`` itself (autograd, export, other inputs)."""
        return (
            (x.requires_grad and torch.is_grad_enabled())
            or not x.is_floating_point()
            or x.dim() not in (3, 4)
            or torch.onnx.is_in_onnx_export()
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
        )

    def _op_takes(self, x: torch.Tensor) -> bool:
        return x.dim() == 4 and x.dtype is torch.float32 and x.is_cpu and _pool_op_available()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._plain(x):
            return F.max_pool2d(x, self.kernel_size, 1, self.padding)
        (kh, kw), (ph, pw) = self.kernel_size, self.padding
        if self._op_takes(x):
            n, c, h, w = x.shape
            out = x.new_empty(n, c, h + 2 * ph - kh + 1, w + 2 * pw - kw + 1)
            torch.ops.dsconv_ext.max_pool2d_s1_out(x, [kh, kw], [ph, pw], out)
            return out
        return _running_max(_running_max(x, kw, pw, -1), kh, ph, -2)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``self(x)`` written into ``out`` (a channel slice of a concatenation) and returned:
        by the op where it takes ``x`` and ``out`` holds each image densely, else copied."""
        if (
            not self._plain(x)
            and self._op_takes(x)
            and type(out) is torch.Tensor
            and out.dtype is torch.float32
            and out.is_cpu
            and out.dim() == 4
            and per_image_dense(out)
        ):
            torch.ops.dsconv_ext.max_pool2d_s1_out(x, self.kernel_size, self.padding, out)
            return out
        return out.copy_(self(x))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, padding={self.padding}"


class NearestUpsample(nn.Module):
    """``nn.Upsample(scale_factor=s, mode="nearest")`` for integer ``s``: each pixel repeated
    s times along the row, then each row s times."""

    # Set by dsconv_ext.yolo.inplace_concat.plan_concatenations: the output is then written
    # straight into its slice of the Concat that reads it. (Class defaults: modules pickled
    # before these existed still load.)
    concat_plan = None
    concat_slot = 0

    def __init__(self, scale_factor: int):
        super().__init__()
        if int(scale_factor) != scale_factor or scale_factor < 1:
            raise ValueError(
                f"NearestUpsample: scale_factor must be a positive integer, got {scale_factor}"
            )
        self.scale_factor = int(scale_factor)

    @classmethod
    def from_module(cls, up: nn.Upsample) -> NearestUpsample:
        if not cls.replaces(up):
            raise ValueError(f"NearestUpsample cannot stand in for {up}")
        s = up.scale_factor
        return cls(int(s[0] if isinstance(s, (tuple, list)) else s))

    @staticmethod
    def replaces(up: nn.Module) -> bool:
        """Whether ``up`` is an ``nn.Upsample`` this module computes exactly."""
        if type(up) is not nn.Upsample or up.mode != "nearest" or up.size is not None:
            return False
        s = up.scale_factor
        ss = list(s) if isinstance(s, (tuple, list)) else [s, s]
        return (
            len(ss) == 2
            and ss[0] == ss[1]
            and ss[0] is not None
            and float(ss[0]).is_integer()
            and ss[0] >= 1
            and not getattr(up, "recompute_scale_factor", None)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.scale_factor
        if (
            x.dim() != 4
            or torch.onnx.is_in_onnx_export()
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
        ):
            return F.interpolate(x, scale_factor=float(s), mode="nearest")
        n, c, h, w = x.shape
        out = None
        plan = self.concat_plan
        if plan is not None and not (torch.is_grad_enabled() and x.requires_grad):
            out = plan.slot(self.concat_slot, x, c, h * s, w * s)
        if out is None:
            out = x.new_empty(n, c, h * s, w * s)
        if (
            x.dtype is torch.float32
            and x.is_cpu
            and not (torch.is_grad_enabled() and x.requires_grad)
            and _upsample_op_available()
            and per_image_dense(out)
        ):
            torch.ops.dsconv_ext.upsample_nearest_out(x, s, out)
            return out
        # Columns first, then whole rows: copying one 6-d broadcast view at once took twice as
        # long (0.30 vs 0.14 ms for 1 x 128 x 40 x 40 at 2 threads).
        wide = x.repeat_interleave(s, dim=3) if s > 1 else x
        out.view(n, c, h, s, w * s).copy_(wide.unsqueeze(3).expand(n, c, h, s, w * s))
        return out

    def extra_repr(self) -> str:
        return f"scale_factor={self.scale_factor}"
