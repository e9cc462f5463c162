"""The reference (float64, by definition) against brute-force loops on tiny problems, and the
PyTorch fallback against the reference over hundreds of random problems. (Wide, grouped and
depthwise geometries against the loops: test_dsconv_reference_brute_force.py.)"""

import pytest
import torch
from brute_force import dsconv2d_loop
from dsconv_cases import integer_exact_case, random_case
from dsconv_compare import BRUTE_ATOL, BRUTE_RTOL, assert_close, exact

from dsconv_ext import dsconv2d_fallback, dsconv2d_reference


@pytest.mark.parametrize("seed", range(25))
def test_reference_matches_brute_force(seed):
    case = random_case(seed, max_c=8, max_hw=5, max_n=2)
    y = dsconv2d_reference(**case)
    y_loop = dsconv2d_loop(
        case["x"],
        case["intweight"],
        case["alpha"],
        case["KDSb"],
        case.get("CDSw"),
        case.get("CDSb"),
        case.get("bias"),
        case["stride"],
        case["padding"],
        case["dilation"],
        case["groups"],
        case["block_size"],
        case["act_bits"],
    )
    if case["fuse_silu"]:
        y_loop = torch.nn.functional.silu(y_loop)
    assert_close(y.double(), y_loop, f"seed={seed}", BRUTE_RTOL, BRUTE_ATOL)


@pytest.mark.parametrize("seed", range(300))
def test_fallback_matches_reference(seed):
    case = random_case(seed)
    y_ref = dsconv2d_reference(**case)
    y = dsconv2d_fallback(**case)
    assert_close(y, y_ref, f"random_case({seed})")


@pytest.mark.parametrize("seed", range(40))
def test_integer_sums_exact(seed):
    case = integer_exact_case(seed)
    y_ref, sums = dsconv2d_reference(**case, return_int_sums=True)
    # With E = 0 and alpha = 1 the output is the plain sum of the per-(block, tap) integers.
    assert torch.equal(y_ref.double(), sums.sum(dim=(2, 3)).double()), f"seed={seed}"
    assert exact(dsconv2d_fallback(**case), y_ref) is None, f"seed={seed}"


def test_int_sums_match_direct_integer_conv():
    torch.manual_seed(0)
    case = integer_exact_case(3)
    x, q = case["x"], case["intweight"]
    _, sums = dsconv2d_reference(**case, return_int_sums=True)
    # A float64 conv of integer tensors is exact: total over blocks and taps must equal it.
    y_int = torch.nn.functional.conv2d(
        x.double(),
        q.double(),
        None,
        case["stride"],
        case["padding"],
        case["dilation"],
        case["groups"],
    )
    assert torch.equal(sums.sum(dim=(2, 3)).double(), y_int)


def test_nonfinite_activations_propagate_as_nan():
    torch.manual_seed(0)
    case = random_case(7)
    x = torch.randn(1, 8, 6, 6)
    from dsconv_ext.dsconv.quant_primitives import quantize_weight

    q, alpha, _ = quantize_weight(torch.randn(4, 8, 3, 3), 8, 4)
    x[0, 5, 2, 3] = float("inf")
    x[0, 0, 0, 0] = float("nan")
    for fn in (dsconv2d_reference, dsconv2d_fallback):
        y = fn(x, q, alpha, padding=1, block_size=4)
        nan = torch.isnan(y[0, 0])
        # Outputs whose 3x3 window covers (2, 3) or (0, 0) are NaN, all others finite.
        expect = torch.zeros(6, 6, dtype=torch.bool)
        expect[1:4, 2:5] = True
        expect[0:2, 0:2] = True
        assert torch.equal(nan, expect), fn.__name__
        assert torch.isfinite(y[0, 0][~expect]).all()
    del case


def test_fallback_half_and_bfloat16_inputs():
    case = random_case(11)
    y_ref = dsconv2d_reference(**case)
    for dt in (torch.float16, torch.bfloat16):
        c = dict(case, x=case["x"].to(dt))
        y = dsconv2d_fallback(**c)
        assert y.dtype == dt
        y_ref_dt = dsconv2d_reference(**c)
        assert_close(y, y_ref_dt, dt, rtol=1e-2)
    del y_ref
