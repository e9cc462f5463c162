"""Registration with ultralytics, in memory: parse_model extension, loud failures, hooks, opt-out,
DDP workers, safe globals, and the oldest ultralytics we claim (8.3.0)."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
from conftest import skip_or_fail, strict_skips
from yolo_helpers import CONFIGS, OLD_ULTRALYTICS, pkg_parent, pth_site, run_python
from yolo_params import derive


@pytest.fixture
def registered():
    import dsconv_ext.yolo as dy

    dy.register()
    yield dy
    dy.register()  # tests that unregister leave it registered for the rest of the session


def test_register_is_idempotent_and_reversible(registered):
    from ultralytics.nn import tasks

    dy = registered
    parse_model = tasks.parse_model
    assert dy.register() and tasks.parse_model is parse_model
    assert tasks.C3k2_DSConv is dy.C3k2_DSConv and tasks.DSConv.__module__.startswith("dsconv_ext")
    original = parse_model.__dsconv_ext_original__
    dy.unregister()
    assert not dy.is_registered()
    assert tasks.parse_model is original and "C3k2_DSConv" not in vars(tasks)
    assert not hasattr(tasks.BaseModel.fuse, "__dsconv_ext_original__")
    with pytest.raises(KeyError, match="C3k2_DSConv"):
        tasks.DetectionModel(str(CONFIGS / "yolo11-C3k2-DSConv.yaml"), verbose=False)
    dy.register()
    assert tasks.parse_model is not original and dy.is_registered()


def test_ultralytics_untouched_on_disk(registered):
    """The extension lives in memory: the installed tasks.py never mentions our modules."""
    from ultralytics.nn import tasks

    source = Path(tasks.__file__).read_text()
    assert "C3k2_DSConv" not in source and "dsconv_ext" not in source
    import ultralytics.nn

    assert ultralytics.nn.parse_model is tasks.parse_model  # the package re-export follows


FAKE_TASKS = {
    "equality test": """
        def parse_model(d, ch, verbose=True):
            for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
                for j, a in enumerate(args):
                    pass
                if m in {Conv, C3k2, C3, Bottleneck}:
                    pass
                if m in {C3k2, C3}:
                    pass
                if m == C3k2:
                    pass
    """,
    "sets moved out of parse_model": """
        BASE = frozenset({Conv, C3k2, C3, Bottleneck})
        def parse_model(d, ch, verbose=True):
            for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
                for j, a in enumerate(args):
                    pass
                if m in BASE:
                    pass
    """,
    "no argument loop": """
        def parse_model(d, ch, verbose=True):
            for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
                if m in {Conv, C3k2, C3, Bottleneck}:
                    pass
                if m in {C3k2, C3}:
                    pass
                if m is C3k2:
                    pass
    """,
}


@pytest.mark.parametrize("case", sorted(FAKE_TASKS))
def test_changed_parse_model_fails_loudly(tmp_path, case):
    """A parse_model whose shape we do not know is refused, naming the ultralytics version."""
    import ultralytics

    from dsconv_ext.yolo.parse_patch import ParseModelShapeError, patch_parse_model
    from dsconv_ext.yolo.registry import ALIASES

    path = tmp_path / "fake_tasks.py"
    path.write_text(textwrap.dedent(FAKE_TASKS[case]))
    spec = importlib.util.spec_from_file_location("fake_tasks", path)
    fake = importlib.util.module_from_spec(spec)
    fake.__dict__.update(Conv=1, C3k2=2, C3=3, Bottleneck=4)
    spec.loader.exec_module(fake)
    with pytest.raises(ParseModelShapeError, match=f"ultralytics {ultralytics.__version__}"):
        patch_parse_model(fake, ALIASES)


VALID_FAKE = """
    def parse_model(d, ch, verbose=True):
        for i, (f, n, m, args) in enumerate(d["backbone"] + d["head"]):
            for j, a in enumerate(args):
                pass
            if m in {Conv, C3k2, C3, Bottleneck}:
                pass
            if m in {C3k2, C3}:
                pass
            if m is C3k2:
                pass
