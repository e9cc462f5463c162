"""bench_conv.py's --compare-isa: the same layers timed on a second CPU path, side by side, with
the ratio computed from the two times, and DSCONV_EXT_CPU_ISA left as it was. No speed is
asserted."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
from yolo_helpers import ROOT

import dsconv_ext

sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_conv  # noqa: E402

pytestmark = pytest.mark.skipif(
    dsconv_ext.dsconv2d_backend("cpu") != "kernel", reason="the compiled CPU kernel is not loaded"
)


def test_compare_isa_columns(tmp_path, monkeypatch):
    monkeypatch.delenv("DSCONV_EXT_CPU_ISA", raising=False)
    calls = []
    real = bench_conv._on_isa

    def spy(isa, fn):
        wrapped = real(isa, fn)

        def call():
            calls.append(isa)
            return wrapped()

        return call

    monkeypatch.setattr(bench_conv, "_on_isa", spy)
    out = tmp_path / "conv.json"
    bench_conv.main(["--quick", "--scales", "n", "--rounds", "2", "--no-fallback", "--no-stem",
                     "--threads", "1", "--compare-isa", "avx2", "--json", str(out)])  # fmt: skip
    assert "DSCONV_EXT_CPU_ISA" not in os.environ
    rows = json.loads(out.read_text())["cpu"]
    # the check, warm-up and rounds; the default path through the same switch ("": unset)
    assert rows and calls.count("avx2") >= 3 * len(rows) and calls.count("") >= 3 * len(rows)
    for r in rows:
        assert r["alt_isa_ms"] > 0 and r["dsconv_ms"] > 0, r
        assert math.isclose(r["x_alt_isa"], r["alt_isa_ms"] / r["dsconv_ms"], rel_tol=1e-9), r


def test_without_compare_isa_the_columns_are_empty(tmp_path):
    out = tmp_path / "conv.json"
    bench_conv.main(["--quick", "--scales", "n", "--rounds", "1", "--no-fallback", "--no-stem",
                     "--threads", "1", "--json", str(out)])  # fmt: skip
    for r in json.loads(out.read_text())["cpu"]:
        assert math.isnan(r["alt_isa_ms"]) and math.isnan(r["x_alt_isa"]), r


def test_compare_isa_refuses_an_unknown_path(capsys):
    with pytest.raises(SystemExit) as e:
        bench_conv.main(["--quick", "--compare-isa", "avx1024"])
    assert e.value.code == 2
    assert "--compare-isa avx1024: DSCONV_EXT_CPU_ISA must be one of" in capsys.readouterr().err
    assert "DSCONV_EXT_CPU_ISA" not in os.environ


def test_compare_layout_columns_and_bits(tmp_path, monkeypatch):
    """--bits 4 --compare-layout int16: the rows say 4 bits, the alternative runs with
    DSCONV_EXT_AVX2_LAYOUT=int16 set only during its calls, and on the AVX2 path the default
    calls take the byte layout (path counter; the depthwise layers have their own path) while
    the alternative's never do."""
    monkeypatch.delenv("DSCONV_EXT_AVX2_LAYOUT", raising=False)
    import torch

    seen = []
    real = bench_conv._with_env

    def spy(var, value, fn):
        wrapped = real(var, value, fn)

        def call():
            before = torch.ops.dsconv_ext._cpu_path_calls()[5]
            y = wrapped()
            seen.append((var, value, torch.ops.dsconv_ext._cpu_path_calls()[5] > before))
            return y

        return call

    monkeypatch.setattr(bench_conv, "_with_env", spy)
    out = tmp_path / "conv.json"
    bench_conv.main(["--quick", "--scales", "n", "--rounds", "2", "--no-fallback", "--no-stem",
                     "--threads", "1", "--bits", "4", "--compare-layout", "int16",
                     "--json", str(out)])  # fmt: skip
    assert "DSCONV_EXT_AVX2_LAYOUT" not in os.environ
    rows = json.loads(out.read_text())["cpu"]
    assert rows
    for r in rows:
        assert r["bits"] == 4 and r["alt_layout_ms"] > 0, r
        assert math.isclose(r["x_alt_layout"], r["alt_layout_ms"] / r["dsconv_ms"], rel_tol=1e-9)
    layout = [s for s in seen if s[0] == "DSCONV_EXT_AVX2_LAYOUT"]
    assert {v for _, v, _ in layout} == {"auto", "int16"}
    assert not any(took for _, v, took in layout if v == "int16")
    if torch.ops.dsconv_ext.cpu_isa() == "avx2":
        assert any(took for _, v, took in layout if v == "auto")


def test_bits_out_of_range_is_refused(capsys):
    with pytest.raises(SystemExit):
        bench_conv.main(["--quick", "--bits", "9"])
    assert "--bits must be in [2, 8], got 9" in capsys.readouterr().err


@pytest.mark.parametrize(
    "features,noted",
    [(["avx2"], True), (["avx2", "avx_vnni"], False), (["avx2", "avx512_vnni"], False),
     (["avx2", "avx512_vnni", "amx_int8"], False)],
)  # fmt: skip
def test_header_names_onednn_7_bit_weights_without_vnni(monkeypatch, capsys, features, noted):
    """Without VNNI the header says torch.ao's products saturate unless a bit is dropped (what
    --bits 7 compares with); with any VNNI flavour it does not."""
    real = bench_conv.environment

    def fake_environment():
        return {**real(), "isa_features": features}

    monkeypatch.setattr(bench_conv, "environment", fake_environment)
    bench_conv.main(["--quick", "--scales", "n", "--kernels", "1", "--rounds", "1",
                     "--no-fallback", "--no-stem", "--threads", "1"])  # fmt: skip
    out = capsys.readouterr().out
    assert ("--bits 7 is DSConv's exact equivalent" in out) == noted, out[:600]


