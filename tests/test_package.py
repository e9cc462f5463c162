"""Package plumbing: the info command, backend selection, honesty about the fallback."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import package_env

import dsconv_ext


def _run(args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "dsconv_ext", *args],
        capture_output=True,
        text=True,
        env=package_env(env),
        cwd=os.path.dirname(__file__),
        timeout=600,
    )


def test_info_reports_each_op_backend():
    r = _run(["info", "--json"])
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["dsconv2d"]["cpu"]["backend"] in ("kernel", "fallback")
    assert report["dsconv2d"]["cuda"]["backend"] in ("kernel", "fallback")
    if report["dsconv2d"]["cpu"]["backend"] == "fallback":
        assert report["dsconv2d"]["cpu"]["why"]  # never a silent fallback
    assert "bilevel_routing_attention" in report
    dfl = report["dfl_expectation"]
    assert dfl.get("cpu float32") in ("kernel", "torch (no compiled op)") or "error" in dfl
    text = _run(["info"])
    assert text.returncode == 0 and "dsconv2d:" in text.stdout


def test_forced_fallback_is_reported(monkeypatch):
    monkeypatch.setenv("DSCONV_EXT_DSCONV_BACKEND", "fallback")
    assert dsconv_ext.dsconv2d_backend("cpu") == "fallback"
    assert dsconv_ext.dsconv_backend_report()["cpu"]["why"] == "DSCONV_EXT_DSCONV_BACKEND=fallback"
    monkeypatch.setenv("DSCONV_EXT_DSCONV_BACKEND", "fast")
    with pytest.raises(ValueError, match="DSCONV_EXT_DSCONV_BACKEND"):
        dsconv_ext.dsconv2d_backend("cpu")


def test_forced_kernel_without_one_raises(monkeypatch):
    monkeypatch.setenv("DSCONV_EXT_DSCONV_BACKEND", "kernel")
    with pytest.raises(RuntimeError, match="no kernel for meta"):
        dsconv_ext.dsconv2d_backend("meta")


def test_unknown_command_fails_cleanly():
    r = _run(["frobnicate"])
    assert r.returncode != 0 and "invalid choice" in r.stderr


def test_public_names():
    for name in (
        "DSConv",
        "DSConv2d",
        "dsconv2d",
        "dsconv2d_reference",
        "FORMAT_VERSION",
        "BiLevelRoutingAttention",
        "quantize",
    ):
        assert getattr(dsconv_ext, name) is not None, name
    assert isinstance(dsconv_ext.quant_primitives.MAX_BLOCK_SIZE, int)
    assert torch.ops.dsconv_ext is not None