"""


def test_fake_source_changed_after_import_is_refused(tmp_path):
    """A tasks file edited after import: its source no longer compiles to the loaded code."""
    from dsconv_ext.yolo.parse_patch import ParseModelShapeError, patch_parse_model
    from dsconv_ext.yolo.registry import ALIASES

    path = tmp_path / "fake_tasks_edited.py"
    path.write_text(textwrap.dedent(VALID_FAKE))
    spec = importlib.util.spec_from_file_location("fake_tasks_edited", path)
    fake = importlib.util.module_from_spec(spec)
    fake.__dict__.update(Conv=1, C3k2=2, C3=3, Bottleneck=4)
    spec.loader.exec_module(fake)
    # The file as loaded is accepted, so the refusal below is about the edit, not about how
    # this test builds its module.
    patch_parse_model(fake, ALIASES)
    # Same lines but one, other code: only the bytecode comparison can tell.
    path.write_text(textwrap.dedent(VALID_FAKE).replace("if m is C3k2:", "if m is not C3k2:"))
    os.utime(path, ns=(1, 1))  # another mtime, so linecache rereads it even within one tick
    with pytest.raises(ParseModelShapeError, match="is not the code that was loaded"):
        patch_parse_model(fake, ALIASES)


@contextlib.contextmanager
def _unregistered(monkeypatch):
    """Run with dsconv_ext unregistered; afterwards undo the test's monkeypatches (ultralytics as
    installed again), drop the stand-ins of a non-strict failure, register, and check that the
    registration wraps ultralytics' real parse_model."""
    from ultralytics.nn import tasks

    import dsconv_ext.yolo as dy
    from dsconv_ext.yolo import registry

    dy.unregister()
    real = tasks.parse_model
    try:
        yield tasks, real
    finally:
        dy.unregister()  # in case the test registered (a refusal that failed to refuse)
        monkeypatch.undo()
        for name, obj in list(vars(tasks).items()):
            if isinstance(obj, type) and issubclass(obj, registry._Unavailable):
                del vars(tasks)[name]
        dy.register()
        assert tasks.parse_model.__dsconv_ext_original__ is real
        assert tasks.DSConv.__module__.startswith("dsconv_ext.")


def _define_in_tasks(monkeypatch, tasks, path: Path, source: str):
    """Compile ``source`` from ``path`` with tasks' globals (as if ultralytics shipped that file)
    and install what it defines in tasks; returns its parse_model."""
    path.write_text(source)
    defined: dict = {}
    # dont_inherit: this file's `from __future__ import annotations` is not ultralytics'
    exec(compile(source, str(path), "exec", dont_inherit=True), vars(tasks), defined)
    for name, obj in defined.items():
        monkeypatch.setitem(vars(tasks), name, obj)
    return defined["parse_model"]


def _edit(source: str, old: str, new: str) -> str:
    if source.count(old) != 1:
        pytest.skip(f"this ultralytics' parse_model has no single {old!r} to edit")
    return source.replace(old, new)


_WIDTH = "c2 = make_divisible(min(c2, max_channels) * width, 8)"
_REPEATS = "if m in repeat_modules:"
_C3K = "if m is C3k2:  # for M/L/X sizes"
_HELPER = """

def _width_of(m, c2, max_channels, width):
    # ultralytics' modules only: the width rule lives here now, out of parse_model's reach
    if m in {Conv, C3k2, C3, Bottleneck, C2f, SPPF}:
        return make_divisible(min(c2, max_channels) * width, 8)
    return c2
"""
_REPEAT_NAMES = "BottleneckCSP C1 C2 C2f C3k2 C2fAttn C3 C3TR C3Ghost C3x RepC3 C2fPSA C2fCIB C2PSA"


