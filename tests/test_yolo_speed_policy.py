"""quantize() never hands back a model slower than the float one unless forced: nothing is
converted without a fast CPU path, and timed layers that DSConv runs slower stay float."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn as nn
from test_yolo_convert import _out, trained_like
from yolo_helpers import IMGSZ, rel_err

from dsconv_ext import DSConv2d, quantize
from dsconv_ext.yolo import convert as convert_mod
from dsconv_ext.yolo.convert import SpeedPolicyWarning, main


@pytest.fixture(scope="module", autouse=True)
def registered():
    import dsconv_ext.yolo as dy

    dy.register()


def _dsconv_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, DSConv2d))


@pytest.fixture(scope="module")
def forced_names():
    """What the default policy converts when nothing holds it back."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpeedPolicyWarning)
        return _dsconv_names(quantize(trained_like(), force=True))


@pytest.mark.parametrize(
    "env",
    [
        ("DSCONV_EXT_CPU_ISA", "scalar"),
        ("DSCONV_EXT_CPU_ISA", "neon_model"),
        ("DSCONV_EXT_DSCONV_BACKEND", "fallback"),
    ],
)
def test_no_fast_path_keeps_every_layer_float(env, monkeypatch, forced_names):
    monkeypatch.setenv(*env)
    model = trained_like()
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    want = _out(copy.deepcopy(model).fuse(verbose=False), x)
    with pytest.warns(SpeedPolicyWarning, match=f"kept {len(forced_names)} of {len(forced_names)}"):
        q = quantize(model)
    assert _dsconv_names(q) == []
    record = q.dsconv_ext
    assert sorted(record["kept_float"]) == forced_names and record["converted"] == []
    assert record["policy"].startswith("keep float")
    # still the float model (the exact stand-ins and the DFL decoder swap change no number
    # beyond float rounding)
    assert rel_err(_out(q, x), want) < 1e-5
    forced = quantize(trained_like(), force=True)
    assert _dsconv_names(forced) == forced_names and forced.dsconv_ext["kept_float"] == {}


def test_timed_layers_that_are_slower_stay_float(monkeypatch, forced_names):
    """The decision follows the timings layer by layer (timings faked: the real ones are
    machine noise), and only the timed-slower layers stay float."""
    seen = {}

    def fake_timings(pairs, shapes, rounds=11):
        seen.update(shapes=dict(shapes), pairs=pairs)
        # "slower" for the bottlenecks' convs, "faster" elsewhere
        return {n: ((1.0, 2.0) if ".m." in n else (2.0, 1.0)) for n in pairs}

    monkeypatch.setattr(convert_mod, "time_layers", fake_timings)
    with pytest.warns(SpeedPolicyWarning, match="slower than float"):
        q = quantize(trained_like(), check_speed=True)
    slow = sorted(n for n in forced_names if ".m." in n)
    assert slow and sorted(q.dsconv_ext["kept_float"]) == slow
    assert _dsconv_names(q) == sorted(set(forced_names) - set(slow))
    for name in slow:
        assert type(q.get_submodule(name)) is nn.Conv2d
    # every candidate was timed on the input shape it sees in the model (640 px by default)
    assert sorted(seen["shapes"]) == forced_names
    assert "model.0.conv" not in seen["shapes"]  # the RGB stem is not a candidate by default
    assert tuple(seen["shapes"]["model.1.conv"]) == (1, 16, 320, 320)
    assert tuple(seen["shapes"]["model.2.cv1.conv"]) == (1, 32, 160, 160)
    conv, act, ds = seen["pairs"]["model.1.conv"]
    assert type(conv) is nn.Conv2d and type(act) is nn.SiLU and ds.fuse_silu


@pytest.mark.parametrize("path,bits,hinted", [("avx2", 8, True), ("avx2", 7, False),
                                               ("avx512_vnni", 8, False)])  # fmt: skip
def test_avx2_slow_layers_hint_at_7_bits(monkeypatch, path, bits, hinted):
    """Where 8-bit layers were kept float on the AVX2 path, the warning names bits=7 (the byte
    layout); not for other widths or paths."""
    monkeypatch.setattr(convert_mod, "cpu_path", lambda: path)
    monkeypatch.setattr(
        convert_mod, "time_layers", lambda pairs, shapes, rounds=11: {n: (1.0, 2.0) for n in pairs}
    )
    with pytest.warns(SpeedPolicyWarning, match=f"slower than float on CPU path {path}") as rec:
        quantize(trained_like(), bits=bits, check_speed=True)
    messages = [str(w.message) for w in rec if w.category is SpeedPolicyWarning]
    assert any("bits=7 takes the AVX2 byte layout" in m for m in messages) == hinted, messages


