"""bench_model.py's machinery end to end on a tiny input: a parent that prepares the models in a
subprocess, times each runtime in processes of its own (cycled), and writes well-formed rows.

yolo11n with random weights at 64 px, 1 thread, 2 timed calls per process: the float eager,
dsconv_ext int7 and onnxruntime fp32 workers (onnxruntime's row must say why it is skipped when
the package is missing). The workers save their output for the same input image, and float and
onnxruntime must agree (int7 within its quantisation error): a worker that timed the wrong model
or input, or lost the output, fails here. No speed is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
from yolo_helpers import ROOT, subprocess_env

sys.path.insert(0, str(ROOT / "benchmarks"))
import _runtimes  # noqa: E402

HAS_ORT = all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx"))
CYCLES = 2


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench_model")
    out = tmp / "bench.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_model.py"), "--models", "yolo11n",
           "--no-accuracy", "--imgsz", "64", "--threads", "1", "--rounds", "2", "--warmup", "1",
           "--cycles", str(CYCLES), "--calib-images", "2", "--variants", "onnxruntime", "int7",
           "--no-interleaved", "--save-outputs", "--work", str(tmp / "work"),
           "--json", str(out)]  # fmt: skip
    r = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_rows_are_well_formed(bench):
    res, stdout = bench
    env = res["environment"]
    assert env["cpu"] and env["threads"] == 1 and "isa_features" in env
    assert res["args"]["rounds"] == 2 and not res["args"]["accuracy"]
    assert "# bench_model" in stdout and "| yolo11n | float eager" in stdout
    rows = {row["runtime"]: row for row in res["rows"]}
    assert set(rows) == {"float", "onnxruntime", "int7"}
    timed = [rows["float"], rows["int7"]] + ([rows["onnxruntime"]] if HAS_ORT else [])
    for row in timed:
        assert row["processes"] == CYCLES == len(row["per process"])
        medians = row["process medians ms"]
        assert len(medians) == CYCLES and all(m > 0 for m in medians)
        assert row["latency ms"] == pytest.approx(float(np.median(medians)))
        assert row["best process ms"] == min(medians)
        assert row["spread %"] >= 0 and row["model file MiB"] > 0
        for proc in row["per process"]:
            assert len(proc["samples ms"]) == 2 and proc["info"]["threads"] == 1
    assert rows["float"]["speed-up vs float eager"] == pytest.approx(1.0)
    assert "dsconv_ext int8 vs this" not in rows["float"]  # int8 was not run
    if HAS_ORT:
        base, ms = rows["float"]["latency ms"], rows["onnxruntime"]["latency ms"]
        assert rows["onnxruntime"]["speed-up vs float eager"] == pytest.approx(base / ms)
    else:
        assert rows["onnxruntime"]["note"].startswith("skipped:")
        assert "latency ms" not in rows["onnxruntime"]


@pytest.mark.skipif(not HAS_ORT, reason="onnxruntime / onnx not installed")
def test_float_and_onnxruntime_workers_agree(bench):
    res, _ = bench
    rows = {row["runtime"]: row for row in res["rows"]}
    outs = {k: [np.load(p["output"]) for p in rows[k]["per process"]] for k in rows}
    ref = outs["float"][0]
    assert ref.shape == (1, 84, 64 // 8 * 64 // 8 + 64 // 16 * 64 // 16 + 64 // 32 * 64 // 32)
    assert np.isfinite(ref).all()
    np.testing.assert_array_equal(outs["float"][1], ref)  # same input, same model, every process
    for out in outs["onnxruntime"]:
        # Boxes in pixels (up to ~500 with random weights), class scores in [0, 1].
        np.testing.assert_allclose(out[:, :4], ref[:, :4], rtol=1e-3, atol=5e-2)
        np.testing.assert_allclose(out[:, 4:], ref[:, 4:], rtol=1e-3, atol=2e-3)


def test_int7_row_runs_the_7_bit_checkpoint(bench):
    """The int7 row converts with 7-bit VQK weights (|q| <= 64: what the AVX2 byte layout takes)
    and times that model: its saved output stays near the float model's."""
    from ultralytics import YOLO

    from dsconv_ext.dsconv.module import DSConv2d

    res, _ = bench
    rows = {row["runtime"]: row for row in res["rows"]}
    for proc in rows["int7"]["per process"]:
        assert proc["info"]["precision"].startswith("DSConv w7a8"), proc["info"]
    model = YOLO(res["manifests"]["yolo11n"]["files"]["int7"]).model
    layers = [m for m in model.modules() if isinstance(m, DSConv2d)]
    assert layers and all(m.bits == 7 for m in layers)
    widest = max(int(m.intweight.abs().max()) for m in layers)
    assert 32 < widest <= 64, widest  # 7 bits used, and no wider
    ref = np.load(rows["float"]["per process"][0]["output"])
    out = np.load(rows["int7"]["per process"][0]["output"])
    assert out.shape == ref.shape and np.isfinite(out).all()
    # Class scores in [0, 1]: 7-bit weights and 8-bit activations move them by a few percent.
    assert np.abs(out[:, 4:] - ref[:, 4:]).mean() < 0.05


@pytest.mark.skipif(not HAS_ORT, reason="onnx not installed")
def test_onnx_head_exclusion_matches_ultralytics_rule(bench):
    """onnxruntime int8 leaves in float what ``yolo export format=openvino int8=True`` does: the
    Detect head's own ops and its DFL, not the head's convolutions or the SiLUs' Sigmoids."""
    import onnx

    res, _ = bench
    graph = onnx.load(res["manifests"]["yolo11n"]["files"]["onnxruntime"]).graph
    excluded = set(_runtimes.onnx_head_nodes(graph))
    types = {n.name: n.op_type for n in graph.node}
    assert "/model.23/Sigmoid" in excluded and "/model.23/dfl/conv/Conv" in excluded
    assert {types[n] for n in excluded} >= {"Concat", "Softmax", "Sigmoid", "Conv"}
    assert [n for n in excluded if types[n] == "Conv"] == ["/model.23/dfl/conv/Conv"]
    assert sum(types[n] == "Sigmoid" for n in excluded) == 1  # SiLUs stay quantisable
    assert all(n.startswith("/model.23/") for n in excluded)


def test_missing_package_skips_with_reason(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "nncf" else real(name, *a)
    )
    assert "nncf not installed" in _runtimes.missing("openvino-int8")
    assert "pip install .[bench]" in _runtimes.missing("openvino-int8")
    assert _runtimes.missing("float") is None