def test_cpu_model_and_flags_on_x86_and_aarch64():
    """The benchmark headers name the CPU and the features that decide the int8 path on both
    architectures: x86 "model name" / "flags", AArch64 "CPU part" / "Features"."""
    import _timing

    x86 = "processor\t: 0\nmodel name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 1\n"
    x86 += "flags\t\t: fpu avx2 fma avx512_vnni\n"
    model, flags = _timing._cpu_model_and_flags(x86)
    assert model == "AMD EPYC (family 25, model 1)" and {"avx2", "avx512_vnni"} <= flags
    arm = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd asimddp i8mm\n"
    arm += "CPU implementer\t: 0x41\nCPU part\t: 0xd0c\n"
    model, flags = _timing._cpu_model_and_flags(arm)
    assert model.endswith("(CPU implementer 0x41, part 0xd0c)"), model
    assert {"asimddp", "i8mm"} <= flags and [f for f in _timing.ISA_FLAGS if f in flags] == [
        "asimddp",
        "i8mm",
    ]


@pytest.mark.parametrize(
    "requested,supported,machine,want",
    [("auto", ["qnnpack", "onednn", "x86", "fbgemm"], "x86_64", ["x86", "onednn"]),
     ("auto", ["qnnpack", "onednn", "x86", "fbgemm"], "aarch64", ["qnnpack", "onednn"]),
     ("auto", ["qnnpack"], "arm64", ["qnnpack"]),
     ("auto", ["onednn"], "aarch64", ["onednn"]),
     ("auto", ["fbgemm", "qnnpack"], "AMD64", ["fbgemm"]),
     ("auto", ["qnnpack"], "x86_64", ["qnnpack"]),
     ("auto", ["none"], "x86_64", []),
     ("onednn", ["x86", "fbgemm"], "x86_64", []),
     ("qnnpack", ["qnnpack", "x86"], "x86_64", ["qnnpack"])],
)  # fmt: skip
def test_ao_engines_are_those_pytorch_offers_on_the_cpu(requested, supported, machine, want):
    """x86 and onednn on x86-64, qnnpack and onednn on Arm (else a fallback); a requested engine
    only if this torch has it."""
    assert bench_conv.ao_engines(requested, supported, machine) == want


def test_the_faster_engine_is_kept_per_layer(tmp_path, capsys, monkeypatch):
    """With two engines each is timed and ao_int8_ms is the faster, ao_engine names it (the
    timings replaced by known values: one engine faster on one layer, the other on the next)."""
    import torch

    if not {"x86", "onednn"} <= set(torch.backends.quantized.supported_engines):
        pytest.skip("this torch lacks the x86 or the onednn engine")
    calls = {"n": 0}

    def fake_time_interleaved(fns, rounds, warmup):
        calls["n"] += 1
        assert {"ao_x86", "ao_onednn", "dsconv", "fp32"} <= set(fns), sorted(fns)
        x86, onednn = (1.0, 2.0) if calls["n"] % 2 else (3.0, 0.5)
        return {"dsconv": 1.5, "fp32": 4.0, "ao_x86": x86, "ao_onednn": onednn}

    monkeypatch.setattr(bench_conv, "time_interleaved", fake_time_interleaved)
    out = tmp_path / "conv.json"
    bench_conv.main(["--quick", "--scales", "n", "--rounds", "1", "--no-fallback", "--no-stem",
                     "--threads", "1", "--ao-engine", "auto", "--json", str(out)])  # fmt: skip
    assert "# torch.ao: engines x86, onednn (the faster per layer" in capsys.readouterr().out
    rows = json.loads(out.read_text())["cpu"]
    assert len(rows) >= 2
    for i, r in enumerate(rows):
        want = ("x86", 1.0) if i % 2 == 0 else ("onednn", 0.5)
        assert (r["ao_engine"], r["ao_int8_ms"]) == want, r
        assert math.isclose(r["x_ao"], want[1] / 1.5), r
        assert set(r["ao_ms_by_engine"]) == {"x86", "onednn"}, r


def test_qnnpack_rows(tmp_path, capsys):
    """--ao-engine qnnpack (the Arm default; x86 builds of torch have it too): the header names
    the engine, the rows carry it, and the timed conv is a real one (its dequantised output
    within int8 rounding of F.conv2d)."""
    import torch
    import torch.nn.functional as F

    if "qnnpack" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no qnnpack engine")
    g = torch.Generator().manual_seed(5)
    x = F.silu(torch.randn(1, 16, 12, 12, generator=g))
    w = torch.randn(24, 16, 3, 3, generator=g) * 0.1
    s = {"c_in": 16, "c_out": 24, "k": 3, "stride": 1, "padding": 1, "groups": 1}
    conv = bench_conv._ao_conv(w, s, x, "qnnpack")
    assert conv is not None and torch.backends.quantized.engine == "qnnpack"
    got = conv().dequantize()
    want = F.conv2d(x, w, None, 1, 1)
    # output step: its scale |x|max / 64; input and weights in 8 bits add about as much
    err = (got - want).abs().max().item()
    assert err <= 3 * float(x.abs().max() / 64), err
    out = tmp_path / "conv.json"
    bench_conv.main(["--quick", "--scales", "n", "--rounds", "1", "--no-fallback", "--no-stem",
                     "--threads", "1", "--ao-engine", "qnnpack", "--json", str(out)])  # fmt: skip
    assert "# torch.ao: engine qnnpack" in capsys.readouterr().out
    rows = json.loads(out.read_text())["cpu"]
    assert rows and all(r["ao_engine"] == "qnnpack" and r["ao_int8_ms"] > 0 for r in rows), rows
