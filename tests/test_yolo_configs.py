"""Every config at every scale: builds in ultralytics, parameters, forward, FLOPs, bad rows."""

from __future__ import annotations

import copy

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


def test_bra_flops_rule_matches_formula():
    import thop

    from dsconv_ext.bra import BiLevelRoutingAttention
    from dsconv_ext.yolo.flops import bra_macs, counting_rules

    for kw, hw in (({}, (20, 20)), ({"n_win": 4, "topk": 3}, (13, 9))):
        m = BiLevelRoutingAttention(64, num_heads=4, **kw).eval()
        with counting_rules():
            macs, _ = thop.profile(m, inputs=(torch.rand(2, 64, *hw),), verbose=False)
        assert macs == bra_macs(m, *hw, batch=2)


def test_model_info_flops_count_dsconv_and_bra():
    """GFLOPs of model.info() (ultralytics' get_flops) = the float model's + our layers' extra."""
    from ultralytics.utils.torch_utils import get_flops

    from dsconv_ext import DSConv2d
    from dsconv_ext.bra import BiLevelRoutingAttention
    from dsconv_ext.yolo.flops import bra_macs, dsconv2d_macs

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
    # DSConv2d: thop's conv count plus one multiply-add per block and tap for the KDS scaling
    extra = sum(
        dsconv2d_macs(m, y) - y.numel() * m.in_channels // m.groups * m.kernel_size[0] ** 2
        for m, (_, y) in shapes.items()
        if isinstance(m, DSConv2d)
    )
    got, want = get_flops(ds, IMGSZ), get_flops(ref, IMGSZ) + 2 * extra / 1e9
    assert got == pytest.approx(want, rel=1e-9) and extra > 0
    # BiFormer = yolo11 + three channel-preserving BRA layers: the difference is their formula
    from ultralytics.nn.tasks import DetectionModel

    plain = DetectionModel("yolo11n.yaml", verbose=False)
    bra = sum(
        bra_macs(m, x[2], x[3])
        for m, (x, _) in shapes.items()
        if isinstance(m, BiLevelRoutingAttention) and any(m is r for r in ref.modules())
    )
    assert get_flops(ref, IMGSZ) == pytest.approx(get_flops(plain, IMGSZ) + 2 * bra / 1e9, rel=1e-9)
