"""A faster Distribution Focal Loss decoder for the Detect heads of converted models.

Ultralytics' ``DFL.forward`` takes the softmax over the 16 bins of a transposed view and then a
1x1 convolution with the weights 0..15 for the expected distance. On a 640 px image that is
(1, 64, 8400) -> (1, 4, 8400): a strided softmax and a oneDNN call on a 16 x 1 x 1 kernel, ~0.43 ms
of a ~19 ms converted yolo11n forward at 2 threads. The softmax over the contiguous bins and a
matmul with the same weights take ~0.23 ms.

Same maths, not the same rounding order: outputs agree to float rounding (|diff| <= 4e-6 on
distances in [0, 15] in the tests). Autograd, ONNX export and TorchScript get the inherited
forward.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
from ultralytics.nn.modules.block import DFL

__all__ = ["FastDFL", "use_fast_dfl"]


class FastDFL(DFL):
    """``DFL`` with the softmax taken over contiguous bins and the expectation as a matmul."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            (torch.is_grad_enabled() and x.requires_grad)
            or torch.jit.is_scripting()
            or torch.onnx.is_in_onnx_export()
            or x.dim() != 3
            or self.conv.bias is not None
        ):
            return super().forward(x)
        b, _, a = x.shape
        p = x.view(b, 4, self.c1, a).softmax(2)
        w = self.conv.weight.view(1, 1, 1, self.c1).to(p.dtype)
        return torch.matmul(w, p).view(b, 4, a)


def use_fast_dfl(model: nn.Module) -> List[str]:
    """Give every ultralytics ``DFL`` of ``model`` the faster forward (class swap, so
    ``isinstance`` and ``state_dict`` are unchanged), in place; returns the names changed."""
    changed: List[str] = []
    for name, m in model.named_modules():
        if type(m) is DFL:
            m.__class__ = FastDFL
            changed.append(name)
    return changed
