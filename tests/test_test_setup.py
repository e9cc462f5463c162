"""The test suite's own setup (tests/conftest.py): tests never touch the user's Ultralytics config
directory, and DSCONV_EXT_STRICT_SKIPS=1 turns skips of tests this machine should run into
failures while true skips stay skips."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import conftest
import pytest

TESTS = Path(__file__).resolve().parent


def _inside(path, folder) -> bool:
    path, folder = Path(path).resolve(), Path(folder).resolve()
    return path == folder or folder in path.parents


# --- private config directory ------------------------------------------------------------------


def test_ultralytics_config_dir_is_private():
    """settings.json and the fonts live in conftest's temporary directory, and the font is found
    there (so check_font never downloads)."""
    pytest.importorskip("ultralytics")
    from ultralytics.utils import SETTINGS
    from ultralytics.utils.checks import check_font

    private = conftest.YOLO_CONFIG_DIR
    assert os.environ.get("YOLO_CONFIG_DIR") == private
    assert _inside(private, tempfile.gettempdir())
    assert _inside(SETTINGS.file, private), SETTINGS.file
    font = check_font("Arial.ttf")
    assert font is not None and _inside(font, private), font


def test_subprocesses_get_the_private_config_dir():
    """Fresh interpreters started by the helpers resolve the same private directory."""
    pytest.importorskip("ultralytics")
    from yolo_helpers import run_python, subprocess_env

    private = conftest.YOLO_CONFIG_DIR
    assert conftest.package_env()["YOLO_CONFIG_DIR"] == private
    assert subprocess_env()["YOLO_CONFIG_DIR"] == private
    r = run_python(
        "from ultralytics.utils import SETTINGS\n"
        "from ultralytics.utils.checks import check_font\n"
        "print('SETTINGS', SETTINGS.file)\n"
        "print('FONT', check_font('Arial.ttf'))\n",
        timeout=120,
    )
    paths = dict(line.split(" ", 1) for line in r.stdout.splitlines() if " " in line)
    assert _inside(paths["SETTINGS"], private) and _inside(paths["FONT"], private), r.stdout


# Patterns that name the user's real config directory (or write ultralytics settings). Each has a
# character class in it, so that this file's own pattern text does not match it.
FORBIDDEN = {
    r"USER_CONFIG_DI[R]": "ultralytics' config dir (the private one: $YOLO_CONFIG_DIR)",
    r"get_user_config_di[r]": "resolves the real config dir",
    r"~[/\\]\.confi[g]": "the real home config dir",
    r"\.config[/\\]Ultralytic[s]": "the real Ultralytics config dir",
    r"XDG_CONFIG_HOM[E]": "the real home config dir",
    r"Path\.hom[e]\(|expandus[e]r\(": "the real home directory",
    r"AppDat[a]|Application Suppor[t]": "the real config dir on Windows / macOS",
    r"SETTINGS\.(?:updat[e]|rese[t]|sav[e])|SETTINGS\[[^\]]*\]\s*=(?!=)": "writes settings",
    r"yolo\W+setting[s]": "the settings command line writes settings",
}


def test_no_test_file_references_the_real_config_dir():
    """The private directory only helps if no test goes around it."""
    hits = []
    for path in sorted(TESTS.rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for pattern, why in FORBIDDEN.items():
                if re.search(pattern, line):
                    hits.append(f"{path.relative_to(TESTS)}:{n}: {line.strip()}  ({why})")
    assert not hits, "\n".join(hits)


def test_forbidden_patterns_match_what_they_forbid():
    """Each pattern catches a line it is meant to (so the scan above can fail)."""
    # "|" splits each forbidden word, so that this file's text does not match it
    samples = [
        s.replace("|", "")
        for s in (
            "from ultralytics.utils import USER_|CONFIG_DIR",
            "get_user_|config_dir()",
            'open("~/.|config/x")',
            "p = home / '.config/|Ultralytics'",
            'os.environ["XDG_|CONFIG_HOME"]',
            "Path.|home() / 'x'",
            "os.path.expand|user('~')",
            "App|Data / 'Roaming'",
            "SETTINGS.|update(runs_dir='x')",
            "SETTINGS['sync'] |= False",
            "yolo sett|ings reset",
        )
    ]
    unmatched = [s for s in samples if not any(re.search(p, s) for p in FORBIDDEN)]
    assert not unmatched
    assert not any(re.search(p, "if SETTINGS['sync'] == 1:") for p in FORBIDDEN)  # reads pass


# --- strict skips ------------------------------------------------------------------------------


def _outcome(call) -> str:
    """'skipped', 'failed' or 'returned': what ``call()`` did. (A pytest.raises for one outcome
    would let the other escape, and an escaping skip would skip this test instead of failing it.)"""
    try:
        call()
    except pytest.skip.Exception:
        return "skipped"
    except pytest.fail.Exception:
        return "failed"
    return "returned"


def test_skip_or_fail(monkeypatch):
    monkeypatch.delenv(conftest.STRICT_SKIPS_ENV, raising=False)
    assert _outcome(lambda: conftest.skip_or_fail("gone", should_run=True)) == "skipped"
    assert _outcome(lambda: conftest.skip_or_fail("gone", should_run=False)) == "skipped"
    monkeypatch.setenv(conftest.STRICT_SKIPS_ENV, "1")
    assert _outcome(lambda: conftest.skip_or_fail("gone", should_run=True)) == "failed"
    assert _outcome(lambda: conftest.skip_or_fail("gone", should_run=False)) == "skipped"
    with pytest.raises(pytest.fail.Exception, match="gone.*should run this test"):
        conftest.skip_or_fail("gone", should_run=True)  # (a failure, checked just above)


def test_cpu_can_run_reads_the_flags(monkeypatch):
    monkeypatch.setattr(conftest, "cpu_flags", lambda: frozenset({"avx2", "fma", "avx512f"}))
    assert conftest.cpu_can_run("avx2") and conftest.cpu_can_run("scalar")
    assert not conftest.cpu_can_run("avx512_vnni")  # avx512bw, dq, vl, avx512_vnni missing
    monkeypatch.undo()
    real = conftest.cpu_flags()
    if Path("/proc/cpuinfo").is_file():
        assert "fpu" in real  # the parser found the flags line (every x86 CPU has an FPU)


def test_missing_cuda_tools_are_expected_unless_cuda_is_off(monkeypatch):
    monkeypatch.setattr(conftest, "find_tool", lambda name: None)
    monkeypatch.setenv(conftest.STRICT_SKIPS_ENV, "1")
    monkeypatch.delenv("DSCONV_EXT_CUDA", raising=False)
    assert _outcome(lambda: conftest.require_tools("nvcc", "ptxas")) == "failed"
    monkeypatch.setenv("DSCONV_EXT_CUDA", "0")  # the build was told there is no CUDA toolchain
    assert _outcome(lambda: conftest.require_tools("nvcc")) == "skipped"
    assert _outcome(lambda: conftest.require_tools("clang-format")) == "failed"  # not CUDA's
    assert _outcome(lambda: conftest.require_tools("x", expected=lambda: False)) == "skipped"
    monkeypatch.undo()
    assert conftest.require_tools("sh")["sh"]  # found: returns the paths


def test_old_ultralytics_unset_is_a_problem_only_when_strict(monkeypatch, tmp_path):
    pytest.importorskip("ultralytics")
    import test_yolo_registration as reg

    monkeypatch.setattr(reg, "OLD_ULTRALYTICS", str(tmp_path))  # nothing installed there
    monkeypatch.delenv("DSCONV_EXT_OLD_ULTRALYTICS", raising=False)
    monkeypatch.delenv(conftest.STRICT_SKIPS_ENV, raising=False)
    assert "not installed" in reg.old_ultralytics_problem()
    monkeypatch.setenv(conftest.STRICT_SKIPS_ENV, "1")
    assert "DSCONV_EXT_OLD_ULTRALYTICS is not set" in reg.old_ultralytics_problem()
    monkeypatch.setenv("DSCONV_EXT_OLD_ULTRALYTICS", str(tmp_path))
    (tmp_path / "ultralytics").mkdir()
    (tmp_path / "ultralytics" / "__init__.py").write_text('__version__ = "8.4.1"\n')
    assert "holds ultralytics 8.4.1, not 8.3.0" in reg.old_ultralytics_problem()
    (tmp_path / "ultralytics" / "__init__.py").write_text('__version__ = "8.3.0"\n')
    assert reg.old_ultralytics_problem() is None


# A tiny suite run by a fresh pytest with tests/conftest.py: a fake machine whose kernel build
# stops at AVX2, with a CPU that lists AVX-512 VNNI (name has "avx512cpu") or does not.
TINY_SUITE = """
    import os

    import conftest
    import pytest


    @pytest.fixture(autouse=True)  # autouse: set up before the isa fixture
    def fake_machine(request, monkeypatch):
        flags = {"avx2", "fma"}
        if "avx512cpu" in request.node.name:
            flags |= {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"}
        monkeypatch.setattr(conftest, "cpu_flags", lambda: frozenset(flags))
        # the build's best path is AVX2; DSCONV_EXT_CPU_ISA (set by the isa fixture) lowers it
        monkeypatch.setattr(conftest, "active_cpu_isa", lambda: min_isa(os.environ))


    def min_isa(env):  # (the Arm model, plain C++, is in every build)
        want = env.get("DSCONV_EXT_CPU_ISA")
        return want if want in ("scalar", "neon_model") else "avx2"


    def test_avx512cpu(isa):
        pass


    def test_avx2cpu(isa):
        pass


    def test_should_run():
        conftest.skip_or_fail("something missing", should_run=True)


    def test_cannot_run():
        conftest.skip_or_fail("no CUDA device", should_run=False)


    @pytest.mark.requires_tool("dsconv-ext-no-such-tool")
    def test_missing_tool():
        pass


    @pytest.mark.requires_tool("dsconv-ext-no-such-tool", expected=False)
    def test_missing_optional_tool():
        pass


    @pytest.mark.requires_tool("sh")
    def test_present_tool():
        pass
"""

# test id -> (outcome without the switch, outcome with DSCONV_EXT_STRICT_SKIPS=1)
TINY_OUTCOMES = {
    "test_avx512cpu[amx]": ("skipped", "skipped"),  # no AMX tiles on this CPU: a true skip
    "test_avx512cpu[amx_model]": ("skipped", "failed"),  # the model needs only AVX-512 VNNI
    "test_avx2cpu[amx]": ("skipped", "skipped"),
    "test_avx2cpu[amx_model]": ("skipped", "skipped"),
    "test_avx512cpu[avx512_vnni]": ("skipped", "failed"),  # the CPU can, the build does not
    "test_avx512cpu[avx2]": ("passed", "passed"),
    "test_avx512cpu[scalar]": ("passed", "passed"),
    "test_avx2cpu[avx512_vnni]": ("skipped", "skipped"),  # the CPU cannot: a true skip
    "test_avx2cpu[avx2]": ("passed", "passed"),
    "test_avx2cpu[scalar]": ("passed", "passed"),
    "test_avx512cpu[neon_dot]": ("skipped", "skipped"),  # an x86 CPU: a true skip
    "test_avx512cpu[neon_model]": ("passed", "passed"),
    "test_avx2cpu[neon_dot]": ("skipped", "skipped"),
    "test_avx2cpu[neon_model]": ("passed", "passed"),
    "test_should_run": ("skipped", "failed"),
    "test_cannot_run": ("skipped", "skipped"),
    "test_missing_tool": ("skipped", "failed"),
    "test_missing_optional_tool": ("skipped", "skipped"),
    "test_present_tool": ("passed", "passed"),
}


def _run_tiny_suite(tmp_path: Path, strict: bool) -> dict:
    folder = tmp_path / ("strict" if strict else "lenient")
    folder.mkdir()
    shutil.copyfile(TESTS / "conftest.py", folder / "conftest.py")
    (folder / "test_tiny.py").write_text(textwrap.dedent(TINY_SUITE))
    env = conftest.package_env()
    env.pop(conftest.STRICT_SKIPS_ENV, None)
    env.pop("DSCONV_EXT_CUDA", None)
    if strict:
        env[conftest.STRICT_SKIPS_ENV] = "1"
    report = folder / "report.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd += [f"--junitxml={report}", "-o", "junit_family=xunit2", str(folder)]
    r = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert report.is_file(), r.stdout[-3000:] + r.stderr[-3000:]
    outcomes = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        kinds = {child.tag for child in case} & {"failure", "error", "skipped"}
        # a failure in the isa fixture is a setup error: both count as failed here
        outcomes[case.get("name")] = (
            "failed" if kinds & {"failure", "error"} else "skipped" if kinds else "passed"
        )
    return outcomes


def test_strict_skips_switch_end_to_end(tmp_path):
    """A fresh pytest with this conftest, with and without DSCONV_EXT_STRICT_SKIPS=1."""
    lenient = _run_tiny_suite(tmp_path, strict=False)
    strict = _run_tiny_suite(tmp_path, strict=True)
    assert lenient == {k: v[0] for k, v in TINY_OUTCOMES.items()}
    assert strict == {k: v[1] for k, v in TINY_OUTCOMES.items()}
