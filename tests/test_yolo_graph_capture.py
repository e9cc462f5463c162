"""The recorded-graph forward of converted ultralytics models (dsconv_ext.yolo.graph_capture).

The reference is the same converted model walking its module tree (``capture_graph=False``, or
``DSCONV_EXT_CAPTURE=0``): replayed outputs must equal it bit for bit. Whether a call replayed is
seen from calls of the first layer's forward, which only the module tree makes."""

from __future__ import annotations

import copy
import io
import os
import warnings

import pytest
import torch
import torch.nn as nn
from test_yolo_convert import trained_like  # the same stand-in for a trained model
from yolo_helpers import CONFIGS, IMGSZ


@pytest.fixture(scope="module", autouse=True)
def registered():
    import dsconv_ext.yolo as dy

    dy.register()


@pytest.fixture(autouse=True)
def record_early(monkeypatch):
    """Record on the third call (the default waits for 10 s of eager forwards of a shape)."""
    monkeypatch.setenv("DSCONV_EXT_CAPTURE_AFTER_S", "0")


def converted_pair(cfg: str = "yolo11n.yaml", seed: int = 0):
    """(captured, plain): one trained-like model converted with and without graph capture."""
    from dsconv_ext import quantize

    model = trained_like(cfg, seed)
    plain = quantize(copy.deepcopy(model), capture_graph=False, check_speed=False)
    return quantize(model, check_speed=False), plain


class TreeCalls:
    """Counts forwards that walked the module tree: calls of the first layer's forward (wrapped
    as an instance attribute: a hook would itself keep the model off the recorded graph)."""

    def __init__(self, model):
        self.n = 0
        layer = model.model[0]
        inner = layer.forward

        def counted(*args, **kwargs):
            self.n += 1
            return inner(*args, **kwargs)

        layer.forward = counted


def record(model, x):
    """Runs ``model(x)`` until the signature is recorded (CAPTURE_AFTER calls, inside the
    caller's no-grad block); returns the last output."""
    from dsconv_ext.yolo.graph_capture import CAPTURE_AFTER, capture_report

    for _ in range(CAPTURE_AFTER):
        y = model(x)
    assert capture_report(model)["recorded"], capture_report(model)
    return y


def assert_same(got, want, what=""):
    gl, gs = torch.utils._pytree.tree_flatten(got)
    wl, ws = torch.utils._pytree.tree_flatten(want)
    assert gs == ws, what
    for a, b in zip(gl, wl):
        assert a.dtype == b.dtype and torch.equal(a, b), what


def test_quantize_gives_the_captured_class():
    from ultralytics.nn.tasks import DetectionModel

    from dsconv_ext.yolo.graph_capture import CapturedDetectionModel

    fast, plain = converted_pair(seed=1)
    assert type(fast) is CapturedDetectionModel and isinstance(fast, DetectionModel)
    assert fast.dsconv_ext["graph_capture"] == "CapturedDetectionModel"
    assert type(plain) is DetectionModel and plain.dsconv_ext["graph_capture"] is None
    assert fast.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo11-C3k2-DSConv.yaml"])
