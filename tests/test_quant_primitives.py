"""Quantisation primitives against brute-force loops and hand-computed values."""

import math

import pytest
import torch
from brute_force import bfp_block, quantize_weight_loop

from dsconv_ext import quant_primitives as qp


def test_bfp_hand_computed():
    # Block max 5.0: floor(log2 5) = 2, E = 2 - 6 = -4, mantissa = round(x * 16).
    x = torch.tensor([5.0, -1.03125, 0.5, 0.0]).view(1, 4, 1, 1)
    m, e = qp.bfp_quantize(x, block_size=4, mant_bits=8)
    assert e.item() == -4
    assert m.view(-1).tolist() == [80, -16, 8, 0]  # -1.03125*16 = -16.5 -> -16 (half to even)
    # Block max exactly 127.5 * 2^E rounds up to 128 and is clamped to 127.
    x = torch.tensor([127.5, 1.0]).view(1, 2, 1, 1)
    m, e = qp.bfp_quantize(x, block_size=2, mant_bits=8)
    assert e.item() == 0 and m.view(-1).tolist() == [127, 1]
    # All-zero block: exponent 0, mantissas 0.
    m, e = qp.bfp_quantize(torch.zeros(1, 3, 1, 1), block_size=3, mant_bits=4)
    assert e.item() == 0 and m.abs().sum() == 0


