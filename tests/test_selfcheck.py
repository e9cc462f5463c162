"""``python -m dsconv_ext selfcheck --all``: the orchestration that runs on a GPU machine, tested
here with its stages' tools faked (no GPU, no compute-sanitizer on this machine)."""

from __future__ import annotations

import json

import pytest

from dsconv_ext import selfcheck

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="4">
<testcase classname="tests.test_a" name="test_ok"/>
<testcase classname="tests.test_a" name="test_skip"><skipped message="needs a GPU"/></testcase>
<testcase classname="tests.test_b" name="test_fail"><failure message="boom"/></testcase>
<testcase classname="tests.test_b" name="test_err"><error message="crash"/></testcase>
</testsuite></testsuites>
"""


def test_junit_counts(tmp_path):
    path = tmp_path / "r.xml"
    path.write_text(JUNIT)
    c = selfcheck.junit_counts(str(path))
    assert (c["tests"], c["failures"], c["errors"], c["skipped"]) == (4, 1, 1, 1)
    assert c["skipped_names"] == ["tests.test_a::test_skip"]


def _fake_compile(ok=True):
    return lambda archs, full, json_path: {"ok": ok, "summary": f"fake, archs {list(archs)}"}


def test_all_without_a_gpu_reports_not_run(tmp_path, monkeypatch, capsys):
    import dsconv_ext.bra.compile_check as cc

    monkeypatch.setattr(cc, "compile_only", _fake_compile())
    monkeypatch.setattr(selfcheck, "_no_gpu_reason", lambda: "no CUDA device on this machine")
    assert selfcheck.main(["--all", "--out", str(tmp_path), "--arch", "86,90"]) == 2
    report = json.loads((tmp_path / "selfcheck_report.json").read_text())
    stages = report["stages"]
    assert stages["compile-only"]["ok"] is True and "[86, 90]" in stages["compile-only"]["summary"]
    for name in ("device checks", "pytest -m cuda", "compute-sanitizer", "benchmarks"):
        assert stages[name]["ok"] is None and "no CUDA device" in stages[name]["summary"]
    out = capsys.readouterr().out
    assert "| compile-only | PASS |" in out and "VERDICT: NOT RUN on a GPU" in out
    # a failed compile stage fails the run even without a GPU
    monkeypatch.setattr(cc, "compile_only", _fake_compile(ok=False))
    assert selfcheck.main(["--all", "--out", str(tmp_path)]) == 1


def test_pytest_stage_counts_a_skip_as_a_failure(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, cwd, log, timeout, env=None):
        calls.append((cmd, env))
        (tmp_path / "pytest_cuda.xml").write_text(JUNIT.replace("<failure", "<skipped").replace(
            "<error", "<skipped"))  # fmt: skip
        return 0

    monkeypatch.setattr(selfcheck, "_run", fake_run)
    res = selfcheck._stage_pytest("/repo", str(tmp_path))
    assert res["ok"] is False and res["skipped"] == 3 and "a skip fails here" in res["summary"]
    cmd, env = calls[0]
    assert cmd[cmd.index("-m", 2) + 1] == "cuda" and env["DSCONV_EXT_STRICT_SKIPS"] == "1"


def test_sanitizer_stage_runs_each_tool(tmp_path, monkeypatch):
    ran = []

    def fake_run(cmd, cwd, log, timeout, env=None):
        ran.append(cmd[cmd.index("--tool") + 1])
        return 1 if cmd[cmd.index("--tool") + 1] == "synccheck" else 0

    monkeypatch.setattr(selfcheck.shutil, "which", lambda name: "/opt/cuda/compute-sanitizer")
    monkeypatch.setattr(selfcheck, "_run", fake_run)
    res = selfcheck._stage_sanitizer(str(tmp_path))
    assert ran == ["racecheck", "synccheck", "initcheck"]
    assert res["ok"] is False and "synccheck exit 1" in res["summary"]
    monkeypatch.setattr(selfcheck.shutil, "which", lambda name: None)
    res = selfcheck._stage_sanitizer(str(tmp_path))
    assert res["ok"] is True and "not on the PATH" in res["summary"]


def test_bench_headline_reads_the_goal_figures():
    result = {
        "bench_conv_cuda": {"summary": [
            {"kernel": "3x3", "batch": 1, "geomean x f16": 0.8},
            {"kernel": "3x3", "batch": 16, "geomean x f16": 1.25},
        ]},
        "bench_bra": {"rows": [
            {"backend": "triton", "pass": "fwd+bwd", "scale": "n", "batch": 16, "x ref": 3.5,
             "mem x": 6.0},
            {"backend": "torch", "pass": "fwd+bwd", "scale": "n", "batch": 16, "x ref": 1.5},
        ]},
    }  # fmt: skip
    text = selfcheck._bench_headline(result)
    assert "DSConv 3x3 b16 1.25x cuDNN fp16" in text and "b1 " not in text
    assert "BRA n P3 b16 fwd+bwd 3.50x, 6.0x less memory" in text and "1.50x" not in text


@pytest.mark.parametrize("argv", [["--compile-only", "--arch", "75"], ["--all", "--arch", "x"]])
def test_bad_arch_is_refused(argv, tmp_path, capsys):
    assert selfcheck.main([*argv, "--out", str(tmp_path)]) in (1, 2)
    assert "arch" in capsys.readouterr().out
