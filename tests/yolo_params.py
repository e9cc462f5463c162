"""Parameter counts of the configs, derived from the YAML with closed-form per-module formulas.

Independent of ultralytics' ``parse_model`` and of the module classes: the scaling rules
(``make_divisible(min(c2, max_channels) * width, 8)``, ``max(round(n * depth), 1)``, ``c3k`` forced
at m/l/x) and every module's parameter formula are written out here. The formulas are checked
against the official YOLO11 totals, which the seeds quote (2,624,080 for yolo11n, ...).
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml

REG_MAX = 16


def make_div(x: float, d: int = 8) -> int:
    return math.ceil(x / d) * d


def conv(c1: int, c2: int, k: int = 1, g: int = 1) -> int:
    """Conv2d without bias + BatchNorm (weight, bias)."""
    return c1 // g * c2 * k * k + 2 * c2


def conv2d(c1: int, c2: int, k: int = 1) -> int:
    """Plain Conv2d with bias."""
    return c1 * c2 * k * k + c2


def bottleneck(c1: int, c2: int, k: int = 3, e: float = 0.5) -> int:
    c_ = int(c2 * e)
    return conv(c1, c_, k) + conv(c_, c2, k)


def c3k(c1: int, c2: int, n: int = 2, e: float = 0.5, k: int = 3) -> int:
    c_ = int(c2 * e)
    return 2 * conv(c1, c_) + conv(2 * c_, c2) + n * bottleneck(c_, c_, k, 1.0)


def c3k2(c1: int, c2: int, n: int, use_c3k: bool, e: float = 0.5) -> int:
    c = int(c2 * e)
    inner = c3k(c, c, 2) if use_c3k else bottleneck(c, c)
    return conv(c1, 2 * c) + conv((2 + n) * c, c2) + n * inner


def sppf(c1: int, c2: int) -> int:
    c_ = c1 // 2
    return conv(c1, c_) + conv(4 * c_, c2)


def c2psa(c1: int, n: int, e: float = 0.5) -> int:
    c = int(c1 * e)
    heads = c // 64
    key_dim = int((c // heads) * 0.5)
    attn = conv(c, c + 2 * key_dim * heads) + conv(c, c) + conv(c, c, 3, g=c)
    ffn = conv(c, 2 * c) + conv(2 * c, c)
    return conv(c1, 2 * c) + conv(2 * c, c1) + n * (attn + ffn)


def bra(dim: int) -> int:
    """qkv Linear (dim -> 3 dim), output Linear, 3x3 depth-wise lepe, all with bias."""
    return dim * 3 * dim + 3 * dim + dim * dim + dim + dim * 9 + dim


def detect(nc: int, ch) -> int:
    c2, c3 = max(16, ch[0] // 4, REG_MAX * 4), max(ch[0], min(nc, 100))
    box = sum(conv(x, c2, 3) + conv(c2, c2, 3) + conv2d(c2, 4 * REG_MAX) for x in ch)
    cls = sum(
        conv(x, x, 3, g=x) + conv(x, c3) + conv(c3, c3, 3, g=c3) + conv(c3, c3) + conv2d(c3, nc)
        for x in ch
    )
    return box + cls + REG_MAX  # DFL: a fixed 1x1 conv of reg_max weights (still a parameter)


def segment(nc: int, nm: int, npr: int, ch) -> int:
    proto = conv(ch[0], npr, 3) + (npr * npr * 4 + npr) + conv(npr, npr, 3) + conv(npr, nm)
    c4 = max(ch[0] // 4, nm)
    return (
        detect(nc, ch) + proto + sum(conv(x, c4, 3) + conv(c4, c4, 3) + conv2d(c4, nm) for x in ch)
    )


def obb(nc: int, ne: int, ch) -> int:
    c4 = max(ch[0] // 4, ne)
    return detect(nc, ch) + sum(conv(x, c4, 3) + conv(c4, c4, 3) + conv2d(c4, ne) for x in ch)


def derive(cfg: Path, scale: str, nc: int = None):
    """Per-layer parameter counts and output channels of ``cfg`` at ``scale``.

    Returns:
        (list of per-layer counts, total).
    """
    d = yaml.safe_load(Path(cfg).read_text())
    nc = d["nc"] if nc is None else nc
    depth, width, max_ch = d["scales"][scale]
    ch, counts = [3], []
    for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
        args = [nc if a == "nc" else a for a in args]
        n = max(round(n * depth), 1) if n > 1 else n
        c1 = ch[f] if isinstance(f, int) else None
        scaled = lambda c: make_div(min(c, max_ch) * width)  # noqa: E731
        if m in ("Conv", "DSConv"):
            c2 = scaled(args[0])
            p = conv(c1, c2, args[1] if len(args) > 1 else 1)
        elif m in ("C3k2", "C3k2_DSConv"):
            c2 = scaled(args[0])
            use_c3k = scale in "mlx" or (len(args) > 1 and args[1])
            p = c3k2(c1, c2, n, use_c3k, args[2] if len(args) > 2 else 0.5)
        elif m == "SPPF":
            c2 = scaled(args[0])
            p = sppf(c1, c2)
        elif m == "C2PSA":
            c2 = scaled(args[0])
            assert c2 == c1
            p = c2psa(c1, n)
        elif m == "BiLevelRoutingAttention":
            c2, p = c1, bra(c1)
        elif m == "nn.Upsample":
            c2, p = c1, 0
        elif m == "Concat":
            c2, p = sum(ch[x] for x in f), 0
        elif m in ("Detect", "Segment", "OBB"):
            chs = [ch[x] for x in f]
            c2 = None
            if m == "Detect":
                p = detect(nc, chs)
            elif m == "Segment":
                p = segment(nc, args[1], scaled(args[2]), chs)
            else:
                p = obb(nc, args[1], chs)
        else:
            raise KeyError(f"no formula for {m}")
        counts.append(p)
        ch = ([] if i == 0 else ch) + [c2]
    return counts, sum(counts)


# Official YOLO11 detection totals (ultralytics' yolo11.yaml comments, quoted by the seed).
YOLO11_TOTALS = {"n": 2624080, "s": 9458752, "m": 20114688, "l": 25372160, "x": 56966176}

# The seed's layer table for yolo11-BiFormer at the n scale (8.3.0), 3,635,152 in all.
SEED_BIFORMER_N = [
    464, 4672, 6640, 36992, 26080, 147712, 87040, 295424, 346112, 164608, 249728, 0, 0, 111296,
    0, 0, 265728, 32096, 36992, 0, 150144, 86720, 147712, 0, 595200, 378880, 464912,
]  # fmt: skip
