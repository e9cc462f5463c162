"""Package plumbing: the info command, backend selection, honesty about the fallback, the layout
(public names, no import cycles) and checkpoints pickled under earlier module paths."""

import ast
import io
import json
import os
import subprocess
import sys
import zipfile

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
    fq = report["dsconv2d_qat_fake_quant"]
    assert fq["cpu"] == {"backend": "torch"}
    assert fq["cuda"]["backend"] in ("triton", "torch")
    if fq["cuda"]["backend"] == "torch":
        assert fq["cuda"]["why"]
    dfl = report["dfl_expectation"]
    assert dfl.get("cpu float32") in ("kernel", "torch (no compiled op)") or "error" in dfl
    stem = report["stem_conv2d"]
    if report["dsconv2d"]["cpu"].get("isa") in ("amx", "avx512_vnni", "avx2"):
        assert stem["cpu float32"] == "kernel", stem
    else:  # the portable path keeps oneDNN, and says why
        assert stem.get("cpu float32", "").startswith("torch (") or "error" in stem, stem
    for path, want in (("avx2", "kernel"), ("scalar", "torch (oneDNN")):
        lower = json.loads(_run(["info", "--json"], env={"DSCONV_EXT_CPU_ISA": path}).stdout)
        if lower["dsconv2d"]["cpu"].get("isa") == path:
            assert lower["stem_conv2d"]["cpu float32"].startswith(want), lower
    text = _run(["info"])
    assert text.returncode == 0 and "dsconv2d:" in text.stdout
    assert "QAT fake quantisation" in text.stdout


def test_info_reports_a_forced_cpu_path_this_machine_lacks():
    """DSCONV_EXT_CPU_ISA naming a path this CPU cannot run: info still reports everything and
    says why, instead of a traceback; the Arm model runs anywhere."""
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    lacking = "neon_dot" if "asimddp" not in flags else "amx"
    r = _run(["info", "--json"], env={"DSCONV_EXT_CPU_ISA": lacking})
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    cpu = report["dsconv2d"]["cpu"]
    if cpu["backend"] == "kernel":
        assert cpu["isa"].startswith("unavailable: DSCONV_EXT_CPU_ISA=" + lacking), cpu
        assert "error" in report["quantize"] and lacking in report["quantize"]["error"]
        assert report["stem_conv2d"]["cpu float32"].startswith("torch ("), report["stem_conv2d"]
        model = json.loads(
            _run(["info", "--json"], env={"DSCONV_EXT_CPU_ISA": "neon_model"}).stdout
        )
        assert model["dsconv2d"]["cpu"]["isa"] == "neon_model"
        assert model["quantize"]["policy"] == "keep float", model["quantize"]


def test_info_reports_forced_torch_fake_quant():
    report = json.loads(_run(["info", "--json"], env={"DSCONV_EXT_FAKE_QUANT": "torch"}).stdout)
    fq = report["dsconv2d_qat_fake_quant"]
    assert fq["cuda"] == {"backend": "torch", "why": "DSCONV_EXT_FAKE_QUANT=torch"}
    bad = json.loads(_run(["info", "--json"], env={"DSCONV_EXT_FAKE_QUANT": "fast"}).stdout)
    assert "DSCONV_EXT_FAKE_QUANT" in bad["dsconv2d_qat_fake_quant"]["error"]


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
    from dsconv_ext import (  # noqa: F401  (the import itself is the test)
        FORMAT_VERSION,
        BiLevelRoutingAttention,
        DSConv,
        DSConv2d,
        DSConvFormatError,
        dsconv2d,
        dsconv2d_backend,
        dsconv2d_fallback,
        dsconv2d_reference,
        dsconv_backend_report,
        quantize,
    )
    from dsconv_ext.dsconv import DSConv2d as home
    from dsconv_ext.yolo.convert import quantize as quantize_home

    assert DSConv2d is home and quantize is quantize_home
    for name in dsconv_ext.__all__:
        assert getattr(dsconv_ext, name) is not None, name
    assert isinstance(dsconv_ext.quant_primitives.MAX_BLOCK_SIZE, int)
    assert torch.ops.dsconv_ext is not None


