import os

import pytest
import torch

# SIMD paths of the CPU kernel, best first (DSCONV_EXT_CPU_ISA lowers the choice). "amx" runs
# the int8 layers on AMX tiles; "amx_model" runs the same AMX kernel on a software model of the
# tiles, on any AVX-512 machine (both are forced: an error where the machine cannot run them).
CPU_ISAS = ("amx", "amx_model", "avx512_vnni", "avx2", "scalar")

# Tests make their own data and never reach the network.
os.environ.setdefault("YOLO_OFFLINE", "1")


def package_env(extra=None):
    """Environment for a subprocess that must import the same dsconv_ext as this test process
    (the installed one in CI, the checkout during development), whatever its working directory."""
    import dsconv_ext

    root = os.path.dirname(os.path.dirname(os.path.abspath(dsconv_ext.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    env.update(extra or {})
    return env


@pytest.fixture
def subprocess_env():
    return package_env


def use_isa(monkeypatch, isa):
    """Forces the CPU kernel's path `isa` for the rest of the test, or skips the test where this
    machine cannot run it."""
    monkeypatch.setenv("DSCONV_EXT_CPU_ISA", isa)
    try:
        got = torch.ops.dsconv_ext.cpu_isa()
    except RuntimeError as e:  # the AMX paths refuse, saying why
        pytest.skip(str(e).splitlines()[0])
    if got != isa:
        pytest.skip(f"this CPU cannot run the {isa} path")


@pytest.fixture(params=CPU_ISAS)
def isa(request, monkeypatch):
    """Runs a test once per CPU kernel SIMD path this CPU can take."""
    use_isa(monkeypatch, request.param)
    return request.param


@pytest.fixture
def threads():
    """Restores the thread count a test changes."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
