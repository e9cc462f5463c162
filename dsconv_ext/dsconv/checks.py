"""Argument checks and conv geometry shared by every dsconv2d entry point.

:func:`check_dsconv2d_args` is the only place a dsconv2d call is validated: the public op, the
fallback, the reference and the modules all go through it, so each fails with the same message.
It returns a :class:`DSConvCall`, the validated arguments with the geometry they imply, which the
reference and the fallback read instead of re-deriving shapes.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .quant_primitives import check_bits, check_block_size, num_blocks

__all__ = [
    "FLOAT_DTYPES",
    "DSConvCall",
    "check_dsconv2d_args",
    "check_out",
    "output_size",
    "pair",
    "per_image_dense",
    "plane_dense",
    "plane_strides",
    "overlap_status",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
Pair = Tuple[int, int]


def pair(v, name: str) -> Pair:
    """``v`` as an (int, int) pair; a TypeError naming ``name`` otherwise."""
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(e, int) and not isinstance(e, bool) for e in v)
    ):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def output_size(H: int, W: int, kh: int, kw: int, stride, padding, dilation) -> Pair:
    """Output height and width of a convolution (``nn.Conv2d``'s formula)."""
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return Ho, Wo


@dataclass(frozen=True)
class DSConvCall:
    """A validated dsconv2d call: its arguments (``stride`` etc. as pairs) and its geometry."""

    x: torch.Tensor
    intweight: torch.Tensor
    alpha: torch.Tensor
    KDSb: Optional[torch.Tensor]
    CDSw: Optional[torch.Tensor]
    CDSb: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    stride: Pair
    padding: Pair
    dilation: Pair
    groups: int
    block_size: int
    act_bits: int
    fuse_silu: bool

    @property
    def out_channels(self) -> int:
        return self.intweight.shape[0]

    @property
    def channels_per_group(self) -> int:
        return self.intweight.shape[1]

    @property
    def kernel_size(self) -> Pair:
        return self.intweight.shape[2], self.intweight.shape[3]

    @property
    def nblocks(self) -> int:
        """Channel blocks per group."""
        return num_blocks(self.channels_per_group, self.block_size)

    @property
    def output_hw(self) -> Pair:
        return output_size(*self.x.shape[2:], *self.kernel_size, *self.conv_params())

    @property
    def output_shape(self) -> Tuple[int, int, int, int]:
        return (self.x.shape[0], self.out_channels, *self.output_hw)

    def conv_params(self) -> Tuple[Pair, Pair, Pair]:
        return self.stride, self.padding, self.dilation

    def op_args(self, float_params: bool = False) -> List:
        """Positional arguments of the ``dsconv_ext::dsconv2d`` schema (pairs as lists).
        ``float_params``: alpha and the optional shifts as float32, as the kernels take them."""
        tensors = (self.alpha, self.KDSb, self.CDSw, self.CDSb, self.bias)
        if float_params:
            tensors = tuple(None if t is None else t.float() for t in tensors)
        return [
            self.x,
            self.intweight,
            *tensors,
            list(self.stride),
            list(self.padding),
            list(self.dilation),
            self.groups,
            self.block_size,
            self.act_bits,
            bool(self.fuse_silu),
        ]


def _tensor_or_none(name: str, t) -> None:
    if t is not None and not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")


def check_dsconv2d_args(
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
) -> DSConvCall:
    """Validate a dsconv2d call (see :func:`dsconv_ext.dsconv2d` for the arguments).

    Raises:
        TypeError / ValueError naming the argument and what was expected.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if not isinstance(intweight, torch.Tensor) or intweight.dtype != torch.int8:
        got = intweight.dtype if isinstance(intweight, torch.Tensor) else type(intweight).__name__
        raise TypeError(f"intweight must be an int8 Tensor, got {got}")
    if intweight.dim() != 4:
        raise ValueError(f"intweight must be 4-D [O, I/g, kh, kw], got {tuple(intweight.shape)}")
    stride = pair(stride, "stride")
    padding = pair(padding, "padding")
    dilation = pair(dilation, "dilation")
    if min(stride) < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if min(padding) < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if min(dilation) < 1:
        raise ValueError(f"dilation must be >= 1, got {dilation}")
    if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups!r}")
    check_block_size(block_size)
    check_bits(act_bits, "act_bits")
    if not isinstance(fuse_silu, bool):
        raise TypeError(f"fuse_silu must be a bool, got {fuse_silu!r}")
    N, C, H, W = x.shape
    O, Cg, kh, kw = intweight.shape
    if C % groups:
        raise ValueError(f"x has {C} channels, not divisible by groups={groups}")
    if O % groups:
        raise ValueError(f"intweight has {O} output channels, not divisible by groups={groups}")
    if Cg * groups != C:
        raise ValueError(
            f"x has {C} channels but intweight expects {Cg * groups} (I/g={Cg}, groups={groups})"
        )
    nblk = num_blocks(Cg, block_size)
    if alpha is None:
        raise TypeError("alpha is required")
    for name, t, shape in (
        ("alpha", alpha, (O, nblk, kh, kw)),
        ("KDSb", KDSb, (O, nblk, kh, kw)),
        ("CDSw", CDSw, (O,)),
        ("CDSb", CDSb, (O,)),
        ("bias", bias, (O,)),
    ):
        _tensor_or_none(name, t)
        if t is None:
            continue
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} must have shape {shape} (block_size={block_size}), got {tuple(t.shape)}"
            )
    for name, t in (
        ("intweight", intweight),
        ("alpha", alpha),
        ("KDSb", KDSb),
        ("CDSw", CDSw),
        ("CDSb", CDSb),
        ("bias", bias),
    ):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}; move them together")
    Ho, Wo = output_size(H, W, kh, kw, stride, padding, dilation)
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"x spatial size {(H, W)} is too small for kernel {(kh, kw)} with padding {padding} "
            f"and dilation {dilation}"
        )
    return DSConvCall(
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


def _span(t: torch.Tensor, base: int, first_dim: int) -> Tuple[int, int]:
    """Byte range [lo, hi) of t's dims ``first_dim..`` starting at address ``base``."""
    last = sum((n - 1) * s for n, s in zip(t.shape[first_dim:], t.stride()[first_dim:]))
    return base, base + t.element_size() * (1 + last)


def _image_dense(t: torch.Tensor) -> bool:
    """Whether each image (dims 1..) of t is non-overlapping and dense, in any dim order: then
    every element slot between its first and last byte belongs to it."""
    dims = sorted((s, n) for s, n in zip(t.stride()[1:], t.shape[1:]) if n != 1)
    expect = 1
    for s, n in dims:
        if s != expect:
            return False
        expect *= n
    return True


def plane_strides(out: torch.Tensor) -> Optional[Tuple[int, int]]:
    """(image, plane) strides of a 4-D ``out`` whose [Ho, Wo] planes are each dense and lie
    apart in (image, channel) order, or None: the layouts the CPU kernel stores into directly
    (a channel slice of a concatenation; one level of a detection head's [N, O, anchors]
    buffer, planes ``anchors`` apart). Sizes of 1 take the dense strides."""
    N, O, Ho, Wo = out.shape
    if (Wo != 1 and out.stride(3) != 1) or (Ho != 1 and out.stride(2) != Wo):
        return None
    plane = Ho * Wo if O == 1 else out.stride(1)
    if plane < Ho * Wo:
        return None
    span = (O - 1) * plane + Ho * Wo
    image = span if N == 1 else out.stride(0)
    return (image, plane) if image >= span else None


def per_image_dense(out: torch.Tensor) -> bool:
    """Whether each image's [C, Ho, Wo] of a 4-D ``out`` is dense (any image stride): the
    layouts the pooling and upsampling ops store into directly."""
    N, C, Ho, Wo = out.shape
    return (
        (Wo == 1 or out.stride(3) == 1)
        and (Ho == 1 or out.stride(2) == Wo)
        and (C == 1 or out.stride(1) == Ho * Wo)
        and (N == 1 or out.stride(0) >= C * Ho * Wo)
    )


def plane_dense(out: torch.Tensor) -> bool:
    """Whether the CPU kernel stores into ``out`` directly (see :func:`plane_strides`)."""
    return plane_strides(out) is not None


def overlap_status(out: torch.Tensor, x: torch.Tensor) -> str:
    """Whether two 4-D tensors share memory: ``"none"``, ``"overlap"`` or ``"unknown"``.

    The same test as the CPU op dsconv2d_out's (csrc/cpu/dsconv2d_cpu.cpp): each image's byte
    range of x against out's dense [Ho, Wo] planes (or, for an out without such planes, its
    images), so that channel slices of one buffer (x = buf[:, :32], out = buf[:, 32:]) are
    disjoint at any batch size although their whole ranges interleave. A range meeting a plane
    is an overlap when both are dense (each covers every slot of its range); otherwise
    (strided within an image) the answer is "unknown"."""
    if out.numel() == 0 or x.numel() == 0:
        return "none"
    o_lo, o_hi = _span(out, out.data_ptr(), 0)
    x_lo, x_hi = _span(x, x.data_ptr(), 0)
    if o_hi <= x_lo or x_hi <= o_lo:
        return "none"
    es = out.element_size()
    ps = plane_strides(out)
    if ps is not None:  # units: planes, each dense
        plane_bytes = out.shape[2] * out.shape[3] * es
        units = [(out.data_ptr() + (n * ps[0] + o * ps[1]) * es, plane_bytes)
                 for n in range(out.shape[0]) for o in range(out.shape[1])]  # fmt: skip
        units_dense = True
    else:  # units: images
        units = [_span(out, out.data_ptr() + n * out.stride(0) * es, 1)
                 for n in range(out.shape[0])]  # fmt: skip
        units = [(lo, hi - lo) for lo, hi in units]
        units_dense = _image_dense(out)
    units.sort()
    starts = [lo for lo, _ in units]
    reach = list(itertools.accumulate((lo + n for lo, n in units), max))  # max end of units[:i+1]
    for n in range(x.shape[0]):
        a, b = _span(x, x.data_ptr() + n * x.stride(0) * x.element_size(), 1)
        i = bisect.bisect_left(starts, b) - 1  # the units starting before b: units[:i+1]
        if i >= 0 and reach[i] > a:
            return "overlap" if _image_dense(x) and units_dense else "unknown"
    return "none"


def check_out(out, call: DSConvCall) -> None:
    """Validate ``dsconv2d(..., out=)`` against the call it receives."""
    x = call.x
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor, got {type(out).__name__}")
    if out.device != x.device:
        raise ValueError(f"out must be on x's device {x.device}, got {out.device}")
    if out.dtype != x.dtype:
        raise TypeError(f"out must have x's dtype {x.dtype}, got {out.dtype}")
    if tuple(out.shape) != call.output_shape:
        raise ValueError(f"out must have shape {list(call.output_shape)}, got {list(out.shape)}")
    # Only a certain overlap is refused: where the test cannot tell, every path is safe anyway
    # (the CPU op copies x first; the others compute the result before copying it into out).
    if overlap_status(out, x) == "overlap":
        raise ValueError("out must not overlap x")
