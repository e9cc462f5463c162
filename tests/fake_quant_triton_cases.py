"""Fused Triton fake quantisation under the interpreter (CPU tensors) against the PyTorch
primitives, which define the numbers: ``fake_quantize_bfp`` (= ``bfp_dequantize(bfp_quantize(x))``
in x's dtype) and ``fake_quantize_weight`` (= ``dequantize_weight(quantize_weight(w))``).

Not collected by ``pytest tests/`` (no ``test_`` prefix): ``test_dsconv_fake_quant_triton.py``
runs this file in a subprocess with ``TRITON_INTERPRET=1``, which must be set before Triton
decorates the kernels. Run alone with
``TRITON_INTERPRET=1 python -m pytest tests/fake_quant_triton_cases.py``.

Values are compared bit for bit (NaN positions equal, every other float's bits equal): the kernels
promise the primitives' exact numbers, not approximations of them.
"""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover
    pytest.skip("needs TRITON_INTERPRET=1 before triton is imported", allow_module_level=True)

from fake_quant_data import FLT_MIN, random_activation, same_bits, special_blocks  # noqa: E402

from dsconv_ext import DSConv2d  # noqa: E402
from dsconv_ext.dsconv import fake_quant_triton  # noqa: E402
from dsconv_ext.dsconv.quant_primitives import (  # noqa: E402
    FAKE_QUANT_ENV,
    fake_quant_backend,
    fake_quantize_bfp,
    fake_quantize_bfp_fused,
    fake_quantize_weight,
    fake_quantize_weight_fused,
)

assert fake_quant_triton.INTERPRETED


def bfp_ref(x, B, m, G):
    return fake_quantize_bfp(x, B, m, G).detach()


def bfp_got(x, B, m, G):
    return fake_quantize_bfp_fused(x, B, m, G).detach()


# ------------------------------------------------------------------ activations
@pytest.mark.parametrize("seed", range(40))
def test_random_bit_identical(seed):
    x, B, m, G = random_activation(seed)
    what = f"seed={seed} shape={tuple(x.shape)} B={B} m={m} G={G} cl={not x.is_contiguous()}"
    same_bits(bfp_got(x, B, m, G), bfp_ref(x, B, m, G), what)


@pytest.mark.parametrize("m", range(2, 9))
def test_special_blocks_bit_identical(m):
    x = special_blocks(m)
    want = bfp_ref(x, 4, m, 1)
    # The reference itself has what the cases are for: NaN blocks, subnormal outputs, ties.
    assert torch.isnan(want[0, 24:28, 0, 0]).all() and not torch.isnan(want[0, 24:28, 0, 1]).any()
    assert (want[0, 0:4].abs() < FLT_MIN).all() and (want[0, 0:4] != 0).any()
    same_bits(bfp_got(x, 4, m, 1), want, f"special blocks m={m}")
    xc = x.contiguous(memory_format=torch.channels_last)
    same_bits(bfp_got(xc, 4, m, 1), want, f"special blocks channels-last m={m}")
    # Blocks of 3 over 32 channels (10 full, 1 partial) and 4 groups, with the same values.
    same_bits(bfp_got(x, 3, m, 1), bfp_ref(x, 3, m, 1), f"blocks of 3 m={m}")
    same_bits(bfp_got(x, 3, m, 4), bfp_ref(x, 3, m, 4), f"groups=4 m={m}")


@pytest.mark.parametrize("m", [2, 5, 8])
def test_wide_blocks_two_passes(m):
    """Blocks wider than one register chunk (two passes over the block), partial last block,
    a NaN in the second chunk of one block."""
    g = torch.Generator().manual_seed(100 + m)
    x = torch.randn(2, 300, 3, 4, generator=g) * torch.exp(
        3 * torch.randn(2, 300, 3, 4, generator=g)
    )
    x[1, 200, 2, 3] = float("nan")
    x[0, 150:, 1, 1] *= 1e-42
    for B, G in ((130, 1), (300, 1), (1024, 1), (100, 3), (65, 2)):
        same_bits(bfp_got(x, B, m, G), bfp_ref(x, B, m, G), f"wide B={B} G={G} m={m}")