def test_replay_is_bit_identical_and_starts_on_the_third_call(cfg):
    """Each signature (batch, size) walks the tree twice, is recorded on its third call, and
    replays from then on, alternating with other signatures; every output (decoded boxes and the
    raw boxes / scores / feature maps) equals the tree walk's."""
    from dsconv_ext.yolo.graph_capture import CAPTURE_AFTER, capture_report

    path = str(CONFIGS / cfg) if "DSConv" in cfg else cfg
    fast, plain = converted_pair(path, seed=2)
    calls = TreeCalls(fast)
    torch.manual_seed(0)
    shapes = [(1, IMGSZ, IMGSZ), (2, IMGSZ, IMGSZ), (1, IMGSZ + 32, IMGSZ)]
    inputs = {s: torch.rand(s[0], 3, s[1], s[2]) for s in shapes}
    with torch.inference_mode():
        want = {s: plain(x) for s, x in inputs.items()}
        for rnd in range(CAPTURE_AFTER + 2):
            for s, x in inputs.items():
                before = calls.n
                got = fast(x)
                # walks: the first CAPTURE_AFTER - 1 calls, and the recording call (its trace,
                # and the eager run it is checked against)
                walked = calls.n - before
                assert walked >= 1 if rnd < CAPTURE_AFTER else walked == 0, (s, rnd, walked)
                assert_same(got, want[s], f"{cfg} {s} call {rnd + 1}")
        # new values through a recorded signature
        for s in shapes:
            x = torch.randn(s[0], 3, s[1], s[2])
            before = calls.n
            assert_same(fast(x), plain(x), f"{cfg} {s} new values")
            assert calls.n == before
    rep = capture_report(fast)
    assert len(rep["recorded"]) == len(shapes) and rep["refused"] == []
    assert "[2, 3, 64, 64] float32 cpu: TorchScript" in rep["recorded"]


def test_eager_where_replay_does_not_apply(monkeypatch):
    """Profiling, embeddings, DSCONV_EXT_CAPTURE=0, autograd, other strides and training mode
    walk the tree; the recorded signature replays again afterwards."""
    fast, plain = converted_pair(seed=3)
    calls = TreeCalls(fast)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.no_grad():
        record(fast, x)
        want = plain(x)
        n = calls.n
        fast(x)
        assert calls.n == n  # replayed

        def walks(fn):
            before = calls.n
            out = fn()
            return calls.n - before, out

        assert walks(lambda: fast(x, profile=True))[0] >= 1  # (profiling runs layers again)
        assert walks(lambda: fast.predict(x, embed=[5]))[0] == 1
        monkeypatch.setenv("DSCONV_EXT_CAPTURE", "0")
        k, y = walks(lambda: fast(x))
        assert k == 1
        assert_same(y, want)
        monkeypatch.delenv("DSCONV_EXT_CAPTURE")
    with torch.enable_grad():
        k, y = walks(lambda: fast(x))
        assert k == 1 and torch.equal(y[0], plain(x)[0])
    with torch.no_grad():
        assert walks(lambda: fast(x.double().float()[:, :, :, :]))[0] == 0  # same signature
        assert walks(lambda: fast(x.to(memory_format=torch.channels_last)))[0] == 1  # strides
        fast.train()
        assert walks(lambda: fast(x))[0] == 1
        fast.eval()
        assert walks(lambda: fast(x))[0] == 0
        # a forward hook anywhere (here deep in the head): the tree, so that it runs
        seen = []
        h = fast.model[-1].cv3[0][1].register_forward_hook(lambda m, i, o: seen.append(o.shape))
        k, y = walks(lambda: fast(x))
        assert k == 1 and len(seen) == 1
        assert_same(y, want)
        h.remove()
        assert walks(lambda: fast(x))[0] == 0


def test_recorded_graphs_follow_weight_updates_and_drop_on_changes():
    """Weights are referenced: load_state_dict into the same tensors is seen. Moving the model
    (``_apply``) or registering a module anywhere drops the graphs; plain attribute edits need
    clear_captures()."""
    from dsconv_ext.yolo.graph_capture import capture_report, clear_captures

    fast, plain = converted_pair(seed=4)
    other, _ = converted_pair(seed=5)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.inference_mode():
        record(fast, x)
        before = fast(x)
        fast.load_state_dict(other.state_dict())
        plain.load_state_dict(other.state_dict())
        after = fast(x)
        assert not torch.equal(after[0], before[0])
        assert_same(after, plain(x))
        assert capture_report(fast)["recorded"]

        fast.float()  # _apply
        assert capture_report(fast)["recorded"] == []
        record(fast, x)
        fast.model[10].extra = nn.Identity()  # any module registration
        assert capture_report(fast)["recorded"] == []
        record(fast, x)
        assert clear_captures(fast) == 1 and capture_report(fast)["recorded"] == []
        # a plain attribute edit, then clear_captures: the new behaviour
        for m in (fast.model[-1], plain.model[-1]):
            m.export = True
        y = record(fast, x)
        assert isinstance(y, torch.Tensor) and torch.equal(y, plain(x))


