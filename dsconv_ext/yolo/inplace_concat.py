"""C2f-family blocks that build their channel concatenation in place.

Ultralytics' ``C2f.forward`` (and so ``C3k2``'s and ``C3k2_DSConv``'s) splits ``cv1``'s output,
runs the bottlenecks, and concatenates every piece for ``cv2``: the concatenation copies the
whole block's activations once more. In a converted model, where the convolutions themselves got
~2x faster, those copies are ~5% of a yolo11n forward on CPU (``torch.cat`` ~0.4 ms of ~17 ms at
2 threads). Here each piece is written straight into its slice of the buffer ``cv2`` reads: the
DSConv kernel stores into a channel slice (``dsconv2d(..., out=)``), a bottleneck's residual is
added in place, and ``C3k``'s own concatenation is built the same way. Outputs are bit-identical
(the same ops on the same values, only the destination changes). ``SPPF`` builds its
concatenation of ``cv1``'s output and three max pools the same way, and ``Detect`` stores each
level's box and class outputs into the head's anchor buffers (:class:`InPlaceDetect`).

:func:`use_in_place_concat` swaps the class of each such block for a subclass that only
overrides ``forward`` (so ``isinstance`` checks and ``state_dict`` keys are unchanged). The
in-place forward runs only without autograd, outside tracing (ONNX, OpenVINO export) and
TorchScript; otherwise, and for bottleneck types it does not know, it is the inherited forward.
"""

from __future__ import annotations

import threading
from typing import Dict, List, Optional

import torch
import torch.nn as nn
from ultralytics.nn.modules import Concat, Conv
from ultralytics.nn.modules.block import C3, SPPF, Bottleneck, C2f, C3k2
from ultralytics.nn.modules.head import Detect

from ..dsconv.module import DSConv, DSConv2d
from .blocks import C3k2_DSConv
from .pooling import NearestUpsample, SeparableMaxPool2d

__all__ = [
    "ConcatPlan",
    "InPlaceC2f",
    "InPlaceC3k2",
    "InPlaceC3k2_DSConv",
    "InPlaceConcat",
    "InPlaceDetect",
    "InPlaceSPPF",
    "plan_concatenations",
    "use_in_place_concat",
]


def _active(x: torch.Tensor) -> bool:
    return not (
        torch.is_grad_enabled()
        or torch.jit.is_scripting()
        # traced (ONNX, OpenVINO, TorchScript export): writes into views of a buffer are no
        # graph an exporter should see
        or torch.jit.is_tracing()
        or torch.onnx.is_in_onnx_export()
        or x.dim() != 4
    )


