"""bench_layers.py end to end on a tiny input: its layer matching and bookkeeping against an
independent count.

yolo11n with random weights at 64 px, converted with 7-bit weights (``--ours int7``), 1 thread,
2 rounds, against OpenVINO at its default precision (its int8 peer needs NNCF, which the test
requirements leave out). Every convolution of the float model must be matched on both sides,
except the DFL's fixed conv, which the converted model runs as its own op; each layer's geometry
and multiply-accumulates must equal what forward hooks on the float ultralytics model count, the
layer kinds must add up to yolo11n's architecture (counted by hand from ultralytics'
yolo11.yaml), and the per-kind rows must be the sums of their layers. No speed is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys

import pytest
import torch
from yolo_helpers import ROOT, subprocess_env

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_layers  # noqa: E402

HAS_OPENVINO = importlib.util.find_spec("openvino") is not None
IMGSZ = 64

# yolo11n's convolutions by kind. 3x3 stride 2: the stem, backbone downsamplers 1, 3, 5, 7 and
# head downsamplers 17, 20. Depthwise: C2PSA's positional conv and Detect's two per level. 3x3
# stride 1: one per C3k2 bottleneck conv (2, 4, 13, 16, 19: two each; 6, 8, 22: C3k's four
# each), Detect's box branch 2 per level. 87 in all.
YOLO11N_KINDS = {"3x3 stride 1": 28, "3x3 stride 2": 7, "1x1": 45, "depthwise": 7}


def test_openvino_node_names_map_to_layers():
    conv = "__module.model.3.conv/aten::_convolution/Convolution"
    assert bench_layers.openvino_conv_layer(conv, "Convolution") == "model.3"
    dw = "__module.model.23.cv3.0.0.0.conv/aten::_convolution/GroupConvolution"
    assert bench_layers.openvino_conv_layer(dw, "GroupConvolution") == "model.23.cv3.0.0.0"
    bare = "__module.model.23.cv3.0.2/aten::_convolution/Convolution"
    assert bench_layers.openvino_conv_layer(bare, "Convolution") == "model.23.cv3.0.2"
    # A reorder named after the conv it feeds, and nodes of no module, are not convolutions.
    reorder = bare + "_bf16_acdb_f32_abcd___module.model.23/aten::view/Reshape_3"
    assert bench_layers.openvino_conv_layer(reorder, "Reorder") is None
    assert bench_layers.openvino_conv_layer("x.1/fq_output_0", "Subgraph") is None
    assert bench_layers.layer_key("model.0") == "model.0"  # our stem replaces its whole Conv


def test_timers_count_each_layer_call_once_and_undo_restores_forwards():
    """Our side's timers (bench_layers._install_timers) on a toy model: a layer whose forward
    falls back through another timed layer's call counts once, forward_into is timed like
    forward, and undo puts back an instance's own forward (ultralytics' fuse() sets one)."""

    class Inner(torch.nn.Module):
        def forward(self, x):
            return x + 1

    class Outer(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 2

        def forward_into(self, x, out):
            return out.copy_(self(x))

    inner = Inner()
    outer = Outer(inner)
    own = outer.forward_into  # stands in for an instance's own forward (fuse())
    outer.__dict__["forward"] = lambda x: Outer.forward(outer, x)
    own_forward = vars(outer)["forward"]
    samples = {"outer": [], "inner": []}
    undo = bench_layers._install_timers({"outer": outer, "inner": inner}, samples)
    x = torch.zeros(2)
    assert torch.equal(outer(x), torch.full((2,), 2.0))  # outer, and inner inside it
    assert torch.equal(inner(x), torch.ones(2))  # inner alone
    out = torch.empty(2)
    outer.forward_into(x, out)  # forward_into, then forward and inner inside it
    assert torch.equal(out, torch.full((2,), 2.0))
    assert len(samples["outer"]) == 2 and len(samples["inner"]) == 1, samples
    assert all(t >= 0 for ts in samples.values() for t in ts)
    undo()
    assert vars(outer)["forward"] is own_forward
    assert "forward_into" not in vars(outer) and outer.forward_into == own
    assert "forward" not in vars(inner) and "forward_into" not in vars(inner)


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    if not HAS_OPENVINO:
        pytest.skip("openvino not installed")
    tmp = tmp_path_factory.mktemp("bench_layers")
    out = tmp / "layers.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_layers.py"), "--models", "yolo11n",
           "--peer", "openvino", "--ours", "int7", "--imgsz", str(IMGSZ), "--threads", "1",
           "--rounds", "2", "--warmup", "1", "--calib-images", "2", "--work", str(tmp / "work"),
           "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout, tmp


def float_model_convs(tmp):
    """Every nn.Conv2d of the float checkpoint the benchmark made, as forward hooks see it."""
    from ultralytics import YOLO

    pt = next((tmp / "work" / "artifacts").glob(f"yolo11n-{IMGSZ}/yolo11n.pt"))
    model = YOLO(str(pt)).model.float().eval()
    seen = {}

    def hook(name, m, inp, out):
        kh, kw = m.kernel_size
        macs = out.numel() * (m.in_channels // m.groups) * kh * kw
        seen[re.sub(r"\.conv$", "", name)] = {
            "in": m.in_channels,
            "out": m.out_channels,
            "k": kh,
            "stride": m.stride[0],
            "groups": m.groups,
            "input hw": list(inp[0].shape[2:]),
            "MACs": macs,
        }

    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Conv2d):
            m.register_forward_hook(lambda m, i, o, name=name: hook(name, m, i, o))
    with torch.no_grad():
        model(torch.zeros(1, 3, IMGSZ, IMGSZ))
    return seen


def test_every_conv_is_matched_with_its_geometry(bench):
    res, stdout, tmp = bench
    assert res["environment"]["threads"] == 1 and res["args"]["peer"] == "openvino"
    assert "# bench_layers" in stdout and f"## yolo11n {IMGSZ} px: by layer kind" in stdout
    model = res["models"][f"yolo11n {IMGSZ} px"]
    assert model["only ours"] == []
    assert model["only OpenVINO"] == ["model.23.dfl"]  # the DFL's fixed conv: FastDFL here
    expected = float_model_convs(tmp)
    assert set(expected) - {"model.23.dfl"} == {r["layer"] for r in model["layers"]}
    for row in model["layers"]:
        ref = expected[row["layer"]]
        assert {k: row[k] for k in ref} == ref, row["layer"]
        assert row["us"] > 0 and row["OpenVINO us"] >= 0
    kinds = {}
    for row in model["layers"]:
        kinds[row["kind"]] = kinds.get(row["kind"], 0) + 1
    assert kinds == YOLO11N_KINDS


def test_ours_times_the_requested_weight_width(bench):
    """--ours int7: the timed model is the 7-bit conversion (every DSConv layer 7 bits; the stem,
    and here any layer the speed check kept float, a float conv), and the header says so."""
    res, stdout, _ = bench
    assert res["args"]["ours"] == "int7" and "our int7 layer times" in stdout
    rows = res["models"][f"yolo11n {IMGSZ} px"]["layers"]
    bits = {r["layer"]: r["bits"] for r in rows if r["module"] == "DSConv2d"}
    assert bits and set(bits.values()) == {7}, bits
    floats = {r["layer"]: r["bits"] for r in rows if r["module"] != "DSConv2d"}
    assert "model.0" in floats and set(floats.values()) == {None}, floats


def test_ratios_and_kind_totals_add_up(bench):
    res, _, _ = bench
    model = res["models"][f"yolo11n {IMGSZ} px"]
    rows = model["layers"]
    peak = res["peak"]
    for row in rows:
        assert row["speed vs OpenVINO"] == pytest.approx(row["OpenVINO us"] / row["us"])
        assert row["GMAC/s"] == pytest.approx(row["MACs"] / row["us"] / 1e3)
        if peak:
            gmacs = peak["MACs per ns per core"] * 1  # one thread
            assert row["% peak"] == pytest.approx(100 * row["GMAC/s"] / gmacs)
    by_kind = {r["kind"]: r for r in model["by kind"]}
    assert set(by_kind) == {*YOLO11N_KINDS, "all"}
    for kind, total in by_kind.items():
        sel = [r for r in rows if kind == "all" or r["kind"] == kind]
        assert total["layers"] == len(sel)
        assert total["GMAC"] == pytest.approx(sum(r["MACs"] for r in sel) / 1e9)
        assert total["ours ms"] == pytest.approx(sum(r["us"] for r in sel) / 1e3)
        assert total["OpenVINO ms"] == pytest.approx(sum(r["OpenVINO us"] for r in sel) / 1e3)
        assert total["speed vs OpenVINO"] == pytest.approx(total["OpenVINO ms"] / total["ours ms"])
    assert model["ours forward ms"] > 0 and model["OpenVINO outside convolutions ms"] >= 0
