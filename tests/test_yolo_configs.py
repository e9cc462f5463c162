"""Every config at every scale: builds in ultralytics, parameters, forward, FLOPs, bad rows."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import yaml
from yolo_helpers import CONFIGS, IMGSZ
from yolo_params import SEED_BIFORMER_N, YOLO11_TOTALS, derive

CONFIG_FILES = sorted(p.name for p in CONFIGS.glob("*.yaml"))
SCALES = "nsmlx"


@pytest.fixture(scope="module", autouse=True)
def registered():
    import dsconv_ext.yolo as dy

    dy.register()


def build(cfg, scale: str, verbose: bool = False, **edit):
    """The ultralytics model for ``cfg`` (a file name in configs/ or a dict) at ``scale``."""
    from ultralytics.nn.tasks import DetectionModel, OBBModel, SegmentationModel

    d = copy.deepcopy(cfg) if isinstance(cfg, dict) else yaml.safe_load((CONFIGS / cfg).read_text())
    d.update(scale=scale, **edit)
    head = d["head"][-1][2]
    cls = {"Segment": SegmentationModel, "OBB": OBBModel}.get(head, DetectionModel)
    return cls(d, ch=3, verbose=verbose)


def test_configs_present():
    assert {
        "yolo11-C3k2-DSConv.yaml",
        "yolo11-BiFormer.yaml",
        "yolo11-BiFormer-seg.yaml",
        "yolo11-BiFormer-obb.yaml",
        "yolo11-C3k2-DSConv-BiFormer.yaml",
    } <= set(CONFIG_FILES)


def test_derivation_matches_official_yolo11():
    # The C3k2-DSConv config has yolo11's shape and a DSConv has a Conv's parameters (float
    # shadow weight + BN), so the formulas must give ultralytics' published yolo11 totals.
    for s in SCALES:
        assert derive(CONFIGS / "yolo11-C3k2-DSConv.yaml", s)[1] == YOLO11_TOTALS[s]
    counts, total = derive(CONFIGS / "yolo11-BiFormer.yaml", "n")
    assert (counts, total) == (SEED_BIFORMER_N, 3_635_152)


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("cfg", CONFIG_FILES)
def test_build_count_forward(cfg, scale):
    """Builds through ultralytics' parse_model, has the derived parameter count per layer, and
    runs forward in eval mode."""
    model = build(cfg, scale)
    counts, total = derive(CONFIGS / cfg, scale)
    assert [sum(p.numel() for p in m.parameters()) for m in model.model] == counts
    assert sum(p.numel() for p in model.parameters()) == total
    model.eval()
    with torch.no_grad():
        out = model(torch.rand(1, 3, IMGSZ, IMGSZ))
    pred = out
    while isinstance(pred, (tuple, list)):  # (pred, raw) in eval; segment nests one level more
        pred = pred[0]
    anchors = sum((IMGSZ // s) ** 2 for s in (8, 16, 32))
    assert pred.shape[0] == 1 and pred.shape[-1] == anchors and torch.isfinite(pred).all()


def test_seed_layer_table_biformer_n():
    model = build("yolo11-BiFormer.yaml", "n")
    assert [sum(p.numel() for p in m.parameters()) for m in model.model] == SEED_BIFORMER_N
    types = [m.type.rsplit(".", 1)[-1] for m in model.model]
    assert [i for i, t in enumerate(types) if t == "BiLevelRoutingAttention"] == [16, 20, 24]
    assert [model.model[i].dim for i in (16, 20, 24)] == [256, 192, 384]


def test_c3k_forced_at_mlx_and_width_scaling():
    from dsconv_ext.yolo import Bottleneck_DSConv, C3k2_DSConv, C3k_DSConv

    small, medium = build("yolo11-C3k2-DSConv.yaml", "n"), build("yolo11-C3k2-DSConv.yaml", "m")
    for model, forced in ((small, False), (medium, True)):
        blocks = [m for m in model.model if isinstance(m, C3k2_DSConv)]
        assert len(blocks) == 8
        for i, m in zip((2, 4, 6, 8, 13, 16, 19, 22), blocks):
            c3k = forced or i in (6, 8, 22)  # YAML says True for 6, 8, 22
            assert isinstance(m.m[0], C3k_DSConv if c3k else Bottleneck_DSConv), (i, m.m[0])
    # width 0.25 and max_channels 1024 at n: layer 8 asks 1024 -> 256; at m (512 cap) -> 512
    assert small.model[8].cv2.conv.out_channels == 256
    assert medium.model[8].cv2.conv.out_channels == 512


def test_dsconv_rows_scale_like_conv():
    from dsconv_ext import DSConv

    d = yaml.safe_load((CONFIGS / "yolo11-C3k2-DSConv.yaml").read_text())
    d["backbone"][1] = [-1, 1, "DSConv", [128, 3, 2]]
    model = build(d, "s")
    layer = model.model[1]
    assert isinstance(layer, DSConv)
    assert (layer.conv.in_channels, layer.conv.out_channels) == (32, 64)  # 64*0.5, 128*0.5


def _bad(row_index, row):
    d = yaml.safe_load((CONFIGS / "yolo11-C3k2-DSConv-BiFormer.yaml").read_text())
    rows = d["backbone"] + d["head"]
    rows[row_index] = row
    d["backbone"], d["head"] = rows[: len(d["backbone"])], rows[len(d["backbone"]) :]
    return d


@pytest.mark.parametrize(
    "index,row,match",
    [
        (
            2,
            [-1, 2, "C3k2_DSConv", [256, "yes", 0.25]],
            r"layer 2 \(C3k2_DSConv\).*'c3k' must be bool",
        ),
        (2, [-1, 2, "C3k2_DSConv", [256.0, False]], r"layer 2 \(C3k2_DSConv\).*'c2' must be int"),
        (1, [-1, 1, "DSConv", [128, 3, 2, None, 1, 1, "relu"]], r"layer 1 \(DSConv\).*'act'"),
        (2, [-1, 2, "C3k2_DSConv", [256, False, 0.25, 1, True, 8, 32, 8, 1]], r"at most 8"),
        (16, [-1, 1, "BiLevelRoutingAttention", [7, [8]]], r"layer 16 .*'num_heads' must be int"),
        (16, [[-1, 4], 1, "BiLevelRoutingAttention", []], r"layer 16 .*'from' must be an int"),
    ],
)
def test_bad_rows_name_the_layer(index, row, match):
    from dsconv_ext.yolo.rows import YamlRowError

    with pytest.raises(YamlRowError, match=match):
        build(_bad(index, row), "n")


def test_bad_groups_names_the_layer():
    # 32 input channels at n, groups=3 does not divide them: the DSConv2d error gets the layer
    with pytest.raises(ValueError, match=r"layer 1 \(DSConv.*divisible by groups \(3\)"):
        build(_bad(1, [-1, 1, "DSConv", [128, 3, 2, None, 3]]), "n")
    with pytest.raises(ValueError, match=r"layer 16 \(BiLevelRoutingAttention.*num_heads=7"):
        build(_bad(16, [-1, 1, "BiLevelRoutingAttention", [7, 7]]), "n")


def _bra_macs_counted(m, x) -> int:
    """Multiply-accumulates of BiLevelRoutingAttention ``m`` on ``x``, counted independently of
    dsconv_ext.yolo.flops: torch's FlopCounterMode counts the products (linear, convolution,
    bmm) that the reference backend executes, and two closed forms adjust for what the counting
    convention says differently from what that backend does:

    - the output projection counts real pixels only; the reference projects the padded map;
    - the routing softmax counts as thop counts softmax: per row of n_win**2 logits, topk exp,
      topk - 1 adds and topk divides (after top-k selection), i.e. 3 * topk - 1 per region.
    """
    from torch.utils.flop_counter import FlopCounterMode

    ref = copy.deepcopy(m).eval()
    ref.backend = "reference"
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        ref(x)
    macs = counter.get_total_flops() // 2  # it counts 2 FLOPs per multiply-add
    n, c, h, w = x.shape
    nw = m.n_win
    hp, wp = (-(-h // nw) * nw, -(-w // nw) * nw) if m.auto_pad else (h, w)
    if m.param_attention == "qkvo":
        macs -= n * (hp * wp - h * w) * c * c
    return macs + n * nw * nw * (3 * m.topk - 1)


BRA_FLOP_CASES = [
    ({}, (20, 20)),  # n_win 7: padded to 21 x 21
    ({"n_win": 4, "topk": 3}, (13, 9)),
    ({"n_win": 4, "topk": 2, "kv_downsample_mode": "ada_avgpool", "kv_per_win": 2}, (16, 16)),
    ({"n_win": 2, "topk": 2, "kv_downsample_mode": "avgpool", "kv_downsample_ratio": 2}, (16, 16)),
    ({"n_win": 4, "param_attention": "qkv", "side_dwconv": 5, "qk_dim": 32}, (12, 12)),
]


@pytest.mark.parametrize("kw,hw", BRA_FLOP_CASES)
def test_bra_flops_rule_matches_independent_count(kw, hw):
    import thop

    from dsconv_ext.bra import BiLevelRoutingAttention
    from dsconv_ext.yolo.flops import counting_rules

    m = BiLevelRoutingAttention(64, num_heads=4, **kw).eval()
    x = torch.zeros(2, 64, *hw)
    with counting_rules():
        macs, _ = thop.profile(m, inputs=(x,), verbose=False)
    assert macs == _bra_macs_counted(m, x) > 0


def test_bra_independent_count_by_hand():
    """The independent count itself, on a layer small enough to add up by hand: dim 8, n_win 2,
    topk 1, qk_dim 8, 4 x 4 map (no padding), no lepe, batch 1. Per pixel: qkv 8 * 24 = 192,
    output projection 8 * 8 = 64 -> 16 * 256 = 4096. Routing: 4 regions x 4 regions x 8 = 128
    logits MACs, softmax 4 * (3 - 1) = 8. Attention: 4 regions x 4 queries x 1 region x 4 keys x
    (8 + 8) = 1024. Total 5256."""
    from dsconv_ext.bra import BiLevelRoutingAttention

    m = BiLevelRoutingAttention(8, num_heads=2, n_win=2, topk=1, side_dwconv=0).eval()
    assert _bra_macs_counted(m, torch.zeros(1, 8, 4, 4)) == 4096 + 128 + 8 + 1024


DSCONV_FLOP_CASES = [
    # (DSConv2d arguments, input shape, MACs of the float conv, of the KDS scaling), by hand:
    # output elements x (C/g) x kh x kw, and output elements x kh x kw x ceil((C/g) / block).
    # out 2 x 24 x 7 x 5 = 1680: 1680 * 40 * 9; blocks ceil(40 / 16) = 3: 1680 * 9 * 3
    (dict(in_channels=40, out_channels=24, kernel_size=3, padding=1, block_size=16),
     (2, 40, 7, 5), 604_800, 45_360),
    # stride 2, 2 groups: out 1 x 24 x 5 x 4 = 480: 480 * 20 * 9; ceil(20 / 16) = 2: 480 * 9 * 2
    (dict(in_channels=40, out_channels=24, kernel_size=3, stride=2, padding=1, groups=2,
          block_size=16), (1, 40, 9, 7), 86_400, 8_640),
    # 3 x 1 kernel: out 1 x 8 x 6 x 6 = 288: 288 * 16 * 3; one block: 288 * 3
    (dict(in_channels=16, out_channels=8, kernel_size=(3, 1), padding=(1, 0), block_size=32),
     (1, 16, 6, 6), 13_824, 864),
]  # fmt: skip


@pytest.mark.parametrize("kw,shape,conv_macs,kds_macs", DSCONV_FLOP_CASES)
def test_dsconv2d_flops_rule_by_hand(kw, shape, conv_macs, kds_macs):
    """Our DSConv2d rule = thop's own count of the equivalent float conv (checked against the
    hand-computed number) + the KDS scaling, by hand."""
    import thop

    from dsconv_ext import DSConv2d
    from dsconv_ext.yolo.flops import counting_rules

    float_kw = {k: v for k, v in kw.items() if k != "block_size"}
    float_macs, _ = thop.profile(
        torch.nn.Conv2d(**float_kw, bias=False), inputs=(torch.zeros(shape),), verbose=False
    )
    assert float_macs == conv_macs
    with counting_rules():
        macs, _ = thop.profile(DSConv2d(**kw).eval(), inputs=(torch.zeros(shape),), verbose=False)
    assert macs == conv_macs + kds_macs


def test_model_info_flops_count_dsconv_and_bra():
    """GFLOPs of model.info() (ultralytics' get_flops) = the float model's + our layers' extra,
    the extra computed here: the KDS scaling by its closed form, BRA by the independent count."""
    from ultralytics.utils.torch_utils import get_flops

    from dsconv_ext import DSConv2d
    from dsconv_ext.bra import BiLevelRoutingAttention

    ds = build("yolo11-C3k2-DSConv-BiFormer.yaml", "n")
    ref = build(yaml.safe_load((CONFIGS / "yolo11-BiFormer.yaml").read_text()), "n")
    shapes = {}
    hooks = [
        m.register_forward_hook(lambda m, x, y: shapes.__setitem__(m, (x[0].shape, y.shape)))
        for m in [*ds.modules(), *ref.modules()]
        if isinstance(m, (DSConv2d, BiLevelRoutingAttention))
    ]
    with torch.no_grad():
        ds.eval()(torch.zeros(1, 3, IMGSZ, IMGSZ))
        ref.eval()(torch.zeros(1, 3, IMGSZ, IMGSZ))
    for h in hooks:
        h.remove()
    # DSConv2d = the float conv that thop counts in `ref` + one multiply-add per output element,
    # tap and block of input channels (scaling each block's integer sum)
    extra = 0
    for m, (_, y) in shapes.items():
        if isinstance(m, DSConv2d):
            kh, kw = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
            extra += y.numel() * kh * kw * math.ceil(m.in_channels // m.groups / m.block_size)
    got, want = get_flops(ds, IMGSZ), get_flops(ref, IMGSZ) + 2 * extra / 1e9
    assert got == pytest.approx(want, rel=1e-9) and extra > 0
    # BiFormer = yolo11 + three channel-preserving BRA layers: the difference is their count
    from ultralytics.nn.tasks import DetectionModel

    plain = DetectionModel("yolo11n.yaml", verbose=False)
    bra = sum(
        _bra_macs_counted(m, torch.zeros(x))
        for m, (x, _) in shapes.items()
        if isinstance(m, BiLevelRoutingAttention) and any(m is r for r in ref.modules())
    )
    assert bra > 0
    assert get_flops(ref, IMGSZ) == pytest.approx(get_flops(plain, IMGSZ) + 2 * bra / 1e9, rel=1e-9)