@pytest.mark.parametrize("seed", range(40))
def test_bfp_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    groups = [1, 2, 3][seed % 3]
    C = groups * int(torch.randint(1, 9, (1,), generator=g))
    B = int(torch.randint(1, 6, (1,), generator=g))
    bits = 2 + seed % 7
    x = torch.randn(2, C, 3, 2, generator=g) * 10 ** float(torch.randint(-3, 4, (1,), generator=g))
    x[x.abs() < 0.1] = 0.0  # some zero blocks / zero entries
    m, e = qp.bfp_quantize(x, B, bits, groups)
    Cg = C // groups
    nblk = -(-Cg // B)
    for n in range(2):
        for grp in range(groups):
            for b in range(nblk):
                chans = list(range(grp * Cg + b * B, grp * Cg + min((b + 1) * B, Cg)))
                for h in range(3):
                    for w in range(2):
                        ms, ee = bfp_block([float(x[n, c, h, w]) for c in chans], bits)
                        assert e[n, grp * nblk + b, h, w].item() == ee, f"seed={seed}"
                        assert [int(m[n, c, h, w]) for c in chans] == ms, f"seed={seed}"


def test_bfp_extreme_magnitudes_and_nonfinite():
    x = torch.tensor([1e-40, 3e-41, 3e38, -1e38, float("nan"), 1.0]).view(1, 6, 1, 1)
    m, e = qp.bfp_quantize(x, block_size=2, mant_bits=8)
    for b in range(2):
        ms, ee = bfp_block([float(v) for v in x.view(-1)[2 * b : 2 * b + 2]], 8)
        assert e[0, b, 0, 0].item() == ee and m.view(-1)[2 * b : 2 * b + 2].tolist() == ms
    assert e[0, 2, 0, 0].item() == qp.NONFINITE_EXPONENT
    assert m.view(-1)[4:].tolist() == [0, 0]
    deq = qp.bfp_dequantize(m, e, 2)
    assert torch.isnan(deq.view(-1)[4:]).all() and torch.isfinite(deq.view(-1)[:4]).all()


@pytest.mark.parametrize("seed", range(30))
def test_quantize_weight_matches_loop(seed):
    g = torch.Generator().manual_seed(seed)
    bits = 2 + seed % 7
    B = [1, 3, 4, 8, 16][seed % 5]
    w = torch.randn(3, int(torch.randint(1, 12, (1,), generator=g)), 3, 1, generator=g)
    w[0, :, 0, 0] = 0  # an all-zero block: q = 0, alpha = 0
    q, alpha, kdsb = qp.quantize_weight(w, bits, B)
    q_ref, alpha_ref = quantize_weight_loop(w, bits, B)
    assert kdsb is None
    assert torch.equal(q, q_ref), f"seed={seed}"
    torch.testing.assert_close(alpha.double(), alpha_ref, rtol=1e-6, atol=1e-12)
    assert q.min() >= -(2 ** (bits - 1)) and q.max() <= 2 ** (bits - 1) - 1


def test_quantize_weight_kds_bias_is_least_squares():
    torch.manual_seed(0)
    w = torch.randn(4, 10, 1, 1) + 3.0  # a strong mean that only a bias can fit
    q, alpha, kdsb = qp.quantize_weight(w, 3, 5, kds_bias=True)
    for o in range(4):
        for b in range(2):
            qs = q[o, 5 * b : 5 * b + 5, 0, 0].double()
            ws = w[o, 5 * b : 5 * b + 5, 0, 0].double()
            A = torch.stack([qs, torch.ones_like(qs)], 1)
            sol = torch.linalg.lstsq(A, ws.unsqueeze(1)).solution.view(-1)
            assert math.isclose(alpha[o, b, 0, 0].item(), sol[0].item(), rel_tol=1e-5)
            assert math.isclose(kdsb[o, b, 0, 0].item(), sol[1].item(), rel_tol=1e-5, abs_tol=1e-6)
    err_bias = (qp.dequantize_weight(q, alpha, kdsb, block_size=5) - w).norm()
    q2, a2, _ = qp.quantize_weight(w, 3, 5)
    assert err_bias < (qp.dequantize_weight(q2, a2, block_size=5) - w).norm()


@pytest.mark.parametrize("bits", range(2, 9))
def test_pack_roundtrip_and_size(bits):
    g = torch.Generator().manual_seed(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    q = torch.randint(lo, hi + 1, (7, 5, 3, 3), generator=g, dtype=torch.int8)
    packed = qp.pack_intweight(q, bits)
    assert packed.dtype == torch.uint8
    assert torch.equal(qp.unpack_intweight(packed, bits, q.shape), q)
    per_byte = {2: 4, 3: 2, 4: 2}.get(bits, 1)
    assert packed.numel() == -(-q.numel() // per_byte)


@pytest.mark.parametrize(
    "bad, exc", [(1, ValueError), (9, ValueError), (4.0, TypeError), (True, TypeError)]
)
def test_bits_out_of_range(bad, exc):
    with pytest.raises(exc, match="bits"):
        qp.quantize_weight(torch.randn(2, 2, 1, 1), bits=bad)
    with pytest.raises(exc, match="mant_bits"):
        qp.bfp_quantize(torch.randn(1, 2, 1, 1), mant_bits=bad)


@pytest.mark.parametrize("bad", [0, 1025, -3])
def test_block_size_out_of_range(bad):
    with pytest.raises(ValueError, match="block_size"):
        qp.quantize_weight(torch.randn(2, 2, 1, 1), block_size=bad)


def test_weight_checks():
    with pytest.raises(ValueError, match="4-D"):
        qp.quantize_weight(torch.randn(2, 2, 1))
    with pytest.raises(TypeError, match="floating"):
        qp.quantize_weight(torch.ones(2, 2, 1, 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="NaN"):
        qp.quantize_weight(torch.tensor([[[[float("nan")]]]]))


def test_straight_through_gradients():
    w = torch.randn(4, 6, 3, 3, requires_grad=True)
    x = torch.randn(1, 6, 5, 5, requires_grad=True)
    qp.fake_quantize_weight(w, 4, 4).sum().backward()
    qp.fake_quantize_bfp(x, 4, 8).mul(2).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))
    assert torch.equal(x.grad, torch.full_like(x, 2.0))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kds", [False, True])
def test_refinement_never_worse_per_block(bits, kds):
    torch.manual_seed(bits)
    w = torch.randn(16, 40, 3, 3)
    base = qp.quantize_weight(w, bits, 16, kds)
    refined = qp.quantize_weight(w, bits, 16, kds, refine_steps=4)

    def block_sse(q, alpha, kdsb):
        err = (qp.dequantize_weight(q, alpha, kdsb, block_size=16) - w) ** 2
        err = torch.nn.functional.pad(err, (0, 0, 0, 0, 0, 8))  # 40 -> 48 = 3 blocks of 16
        return err.view(16, 3, 16, 3, 3).sum(2)

    e0, e1 = block_sse(*base), block_sse(*refined)
    assert (e1 <= e0 * (1 + 1e-6) + 1e-12).all()
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert refined[0].min() >= lo and refined[0].max() <= hi
    if bits == 2:
        assert e1.sum() < 0.8 * e0.sum()  # refinement matters most at 2 bits


def test_dequantize_weight_needs_the_block_size():
    # 40 channels in 3 blocks: blocks of 16 (16, 16, 8), not 14 as ceil(40 / 3) would guess.
    w = torch.randn(2, 40, 1, 1)
    q, alpha, _ = qp.quantize_weight(w, 8, 16)
    err = (qp.dequantize_weight(q, alpha, block_size=16) - w).abs().max()
    assert err < 0.01 * w.abs().max()
    with pytest.raises(ValueError, match="blocks of 10"):
        qp.dequantize_weight(q, alpha, block_size=10)
