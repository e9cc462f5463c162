"""Export of DSConv layers as standard operators (ONNX and OpenVINO, one forward for both).

The int8 kernel is a custom op (``dsconv_ext::dsconv2d``) and the PyTorch fallback uses
``frexp``: no exporter or runtime knows either. While a model is exported, :func:`export_mode`
gives every DSConv2d the forward of :class:`StandardOpsDSConv`, the same numbers written with
operators every runtime has:

- the block floating point (BFP) of the activations: ``Abs``, ``MaxPool`` over each block of
  ``block_size`` channels, ``2^floor(log2(max))`` (``Log``, ``Round``, ``Pow``, one compare and
  select that make it exact), back to one scale per channel, ``Div``, ``Round`` (half to even,
  as the kernel), ``Clip``, ``Mul``;
- one float ``Conv`` whose weight is the dequantised VQK, built in the graph from the int8 VQK:
  ``Convert(int8 -> f32)`` of a ``[O, nblocks, block_size, kh, kw]`` constant, ``Multiply`` by
  the ``[O, nblocks, 1, kh, kw]`` scales ``alpha * CDSw`` (the KDS scale times the channel scale
  of the folded BatchNorm; ``+ KDSb * CDSw`` with a KDS bias), ``Reshape`` to the conv weight;
  ``CDSb`` and the bias are the conv's bias; then SiLU where the kernel fuses it.

What the exported model computes: float32 arithmetic on the quantised weights and the BFP-rounded
activations. The BFP mantissas and exponents are bit-identical to the kernel's (for blocks whose
max ``|x|`` is at least 2^-64); the weights differ from ``alpha * q`` by one float rounding (the
channel scale is folded in), and the sums are float sums in the runtime's order instead of the
kernel's exact integer block sums. So each layer agrees with the kernel to float32 rounding,
except where such a rounding difference moves an activation across a BFP rounding boundary of the
next layer: one mantissa step (up to 2^-(act_bits - 2) of its block's max) there, which then
propagates. Through a whole network these flips can add up to visible differences on some
inputs, as between any two float evaluation orders of a BFP network.

Weight storage: OpenVINO keeps the int8 constant and its ``Convert -> Multiply`` (the pattern it
treats as compressed weights and does not fold), so the ``.bin`` holds int8 VQKs plus float32
scales, about a quarter of the float weights; its CPU plugin decompresses them when it compiles
the model, or runs 1x1 convolutions as fully-connected layers on the compressed weights (see
:func:`keep_dsconv_numbers`). The ONNX exporter folds the same constant subgraph into one float32
initializer: the ``.onnx`` holds float weights. Layers trained with QAT (float shadow weight)
export the same way: their weight is quantised once, when the export starts.

Runtime precision: OpenVINO's CPU plugin runs float32 models in bfloat16 by default on CPUs with
bf16 support (AMX, AVX512-BF16); compile with ``INFERENCE_PRECISION_HINT=f32`` to get the float32
numbers described here.

The registration wraps ultralytics' ``Exporter.export_onnx`` (every format that goes through
ONNX) and ``Exporter.export_openvino`` (which traces the model with ``torch.jit.trace`` and
converts that with OpenVINO's PyTorch frontend, not through ONNX) in :func:`export_mode`. Use it
directly around ``torch.onnx.export`` or ``openvino.convert_model`` otherwise (and
:func:`keep_dsconv_numbers` on the OpenVINO model).
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F

__all__ = [
    "EXPORT_METHODS",
    "StandardOpsDSConv",
    "bfp_standard_ops",
    "export_mode",
    "keep_dsconv_numbers",
    "wrap_export",
]

# The ultralytics Exporter methods run inside export_mode (wrap_export).
EXPORT_METHODS = ("export_onnx", "export_openvino")

_TINY = 2.0**-64


def _block_scale(amax: torch.Tensor, act_bits: int) -> torch.Tensor:
    """``2^E`` of blocks whose max |x| is ``amax``: ``E = floor(log2(amax)) - (act_bits - 2)``."""
    # Blocks whose max |x| is below 2^-64 are rounded as if it were 2^-64, on the grid of 2^-70
    # (an error below 2^-71 per element, where the kernel's own exponent is finer); all-zero
    # blocks stay 0, as in the kernel. This needs no select per block, and keeps every scale a
    # normal float32: the exact 2^E of a block below ~2^-120 is subnormal, which runtimes that
    # flush denormals turn into 0 (then x / 0).
    amax = amax.clamp_min(_TINY)
    # p = 2^floor(log2(amax)) exactly, as frexp gives it. Runtimes compute log2 as
    # ln(x) / ln(2), a few ulps off, so floor() of it can miss by one next to a power of two;
    # rounding instead lands on floor or floor + 1 (the true log2 is in [floor, floor + 1)),
    # and one comparison takes floor + 1 back down. (Few nodes matter: ultralytics' ONNX export
    # and its onnxslim pass take time superlinear in the node count.)
    p = torch.pow(2.0, torch.round(torch.log2(amax)))
    p = torch.where(p > amax, p * 0.5, p)
    return p * 2.0 ** -(act_bits - 2)


def _bfp_segment(x: torch.Tensor, block: int, act_bits: int) -> torch.Tensor:
    """BFP round trip of ``x`` [N, C, H, W] in blocks of ``block`` consecutive channels (C a
    multiple of it).

    Everything stays 4-D: the block maxima come from a ``MaxPool3d`` over the channel axis and
    go back to one scale per channel with ``repeat_interleave``. OpenVINO's CPU plugin ran the
    same arithmetic on a [N, blocks, block, H, W] view 6x slower (layout reorders around the
    reshapes, broadcasts inside its fused element-wise kernels)."""
    if block == 1:  # each channel is its own block (depth-wise convs)
        scale = _block_scale(x.abs(), act_bits)
    else:
        amax = F.max_pool3d(x.abs().unsqueeze(1), (block, 1, 1), (block, 1, 1)).squeeze(1)
        scale = _block_scale(amax, act_bits).repeat_interleave(block, dim=1)
    lim = float(2 ** (act_bits - 1) - 1)
    # Dividing and multiplying by a power of two are exact (normal range): the result is the
    # mantissa times its block's scale, as the kernel sees it.
    return torch.clamp(torch.round(x / scale), -lim, lim) * scale


def bfp_standard_ops(
    x: torch.Tensor, channels: int, block_size: int, act_bits: int, groups: int
) -> torch.Tensor:
    """Block floating point round trip of ``x`` [N, C, H, W] (what the kernel multiplies).

    ``channels`` is C as a Python int, and every block boundary a constant: block arithmetic on
    traced sizes would be exported with truncating division. Blocks are ``block_size``
    consecutive channels of a group, the last one of each group shorter when ``block_size`` does
    not divide the group's channels: then the channels are cut into segments of equal blocks
    (constant slices), each rounded on its own, and concatenated.
    """
    cg = channels // groups
    if cg <= block_size:  # one block per group
        return _bfp_segment(x, cg, act_bits)
    rem = cg % block_size
    if rem == 0:  # blocks never straddle a group boundary
        return _bfp_segment(x, block_size, act_bits)
    parts = []
    full = cg - rem
    for g in range(groups):
        c0 = g * cg
        parts.append(_bfp_segment(x[:, c0 : c0 + full], block_size, act_bits))
        parts.append(_bfp_segment(x[:, c0 + full : c0 + cg], rem, act_bits))
    return torch.cat(parts, 1)


class StandardOpsDSConv:
    """The exporting forward of one DSConv2d (frozen or QAT), as standard operators.

    Built when an export starts: the VQK, KDS scales and channel shift are read (a QAT layer's
    weight is quantised) once, into constants of the traced graph. The VQK is laid out in
    channel blocks ``[O, nblocks, block_size, kh, kw]`` so that its dequantisation is one
    broadcast ``Multiply`` by ``alpha * CDSw`` ``[O, nblocks, 1, kh, kw]``; ``CDSb`` and the
    bias become the conv's bias. (Folding the channel scale into the KDS scale changes float
    rounding only, like the float accumulation itself, and saves a node per layer.)
    """

    def __init__(self, m):
        from ..dsconv.quant_primitives import num_blocks, quantize_weight

        self.module = m
        with torch.no_grad():
            if m.frozen:
                q, alpha, kdsb = m.intweight, m.alpha, m.KDSb
            else:  # the quantiser QAT trains against (fake_quantize_weight)
                q, alpha, kdsb = quantize_weight(
                    m.weight.detach().float(), m.bits, m.block_size, m.KDSBias
                )
            o, cg, kh, kw = q.shape
            bs = m.block_size
            nblk = num_blocks(cg, bs)
            self.cg = cg
            self.weight_shape = (o, nblk * bs, kh, kw)
            # Zero VQK channels pad the last block: sliced off after the dequantisation.
            qb = torch.zeros(o, nblk * bs, kh, kw, dtype=torch.int8, device=q.device)
            qb[:, :cg] = q
            self.q = qb.view(o, nblk, bs, kh, kw)
            cdsw = 1.0 if m.CDSw is None else m.CDSw.detach().float().view(o, 1, 1, 1, 1)
            self.scale = (alpha.float().reshape(o, nblk, 1, kh, kw) * cdsw).contiguous()
            self.shift = None  # KDSb * CDSw, added to the dequantised weight
            if kdsb is not None:
                self.shift = (kdsb.float().reshape(o, nblk, 1, kh, kw) * cdsw).contiguous()
            bias = None
            for t in (m.CDSb, m.bias):
                if t is not None:
                    bias = t.detach().float() if bias is None else bias + t.detach().float()
            self.bias = None if bias is None else bias.contiguous()

    def weight(self) -> torch.Tensor:
        """The float conv weight ``CDSw * (alpha * q (+ KDSb))``, computed in the graph from the
        int8 VQK."""
        w = self.q.to(torch.float32) * self.scale
        if self.shift is not None:
            w = w + self.shift
        w = w.reshape(self.weight_shape)
        return w if self.weight_shape[1] == self.cg else w[:, : self.cg]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        m = self.module
        dtype = x.dtype
        xq = bfp_standard_ops(x.float(), m.in_channels, m.block_size, m.act_bits, m.groups)
        y = F.conv2d(xq, self.weight(), self.bias, m.stride, m.padding, m.dilation, m.groups)
        if m.fuse_silu:
            y = F.silu(y)
        return y.to(dtype)


@contextlib.contextmanager
def export_mode(model: torch.nn.Module):
    """Within the block, every DSConv2d of ``model`` runs :class:`StandardOpsDSConv` (its
    weights as they are on entry)."""
    from ..dsconv.module import DSConv2d

    swapped = []
    try:
        for m in model.modules():
            if isinstance(m, DSConv2d) and "forward" not in m.__dict__:
                m.forward = StandardOpsDSConv(m)
                swapped.append(m)
        yield model
    finally:
        for m in swapped:
            m.__dict__.pop("forward", None)


def keep_dsconv_numbers(ov_model) -> None:
    """Mark an OpenVINO model (``openvino.Model``) so that OpenVINO computes DSConv layers as
    exported: ``DYNAMIC_QUANTIZATION_GROUP_SIZE=0`` in its ``runtime_options``, which
    ``compile_model`` applies unless the caller sets that property itself.

    OpenVINO's CPU plugin turns 1x1 convolutions with int8-compressed weights into
    fully-connected layers and, by default, quantises their activations on the fly (int8, one
    scale per 32 input channels): on top of the BFP rounding that is a second, different
    rounding of every such layer's input (on a converted yolo11n at 64 px it moved 19% of the
    outputs by more than 1e-4 of their channel's scale, against 1% without it). The setting is
    saved in the IR.
    """
    ov_model.set_rt_info("0", ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"])


def _mark_openvino_files(path: str) -> None:
    """:func:`keep_dsconv_numbers` on the IR that ultralytics wrote under ``path``."""
    import os
    import tempfile
    from pathlib import Path

    import openvino as ov

    for xml in Path(path).glob("*.xml"):
        model = ov.Core().read_model(str(xml))
        keep_dsconv_numbers(model)
        # Written next to the original, then moved over it: the model read may still map the
        # original .bin. compress_to_fp16=False keeps the stored precision as it is (an fp16
        # export's weights are already fp16 in the IR).
        with tempfile.TemporaryDirectory(dir=xml.parent) as tmp:
            out = Path(tmp) / xml.name
            ov.save_model(model, str(out), compress_to_fp16=False)
            del model
            for suffix in (".xml", ".bin"):
                os.replace(out.with_suffix(suffix), xml.with_suffix(suffix))


def wrap_export(original, name: str = "export_onnx"):
    """Wrap the ultralytics method ``Exporter.<name>`` (``original``) to run inside
    :func:`export_mode` (and, for ``export_openvino``, to mark the IR with
    :func:`keep_dsconv_numbers` when the model has DSConv layers)."""
    openvino = name == "export_openvino"

    @functools.wraps(original)
    def export(self, *args, **kwargs):
        from ..dsconv.module import DSConv2d

        with export_mode(self.model):
            out = original(self, *args, **kwargs)
        f = out[0] if isinstance(out, (tuple, list)) else out
        if openvino and f and any(isinstance(m, DSConv2d) for m in self.model.modules()):
            _mark_openvino_files(f)
        return out

    export.__dsconv_ext_original__ = original
    return export