def _moved_rule(case: str, source: str) -> str:
    """ultralytics' parse_model with one scaling rule moved where the source rewrite cannot
    reach it."""
    if case == "width rule in a helper":
        return _edit(source, _WIDTH, "c2 = _width_of(m, c2, max_channels, width)") + _HELPER
    if case == "c3k rule as a name comparison":
        return _edit(source, _C3K, 'if m.__name__ == "C3k2":')
    if case == "repeat rule as a match statement":
        lines = source.splitlines(keepends=True)
        k = [i for i, line in enumerate(lines) if line.strip() == _REPEATS]
        if len(k) != 1 or lines[k[0] + 2].strip() != "n = 1":
            pytest.skip(f"this ultralytics' parse_model has no single {_REPEATS!r} block")
        k = k[0]
        indent = lines[k][: len(lines[k]) - len(lines[k].lstrip())]
        names = " | ".join(f'"{n}"' for n in _REPEAT_NAMES.split())
        lines[k : k + 1] = [f"{indent}match m.__name__:\n", f"{indent}    case {names}:\n"]
        lines[k + 2 : k + 4] = ["    " + line for line in lines[k + 2 : k + 4]]  # the case body
        return "".join(lines)
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    ["width rule in a helper", "c3k rule as a name comparison", "repeat rule as a match statement"],
)
def test_scaling_rules_out_of_reach_are_refused(registered, monkeypatch, tmp_path, case):
    """Rules our rewrite cannot see would leave our modules unscaled: the probe model built
    through the patched parse_model shows it, and registration is refused."""
    import inspect

    from dsconv_ext.yolo import parse_patch, registry

    with _unregistered(monkeypatch) as (tasks, real):
        source = _moved_rule(case, textwrap.dedent(inspect.getsource(real)))
        altered = _define_in_tasks(monkeypatch, tasks, tmp_path / "moved.py", source)
        # The name-based variants also drop type tests that the source check counts: take that
        # check out, so that this tests the behavioural check on its own ...
        monkeypatch.setattr(parse_patch, "MIN_REFERENCES", {})
        with pytest.raises(registry.RegistrationError, match="is not scaled like"):
            registry.register()
        assert tasks.parse_model is altered and "C3k2_DSConv" not in vars(tasks)
        # ... and non-strict registration warns and leaves ultralytics' function in place.
        with pytest.warns(RuntimeWarning, match="is not scaled like"):
            assert registry.register(strict=False) is False
        assert tasks.parse_model is altered


def test_unchanged_copy_registers_then_edited_file_is_refused(registered, monkeypatch, tmp_path):
    """parse_model compiled from a file that is edited afterwards: the source inspect reads is
    not the loaded code, and recompiling it would silently swap the code that runs."""
    import inspect

    from dsconv_ext.yolo import registry

    with _unregistered(monkeypatch) as (tasks, real):
        path = tmp_path / "copied_tasks.py"
        source = textwrap.dedent(inspect.getsource(real))
        copied = _define_in_tasks(monkeypatch, tasks, path, source)
        # Accepted as loaded (so the refusal below is about the edit)...
        assert registry.register() and tasks.parse_model.__dsconv_ext_original__ is copied
        registry.unregister()
        assert tasks.parse_model is copied
        # ... then one line of the file changes (a scaling rule): the code in memory does not.
        path.write_text(_edit(source, _WIDTH, "c2 = make_divisible(min(c2, max_channels), 8)"))
        with pytest.raises(registry.RegistrationError, match="is not the code that was loaded"):
            registry.register()
        assert tasks.parse_model is copied and "DSConv" not in vars(tasks)


@pytest.mark.parametrize("how", ["functools.wraps", "another module"])
def test_foreign_parse_model_is_refused(registered, monkeypatch, how):
    """Another plugin's parse_model: recompiling the function it wraps (or ultralytics' source)
    in its place would drop that plugin's change. Refused, and left in place."""
    import functools

    from dsconv_ext.yolo import registry

    with _unregistered(monkeypatch) as (tasks, real):
        if how == "functools.wraps":

            @functools.wraps(real)
            def other_plugin(*args, **kwargs):
                return real(*args, **kwargs)

            match = r"a wrapper \(by another plugin\?\) of ultralytics.nn.tasks.parse_model"
        else:

            def other_plugin(d, ch, verbose=True):
                return real(d, ch, verbose)

            match = "defined outside ultralytics.nn.tasks"
        monkeypatch.setattr(tasks, "parse_model", other_plugin)
        with pytest.raises(registry.RegistrationError, match=match):
            registry.register()
        assert tasks.parse_model is other_plugin and "DSConv" not in vars(tasks)


