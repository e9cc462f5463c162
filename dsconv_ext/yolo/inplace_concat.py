"""C2f-family blocks that build their channel concatenation in place.

Ultralytics' ``C2f.forward`` (and so ``C3k2``'s and ``C3k2_DSConv``'s) splits ``cv1``'s output,
runs the bottlenecks, and concatenates every piece for ``cv2``: the concatenation copies the
whole block's activations once more. In a converted model, where the convolutions themselves got
~2x faster, those copies are ~5% of a yolo11n forward on CPU (``torch.cat`` ~0.4 ms of ~17 ms at
2 threads). Here each piece is written straight into its slice of the buffer ``cv2`` reads: the
DSConv kernel stores into a channel slice (``dsconv2d(..., out=)``), a bottleneck's residual is
added in place, and ``C3k``'s own concatenation is built the same way. Outputs are bit-identical
(the same ops on the same values, only the destination changes).

:func:`use_in_place_concat` swaps the class of each such block for a subclass that only
overrides ``forward`` (so ``isinstance`` checks and ``state_dict`` keys are unchanged). The in-place
forward runs only without autograd, outside ONNX export and TorchScript; otherwise, and for
bottleneck types it does not know, it is the inherited forward.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn as nn
from ultralytics.nn.modules import Conv
from ultralytics.nn.modules.block import C3, Bottleneck, C2f, C3k2

from ..modules.dsconv import DSConv, DSConv2d
from .blocks import C3k2_DSConv

__all__ = ["InPlaceC2f", "InPlaceC3k2", "InPlaceC3k2_DSConv", "use_in_place_concat"]


def _active(x: torch.Tensor) -> bool:
    return not (
        torch.is_grad_enabled()
        or torch.jit.is_scripting()
        or torch.onnx.is_in_onnx_export()
        or x.dim() != 4
    )


def _into(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = m(x)``, storing in place where ``m``'s last op allows it."""
    # ultralytics Conv after fuse() and our DSConv after fuse_bn(): act(conv(x))
    fused = (isinstance(m, Conv) and vars(m).get("forward") == m.forward_fuse) or (
        isinstance(m, DSConv) and m.fused and type(m).forward is DSConv.forward
    )
    if fused:
        if isinstance(m.act, nn.Identity) and isinstance(m.conv, DSConv2d):
            m.conv.forward_into(x, out)
            return
    elif isinstance(m, Bottleneck) and type(m).forward is Bottleneck.forward:
        _into(m.cv2, m.cv1(x), out)
        if m.add:
            out.add_(x)
        return
    elif isinstance(m, C3) and type(m).forward is C3.forward and isinstance(m.m, nn.Sequential):
        c_ = m.cv2.conv.out_channels
        both = x.new_empty(x.shape[0], 2 * c_, x.shape[2], x.shape[3])
        _into(m.cv2, x, both[:, c_:])
        h = m.cv1(x)
        for blk in m.m[:-1]:
            h = blk(h)
        _into(m.m[-1], h, both[:, :c_])
        _into(m.cv3, both, out)
        return
    out.copy_(m(x))


class _InPlaceConcatForward:
    """``C2f.forward`` with the concatenation built in place (see the module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _active(x):
            return super().forward(x)
        c, n = self.c, len(self.m)
        buf = x.new_empty(x.shape[0], (2 + n) * c, x.shape[2], x.shape[3])
        _into(self.cv1, x, buf[:, : 2 * c])
        for i, m in enumerate(self.m):
            _into(m, buf[:, (1 + i) * c : (2 + i) * c], buf[:, (2 + i) * c : (3 + i) * c])
        return self.cv2(buf)


class InPlaceC2f(_InPlaceConcatForward, C2f):
    """``C2f`` building its concatenation in place."""


class InPlaceC3k2(_InPlaceConcatForward, C3k2):
    """``C3k2`` building its concatenation in place."""


class InPlaceC3k2_DSConv(_InPlaceConcatForward, C3k2_DSConv):
    """``C3k2_DSConv`` building its concatenation in place."""


_IN_PLACE = {C2f: InPlaceC2f, C3k2: InPlaceC3k2, C3k2_DSConv: InPlaceC3k2_DSConv}


def use_in_place_concat(model: nn.Module) -> List[str]:
    """Give every ``C2f`` / ``C3k2`` / ``C3k2_DSConv`` block of ``model`` whose forward is still
    ``C2f.forward`` the in-place forward, in place; returns the names of the blocks changed."""
    changed: List[str] = []
    for name, m in model.named_modules():
        cls = _IN_PLACE.get(type(m))
        if cls is None or type(m).forward is not C2f.forward:
            continue
        conv = getattr(getattr(m, "cv1", None), "conv", None)
        # cv1 must keep the spatial size (1x1, stride 1) for the buffer's shape.
        if getattr(conv, "kernel_size", None) != (1, 1) or getattr(conv, "stride", None) != (1, 1):
            continue
        m.__class__ = cls
        changed.append(name)
    return changed
