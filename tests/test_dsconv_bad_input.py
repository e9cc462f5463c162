"""Every public DSConv entry point rejects bad input with an error naming the argument."""

import pytest
import torch

from dsconv_ext import dsconv2d, dsconv2d_fallback, dsconv2d_reference
from dsconv_ext.dsconv.quant_primitives import quantize_weight

ENTRY_POINTS = [dsconv2d, dsconv2d_fallback, dsconv2d_reference]


def _good():
    q, alpha, kdsb = quantize_weight(torch.randn(8, 4, 3, 3), 8, 3, kds_bias=True)
    return dict(
        x=torch.randn(1, 8, 6, 6),
        intweight=q,
        alpha=alpha,
        KDSb=kdsb,
        CDSw=torch.ones(8),
        CDSb=torch.zeros(8),
        bias=torch.zeros(8),
        stride=1,
        padding=1,
        dilation=1,
        groups=2,
        block_size=3,
        act_bits=8,
    )


BAD = [
    ("x", dict(x=torch.randn(8, 6, 6)), ValueError, "x must be 4-D"),
    ("x", dict(x=torch.ones(1, 8, 6, 6, dtype=torch.int32)), TypeError, "x must be float"),
    ("x", dict(x=torch.randn(1, 6, 6, 6)), ValueError, "x has 6 channels"),
    ("x", dict(x=torch.randn(1, 8, 6, 6, dtype=torch.float64)), TypeError, "x must be float32"),
    ("intweight", dict(intweight=torch.randn(8, 4, 3, 3)), TypeError, "intweight must be an int8"),
    (
        "intweight",
        dict(intweight=torch.zeros(8, 4, 3, dtype=torch.int8)),
        ValueError,
        "intweight must be 4-D",
    ),
    ("alpha", dict(alpha=torch.ones(8, 1, 3, 3)), ValueError, r"alpha must have shape \(8, 2"),
    ("alpha", dict(alpha=torch.ones(8, 2, 3, 3, dtype=torch.int32)), TypeError, "alpha must be"),
    ("KDSb", dict(KDSb=torch.ones(8, 2, 3)), ValueError, "KDSb must have shape"),
    ("CDSw", dict(CDSw=torch.ones(7)), ValueError, "CDSw must have shape"),
    ("bias", dict(bias=torch.ones(8, 1)), ValueError, "bias must have shape"),
    ("groups", dict(groups=3), ValueError, "divisible by groups"),
    ("groups", dict(groups=0), ValueError, "groups must be a positive int"),
    ("block_size", dict(block_size=0), ValueError, "block_size"),
    ("block_size", dict(block_size=2048), ValueError, "block_size"),
    ("act_bits", dict(act_bits=1), ValueError, "act_bits"),
    ("act_bits", dict(act_bits=9), ValueError, "act_bits"),
    ("stride", dict(stride=0), ValueError, "stride"),
    ("stride", dict(stride=(1, 2, 3)), TypeError, "stride"),
    ("padding", dict(padding=-1), ValueError, "padding"),
    ("dilation", dict(dilation=0), ValueError, "dilation"),
    ("x", dict(x=torch.randn(1, 8, 1, 1), padding=0), ValueError, "too small"),
    ("device", dict(CDSw=torch.ones(8, device="meta")), ValueError, "CDSw is on meta"),
]


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "arg, change, exc, msg", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)]
)
def test_rejects(fn, arg, change, exc, msg):
    kwargs = dict(_good(), **change)
    with pytest.raises(exc, match=msg):
        fn(**kwargs)


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=lambda f: f.__name__)
def test_good_call_passes(fn):
    y = fn(**_good())
    assert y.shape == (1, 8, 6, 6) and torch.isfinite(y).all()