def test_wrapper_of_our_wrapper_is_foreign(registered, monkeypatch):
    """functools.wraps copies our wrapper's attributes into another plugin's wrapper of it: that
    wrapper must not pass for ours."""
    import functools

    from ultralytics.nn import tasks

    from dsconv_ext.yolo import parse_patch

    ours = tasks.parse_model
    assert parse_patch.is_our_wrapper(ours)
    theirs = functools.wraps(ours)(lambda *a, **k: ours(*a, **k))
    assert theirs.__dsconv_ext_original__ is ours.__dsconv_ext_original__  # copied along
    assert not parse_patch.is_our_wrapper(theirs)
    monkeypatch.setattr(tasks, "parse_model", theirs)
    with pytest.raises(parse_patch.ParseModelShapeError, match="will not unwrap"):
        parse_patch.patch_parse_model(tasks, {"Conv": ("DSConv",)})


def test_existing_name_in_tasks_is_refused(registered, monkeypatch):
    """A future ultralytics with its own DSConv: overwriting it would change what ultralytics'
    own YAMLs build. Refused, naming it; non-strict registration keeps it too."""
    import torch

    from dsconv_ext.yolo import registry

    class DSConv(torch.nn.Module):  # stands in for a future ultralytics.nn.modules.DSConv
        pass

    with _unregistered(monkeypatch) as (tasks, real):
        monkeypatch.setitem(vars(tasks), "DSConv", DSConv)
        with pytest.raises(
            registry.RegistrationError,
            match=r"already defines DSConv \(test_yolo_registration\..*DSConv\)",
        ):
            registry.register()
        assert tasks.DSConv is DSConv and tasks.parse_model is real
        with pytest.warns(RuntimeWarning, match="already defines DSConv"):
            assert registry.register(strict=False) is False
        assert tasks.DSConv is DSConv  # not replaced by a stand-in either


def test_non_strict_failure_warns_and_fails_on_use(registered, monkeypatch):
    from ultralytics.nn import tasks

    from dsconv_ext.yolo import registry

    dy = registered
    dy.unregister()

    def broken(*a, **k):
        raise registry.ParseModelShapeError("parse_model changed shape (simulated)")

    monkeypatch.setattr(registry, "patch_parse_model", broken)
    try:
        with pytest.warns(RuntimeWarning, match="simulated"):
            assert registry.register(strict=False) is False
        with pytest.raises(registry.RegistrationError, match="simulated"):
            tasks.DetectionModel(str(CONFIGS / "yolo11-C3k2-DSConv.yaml"), verbose=False)
        with pytest.raises(registry.ParseModelShapeError):
            registry.register(strict=True)
    finally:
        for name in [*(a for v in registry.ALIASES.values() for a in v), "BiLevelRoutingAttention"]:
            vars(tasks).pop(name, None)
        monkeypatch.undo()
        dy.register()


def test_too_old_ultralytics_is_refused(registered, monkeypatch):
    import ultralytics

    from dsconv_ext.yolo import registry

    registered.unregister()
    monkeypatch.setattr(ultralytics, "__version__", "8.2.103")
    with pytest.raises(registry.RegistrationError, match="ultralytics>=8.3.0, found 8.2.103"):
        registry.register()
    monkeypatch.undo()


HOOK_CHECK = """
    import sys, site
    site.addsitedir({site!r})
    # the start-up hook must not import torch, ultralytics or dsconv_ext by itself
    assert not {{"torch", "ultralytics", "dsconv_ext"}} & set(sys.modules), sorted(sys.modules)
    from ultralytics import YOLO
    model = YOLO({cfg!r})
    print("PARAMS", sum(p.numel() for p in model.model.parameters()))
"""


def test_startup_hook_registers_without_import(tmp_path):
    """What an installed dsconv_ext_yolo.pth does: user code never imports dsconv_ext."""
    cfg = str(CONFIGS / "yolo11n-C3k2-DSConv.yaml")  # n scale from the name, as ultralytics does
    r = run_python(HOOK_CHECK.format(site=str(pth_site(tmp_path)), cfg=cfg), timeout=180)
    assert "PARAMS 2624080" in r.stdout


