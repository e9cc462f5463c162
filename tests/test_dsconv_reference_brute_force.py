"""The reference ``dsconv2d_reference`` (the kernel tests' oracle) against the brute-force loops
(tests/brute_force.py: Python scalars, one output element at a time, written from the
definition without dsconv_ext's vectorised helpers) on the geometries the kernels care about:
more channels than one block with a partial last block, groups, depthwise with a channel
multiplier, strides, dilations, padding, and activations at 1, near 1e-39, subnormal, NaN and
Inf (``brute_case`` in dsconv_cases.py; every case's convolution and KDSb term visible past the
tolerance). Small sizes keep the whole file within a few seconds on one core.
"""

import math

import pytest
import torch
from brute_force import bfp_block, dsconv2d_loop
from dsconv_cases import brute_case
from dsconv_compare import BRUTE_ATOL, BRUTE_RTOL, assert_close

from dsconv_ext import dsconv2d_reference
from dsconv_ext.dsconv.quant_primitives import bfp_quantize, exponent_to_scale

N_CASES = 96  # seeds 0..95: 48 wide, 24 grouped, 24 depthwise (the kind is seed % 4)


def loop(case):
    y = dsconv2d_loop(
        case["x"], case["intweight"], case["alpha"], case.get("KDSb"), case.get("CDSw"),
        case.get("CDSb"), case.get("bias"), case["stride"], case["padding"], case["dilation"],
        case["groups"], case["block_size"], case["act_bits"],
    )  # fmt: skip
    return torch.nn.functional.silu(y) if case["fuse_silu"] else y


def describe(case):
    return {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


@pytest.mark.parametrize("seed", range(N_CASES))
def test_reference_matches_brute_force(seed):
    case = brute_case(seed)
    y = dsconv2d_reference(**case)
    assert_close(y.double(), loop(case), f"brute_case({seed}) {describe(case)}", BRUTE_RTOL,
                 BRUTE_ATOL)  # fmt: skip


def test_cases_cover_the_geometries_and_values():
    """The seeds above hold what the file promises (so that a change of generator cannot
    quietly drop a family)."""
    seen = set()
    for seed in range(N_CASES):
        c = brute_case(seed)
        x, q, B, G = c["x"], c["intweight"], c["block_size"], c["groups"]
        O, Cg = q.shape[:2]
        if G == 1 and Cg > B:
            seen.add("several blocks")
            if Cg % B:
                seen.add("partial last block")
        if 1 < G < x.shape[1]:
            seen.add("groups")
        if G == x.shape[1] and O > G:
            seen.add("depthwise with multiplier")
        if max(c["stride"]) > 1:
            seen.add("stride")
        if max(c["dilation"]) > 1:
            seen.add("dilation")
        if max(c["padding"]) > 0:
            seen.add("padding")
        fin = x[torch.isfinite(x)]
        if ((fin != 0) & (fin.abs() < 2.0**-126)).any():
            seen.add("subnormal")
        if (fin.abs().max() < 1e-38) & (fin.abs().max() > 1e-40):
            seen.add("near 1e-39")
        if torch.isnan(x).any():
            seen.add("nan")
        if torch.isinf(x).any():
            seen.add("inf")
        if c.get("KDSb") is not None:
            seen.add("KDSb")
    want = {"several blocks", "partial last block", "groups", "depthwise with multiplier",
            "stride", "dilation", "padding", "subnormal", "near 1e-39", "nan", "inf",
            "KDSb"}  # fmt: skip
    assert want <= seen, want - seen


@pytest.mark.parametrize("mant_bits", [2, 5, 8])
def test_bfp_matches_brute_force_near_the_subnormal_range(mant_bits):
    """Block floating point of blocks whose max sits around 2^-126 (the normal / subnormal
    boundary) and below, one block at a time against the loop's ``bfp_block``."""
    g = torch.Generator().manual_seed(mant_bits)
    B = 5
    exps = torch.randint(-150, -120, (64,), generator=g)
    x = torch.randn(1, B, 8, 8, generator=g) * torch.pow(2.0, exps.double()).view(1, 1, 8, 8)
    x = x.float()
    x[0, 2, 0, 0] = math.nan
    x[0, 4, 0, 1] = math.inf
    mant, expo = bfp_quantize(x, B, mant_bits)
    scale = exponent_to_scale(expo)
    for h in range(8):
        for w in range(8):
            ms, e = bfp_block([float(x[0, c, h, w]) for c in range(B)], mant_bits)
            assert [int(m) for m in mant[0, :, h, w]] == ms, (h, w)
            if e is None:
                assert math.isnan(scale[0, 0, h, w])
            else:
                assert scale[0, 0, h, w].item() == 2.0**e, (h, w)