class _ValueBranch(nn.Module):
    """Doubles its input where the input's sum is positive: control flow on tensor values."""

    def forward(self, x):
        return x * 2 if x.sum() > 0 else x


class _MaskedShift(nn.Module):
    """Adds the mean of its positive inputs: a boolean mask, an output shape set by values."""

    def forward(self, x):
        return x + x[x > 0].mean()


@pytest.mark.parametrize("layer", [_ValueBranch, _MaskedShift])
def test_value_dependent_forward_is_refused(layer):
    """A layer whose behaviour depends on tensor values is never baked into a graph: the
    signature stays on the tree walk, with a warning and the reason in capture_report."""
    from dsconv_ext.yolo.graph_capture import capture_report

    fast, plain = converted_pair(seed=6)
    for m in (fast, plain):
        # inside layer 10 (C2PSA's cv2), so the layer list and its save indices stay as they are
        m.model[10].cv2 = nn.Sequential(m.model[10].cv2, layer())
    calls = TreeCalls(fast)
    x = torch.rand(1, 3, IMGSZ, IMGSZ) - 0.5
    with torch.inference_mode(), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(5):
            got = fast(x)
        want = plain(x)
        assert_same(got, want)
        assert_same(fast(-x), plain(-x))  # the branch taken changes with the values
        before = calls.n
        fast(x)
        assert calls.n == before + 1
    assert any("runs the eager forward" in str(m.message) for m in w)
    rep = capture_report(fast)
    assert rep["recorded"] == [] and len(rep["refused"]) == 1
    want_reason = "recording failed" if layer is _ValueBranch else "value-dependent output"
    assert want_reason in rep["refused"][0]


def test_copies_and_checkpoints_carry_no_graphs(tmp_path):
    from dsconv_ext.yolo.checkpoint import restricted_load
    from dsconv_ext.yolo.graph_capture import CapturedDetectionModel

    fast, plain = converted_pair(seed=7)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.inference_mode():
        record(fast, x)
        twin = copy.deepcopy(fast)
        assert type(twin) is CapturedDetectionModel and "_dsconv_captures" not in vars(twin)
        buf = io.BytesIO()
        torch.save({"model": fast}, buf)
        path = tmp_path / "m.pt"
        path.write_bytes(buf.getvalue())
        loaded = restricted_load(str(path))["model"]
        assert type(loaded) is CapturedDetectionModel and "_dsconv_captures" not in vars(loaded)
        for m in (twin, loaded):
            assert_same(record(m, x), plain(x))


@pytest.mark.parametrize(
    "cfg",
    ["yolo11n-seg.yaml", "yolo11n-pose.yaml", "yolo11n-obb.yaml", "yolo11n-cls.yaml",
     "yolo11-C3k2-DSConv-BiFormer.yaml"],
)  # fmt: skip
def test_other_heads_and_biformer_replay_bit_identical(cfg):
    """Segmentation, pose, OBB and classification models, and the BiFormer config (routed
    attention: top-k and gathers), record on their third call and replay exactly."""
    from ultralytics.nn import tasks

    from dsconv_ext import quantize
    from dsconv_ext.yolo.graph_capture import capture_report

    path = str(CONFIGS / cfg) if "BiFormer" in cfg else cfg
    kind = {"seg": "SegmentationModel", "pose": "PoseModel", "obb": "OBBModel"}
    name = next((v for k, v in kind.items() if f"-{k}." in cfg), "DetectionModel")
    name = "ClassificationModel" if "-cls." in cfg else name
    torch.manual_seed(8)
    model = getattr(tasks, name)(path, verbose=False).eval()
    plain = quantize(copy.deepcopy(model), capture_graph=False, check_speed=False)
    fast = quantize(model, check_speed=False)
    assert type(fast).__name__ == f"Captured{name}"
    calls = TreeCalls(fast)
    xs = [torch.rand(1, 3, IMGSZ, IMGSZ) for _ in range(5)]
    with torch.inference_mode():
        for x in xs:
            got = fast(x)
            assert_same(got, plain(x), cfg)
        before = calls.n
        assert_same(fast(xs[0]), plain(xs[0]), cfg)
        assert calls.n == before
    assert capture_report(fast) == {
        "recorded": ["[1, 3, 64, 64] float32 cpu: TorchScript"],
        "refused": [],
    }