def test_opt_out(tmp_path):
    """DSCONV_EXT_YOLO=0: neither the start-up hook nor `import dsconv_ext` registers."""
    code = f"""
        import site
        site.addsitedir({str(pth_site(tmp_path))!r})
        import dsconv_ext, dsconv_ext.yolo as dy
        from ultralytics import YOLO
        try:
            YOLO({str(CONFIGS / "yolo11n-C3k2-DSConv.yaml")!r})
        except KeyError as e:
            assert "C3k2_DSConv" in str(e) and not dy.is_registered(), e
            print("OPTED OUT")
    """
    r = run_python(code, timeout=180, DSCONV_EXT_YOLO="0")
    assert "OPTED OUT" in r.stdout


def test_ddp_worker_file_registers(tmp_path, registered):
    """Workers of multi-GPU training are fresh processes: the DDP file ultralytics writes for them
    starts by registering, so they work even without the .pth hook (checked with it off)."""
    from ultralytics.utils import dist

    from dsconv_ext.yolo.registry import _wrap_generate_ddp_file

    assert dist.generate_ddp_file.__dsconv_ext_original__  # the real one is wrapped
    script = tmp_path / "_temp_ddp.py"
    cfg = str(CONFIGS / "yolo11n-C3k2-DSConv.yaml")

    def fake_generate(trainer):  # stands in for ultralytics' writer (it needs a real trainer)
        script.write_text(
            "if __name__ == '__main__':\n"
            "    from ultralytics.nn.tasks import DetectionModel\n"
            f"    m = DetectionModel({cfg!r}, verbose=False)\n"
            "    print('PARAMS', sum(p.numel() for p in m.parameters()))\n"
        )
        return str(script)

    path = _wrap_generate_ddp_file(fake_generate)(None)
    code = f"import runpy; runpy.run_path({path!r}, run_name='__main__')"
    r = run_python(code, timeout=180, DSCONV_EXT_YOLO="0", PYTHONPATH="")
    assert "PARAMS 2624080" in r.stdout


def test_safe_globals_cover_our_classes(registered):
    import torch

    from dsconv_ext import DSConv, DSConv2d
    from dsconv_ext.bra import BiLevelRoutingAttention
    from dsconv_ext.yolo.registry import safe_globals

    ours = set(safe_globals())
    for cls in (DSConv, DSConv2d, BiLevelRoutingAttention, registered.C3k2_DSConv):
        assert cls in ours
    allowed = torch.serialization.get_safe_globals()
    assert all(c in allowed for c in (DSConv2d, registered.C3k2_DSConv))


OLD_CHECK = """
    import ultralytics, torch
    assert ultralytics.__version__ == "8.3.0", ultralytics.__version__
    import dsconv_ext.yolo as dy
    dy.register()
    from ultralytics.nn.tasks import DetectionModel, OBBModel, SegmentationModel
    import yaml
    for cfg, scale in {cases!r}:
        d = yaml.safe_load(open(cfg))
        d["scale"] = scale
        head = d["head"][-1][2]
        cls = {{"Segment": SegmentationModel, "OBB": OBBModel}}.get(head, DetectionModel)
        m = cls(d, verbose=False).eval()
        with torch.no_grad():
            m(torch.rand(1, 3, 64, 64))
        print("COUNT", cfg.rsplit("/", 1)[-1], scale, sum(p.numel() for p in m.parameters()))
    from dsconv_ext import DSConv
    m = DetectionModel({bad!r}, verbose=False).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        y0 = m(x)[0]
        m.fuse()  # 8.3's fuse(verbose) signature, our DSConvs folded too
        y1 = m(x)[0]
    assert all(l.fused for l in m.modules() if isinstance(l, DSConv))
    print("FUSED", float((y1 - y0).abs().max() / y0.abs().max()))
    d = yaml.safe_load(open({bad!r}))
    d["backbone"][2] = [-1, 2, "C3k2_DSConv", [256, "yes"]]
    try:
        DetectionModel(d, verbose=False)
    except TypeError as e:
        print("ROWERROR", e)
"""


