"""ONNX export of DSConv layers as standard ONNX operators.

The int8 kernel is a custom op and the PyTorch fallback uses ``frexp``; neither has an ONNX
form. While exporting, :func:`export_mode` swaps each DSConv2d's forward for
:func:`dsconv2d_onnx`: the same numbers written with operators every ONNX runtime has (block
floating point of the activations with Abs/ReduceMax/Log/Floor/Pow/Round/Clip, then one float
Conv with the dequantised VQK as a constant). Mantissas and exponents are bit-identical to the
integer path; only the accumulation order differs (float sums instead of exact integer block
sums), so outputs agree to float32 rounding.

Registration wraps ultralytics' ``Exporter.export_onnx`` in it (every format that goes through
ONNX: onnx, engine, openvino, ...). Use it directly around ``torch.onnx.export`` otherwise.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

__all__ = ["dsconv2d_onnx", "export_mode", "wrap_export_onnx"]


def _bfp_onnx(
    x: torch.Tensor, channels: int, block_size: int, act_bits: int, groups: int
) -> torch.Tensor:
    """Block floating point round trip of ``x`` [N, C, H, W] (what the kernel multiplies).

    ``channels`` is C as a Python int: block arithmetic on traced sizes would be exported with
    truncating division.
    """
    n, _, h, w = x.shape
    c = channels
    cg = c // groups
    nblk = -(-cg // block_size)
    xb = x.reshape(n, groups, cg, h, w)
    if nblk * block_size != cg:  # zero channels do not change a block's max |x|
        # (torch.cat, not F.pad: the exporter writes a wrong Pad for this 5-D case)
        xb = torch.cat([xb, xb.new_zeros(n, groups, nblk * block_size - cg, h, w)], 2)
    amax = xb.reshape(n, groups, nblk, block_size, h, w).abs().amax(dim=3)  # [N, G, nblk, H, W]
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    e = torch.floor(torch.log2(safe))
    # log2 of an exact power of two may land a hair below the integer: correct both ways so
    # that e == floor(log2(amax)) exactly, as frexp gives it.
    e = torch.where(torch.pow(2.0, e) > safe, e - 1, e)
    e = torch.where(torch.pow(2.0, e + 1) <= safe, e + 1, e)
    e = torch.where(amax > 0, e - (act_bits - 2), torch.zeros_like(e))
    # Back to one scale per channel with a constant gather (slicing padded channels off traced
    # shapes exports wrongly).
    block_of = torch.arange(cg, device=x.device) // block_size
    scale = torch.pow(2.0, e).index_select(2, block_of).reshape(n, c, h, w)
    lim = float(2 ** (act_bits - 1) - 1)
    return torch.clamp(torch.round(x / scale), -lim, lim) * scale


def dsconv2d_onnx(m, x: torch.Tensor) -> torch.Tensor:
    """Forward of DSConv2d ``m`` (frozen or QAT) in ONNX-exportable operators."""
    from ..dsconv.quant_primitives import dequantize_weight, fake_quantize_weight

    with torch.no_grad():  # the weight becomes a constant of the graph
        if m.frozen:
            weight = dequantize_weight(m.intweight, m.alpha, m.KDSb, block_size=m.block_size)
        else:
            weight = fake_quantize_weight(m.weight.float(), m.bits, m.block_size, m.KDSBias)
    dtype = x.dtype
    xq = _bfp_onnx(x.float(), m.in_channels, m.block_size, m.act_bits, m.groups)
    y = F.conv2d(xq, weight.detach(), None, m.stride, m.padding, m.dilation, m.groups)
    shape = (1, -1, 1, 1)
    if m.CDSw is not None:
        y = y * m.CDSw.detach().float().view(shape)
    if m.CDSb is not None:
        y = y + m.CDSb.detach().float().view(shape)
    if m.bias is not None:
        y = y + m.bias.detach().float().view(shape)
    if m.fuse_silu:
        y = F.silu(y)
    return y.to(dtype)


@contextlib.contextmanager
def export_mode(model: torch.nn.Module):
    """Within the block, every DSConv2d of ``model`` runs :func:`dsconv2d_onnx`."""
    from ..dsconv.module import DSConv2d

    swapped = []
    for m in model.modules():
        if isinstance(m, DSConv2d) and "forward" not in m.__dict__:
            m.forward = functools.partial(dsconv2d_onnx, m)
            swapped.append(m)
    try:
        yield model
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)


def wrap_export_onnx(original):
    """Wrap ``Exporter.export_onnx`` to export DSConv layers through :func:`export_mode`."""

    @functools.wraps(original)
    def export_onnx(self, *args, **kwargs):
        with export_mode(self.model):
            return original(self, *args, **kwargs)

    export_onnx.__dsconv_ext_original__ = original
    return export_onnx
