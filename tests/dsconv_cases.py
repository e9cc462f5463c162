"""Random DSConv problems shared by the reference, fallback, kernel and module tests."""

import torch

from dsconv_ext.dsconv.quant_primitives import num_blocks, quantize_weight


def random_case(seed: int, max_c: int = 24, max_hw: int = 9, max_n: int = 3, device="cpu"):
    """A random dsconv2d call: dict of keyword arguments for dsconv2d / dsconv2d_reference."""
    g = torch.Generator().manual_seed(seed)

    def ri(lo, hi):  # inclusive
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    groups = [1, 1, 1, 2, 3, 4][ri(0, 5)]
    depthwise = ri(0, 7) == 0
    Cg = 1 if depthwise else ri(1, max(1, max_c // groups))
    C = Cg * (groups if not depthwise else ri(1, 6))
    if depthwise:
        groups = C
    Og = 1 if depthwise and ri(0, 1) else ri(1, 4)
    O = Og * groups
    kh, kw = ri(1, 3), ri(1, 3)
    stride = (ri(1, 2), ri(1, 3))
    dilation = (ri(1, 2), ri(1, 2))
    padding = (ri(0, 2), ri(0, 2))
    H = ri(max(1, dilation[0] * (kh - 1) + 1 - 2 * padding[0]), max_hw)
    W = ri(max(1, dilation[1] * (kw - 1) + 1 - 2 * padding[1]), max_hw)
    block_size = [1, 2, 3, 4, 5, 8, 16, 32, 64][ri(0, 8)]
    bits, act_bits = ri(2, 8), ri(2, 8)
    x = torch.randn(ri(1, max_n), C, H, W, generator=g) * 3 ** ri(-2, 2)
    w = torch.randn(O, Cg, kh, kw, generator=g)
    kds = ri(0, 2) == 0
    q, alpha, kdsb = quantize_weight(w, bits, block_size, kds_bias=kds)
    assert alpha.shape[1] == num_blocks(Cg, block_size)
    opt = {}
    if ri(0, 1):
        opt["CDSw"] = torch.rand(O, generator=g) + 0.5
        opt["CDSb"] = torch.randn(O, generator=g)
    if ri(0, 1):
        opt["bias"] = torch.randn(O, generator=g)
    case = dict(
        x=x,
        intweight=q,
        alpha=alpha,
        KDSb=kdsb,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        block_size=block_size,
        act_bits=act_bits,
        fuse_silu=bool(ri(0, 1)),
        **opt,
    )
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}


def integer_exact_case(seed: int, device="cpu"):
    """A case whose output IS the per-block integer sum: integer activations with every block's
    max |x| in [64, 127] (so E = 0 at 8 mantissa bits), alpha = 1, no shifts."""
    case = random_case(seed, device=device)
    x = case["x"]
    g = torch.Generator().manual_seed(seed + 10_000)
    xi = torch.randint(-127, 128, x.shape, generator=g).float()
    # Force the first channel of every block in every group to a large value.
    C = x.shape[1]
    Cg = C // case["groups"]
    B = case["block_size"]
    for grp in range(case["groups"]):
        for b0 in range(0, Cg, B):
            xi[:, grp * Cg + b0] = torch.randint(64, 128, xi[:, 0].shape, generator=g).float()
    case.update(
        x=xi.to(device),
        alpha=torch.ones_like(case["alpha"]),
        KDSb=None,
        act_bits=8,
        fuse_silu=False,
    )
    for k in ("CDSw", "CDSb", "bias"):
        case.pop(k, None)
    return case
