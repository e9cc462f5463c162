"""Shared test setup: a private Ultralytics config directory, strict skips for CI, CPU paths.

Private Ultralytics config directory
    Ultralytics keeps ``settings.json`` and its fonts in a per-user directory that it picks once,
    when ``ultralytics.utils`` is first imported: ``$YOLO_CONFIG_DIR`` (8.4 adds an
    ``Ultralytics/`` level below it), else one in the user's home. This file points
    ``YOLO_CONFIG_DIR`` at a fresh temporary directory before any test module can import
    ultralytics, so no test reads or writes the user's real one; subprocesses inherit it through
    ``os.environ`` (``package_env`` and ``yolo_helpers.subprocess_env`` copy it). A TTF from
    matplotlib stands in for ``Arial.ttf``, which ``check_font`` would otherwise download.

Strict skips (``DSCONV_EXT_STRICT_SKIPS=1``, set by ``.ci/run``)
    A skip that only means "this machine lacks X" hides a broken CI setup when the machine has X.
    :func:`skip_or_fail` skips, or under the switch fails, when its caller says the machine
    should run the test. Used by:

    - the ``isa`` fixture and :func:`use_isa`: a kernel path the CPU can run per
      ``/proc/cpuinfo`` (:data:`ISA_CPU_FLAGS`) but the build does not take fails; a path the CPU
      cannot run stays a skip;
    - the ``requires_tool`` marker (below): a missing tool fails;
    - the oldest-ultralytics test: ``DSCONV_EXT_OLD_ULTRALYTICS`` unset or not holding 8.3.0
      fails.

    Tests that need a CUDA device are not affected: these machines have none, and those tests
    keep skipping (a plain ``pytest.skip`` / ``skipif``).

``@pytest.mark.requires_tool(*names, expected=None)``
    Skips the test unless every named executable is found (:func:`find_tool`: ``PATH``, then
    ``$CUDA_HOME/bin``, then the CUDA binaries Triton ships, for ``ptxas`` and friends). Under
    the switch a missing tool fails instead, when it is expected: ``expected`` is a bool or a
    callable returning one; by default every tool is expected, except that the CUDA toolchain
    (:data:`CUDA_TOOLS`) is not expected where ``DSCONV_EXT_CUDA=0`` (the build was told there
    is none). For compile-only GPU checks, e.g.
    ``@pytest.mark.requires_tool("nvcc", "ptxas")`` on a test that runs
    ``python -m dsconv_ext selfcheck --compile-only``.
"""

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

# --- private Ultralytics config directory ------------------------------------------------------

if "ultralytics.utils" in sys.modules:  # pragma: no cover - a plugin imported it before us
    raise RuntimeError(
        "ultralytics was imported before tests/conftest.py could give it a private "
        "YOLO_CONFIG_DIR: the tests would write to the real Ultralytics config directory"
    )
# Replaces any YOLO_CONFIG_DIR of the caller too: tests must not change a user's settings.
YOLO_CONFIG_DIR = tempfile.mkdtemp(prefix="dsconv_ext_tests_yolo_config_")
os.environ["YOLO_CONFIG_DIR"] = YOLO_CONFIG_DIR


def _offline_fonts(root: str) -> None:
    """Copy matplotlib's DejaVuSans.ttf to where each supported ultralytics looks for Arial
    (8.3: ``$YOLO_CONFIG_DIR``; 8.4: ``$YOLO_CONFIG_DIR/Ultralytics``)."""
    spec = importlib.util.find_spec("matplotlib")  # (without importing it: that is slow)
    if spec is None or not spec.submodule_search_locations:
        return  # no matplotlib, no ultralytics plots: nothing will look for the font
    src = Path(spec.submodule_search_locations[0]) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    for folder in (Path(root), Path(root) / "Ultralytics"):
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("Arial.ttf", "Arial.Unicode.ttf"):
            shutil.copyfile(src, folder / name)


_offline_fonts(YOLO_CONFIG_DIR)


def pytest_unconfigure(config):
    shutil.rmtree(YOLO_CONFIG_DIR, ignore_errors=True)


# --- strict skips ------------------------------------------------------------------------------

STRICT_SKIPS_ENV = "DSCONV_EXT_STRICT_SKIPS"


def strict_skips() -> bool:
    """Whether skips of tests this machine should run are failures (read at each call)."""
    return os.environ.get(STRICT_SKIPS_ENV, "") == "1"


def skip_or_fail(reason: str, should_run: bool) -> None:
    """Skip with ``reason``; under ``DSCONV_EXT_STRICT_SKIPS=1`` fail instead when
    ``should_run`` (this machine is expected to run the test, so the skip hides a problem)."""
    if should_run and strict_skips():
        pytest.fail(
            f"{reason} [{STRICT_SKIPS_ENV}=1: this machine should run this test, so not running "
            "it is a failure]",
            pytrace=False,
        )
    pytest.skip(reason)


