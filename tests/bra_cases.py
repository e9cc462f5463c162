"""Random BiLevelRoutingAttention cases shared by the BRA tests (torch and Triton backends).

Every case is drawn from a fixed integer seed, and every failure message starts with that seed
and the drawn configuration, so a failing case can be rerun alone.
"""

from __future__ import annotations

import random
from typing import Dict, List, Tuple

import torch

MODES = ("identity", "ada_avgpool", "ada_maxpool", "maxpool", "avgpool")


def random_case(seed: int, small: bool = False) -> Tuple[dict, Tuple[int, int, int, int]]:
    """Constructor kwargs and an input shape ``(N, C, H, W)`` drawn from ``seed``.

    ``small`` keeps the work tiny (the Triton interpreter runs every program in Python).
    """
    rng = random.Random(seed)
    heads = rng.choice((1, 2) if small else (1, 2, 4))
    hd = rng.choice((4, 8, 12) if small else (4, 8, 12, 16))
    dim = heads * hd
    qk_dim = rng.choice((None, None, heads * rng.choice((4, 8, 16))))
    n_win = rng.choice((1, 2, 3) if small else (1, 2, 3, 4, 5, 7))
    mode = rng.choice(MODES)
    ratio = rng.choice((1, 2)) if mode in ("maxpool", "avgpool") else 4
    hmax = 13 if small else 30
    # Windows of at least `ratio` pixels per side for the strided pools; otherwise anything,
    # maps smaller than n_win included.
    lo = n_win * (ratio - 1) + 1 if mode in ("maxpool", "avgpool") else 1
    h, w = rng.randint(lo, max(lo, hmax)), rng.randint(lo, max(lo, hmax))
    soft = rng.random() < 0.4
    diff = soft and rng.random() < 0.5
    kw = dict(
        dim=dim,
        n_win=n_win,
        num_heads=heads,
        qk_dim=qk_dim,
        qk_scale=rng.choice((None, None, 0.3)),
        kv_per_win=rng.choice((1, 2, 3)),
        kv_downsample_ratio=ratio,
        kv_downsample_mode=mode,
        topk=rng.randint(1, n_win * n_win),
        param_attention=rng.choice(("qkvo", "qkvo", "qkv")),
        param_routing=diff and rng.random() < 0.5,
        diff_routing=diff,
        soft_routing=soft,
        side_dwconv=rng.choice((0, 3, 3, 5)),
    )
    n = rng.choice((1, 2) if small else (1, 2, 3))
    return kw, (n, dim, h, w)


def routing_gap(m, x: torch.Tensor) -> float:
    """Smallest logit gap between the last routed and the first unrouted region (inf if none).

    Fast backends compute the window means in another order; a gap below the rounding error
    could route differently, which says nothing about the backend.
    """
    seen = {}

    def hook(_mod, args, _out):
        seen["qk"] = [a.detach() for a in args]

    handle = m.router.register_forward_hook(hook)
    try:
        with torch.no_grad():
            m(x, ret_attn_mask=True)
    finally:
        handle.remove()
    q, k = seen["qk"]
    with torch.no_grad():
        logits = (m.router.emb(q) * m.router.scale) @ m.router.emb(k).transpose(-2, -1)
    if m.topk >= logits.shape[-1]:
        return float("inf")
    top = logits.topk(m.topk + 1, dim=-1).values
    return float((top[..., -2] - top[..., -1]).min())


def make_input(m, shape, seed: int, dtype=torch.float32) -> torch.Tensor:
    """A seeded input whose routing is unambiguous (redrawn while the gap is tiny)."""
    for attempt in range(20):
        g = torch.Generator().manual_seed(seed * 1000 + attempt)
        x = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
        if routing_gap(m, x) > 1e-4:
            return x
    return x


def build(kw: dict, seed: int, cls=None, **extra):
    from dsconv_ext.bra import BiLevelRoutingAttention

    torch.manual_seed(seed)
    m = (cls or BiLevelRoutingAttention)(**kw, **extra)
    # Non-trivial biases and routing embeddings (defaults are already random; make the lepe and
    # projections larger so that every path matters in the output).
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1.5)
    return m


def run(m, x: torch.Tensor, backend: str, grad: bool = True) -> Dict[str, torch.Tensor]:
    """Output and (with ``grad``) gradients of the input and every parameter, by name."""
    m.backend = backend
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(grad)
    y = m(x)
    res = {"out": y.detach().clone()}
    if grad:
        g = torch.Generator().manual_seed(7)
        gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
        (y * gy).sum().backward()
        res["grad_x"] = x.grad.clone()
        for name, p in m.named_parameters():
            if p.grad is not None:
                res[f"grad_{name}"] = p.grad.clone()
    return res


def compare(
    got: Dict[str, torch.Tensor], ref: Dict[str, torch.Tensor], tol: float, ctx: str
) -> List[str]:
    """Failures ``name: error`` where ``max|got-ref| > tol * max(1, max|ref|)``."""
    bad = []
    if set(got) != set(ref):
        bad.append(f"keys differ: {sorted(set(got) ^ set(ref))}")
    for name in sorted(set(got) & set(ref)):
        a, b = got[name].double(), ref[name].double()
        if a.shape != b.shape:
            bad.append(f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}")
            continue
        scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
        err = float((a - b).abs().max()) / scale if b.numel() else 0.0
        if not err <= tol:  # catches NaN too
            bad.append(f"{name}: relative error {err:.2e} > {tol:.0e}")
    return [f"{ctx}: {b}" for b in bad]