def test_strided_input():
    """A non-dense view (a channel slice of a wider tensor, every other column): the kernel reads
    through x's strides."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(2, 80, 6, 10, generator=g)
    x = base[:, 8:72, :, ::2]
    assert not x.is_contiguous()
    same_bits(bfp_got(x, 16, 6, 2), bfp_ref(x, 16, 6, 2), "strided view")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seed", range(4))
def test_half_inputs_bit_identical(dtype, seed):
    """float16 / bfloat16 inputs, as an autocast network hands them to DSConv2d: the primitives
    quantise in float32 and cast the result back; so must the kernel."""
    x, B, m, G = random_activation(seed + 50)
    x = (x / x.abs().amax().clamp_min(1e-30) * (100.0 if dtype == torch.float16 else 1e20)).to(
        dtype
    )
    if seed == 0:
        x[0, 0, 0, 0] = float("nan")
        x[-1, -1, -1, -1] = 2.0**-24 if dtype == torch.float16 else 1e-40  # subnormal in dtype
    what = f"{dtype} seed={seed} B={B} m={m} G={G}"
    same_bits(bfp_got(x, B, m, G), bfp_ref(x, B, m, G), what)


def test_gradient_is_straight_through():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 24, 5, 5, generator=g)
    x[0, 1, 1, 1] = float("nan")
    gy = torch.randn(x.shape, generator=g)
    grads = []
    for fn in (fake_quantize_bfp, fake_quantize_bfp_fused):
        leaf = x.clone().requires_grad_()
        fn(leaf, 8, 4, 3).backward(gy)
        grads.append(leaf.grad)
    assert torch.equal(grads[0], gy) and torch.equal(grads[1], grads[0])


def test_empty_and_output_layout():
    assert bfp_got(torch.empty(0, 8, 3, 3), 4, 8, 1).shape == (0, 8, 3, 3)
    x = torch.randn(1, 8, 3, 3).contiguous(memory_format=torch.channels_last)
    assert bfp_got(x, 4, 8, 1).is_contiguous(memory_format=torch.channels_last)


def test_custom_op_schema():
    # Fake-tensor checks run on the GPU (test_dsconv_fake_quant_triton.py): the interpreter would
    # launch the kernel on fake tensors.
    utils = ("test_schema", "test_autograd_registration")
    x = torch.randn(2, 12, 3, 4)
    torch.library.opcheck(
        torch.ops.dsconv_ext_fq.bfp_fake_quant.default, (x, 4, 8, 3), test_utils=utils
    )
    w = torch.randn(6, 12, 3, 3)
    torch.library.opcheck(
        torch.ops.dsconv_ext_fq.weight_fake_quant.default, (w, 4, 5), test_utils=utils
    )


# ------------------------------------------------------------------ weights
def w_ref(w, bits, B):
    return fake_quantize_weight(w, bits, B).detach()


def w_got(w, bits, B):
    return fake_quantize_weight_fused(w, bits, B).detach()


@pytest.mark.parametrize("seed", range(21))
def test_weight_random_bit_identical(seed):
    g = torch.Generator().manual_seed(1000 + seed)

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    bits = 2 + seed % 7
    O, Cg, k = pick([1, 4, 9]), pick([1, 3, 16, 40, 130]), pick([1, 3, 5])
    B = pick([1, 5, 16, 32, 64, 128, 1024])
    w = torch.randn(O, Cg, k, k, generator=g) * 10.0 ** pick([-38, -3, 0, 30])
    w[w.abs() < w.abs().mean() * 0.05] = 0.0  # exact zeros, and all-zero blocks at Cg = 1
    what = f"seed={seed} shape={tuple(w.shape)} bits={bits} B={B}"
    same_bits(w_got(w, bits, B), w_ref(w, bits, B), what)


@pytest.mark.parametrize("bits", range(2, 9))
def test_weight_special_blocks(bits):
    """Rounding ties (max |w| = qmax makes the step exactly 1), all-zero blocks, subnormal
    weights, a block of several register chunks (1024 channels of 3x3), 2 blocks with a partial
    one."""
    qmax = 2 ** (bits - 1) - 1
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(6, 20, 3, 3, generator=g)
    w[0, :, 0, 0] = 0.5
    w[0, 0, 0, 0] = float(qmax)
    w[0, 1:6, 0, 0] = torch.tensor([0.5, -0.5, qmax - 0.5, -(qmax - 0.5), min(2.5, qmax - 0.5)])
    w[1] = 0.0  # an all-zero output channel
    w[2] *= 1e-40  # subnormal weights: the float32 alpha * q products are subnormal too
    w[3, :, 1, 1] = torch.tensor([2.0**-149, -(2.0**-149)] * 10)
    w[4] *= 3e37
    for B in (20, 8, 7):
        same_bits(w_got(w, bits, B), w_ref(w, bits, B), f"bits={bits} B={B}")
    wide = torch.randn(3, 1024, 3, 3, generator=g)
    same_bits(w_got(wide, bits, 1024), w_ref(wide, bits, 1024), f"wide bits={bits}")
    same_bits(w_got(wide, bits, 600), w_ref(wide, bits, 600), f"wide B=600 bits={bits}")


def test_weight_nonfinite_is_nan_in_its_block_and_tap():
    """quantize_weight raises on a NaN / Inf weight; the fused kernel (no host sync) makes that
    (block, tap) NaN and leaves every other one as the primitive computes it."""
    g = torch.Generator().manual_seed(9)
    w = torch.randn(4, 40, 3, 3, generator=g)
    bad = w.clone()
    bad[1, 5, 2, 0] = float("nan")  # block 0 of channel 1, tap (2, 0)
    bad[3, 39, 0, 1] = float("inf")  # block 2 of channel 3, tap (0, 1)
    got = w_got(bad, 8, 16)
    want = w_ref(w.masked_fill(~torch.isfinite(bad), 0.0), 8, 16)  # blocks are independent
    want[1, 0:16, 2, 0] = float("nan")
    want[3, 32:40, 0, 1] = float("nan")
    same_bits(got, want, "non-finite weights")
    with pytest.raises(ValueError, match="NaN or Inf"):
        fake_quantize_weight(bad, 8, 16)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_weight_half(dtype):
    w = torch.randn(8, 24, 3, 3, generator=torch.Generator().manual_seed(4)).to(dtype)
    same_bits(w_got(w, 8, 16), w_ref(w, 8, 16), f"weight {dtype}")


def test_weight_gradient_is_straight_through():
    w = torch.randn(4, 8, 3, 3, generator=torch.Generator().manual_seed(5))
    gy = torch.randn(w.shape)
    grads = []
    for fn in (fake_quantize_weight, fake_quantize_weight_fused):
        leaf = w.clone().requires_grad_()
        fn(leaf, 4, 8).backward(gy)
        grads.append(leaf.grad)
    assert torch.equal(grads[0], gy) and torch.equal(grads[1], gy)


# ------------------------------------------------------------------ the module
def _run_module(m, x, backend, autocast=False):
    os.environ[FAKE_QUANT_ENV] = backend
    try:
        m.zero_grad(set_to_none=True)
        leaf = x.detach().clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(leaf)
        y.float().backward(torch.ones(y.shape))
        grads = {n: p.grad for n, p in m.named_parameters()}
        return y.detach(), leaf.grad, grads
    finally:
        del os.environ[FAKE_QUANT_ENV]


@pytest.mark.parametrize(
    "kw",
    [
        dict(c1=40, c2=24, k=3, padding=1, groups=2, block_size=16, bits=4, act_bits=6, bias=True),
        dict(c1=33, c2=8, k=1, block_size=32, bits=8, act_bits=8, CDS=True),
        dict(c1=20, c2=12, k=3, stride=2, block_size=8, bits=3, act_bits=3, KDSBias=True),
        dict(c1=16, c2=16, k=3, padding=1, groups=16, block_size=1, bits=2, act_bits=2),
    ],
)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "autocast"])
def test_module_triton_path_matches_torch_path(kw, layout):
    """DSConv2d's QAT forward and backward are the same whichever fake quantisation runs."""
    kw = dict(kw)
    torch.manual_seed(0)
    m = DSConv2d(kw.pop("c1"), kw.pop("c2"), kw.pop("k"), **kw).train()
    x = torch.randn(2, m.in_channels, 7, 6) * 3
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    os.environ[FAKE_QUANT_ENV] = "triton"
    try:
        assert fake_quant_backend(x) == "triton"
    finally:
        del os.environ[FAKE_QUANT_ENV]
    ref = _run_module(m, x, "torch", layout == "autocast")
    got = _run_module(m, x, "triton", layout == "autocast")
    pairs = [("output", got[0], ref[0]), ("input gradient", got[1], ref[1])]
    pairs += [(f"grad of {n}", got[2][n], ref[2][n]) for n in ref[2]]
    for what, a, b in pairs:
        if layout == "channels_last":
            # The fused path keeps x's memory format (the primitive returns NCHW), so the float
            # conv after it runs on the other layout and sums in another order: float rounding.
            tol = 1e-6 * float(b.abs().max())
            assert (a - b).abs().max() <= tol, f"{kw} {layout}: {what}"
        else:
            same_bits(a, b, f"{kw} {layout}: {what}")


def test_auto_backend_keeps_pytorch_on_cpu():
    os.environ.pop(FAKE_QUANT_ENV, None)
    assert fake_quant_backend(torch.empty(1, 4, 2, 2)) == "torch"
