"""Inputs and the bit-exact comparison shared by the fused fake-quantisation tests (the
interpreter cases and the GPU tests)."""

from __future__ import annotations

import torch

TINY = 2.0**-149  # the smallest float32 subnormal
FLT_MIN = 2.0**-126  # the smallest normal float32
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def same_bits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """NaN in the same places, identical bits everywhere else (got may be on a GPU)."""
    got = got.detach().cpu()
    assert got.shape == want.shape and got.dtype == want.dtype, (what, got.dtype, want.dtype)
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), f"{what}: NaN positions differ"
    view = _INT_VIEW[want.dtype]
    g, w = got[~nan].view(view), want[~nan].view(view)
    bad = (g != w).nonzero()
    if bad.numel():
        i = int(bad[0, 0])
        raise AssertionError(
            f"{what}: {bad.shape[0]} values differ, first {got[~nan][i].item()!r} "
            f"!= {want[~nan][i].item()!r} (input index {i} of the non-NaN values)"
        )


def random_activation(seed):
    g = torch.Generator().manual_seed(seed)

    def pick(seq):
        return seq[int(torch.randint(len(seq), (1,), generator=g))]

    groups = pick([1, 1, 2, 3])
    Cg = pick([1, 5, 16, 33, 64, 70, 130])
    B = pick([1, 4, 8, 16, 32, 64, 100, 1024])
    N, H, W = pick([1, 2, 3]), pick([1, 3, 7]), pick([1, 5, 11])
    m = 2 + seed % 7  # every mantissa width, 2..8
    x = torch.randn(N, Cg * groups, H, W, generator=g) * 10.0 ** pick([-30, -3, 0, 2, 30])
    # Heavy tails so that block maxima vary by orders of magnitude within one tensor.
    x = x * torch.exp(2 * torch.randn(x.shape, generator=g))
    if pick([False, True]):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, B, m, groups


def special_blocks(m):
    """One [1, 8 * 4, 3, 2] tensor, blocks of 4 channels, each pixel's blocks with its own
    character: subnormal, around FLT_MIN, all-zero and -0, near FLT_MAX, ties of the rounding,
    the clamp edge, non-finite values."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(1, 32, 3, 2, generator=g)
    lim = 2 ** (m - 1) - 1
    # Block 0: subnormal, block maxima from 1e-39 down to the smallest subnormal.
    x[0, 0:4] = torch.randn(4, 3, 2, generator=g) * 1e-40
    x[0, 0:4, 0, 0] = torch.tensor([TINY, -TINY, 0.0, TINY])
    x[0, 0:4, 0, 1] = torch.tensor([3 * TINY, -7 * TINY, 2 * TINY, TINY])
    x[0, 0:4, 1, 0] = torch.tensor([FLT_MIN - TINY, 1e-42, -1e-45, 5e-41])
    # Block 1: around FLT_MIN, normal maxima with subnormal members.
    x[0, 4:8] = torch.tensor([FLT_MIN, -FLT_MIN * 1.5, 1e-39, 3e-44]).view(4, 1, 1)
    # Block 2: all zero, with negative zeros.
    x[0, 8:12] = 0.0
    x[0, 9, 1, 1] = -0.0
    # Block 3: near FLT_MAX (the largest exponents).
    x[0, 12:16] = torch.tensor([3.4e38, -3.0e38, 1e38, -2.5e37]).view(4, 1, 1)
    # Block 4: ties. max = lim (E = 0) and members k + 1/2; at (2, 1) the same scaled by 2^-140
    # (a subnormal block with ties) and at (1, 1) by 2^100.
    ties = torch.tensor([float(lim), 0.5, -1.5, (lim - 1) + 0.5 if lim > 1 else -0.5])
    x[0, 16:20] = ties.view(4, 1, 1)
    x[0, 16:20, 2, 1] = ties * 2.0**-140
    x[0, 16:20, 1, 1] = ties * 2.0**100
    x[0, 16:20, 0, 1] = torch.tensor([-float(lim), -0.5, 2.5, -2.5])
    # Block 5: the clamp edge: lim + 1/2 rounds (half to even) to 2^(m-1), clamped back to lim.
    x[0, 20:24] = torch.tensor([lim + 0.5, -(lim + 0.5), lim + 0.25, -(lim + 0.75)]).view(4, 1, 1)
    # Blocks 6, 7: non-finite values poison their whole block (at some pixels only).
    x[0, 25, 0, 0] = float("nan")
    x[0, 26, 1, 1] = float("inf")
    x[0, 31, 2, 0] = float("-inf")
    x[0, 28:32, 0, 1] = float("nan")
    return x