def test_threads_recording_and_replaying_at_once_agree():
    """Three threads run one captured model on the same shape at once, through the tree walks,
    the recording and the replays: every output equals the single-threaded tree walk's."""
    import threading

    fast, plain = converted_pair(seed=9)
    gen = torch.Generator().manual_seed(9)
    xs = [torch.rand(1, 3, IMGSZ, IMGSZ, generator=gen) for _ in range(6)]
    with torch.no_grad():
        want = [plain(x) for x in xs]
    errors, done = [], []

    def run(t):
        try:
            with torch.no_grad():
                for k in range(len(xs)):
                    i = (k + 2 * t) % len(xs)
                    assert_same(fast(xs[i]), want[i], f"thread {t}, input {i}")
            done.append(t)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(t,)) for t in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    assert sorted(done) == [0, 1, 2]
    from dsconv_ext.yolo.graph_capture import capture_report

    assert capture_report(fast)["recorded"] == ["[1, 3, 64, 64] float32 cpu: TorchScript"]


OLD_CAPTURE_CHECK = """
import copy, warnings
import torch
import dsconv_ext.yolo as dy
dy.register()
from ultralytics.nn.tasks import DetectionModel
from dsconv_ext import quantize
from dsconv_ext.yolo.graph_capture import capture_report
torch.manual_seed(0)
model = DetectionModel("yolo11n.yaml", verbose=False).eval()
plain = quantize(copy.deepcopy(model), capture_graph=False, check_speed=False)
fast = quantize(model, check_speed=False)
x = torch.rand(1, 3, 64, 64)
with torch.inference_mode(), warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    got = [fast(x) for _ in range(4)] + [fast.predict(x, profile=False, visualize=False)]
    want = plain(x)
print("TYPE", type(fast).__name__, "RECORDED", capture_report(fast)["recorded"])
print("EQUAL", all(torch.equal(g[0], want[0]) for g in got))
print("WARNINGS", [str(m.message) for m in w if "dsconv_ext" in str(m.message)])
"""


def test_oldest_supported_ultralytics_replays():
    """ultralytics 8.3.0's predict passes (x, profile, visualize, embed) to _predict_once, later
    versions (x, profile, embed): both record and replay bit-identically."""
    from conftest import skip_or_fail
    from test_yolo_registration import old_ultralytics_problem
    from yolo_helpers import OLD_ULTRALYTICS, pkg_parent, run_python

    problem = old_ultralytics_problem()
    if problem:
        skip_or_fail(problem, should_run=True)
    path = os.pathsep.join([OLD_ULTRALYTICS, pkg_parent()])
    r = run_python(OLD_CAPTURE_CHECK, timeout=300, PYTHONPATH=path, DSCONV_EXT_CAPTURE_AFTER_S=0)
    want = "TYPE CapturedDetectionModel RECORDED ['[1, 3, 64, 64] float32 cpu: TorchScript']"
    assert want in r.stdout, r.stdout
    assert "EQUAL True" in r.stdout and "WARNINGS []" in r.stdout, r.stdout