def _into(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    """``out[:] = m(x)``, storing in place where ``m``'s last op allows it."""
    # ultralytics Conv after fuse() (and quantize(), whose forward may be the conv itself) and
    # our DSConv after fuse_bn(): act(conv(x))
    fused = (
        isinstance(m, Conv)
        and (vars(m).get("forward") == m.forward_fuse or vars(m).get("forward") is m.conv)
    ) or (isinstance(m, DSConv) and m.fused and type(m).forward is DSConv.forward)
    if fused:
        if isinstance(m.act, nn.Identity) and isinstance(m.conv, DSConv2d):
            m.conv.forward_into(x, out)
            return
    elif isinstance(m, Bottleneck) and type(m).forward is Bottleneck.forward:
        _into(m.cv2, m.cv1(x), out)
        if m.add:
            out.add_(x)
        return
    elif isinstance(m, DSConv2d) and type(m).forward is DSConv2d.forward:
        m.forward_into(x, out)
        return
    elif type(m) is nn.Sequential and len(m) > 0:
        *head, last = m
        for blk in head:
            x = blk(x)
        _into(last, x, out)
        return
    elif isinstance(m, C3) and type(m).forward is C3.forward and isinstance(m.m, nn.Sequential):
        c_ = m.cv2.conv.out_channels
        both = x.new_empty(x.shape[0], 2 * c_, x.shape[2], x.shape[3])
        _into(m.cv2, x, both[:, c_:])
        _into(m.m, m.cv1(x), both[:, :c_])
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
        plan = self.concat_plan
        out = (
            None
            if plan is None
            else plan.slot(self.concat_slot, x, self.cv2.conv.out_channels, x.shape[2], x.shape[3])
        )
        if out is None:
            return self.cv2(buf)
        _into(self.cv2, buf, out)
        return out

    # See plan_concatenations. (Class defaults: blocks pickled before these existed still load.)
    concat_plan = None
    concat_slot = 0


class InPlaceC2f(_InPlaceConcatForward, C2f):
    """``C2f`` building its concatenation in place."""


class InPlaceC3k2(_InPlaceConcatForward, C3k2):
    """``C3k2`` building its concatenation in place."""


class InPlaceC3k2_DSConv(_InPlaceConcatForward, C3k2_DSConv):
    """``C3k2_DSConv`` building its concatenation in place."""


class InPlaceSPPF(SPPF):
    """``SPPF`` building its concatenation in place: ``cv1`` stores into the first slice and each
    max pool reads the previous slice and writes the next (the compiled pool op writes there
    directly, see :meth:`SeparableMaxPool2d.forward_into`), then ``cv2`` reads the buffer."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = self.m
        if not _active(x) or not isinstance(pool, SeparableMaxPool2d):
            return super().forward(x)
        (kh, kw), (ph, pw) = pool.kernel_size, pool.padding
        if kh != 2 * ph + 1 or kw != 2 * pw + 1:  # the pools must keep the map's size
            return super().forward(x)
        n, c = getattr(self, "n", 3), self.cv1.conv.out_channels
        buf = x.new_empty(x.shape[0], (n + 1) * c, x.shape[2], x.shape[3])
        _into(self.cv1, x, buf[:, :c])
        for i in range(n):
            pool.forward_into(buf[:, i * c : (i + 1) * c], buf[:, (i + 1) * c : (i + 2) * c])
        y = self.cv2(buf)
        return y + x if getattr(self, "add", False) else y


class InPlaceDetect(Detect):
    """``Detect`` whose levels store straight into the head's buffers: each level's box and
    class convolutions write their [N, 4 * reg_max, H, W] and [N, nc, H, W] outputs into
    anchor slices of [N, 4 * reg_max, anchors] and [N, nc, anchors] (planes ``anchors`` floats
    apart, which the DSConv kernel stores into directly), and the class sigmoid writes into the
    decoded output, instead of the three concatenations of ``Detect.forward`` (~7.5 MB copied
    per 640 px image at 80 classes). Returns what ``Detect.forward`` returns in inference,
    ``(y, {"boxes", "scores", "feats"})``, bit-identical. Training, export, end-to-end heads
    and tracing take the inherited forward."""

    def forward(self, x):
        if (
            self.training
            or self.export
            or not isinstance(x, list)
            or not _active(x[0])
            or getattr(self, "one2one_cv2", None) is not None
            or self.cv2 is None
            or self.cv3 is None
        ):
            return super().forward(x)
        n = x[0].shape[0]
        anchors = [t.shape[2] * t.shape[3] for t in x]
        total = sum(anchors)
        boxes = x[0].new_empty(n, 4 * self.reg_max, total)
        scores = x[0].new_empty(n, self.nc, total)
        a0 = 0
        for box_head, cls_head, t, a in zip(self.cv2, self.cv3, x, anchors):
            h, w = t.shape[2], t.shape[3]
            _into(box_head, t, boxes[:, :, a0 : a0 + a].view(n, -1, h, w))
            _into(cls_head, t, scores[:, :, a0 : a0 + a].view(n, -1, h, w))
            a0 += a
        preds = {"boxes": boxes, "scores": scores, "feats": x}
        y = x[0].new_empty(n, 4 + self.nc, total)
        y[:, :4] = self._get_decode_boxes(preds)
        for i in range(n):  # contiguous per image: the same vectorised sigmoid as scores.sigmoid()
            torch.sigmoid(scores[i], out=y[i, 4:])
        return y, preds


def _detect_in_place_applies() -> bool:
    """Whether this ultralytics' ``Detect`` is the one InPlaceDetect reproduces (its inference
    split into ``forward_head`` and ``_get_decode_boxes``; older releases concatenate per
    level inside ``forward``)."""
    return all(
        callable(getattr(Detect, name, None)) for name in ("forward_head", "_get_decode_boxes")
    ) and isinstance(getattr(Detect, "one2many", None), property)


_IN_PLACE = {C2f: InPlaceC2f, C3k2: InPlaceC3k2, C3k2_DSConv: InPlaceC3k2_DSConv}


def use_in_place_concat(model: nn.Module) -> List[str]:
    """Give every ``C2f`` / ``C3k2`` / ``C3k2_DSConv`` block of ``model`` whose forward is still
    ``C2f.forward``, every ``SPPF`` whose forward is still ``SPPF.forward`` and every plain
    ``Detect`` head, the in-place forward, in place; returns the names of the blocks changed."""
    changed: List[str] = []
    for name, m in model.named_modules():
        if type(m) is SPPF and type(m).forward is SPPF.forward:
            m.__class__ = InPlaceSPPF
            changed.append(name)
            continue
        if type(m) is Detect and _detect_in_place_applies():
            m.__class__ = InPlaceDetect
            changed.append(name)
            continue
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


# --- Concat layers of the model graph --------------------------------------------------------


class ConcatPlan:
    """The buffer of one ``InPlaceConcat`` layer, shared with the layers that write into it.

    The channel count of each input is learned from the first concatenation the layer runs
    (until then, and whenever anything does not match, the layer simply concatenates). The
    buffer of a forward in progress is kept per thread and never pickled."""

    def __init__(self) -> None:
        self.channels: Optional[List[int]] = None
        self._local = threading.local()

    def __getstate__(self):
        return {"channels": self.channels}

    def __setstate__(self, state) -> None:
        self.channels = state["channels"]
        self._local = threading.local()

    def slot(
        self, i: int, like: torch.Tensor, channels: int, height: int, width: int
    ) -> Optional[torch.Tensor]:
        """Input ``i``'s channel slice of this forward's buffer (allocated by the first writer),
        or None where the producer must allocate its own output."""
        ch = self.channels
        if ch is None or ch[i] != channels:
            return None
        n = like.shape[0]
        buf = getattr(self._local, "buf", None)
        if (
            buf is None
            or buf.shape[0] != n
            or buf.shape[2] != height
            or buf.shape[3] != width
            or buf.dtype != like.dtype
            or buf.device != like.device
            # left by a forward under torch.inference_mode that never reached the concatenation:
            # an inference tensor cannot be written outside that mode
            or (buf.is_inference() and not torch.is_inference_mode_enabled())
        ):
            buf = like.new_empty(n, sum(ch), height, width)
            self._local.buf = buf
        off = sum(ch[:i])
        return buf[:, off : off + ch[i]]

    def take(self) -> Optional[torch.Tensor]:
        buf = getattr(self._local, "buf", None)
        self._local.buf = None
        return buf


class InPlaceConcat(Concat):
    """``Concat`` along channels whose output buffer the layers feeding it have already written
    into (:func:`plan_concatenations`): inputs found in their slice cost nothing, any other
    input is copied into its slice, and anything unexpected falls back to ``torch.cat``."""

    concat_plan: Optional[ConcatPlan] = None

    def forward(self, x: List[torch.Tensor]) -> torch.Tensor:
        plan = self.concat_plan
        if plan is None or self.d != 1 or not _active(x[0]):
            return super().forward(x)
        buf = plan.take()
        if plan.channels is None:
            plan.channels = [t.shape[1] for t in x]
            return super().forward(x)
        if buf is None or len(x) != len(plan.channels):
            return super().forward(x)
        n, _, h, w = buf.shape
        for t, c in zip(x, plan.channels):
            if t.shape != (n, c, h, w) or t.dtype != buf.dtype or t.device != buf.device:
                return super().forward(x)
        off = 0
        for t, c in zip(x, plan.channels):
            dst = buf[:, off : off + c]
            if t.data_ptr() != dst.data_ptr() or t.stride() != dst.stride():
                dst.copy_(t)
            off += c
        return buf


# Layer types known not to need their input contiguous (a channel slice of a batch is not).
_SLICE_SAFE_CONSUMERS = (Conv, C2f, Concat, NearestUpsample)


def plan_concatenations(model: nn.Module) -> List[str]:
    """Let the ``NearestUpsample`` and in-place C2f-family layers of an ultralytics model
    (``model.model``, layers with ``f`` / ``i``) write their outputs straight into the channel
    concatenation that reads them, in place; returns the names of the Concat layers changed.

    Applies where every reader of such a layer's output takes a channel slice as it takes a
    tensor (the slice of a batch is not contiguous) and each layer feeds at most one Concat.
    Bit-identical: only where the values are stored changes."""
    layers = getattr(model, "model", None)
    if not isinstance(layers, nn.Sequential) or not all(hasattr(m, "f") for m in layers):
        return []

    def sources(j: int, m: nn.Module) -> List[int]:
        f = m.f if isinstance(m.f, (list, tuple)) else [m.f]
        return [j - 1 if k == -1 else (k if k >= 0 else j + k) for k in f]

    readers: Dict[int, List[nn.Module]] = {}
    for j, m in enumerate(layers):
        for k in sources(j, m):
            readers.setdefault(k, []).append(m)
    changed: List[str] = []
    for j, m in enumerate(layers):
        if type(m) is not Concat or m.d != 1 or not isinstance(m.f, (list, tuple)):
            continue
        plan = ConcatPlan()
        writers = []
        for slot, k in enumerate(sources(j, m)):
            src = layers[k]
            if (
                isinstance(src, (NearestUpsample, _InPlaceConcatForward))
                and src.concat_plan is None
                and all(isinstance(r, _SLICE_SAFE_CONSUMERS) for r in readers.get(k, ()))
            ):
                writers.append((src, slot))
        if not writers:
            continue
        for src, slot in writers:
            src.concat_plan, src.concat_slot = plan, slot
        m.__class__ = InPlaceConcat
        m.concat_plan = plan
        changed.append(f"model.{j}")
    return changed


SAFE_GLOBALS = (ConcatPlan,)