# Paths of the CPU kernel, best first (DSCONV_EXT_CPU_ISA forces one), and the /proc/cpuinfo
# flags each needs (csrc/cpu/dsconv2d_cpu.cpp, best_isa()). "amx" runs the int8 layers on AMX
# tiles; "amx_model" runs the same AMX kernel on a software model of the tiles, on any AVX-512
# VNNI machine (both are forced: an error where the machine cannot run them). "neon_dot" is the
# AArch64 dot-product path (forced likewise), "neon_model" the same kernel on a software model of
# those instructions, on any CPU.
CPU_ISAS = ("amx", "amx_model", "avx512_vnni", "avx2", "neon_dot", "neon_model", "scalar")
_AVX512_VNNI = frozenset({"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"})
ISA_CPU_FLAGS = {
    "amx": _AVX512_VNNI | {"amx_tile", "amx_int8"},
    "amx_model": _AVX512_VNNI,
    "avx512_vnni": _AVX512_VNNI,
    "avx2": frozenset({"avx2", "fma"}),
    # AArch64 /proc/cpuinfo lists its features on "Features" lines: asimddp is FEAT_DotProd.
    "neon_dot": frozenset({"asimddp"}),
    "neon_model": frozenset(),
    "scalar": frozenset(),
}


def cpu_flags() -> frozenset:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none: then no ISA counts
    as runnable, and ISA skips stay skips)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_can_run(isa: str) -> bool:
    return ISA_CPU_FLAGS[isa] <= cpu_flags()


def active_cpu_isa() -> str:
    """The path the compiled kernel takes now (honours DSCONV_EXT_CPU_ISA; a forced path this
    machine cannot run is reported as the kernel's reason, which names it)."""
    import dsconv_ext  # noqa: F401  (loads the library that defines the op)

    try:
        return torch.ops.dsconv_ext.cpu_isa()
    except RuntimeError as e:  # the AMX paths refuse, saying why
        return f"none ({str(e).splitlines()[0]})"


def use_isa(monkeypatch, isa: str) -> None:
    """Force the kernel's path ``isa`` for the rest of the test; skip (strict: fail where the CPU
    supports it) where the build does not take it."""
    monkeypatch.setenv("DSCONV_EXT_CPU_ISA", isa)
    active = active_cpu_isa()
    if active != isa:
        skip_or_fail(f"this CPU or build cannot run the {isa} path: {active}", cpu_can_run(isa))


# --- requires_tool marker ------------------------------------------------------------------------

CUDA_TOOLS = frozenset({"nvcc", "ptxas", "cuobjdump", "nvdisasm"})


def cuda_toolchain_expected() -> bool:
    return os.environ.get("DSCONV_EXT_CUDA", "") != "0"


def find_tool(name: str):
    """Path of executable ``name``, or None."""
    found = shutil.which(name)
    if found:
        return found
    dirs = []
    if os.environ.get("CUDA_HOME"):
        dirs.append(Path(os.environ["CUDA_HOME"]) / "bin")
    spec = importlib.util.find_spec("triton")  # Triton ships ptxas, cuobjdump and nvdisasm
    if spec is not None and spec.submodule_search_locations:
        dirs.append(Path(spec.submodule_search_locations[0]) / "backends" / "nvidia" / "bin")
    for d in dirs:
        if (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    return None


def require_tools(*names, expected=None) -> dict:
    """Paths of the tools ``names``; skips (strict: fails where expected) when one is missing.
    ``expected``: see the module docstring."""
    paths = {n: find_tool(n) for n in names}
    missing = [n for n, p in paths.items() if p is None]
    if missing:
        if expected is None:
            should_run = cuda_toolchain_expected() or not (set(missing) <= CUDA_TOOLS)
        else:
            should_run = bool(expected() if callable(expected) else expected)
        skip_or_fail(f"needs {', '.join(missing)}, not found", should_run=should_run)
    return paths


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "requires_tool(*names, expected=None): skip unless the executables are found; under "
        f"{STRICT_SKIPS_ENV}=1 a missing expected tool fails (see tests/conftest.py)",
    )


def pytest_runtest_setup(item):
    for mark in item.iter_markers("requires_tool"):
        require_tools(*mark.args, expected=mark.kwargs.get("expected"))


# --- fixtures ----------------------------------------------------------------------------------

# Tests make their own data and never reach the network.
os.environ.setdefault("YOLO_OFFLINE", "1")


def package_env(extra=None):
    """Environment for a subprocess that must import the same dsconv_ext as this test process
    (the installed one in CI, the checkout during development), whatever its working directory.
    It inherits this process's private YOLO_CONFIG_DIR."""
    import dsconv_ext

    root = os.path.dirname(os.path.dirname(os.path.abspath(dsconv_ext.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


@pytest.fixture
def subprocess_env():
    return package_env


@pytest.fixture(params=CPU_ISAS)
def isa(request, monkeypatch):
    """Runs a test once per CPU kernel SIMD path this CPU can take (strict: a path the CPU can
    run but the build does not take fails)."""
    use_isa(monkeypatch, request.param)
    return request.param


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