def _package_modules():
    root = os.path.dirname(os.path.abspath(dsconv_ext.__file__))
    mods = {}
    for folder, _, files in os.walk(root):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, f), os.path.dirname(root))
                name = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
                mods[name] = os.path.join(folder, f)
    return mods


def _imports(name, path, mods):
    """dsconv_ext modules that module ``name`` imports anywhere in its file (lazy imports too)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package
                for _ in range(node.level - 1):
                    parent = parent.rpartition(".")[0]
                base = f"{parent}.{node.module}" if node.module else parent
            targets = [
                f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
            ]
        for t in targets:
            while t and t not in mods:  # a name inside a module -> the module
                t = t.rpartition(".")[0]
            if t and t != name and not t.endswith("._C"):
                out.add(t)
    return out


def test_no_import_cycles():
    """Every import statement of the package, lazy ones included, forms a DAG (three homes,
    dsconv/ bra/ yolo/, that lean on each other one way)."""
    mods = _package_modules()
    # the compiled library, imported as `from . import _C`, is not a Python module
    graph = {m: {t for t in _imports(m, p, mods) if t != "dsconv_ext" or m != "dsconv_ext._loader"}
             for m, p in mods.items()}  # fmt: skip
    state, path = {}, []

    def visit(m):
        state[m] = "open"
        path.append(m)
        for t in sorted(graph[m]):
            if state.get(t) == "open":
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(t) :] + [t]))
            if t not in state:
                visit(t)
        path.pop()
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert {"dsconv_ext.dsconv.ops", "dsconv_ext.yolo.registry"} <= set(graph)  # it looked


def _pickle_with_old_paths(obj, renames):
    """``torch.save(obj)`` as an earlier release wrote it: the pickle names the classes by the
    module paths they had then (protocol 2 spells globals as text, so a rename is exact)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    src, dst = zipfile.ZipFile(buf), io.BytesIO()
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                for new, old in renames.items():
                    assert new.encode() in data, new
                    data = data.replace(f"{new}\n".encode(), f"{old}\n".encode())
                    assert new.encode() not in data
            out.writestr(info, data)
    return dst.getvalue()


def test_checkpoints_of_earlier_module_paths_load(tmp_path):
    """Frozen DSConv2d and the pooling stand-ins were defined in dsconv_ext.modules.{dsconv,
    pooling}: such pickles load, unrestricted and with weights_only, in a fresh process."""
    from dsconv_ext.yolo.pooling import NearestUpsample, SeparableMaxPool2d

    torch.manual_seed(0)
    model = torch.nn.Sequential(
        dsconv_ext.DSConv2d(8, 16, 3, padding=1, bits=4).freeze(),
        NearestUpsample(2),
        SeparableMaxPool2d(5, 2),
    ).eval()
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        want = model(x)
    renames = {
        "dsconv_ext.dsconv.module": "dsconv_ext.modules.dsconv",
        "dsconv_ext.yolo.pooling": "dsconv_ext.modules.pooling",
    }
    path = tmp_path / "old.pt"
    path.write_bytes(_pickle_with_old_paths(model, renames))
    torch.save(x, tmp_path / "x.pt")
    for weights_only in (False, True):
        code = f"""
import torch
from dsconv_ext.yolo.registry import safe_globals
torch.serialization.add_safe_globals([torch.nn.Sequential, *safe_globals()])
m = torch.load({str(path)!r}, weights_only={weights_only})
assert type(m[0]).__module__ == "dsconv_ext.dsconv.module", type(m[0]).__module__
with torch.no_grad():
    torch.save(m(torch.load({str(tmp_path / "x.pt")!r})), {str(tmp_path / "y.pt")!r})
"""
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=package_env(), timeout=300)  # fmt: skip
        assert r.returncode == 0, r.stderr[-3000:]
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), want, rtol=0, atol=0)