def old_ultralytics_problem():
    """Why the oldest-ultralytics test cannot run here, or None. CI always can (.ci/run installs
    8.3.0 and sets DSCONV_EXT_OLD_ULTRALYTICS), so under DSCONV_EXT_STRICT_SKIPS=1 an unset
    variable is a problem too; without the switch /tmp/ul830 is tried."""
    install = "pip install --no-deps --target /tmp/ul830 ultralytics==8.3.0 tqdm"
    if not os.environ.get("DSCONV_EXT_OLD_ULTRALYTICS") and strict_skips():
        return f"DSCONV_EXT_OLD_ULTRALYTICS is not set ({install}, then point it there)"
    init = Path(OLD_ULTRALYTICS) / "ultralytics" / "__init__.py"
    if not init.is_file():
        return f"ultralytics 8.3.0 not installed in {OLD_ULTRALYTICS} ({install})"
    found = re.search(r"^__version__\s*=\s*[\"']([^\"']+)", init.read_text(), re.M)
    if found is None or found.group(1) != "8.3.0":
        version = found.group(1) if found else "of unknown version"
        return f"{OLD_ULTRALYTICS} holds ultralytics {version}, not 8.3.0 ({install})"
    return None


def test_oldest_supported_ultralytics():
    """Registration + every config at n (C3k2-DSConv also at m, for the forced c3k) on 8.3.0."""
    problem = old_ultralytics_problem()
    if problem:
        skip_or_fail(problem, should_run=True)
    cases = [(str(CONFIGS / c), "n") for c in sorted(os.listdir(CONFIGS)) if c.endswith(".yaml")]
    cases.append((str(CONFIGS / "yolo11-C3k2-DSConv.yaml"), "m"))
    code = OLD_CHECK.format(cases=cases, bad=str(CONFIGS / "yolo11-C3k2-DSConv.yaml"))
    r = run_python(code, timeout=400, PYTHONPATH=os.pathsep.join([OLD_ULTRALYTICS, pkg_parent()]))
    for cfg, scale in cases:
        want = derive(Path(cfg), scale)[1]
        assert f"COUNT {Path(cfg).name} {scale} {want}" in r.stdout, r.stdout
    assert "ROWERROR" in r.stdout and "layer 2 (C3k2_DSConv)" in r.stdout
    assert float(r.stdout.split("FUSED")[1].split()[0]) < 1e-4
    assert "GFLOPs" in r.stdout + r.stderr  # 8.3's model.info() after fuse, our rules in


def test_info_report(registered, monkeypatch):
    monkeypatch.delenv("DSCONV_EXT_CAPTURE", raising=False)
    report = registered.integration_report()
    assert report["registered"] is True and report["ultralytics"]
    assert report["graph_capture"].startswith("on (replayed by TorchScript")
    monkeypatch.setenv("DSCONV_EXT_CAPTURE", "0")
    assert registered.integration_report()["graph_capture"] == "off (DSCONV_EXT_CAPTURE=0)"
    monkeypatch.setenv("DSCONV_EXT_CAPTURE", "fx")
    assert registered.integration_report()["graph_capture"].startswith("on (replayed by torch.fx")
    monkeypatch.setenv("DSCONV_EXT_CAPTURE", "off")
    assert "must be 0, 1 or fx, got 'off'" in registered.integration_report()["graph_capture"]
    assert sys.modules["ultralytics.nn.tasks"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registered.register()


@pytest.mark.parametrize(
    "first_import",
    [
        "from dsconv_ext.yolo.blocks import C3k2_DSConv",
        "import dsconv_ext; from dsconv_ext.yolo.registry import safe_globals; safe_globals()",
    ],
)
def test_registers_when_our_blocks_import_ultralytics_first(first_import):
    """Importing our blocks before ultralytics makes ultralytics' import (and our import hook)
    run while blocks.py is half executed: registration must wait for it, not fail and leave
    stubs behind (it used to warn 'circular import' and break every DSConv YAML)."""
    code = f"""
        import warnings
        warnings.simplefilter("error", RuntimeWarning)
        {first_import}
        from ultralytics.nn import tasks
        import dsconv_ext.yolo as dy
        from dsconv_ext.yolo.blocks import C3k2_DSConv
        assert dy.is_registered(), "not registered"
        assert tasks.C3k2_DSConv is C3k2_DSConv, tasks.__dict__.get("C3k2_DSConv")
    """
    run_python(code, timeout=120)
