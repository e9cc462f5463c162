"""Argument checks shared by every dsconv2d entry point, so each one fails with the same message."""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from ..quant_primitives import check_bits, check_block_size, num_blocks

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pair(v, name: str) -> Tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(isinstance(e, int) and not isinstance(e, bool) for e in v)
    ):
        return (int(v[0]), int(v[1]))
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


def check_dsconv2d_args(
    x: torch.Tensor,
    intweight: torch.Tensor,
    alpha: torch.Tensor,
    KDSb: Optional[torch.Tensor],
    CDSw: Optional[torch.Tensor],
    CDSb: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    block_size: int,
    act_bits: int,
) -> Tuple[Tuple[int, int], Tuple[int, int], Tuple[int, int]]:
    """Validate a dsconv2d call; returns (stride, padding, dilation) as pairs."""
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
    for name, t, shape in (
        ("alpha", alpha, (O, nblk, kh, kw)),
        ("KDSb", KDSb, (O, nblk, kh, kw)),
        ("CDSw", CDSw, (O,)),
        ("CDSb", CDSb, (O,)),
        ("bias", bias, (O,)),
    ):
        if t is None:
            if name == "alpha":
                raise TypeError("alpha is required")
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
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
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"x spatial size {(H, W)} is too small for kernel {(kh, kw)} with padding {padding} "
            f"and dilation {dilation}"
        )
    return stride, padding, dilation


def output_size(H: int, W: int, kh: int, kw: int, stride, padding, dilation) -> Tuple[int, int]:
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return Ho, Wo
