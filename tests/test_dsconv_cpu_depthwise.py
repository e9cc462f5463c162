"""The CPU kernel's depthwise path (groups == channels; csrc/cpu/kernel_avx*.cpp `depthwise`)
against the float64 reference, on each SIMD path.

The path quantises each value on its own (a one-channel BFP block) straight from NCHW, in bands
sized for L1, so the cases here vary what it depends on: plane sizes from 1 pixel to several
bands, strides, padding, dilation, kernel sizes (3x3 has its own unrolled tile), channel
multipliers, batch, thread count, every epilogue option, act_bits 2..8, and values across the
float range: subnormal, huge, NaN and Inf. A failing case prints its seed: ``dw_case(seed)``
(dsconv_cases.py, which makes every case's convolution visible past the comparison's tolerance).
"""

import math

import pytest
import torch
from dsconv_cases import dw_case
from dsconv_compare import assert_close
from test_dsconv_cpu_kernel import describe, op

import dsconv_ext
from dsconv_ext import dsconv2d_reference
from dsconv_ext.dsconv.quant_primitives import quantize_weight

pytestmark = pytest.mark.skipif(
    dsconv_ext.dsconv2d_backend("cpu") != "kernel", reason="the compiled CPU kernel is not loaded"
)

PATHS = ("int8", "float", "depthwise")  # order of torch.ops.dsconv_ext._cpu_path_calls()


def path_calls():
    return dict(zip(PATHS, torch.ops.dsconv_ext._cpu_path_calls()))


@pytest.mark.parametrize("chunk", range(4))
def test_depthwise_random_cases(isa, chunk, threads):
    n = 15 if isa in ("scalar", "neon_dot", "neon_model") else 60
    for i in range(chunk * n, (chunk + 1) * n):
        torch.set_num_threads(1 + i % 2)
        case = dw_case(i)
        assert_close(op(case), dsconv2d_reference(**case), f"dw_case({i}) {describe(case)}")


def test_depthwise_path_is_taken(isa):
    """groups == C goes to the depthwise path on the x86 SIMD ISAs (the float family on the
    portable and Arm ones); groups < C never does."""
    before = path_calls()
    for i in range(8):
        op(dw_case(i))
    after = path_calls()
    want = "float" if isa in ("scalar", "neon_dot", "neon_model") else "depthwise"
    assert after[want] - before[want] == 8, (isa, before, after)
    q, alpha, _ = quantize_weight(torch.randn(8, 2, 3, 3), 8, 32)
    case = dict(x=torch.randn(1, 8, 9, 9), intweight=q, alpha=alpha, stride=(1, 1),
                padding=(1, 1), dilation=(1, 1), groups=4, block_size=32, act_bits=8,
                fuse_silu=False)  # fmt: skip
    before = path_calls()
    assert_close(op(case), dsconv2d_reference(**case), "groups=4, 2 channels each")
    assert path_calls()["depthwise"] == before["depthwise"]


def test_depthwise_yolo_head_shapes(isa, threads):
    """The Detect head's depthwise 3x3 convs (YOLO11n channel counts, smaller maps), BN folded
    into CDS and SiLU fused as after dsconv_ext.quantize, batch 2, 1 and 2 threads."""
    g = torch.Generator().manual_seed(31)
    # Widths of whole vectors (the AVX-512 tile stores those rows straight out) and not.
    for C, H, W in ((64, 40, 32), (80, 20, 16), (48, 23, 27), (128, 10, 13), (256, 5, 8)):
        q, alpha, _ = quantize_weight(torch.randn(C, 1, 3, 3, generator=g), 8, 32)
        x = torch.nn.functional.silu(torch.randn(2, C, H, W, generator=g) * 2)
        case = dict(x=x, intweight=q, alpha=alpha, CDSw=torch.rand(C, generator=g) + 0.5,
                    CDSb=torch.randn(C, generator=g), stride=(1, 1), padding=(1, 1),
                    dilation=(1, 1), groups=C, block_size=32, act_bits=8,
                    fuse_silu=True)  # fmt: skip
        ref = dsconv2d_reference(**case)
        for t in (1, 2):
            torch.set_num_threads(t)
            assert_close(op(case), ref, f"C={C} H={H} W={W} threads={t}")


def test_depthwise_subnormal_and_nonfinite(isa):
    """Every value a subnormal, exactly representable as its own BFP value at 8 bits (so the
    output is exact), with NaN, +Inf and -Inf at the borders and the centre."""
    x = torch.arange(1, 1 + 2 * 3 * 17 * 19, dtype=torch.float32).view(2, 3, 17, 19)
    x = x.remainder(100) * 2.0**-149 * torch.where(x.remainder(3) == 0, -1.0, 1.0)
    x[0, 0, 0, 0], x[1, 2, 16, 18], x[0, 1, 8, 9] = math.nan, math.inf, -math.inf
    q = torch.randint(-3, 4, (3, 1, 3, 3), dtype=torch.int8)
    case = dict(x=x, intweight=q, alpha=torch.ones(3, 1, 3, 3), stride=(1, 1), padding=(1, 1),
                dilation=(1, 1), groups=3, block_size=32, act_bits=8, fuse_silu=False)  # fmt: skip
    y, ref = op(case), dsconv2d_reference(**case)
    assert torch.isnan(ref).any() and not torch.isnan(ref).all()
    assert torch.equal(torch.isnan(y), torch.isnan(ref))
    fin = ~torch.isnan(ref)
    assert torch.equal(y[fin], ref[fin])