@pytest.mark.parametrize(
    "path,policy",
    [("neon_dot", "time"), ("avx2", "time"), ("avx512_vnni", "convert"),
     ("neon_model", "keep float"), ("scalar", "keep float")],
)  # fmt: skip
def test_policy_per_cpu_path(monkeypatch, path, policy):
    """The Arm dot-product path, never measured against oneDNN, times its layers like AVX2; its
    software model (tests only) converts nothing, like the portable path."""
    from dsconv_ext.yolo import speed_check

    monkeypatch.setattr(speed_check, "cpu_path", lambda: path)
    got, why = speed_check.conversion_policy()
    assert got == policy and (path in why or policy == "keep float"), (got, why)


def test_real_timing_on_a_plain_module_accounts_for_every_layer():
    def net():
        return nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 32, 1))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpeedPolicyWarning)
        q = quantize(net(), check_speed=True, example_input=torch.randn(1, 64, 20, 20))
    record = q.dsconv_ext
    assert sorted(record["converted"] + list(record["kept_float"])) == ["0", "2"]
    for name, why in record["kept_float"].items():
        assert "slower than float" in why and " ms)" in why, (name, why)
    with pytest.warns(SpeedPolicyWarning, match="example_input"):
        quantize(net(), check_speed=True)


def test_convert_cli_force(tmp_path, capsys, monkeypatch):
    from ultralytics import YOLO

    src = tmp_path / "m.pt"
    YOLO("yolo11n.yaml").save(str(src))
    monkeypatch.setenv("DSCONV_EXT_CPU_ISA", "scalar")
    assert main([str(src), "-o", str(tmp_path / "a.pt")]) == 0
    out = capsys.readouterr().out
    assert "converted 0 convolutions" in out and "kept 86 convolutions in float" in out, out
    assert main([str(src), "-o", str(tmp_path / "b.pt"), "--force"]) == 0
    out = capsys.readouterr().out
    assert "converted 86 convolutions" in out and "kept" not in out, out
    ckpt = torch.load(tmp_path / "a.pt", weights_only=False)
    assert ckpt["dsconv_ext"]["policy"].startswith("keep float")


def test_convert_cli_times_at_the_deployed_size_and_batch(tmp_path, capsys, monkeypatch):
    """`convert --imgsz 64 --batch 2`: the speed check times each layer on the input shape it sees
    at that size and batch (a batch-8 deployment is served by batch-8 timings), and says so."""
    from ultralytics import YOLO

    src = tmp_path / "m.pt"
    YOLO("yolo11n.yaml").save(str(src))
    seen = {}

    def fake_timings(pairs, shapes, rounds=11):
        seen.update(shapes)
        return {n: ((1.0, 2.0) if n == "model.1.conv" else (2.0, 1.0)) for n in pairs}

    monkeypatch.setattr(convert_mod, "time_layers", fake_timings)
    argv = [str(src), "-o", str(tmp_path / "a.pt"), "--imgsz", "64", "--batch", "2"]
    monkeypatch.setattr(convert_mod, "conversion_policy", lambda force, check: ("time", "test"))
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert tuple(seen["model.1.conv"]) == (2, 16, 32, 32)
    assert tuple(seen["model.2.cv1.conv"]) == (2, 32, 16, 16)
    assert "kept 1 convolutions in float" in out and "(timed at batch 2, 64 px)" in out, out
    seen.clear()
    assert main([str(src), "-o", str(tmp_path / "b.pt")]) == 0  # default: batch 1, 640 px
    assert tuple(seen["model.1.conv"]) == (1, 16, 320, 320)
    capsys.readouterr()
    for flag, value, message in (
        ("--imgsz", "100", "imgsz must be a multiple of 32"),
        ("--imgsz", "0", "imgsz must be a positive integer, got 0"),
        ("--batch", "-1", "batch must be a positive integer, got -1"),
    ):
        assert main([str(src), "-o", str(tmp_path / "c.pt"), flag, value]) == 1
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (flag, value, err)
        assert not (tmp_path / "c.pt").exists()
