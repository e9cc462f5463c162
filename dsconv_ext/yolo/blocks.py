"""YOLO11 blocks whose bottlenecks run DSConv: ``C3k2_DSConv`` and the pieces it is built from.

Same structure, arguments and forward as ultralytics' ``Bottleneck`` / ``C3k`` / ``C3k2`` (they
subclass them and inherit ``forward``), with the bottleneck's two convolutions replaced by
:class:`dsconv_ext.DSConv`. The 1x1 split/merge convolutions of C2f/C3 stay ultralytics ``Conv``,
as in the original add-on ("C3k2 whose bottlenecks use DSConv"). ``bits``, ``block_size`` and
``act_bits`` may be appended to a YAML row to change the quantisation of those bottlenecks.
"""

from __future__ import annotations

import torch.nn as nn
from ultralytics.nn.modules.block import C3, Bottleneck, C2f
from ultralytics.nn.modules.conv import Conv

from ..dsconv.module import DSConv

__all__ = ["Bottleneck_DSConv", "C3k2_DSConv", "C3k_DSConv"]


def _dsconv(c1, c2, k, g=1, bits=8, block_size=32, act_bits=8):
    # Conv.default_act follows the YAML's `activation:` while parse_model runs; pass it on so that
    # our bottlenecks use the same activation as the ultralytics convs around them.
    return DSConv(
        c1, c2, k, 1, g=g, act=Conv.default_act, block_size=block_size, bits=bits, act_bits=act_bits
    )


class Bottleneck_DSConv(Bottleneck):
    """Residual bottleneck of two DSConvs: ``[N, c1, H, W] -> [N, c2, H, W]``.

    Args:
        c1 (int): input channels.
        c2 (int): output channels.
        shortcut (bool): add the input when ``c1 == c2``.
        g (int): groups of the second convolution.
        k (tuple): kernel sizes of the two convolutions.
        e (float): hidden channels ``int(c2 * e)``.
        bits (int): VQK width, 2..8.
        block_size (int): input channels per KDS block.
        act_bits (int): activation mantissa width.
    """

    def __init__(
        self, c1, c2, shortcut=True, g=1, k=(3, 3), e=0.5, bits=8, block_size=32, act_bits=8
    ):
        nn.Module.__init__(self)  # Bottleneck.__init__ would build two float Convs to discard
        c_ = int(c2 * e)
        q = dict(bits=bits, block_size=block_size, act_bits=act_bits)
        self.cv1 = _dsconv(c1, c_, k[0], **q)
        self.cv2 = _dsconv(c_, c2, k[1], g=g, **q)
        self.add = shortcut and c1 == c2


class C3k_DSConv(C3):
    """C3k with DSConv bottlenecks: ``[N, c1, H, W] -> [N, c2, H, W]``.

    Args:
        c1 (int): input channels.
        c2 (int): output channels.
        n (int): bottlenecks.
        shortcut (bool): residual bottlenecks.
        g (int): groups.
        e (float): hidden channels ``int(c2 * e)``.
        k (int): bottleneck kernel size.
        bits, block_size, act_bits: DSConv quantisation of the bottlenecks.
    """

    def __init__(
        self, c1, c2, n=1, shortcut=True, g=1, e=0.5, k=3, bits=8, block_size=32, act_bits=8
    ):
        super().__init__(c1, c2, 0, shortcut, g, e)  # n=0: no float bottlenecks to discard
        c_ = int(c2 * e)
        q = dict(bits=bits, block_size=block_size, act_bits=act_bits)
        self.m = nn.Sequential(
            *(Bottleneck_DSConv(c_, c_, shortcut, g, k=(k, k), e=1.0, **q) for _ in range(n))
        )


class C3k2_DSConv(C2f):
    """YOLO11's C3k2 with DSConv bottlenecks: ``[N, c1, H, W] -> [N, c2, H, W]``.

    Args:
        c1 (int): input channels.
        c2 (int): output channels.
        n (int): inner blocks.
        c3k (bool): inner blocks are ``C3k_DSConv`` (two bottlenecks each) instead of one
            ``Bottleneck_DSConv``; ultralytics forces it on at the m/l/x scales.
        e (float): hidden channels ``int(c2 * e)``.
        g (int): groups.
        shortcut (bool): residual bottlenecks.
        bits, block_size, act_bits: DSConv quantisation of the bottlenecks.
    """

    def __init__(
        self, c1, c2, n=1, c3k=False, e=0.5, g=1, shortcut=True, bits=8, block_size=32, act_bits=8
    ):
        nn.Module.__init__(self)  # C2f.__init__ would build n float Bottlenecks to discard
        self.c = int(c2 * e)
        self.cv1 = Conv(c1, 2 * self.c, 1, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        q = dict(bits=bits, block_size=block_size, act_bits=act_bits)
        self.m = nn.ModuleList(
            C3k_DSConv(self.c, self.c, 2, shortcut, g, **q)
            if c3k
            else Bottleneck_DSConv(self.c, self.c, shortcut, g, **q)
            for _ in range(n)
        )


# If this module's imports above were the first import of ultralytics, its import hook had to
# wait for the classes here: it runs now (see registry.register).
from .import_hook import module_finished  # noqa: E402

module_finished(__name__)