def test_recording_waits_for_the_eager_seconds(monkeypatch):
    """By default a signature is recorded only after CAPTURE_AFTER_SECONDS of eager forwards (a
    short job never pays for the recording); DSCONV_EXT_CAPTURE_AFTER_S sets the wait, and a
    value that is not a number of seconds >= 0 is refused by name."""
    import time

    from dsconv_ext.yolo.graph_capture import CAPTURE_AFTER_SECONDS, capture_report

    assert CAPTURE_AFTER_SECONDS == 10.0
    fast, plain = converted_pair(seed=10)
    calls = TreeCalls(fast)
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    with torch.inference_mode():
        monkeypatch.delenv("DSCONV_EXT_CAPTURE_AFTER_S")  # the default: 10 s
        for _ in range(6):
            fast(x)
        assert capture_report(fast)["recorded"] == [] and calls.n == 6
        wait = 0.25
        monkeypatch.setenv("DSCONV_EXT_CAPTURE_AFTER_S", str(wait))
        fast.float()  # drops the counts with the (absent) graphs
        took = []
        while not capture_report(fast)["recorded"]:
            t0 = time.perf_counter()
            fast(x)
            took.append(time.perf_counter() - t0)
            assert len(took) < 1000, "never recorded"
        # the recording call comes once the eager calls before it took the wait (timed here
        # around the whole call, so a little longer than the forwards the model counts)
        assert len(took) >= 3 and sum(took[:-1]) >= wait
        assert sum(took[:-2]) < 2 * wait, took
        before = calls.n
        assert_same(fast(x), plain(x))
        assert calls.n == before
        for bad in ("-1", "soon", "nan"):
            monkeypatch.setenv("DSCONV_EXT_CAPTURE_AFTER_S", bad)
            fast.float()
            with pytest.raises(ValueError, match="DSCONV_EXT_CAPTURE_AFTER_S must be a number"):
                for _ in range(3):
                    fast(x)


def test_torchscript_replay_and_its_fallbacks_to_the_fx_graph(monkeypatch):
    """The recorded graph replays through TorchScript where tracing it works and its replay is
    bit-identical; a trace that fails or replays different values (here planted: a trace that
    adds 1 to every output), or DSCONV_EXT_CAPTURE=fx, replays the fx graph instead, still bit
    for bit. A DSCONV_EXT_CAPTURE value other than 0, 1 or fx is refused by name."""
    from dsconv_ext.yolo.graph_capture import capture_report

    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    real_trace = torch.jit.trace

    class _OffByOne(nn.Module):
        def __init__(self, traced):
            super().__init__()
            self.traced = traced

        def forward(self, t):
            return tuple(v + 1 for v in self.traced(t))

    def failing(*args, **kwargs):
        raise RuntimeError("no TorchScript here")

    def off_by_one(*args, **kwargs):
        return _OffByOne(real_trace(*args, **kwargs))

    cases = [
        ("1", None, "TorchScript"),
        ("fx", None, "fx"),
        ("1", failing, "fx"),
        ("1", off_by_one, "fx"),
    ]
    for env, trace, engine in cases:
        monkeypatch.setenv("DSCONV_EXT_CAPTURE", env)
        monkeypatch.setattr(torch.jit, "trace", trace or real_trace)
        fast, plain = converted_pair(seed=11)
        calls = TreeCalls(fast)
        with torch.inference_mode():
            record(fast, x)
            want = [f"[1, 3, {IMGSZ}, {IMGSZ}] float32 cpu: {engine}"]
            assert capture_report(fast)["recorded"] == want, (env, trace)
            before = calls.n
            x2 = torch.randn(1, 3, IMGSZ, IMGSZ)
            assert_same(fast(x2), plain(x2), f"{env} {engine}")
            assert calls.n == before
    monkeypatch.setattr(torch.jit, "trace", real_trace)
    monkeypatch.setenv("DSCONV_EXT_CAPTURE", "yes")
    with torch.inference_mode(), pytest.raises(ValueError, match="DSCONV_EXT_CAPTURE must be 0"):
        fast(x)
