"""Post-training conversion: quantize() on ultralytics models and plain modules, the convert
command line, packed checkpoints that ultralytics loads, and format-version errors.

These tests ask for what is converted, so they turn the per-layer speed check off
(``check_speed=False``, ``--force``): on a CPU path that times layers (AVX2) it keeps a
run-to-run varying set float. That check is tested in test_yolo_speed_policy.py."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn as nn
from yolo_helpers import CONFIGS, IMGSZ, pth_site, rel_err, run_python


@pytest.fixture(scope="module", autouse=True)
def registered():
    import dsconv_ext.yolo as dy

    dy.register()


def trained_like(cfg: str = "yolo11n.yaml", seed: int = 0):
    """An ultralytics model with non-trivial BatchNorm statistics (stands in for a trained one:
    no pretrained weights offline)."""
    from ultralytics.nn.tasks import DetectionModel

    torch.manual_seed(seed)
    model = DetectionModel(cfg, verbose=False).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    return model


def _out(model, x):
    with torch.no_grad():
        y = model(x)
    return (y[0] if isinstance(y, (tuple, list)) else y).numpy()


def test_quantize_ultralytics_model():
    from ultralytics.nn.modules import Conv

    from dsconv_ext import DSConv2d, quantize
    from dsconv_ext.yolo.fast_stem import FastStemConv

    model = trained_like()
    x = torch.rand(2, 3, IMGSZ, IMGSZ)
    want = _out(copy.deepcopy(model).fuse(verbose=False), x)
    convs = {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}
    q = quantize(model, check_speed=False)
    assert q is model
    converted = q.dsconv_ext["converted"]
    depthwise = {n for n, m in convs.items() if m.in_channels == m.groups}
    # the RGB stem stays float by default (eligible()), as does the fixed DFL ramp
    assert depthwise and set(converted) == set(convs) - {"model.0.conv", "model.23.dfl.conv"}
    assert type(q.model[0].conv) is nn.Conv2d
    # SPPF's max pool (applied three times) and the two nearest upsamplings: exact stand-ins
    assert sorted(q.dsconv_ext["pooling"]) == ["model.11", "model.14", "model.9.m"]
    assert all(q.get_submodule(n).groups > 1 for n in depthwise)  # converted by default
    assert type(q.model[-1].dfl.conv) is nn.Conv2d  # the fixed DFL ramp stays exact
    assert q.dsconv_ext["fast_dfl"] == ["model.23.dfl"]
    # the float stem takes the direct conv with the SiLU fused (dsconv_ext.yolo.fast_stem)
    assert q.dsconv_ext["fast_stem"] == ["model.0"] and type(q.model[0]) is FastStemConv
    # the head's Concat layers fed by an upsampling or a C3k2 block (layer 21 reads a Conv and
    # C2PSA only)
    assert q.dsconv_ext["in_place_concat_layers"] == ["model.12", "model.15", "model.18"]
    for name, m in q.named_modules():
        if isinstance(m, DSConv2d):
            assert m.frozen and m.layer_name == name and m.bits == 8
    # BN folded first, SiLU run inside the kernel call of every ultralytics Conv
    fused_silu = dw_silu = 0
    for m in q.modules():
        if isinstance(m, Conv) and m is not q.model[0]:  # depth-wise ones (DWConv) included
            assert not hasattr(m, "bn") and isinstance(m.conv, DSConv2d)
            assert not isinstance(m.act, nn.SiLU)  # it moved into the kernel call
            fused_silu += m.conv.fuse_silu
            dw_silu += m.conv.fuse_silu and m.conv.groups == m.conv.in_channels
    assert fused_silu > 50 and dw_silu == 6  # the Detect head's six DWConv
    got = _out(q, x)
    boxes, scores = slice(0, 4), slice(4, None)
    assert rel_err(got[:, boxes], want[:, boxes]) < 5e-3
    assert np.abs(got[:, scores] - want[:, scores]).max() < 5e-3


@pytest.mark.parametrize("cfg", ["yolo11n.yaml", "yolo11m.yaml", "yolo11n-C3k2-DSConv.yaml"])
def test_in_place_concat_is_bit_identical(cfg):
    """C2f / C3k2 blocks that write their branches into the concatenation in place (the default)
    give exactly the outputs of the torch.cat forward, batch 1 and 2; with autograd on they run the
    inherited forward. yolo11m: C3k2 with C3k inside (c3k=True) and shortcut bottlenecks."""
    from ultralytics.nn.modules.block import SPPF, C2f
    from ultralytics.nn.modules.head import Detect

    from dsconv_ext import quantize

    path = str(CONFIGS / cfg) if "DSConv" in cfg else cfg
    model = trained_like(path)
    plain = quantize(copy.deepcopy(model), in_place_concat=False, check_speed=False)
    fast = quantize(model, check_speed=False)
    blocks = [n for n, m in plain.named_modules() if isinstance(m, C2f)]
    sppf = [n for n, m in plain.named_modules() if type(m) is SPPF]
    heads = [n for n, m in plain.named_modules() if type(m) is Detect]
    assert blocks and sppf and heads == ["model.23"]
    assert sorted(fast.dsconv_ext["in_place_concat"]) == sorted(blocks + sppf + heads)
    assert plain.dsconv_ext["in_place_concat"] == []
    assert all(type(fast.get_submodule(n)).__name__ == "InPlaceSPPF" for n in sppf)
    assert type(fast.get_submodule(heads[0])).__name__ == "InPlaceDetect"
    kinds = set()
    for n in blocks:
        was, now = type(plain.get_submodule(n)), type(fast.get_submodule(n))
        assert issubclass(now, was) and now.__name__ == f"InPlace{was.__name__}"
        kinds.add(was.__name__)
    assert kinds == ({"C3k2_DSConv"} if "DSConv" in cfg else {"C3k2"})
    assert fast.state_dict().keys() == plain.state_dict().keys()
    layers = fast.dsconv_ext["in_place_concat_layers"]
    assert layers and plain.dsconv_ext["in_place_concat_layers"] == []
    for n in layers:
        assert type(fast.get_submodule(n)).__name__ == "InPlaceConcat"
    # the first forward learns the channel counts; then batch and size changes reallocate
    for n, size in ((1, IMGSZ), (1, IMGSZ), (2, IMGSZ), (1, IMGSZ + 32)):
        x = torch.rand(n, 3, size, size)
        with torch.no_grad():
            want, got = plain(x), fast(x)
        assert torch.equal(got[0], want[0]), f"batch {n}, size {size}"
        assert got[1].keys() == want[1].keys()  # the raw head outputs, as Detect returns them
        for k in ("boxes", "scores"):
            assert torch.equal(got[1][k], want[1][k]), f"{k}: batch {n}, size {size}"
        for a, b in zip(got[1]["feats"], want[1]["feats"]):
            assert torch.equal(a, b)
    with torch.enable_grad():  # the inherited forward: same values again
        assert torch.equal(fast(x)[0], plain(x)[0])


@pytest.mark.parametrize("n", [1, 3])
def test_in_place_detect_on_float_head_is_bit_identical(n):
    """InPlaceDetect on a float model (fused, nothing converted: the levels' last layers are
    nn.Conv2d, stored by copy) and under export / training flags: always the values of
    Detect.forward, in the structure it returns."""
    from ultralytics.nn.modules.head import Detect

    from dsconv_ext.yolo.inplace_concat import InPlaceDetect, use_in_place_concat

    plain = trained_like(seed=3).fuse(verbose=False)
    fast = copy.deepcopy(plain)
    assert "model.23" in use_in_place_concat(fast)
    assert type(fast.model[-1]) is InPlaceDetect and isinstance(fast.model[-1], Detect)
    x = torch.rand(n, 3, IMGSZ, IMGSZ + 32)
    with torch.no_grad():
        want, got = plain(x), fast(x)
        assert torch.equal(got[0], want[0])
        for k in ("boxes", "scores"):
            assert torch.equal(got[1][k], want[1][k]), k
        for m in (plain.model[-1], fast.model[-1]):
            m.export = True
        assert torch.equal(fast(x), plain(x))  # export mode: y alone, the inherited forward


def test_in_place_concat_threads_do_not_share_buffers():
    """Two threads running one converted model at once get their single-threaded outputs, bit
    for bit: each forward's Concat buffers are per thread.

    Interleaving is forced: a barrier in a forward hook on every layer that writes into a Concat
    buffer holds each thread there until the other arrives, so at each such point both forwards
    have written their slice and neither has read its buffer yet (a buffer shared between the
    threads would hold the other thread's values by then). Input shapes change from step to step;
    within a step both threads use one shape, because ultralytics' Detect head caches its anchors
    per input shape on the module (not thread-safe across shapes, whatever dsconv_ext does).
    test_concat_plan_buffers_are_per_thread runs different shapes at once on one plan."""
    import threading

    from dsconv_ext import quantize
    from dsconv_ext.yolo.inplace_concat import InPlaceConcat

    model = quantize(trained_like(), check_speed=False)
    writers = [
        m
        for m in model.modules()
        if getattr(m, "concat_plan", None) is not None and not isinstance(m, InPlaceConcat)
    ]
    assert writers, "the converted model has no layer writing into a Concat buffer"
    schedule = [(1, 64), (2, 64), (1, 96), (2, 32), (1, 32)]  # (batch, size) per step
    xs = [
        [
            torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(100 * t + k))
            for k, (n, size) in enumerate(schedule)
        ]
        for t in (0, 1)
    ]
    with torch.no_grad():
        model(xs[0][0])  # learn the channel counts
        want = [[model(x)[0] for x in xs[t]] for t in (0, 1)]  # one thread at a time

    barrier = threading.Barrier(2, timeout=120)

    def meet(module, inputs, output):
        barrier.wait()  # (returns None: a hook's non-None result would replace the output)

    hooks = [m.register_forward_hook(meet) for m in writers]
    got = [[], []]
    errors = []

    def run(t):
        try:
            with torch.no_grad():
                for x in xs[t]:
                    got[t].append(model(x)[0])
        except BaseException as e:  # report it, and release the other thread from the barrier
            errors.append(e)
            barrier.abort()

    try:
        threads = [threading.Thread(target=run, args=(t,)) for t in (0, 1)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
    finally:
        for h in hooks:
            h.remove()
    assert not errors, errors
    for t in (0, 1):
        assert len(got[t]) == len(schedule)
        for k, (g, w) in enumerate(zip(got[t], want[t])):
            assert torch.equal(g, w), f"thread {t}, step {k} {schedule[k]}"


def test_concat_plan_buffers_are_per_thread():
    """One ConcatPlan and InPlaceConcat layer used by two threads at once, with different shapes
    per thread and per step: between writing its slice and concatenating, each thread waits for
    the other at a barrier. Each gets torch.cat's result bit for bit, from its own buffer (the
    output is the buffer its slice was written into, so nothing fell back to a copy)."""
    import threading

    from ultralytics.nn.modules import Concat

    from dsconv_ext.yolo.inplace_concat import ConcatPlan, InPlaceConcat

    layer = Concat(1)
    layer.__class__ = InPlaceConcat
    layer.concat_plan = plan = ConcatPlan()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # learn the channel counts [3, 5]
        layer([torch.zeros(1, 3, 2, 2), torch.zeros(1, 5, 2, 2)])
    # (batch, height, width) per step and thread: equal and different shapes in turn
    shapes = [((1, 4, 4), (1, 4, 4)), ((2, 3, 5), (1, 6, 2)), ((1, 8, 8), (1, 8, 8))]
    shapes += [((2, 4, 4), (2, 5, 5))]
    data = [
        [(torch.randn(n, 3, h, w, generator=g), torch.randn(n, 5, h, w, generator=g))
         for (n, h, w) in (step[t] for step in shapes)]
        for t in (0, 1)
    ]  # fmt: skip
    barrier = threading.Barrier(2, timeout=60)
    results = [[], []]
    errors = []

    def run(t):
        try:
            with torch.no_grad():
                for a, b in data[t]:
                    slot = plan.slot(1, a, 5, a.shape[2], a.shape[3])  # a writer's store
                    slot.copy_(b)
                    barrier.wait()  # the other thread has written its slice too
                    out = layer([a, slot])
                    results[t].append((out, slot))
                    barrier.wait()  # neither starts the next step before both concatenated
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(t,)) for t in (0, 1)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for t in (0, 1):
        for k, ((out, slot), (a, b)) in enumerate(zip(results[t], data[t])):
            assert torch.equal(out, torch.cat([a, b], 1)), f"thread {t}, step {k}"
            assert out[:, 3:].data_ptr() == slot.data_ptr(), f"thread {t}, step {k}: copied"


def test_in_place_concat_layer_falls_back_to_cat():
    """An InPlaceConcat whose inputs are not (all) in its buffer, or do not match the channel
    counts it learned, concatenates them as torch.cat does."""
    from ultralytics.nn.modules import Concat

    from dsconv_ext.yolo.inplace_concat import ConcatPlan, InPlaceConcat

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 3, 4, 5, generator=g), torch.randn(2, 6, 4, 5, generator=g)
    layer = Concat(1)
    layer.__class__ = InPlaceConcat
    layer.concat_plan = plan = ConcatPlan()
    with torch.no_grad():
        assert torch.equal(layer([a, b]), torch.cat([a, b], 1))  # learns [3, 6]
        assert plan.channels == [3, 6]
        slot = plan.slot(1, a, 6, 4, 5)  # a writer stores input 1 in place
        slot.copy_(b)
        out = layer([a, slot])  # input 0 is copied in
        assert torch.equal(out, torch.cat([a, b], 1)) and out[:, 3:].data_ptr() == slot.data_ptr()
        assert plan.slot(0, a, 4, 4, 5) is None  # a writer of another width allocates its own
        plan.slot(1, a, 6, 4, 5).fill_(7.0)
        c = torch.randn(2, 6, 4, 5, generator=g)  # not the slot: copied over the stale values
        assert torch.equal(layer([a, c]), torch.cat([a, c], 1))
        plan.slot(1, a, 6, 4, 5)
        wide = torch.randn(2, 5, 4, 5, generator=g)  # other channel counts: torch.cat
        assert torch.equal(layer([wide, c]), torch.cat([wide, c], 1))
    with torch.enable_grad():
        a.requires_grad_(True)
        assert torch.equal(layer([a, b]), torch.cat([a, b], 1))


def test_in_place_concat_buffer_left_by_inference_mode_is_not_reused_outside_it():
    """A buffer a forward under torch.inference_mode allocated and never consumed (it stopped
    before the concatenation) is an inference tensor: a later slot outside that mode gets a
    fresh, writable buffer."""
    from dsconv_ext.yolo.inplace_concat import ConcatPlan

    a = torch.randn(2, 3, 4, 5)
    plan = ConcatPlan()
    plan.channels = [3, 6]
    with torch.inference_mode():
        stale = plan.slot(1, a, 6, 4, 5)
    assert stale.is_inference()
    with torch.no_grad():
        slot = plan.slot(1, a, 6, 4, 5)
        assert not slot.is_inference()
        slot.fill_(1.0)  # an inference tensor would refuse this write
    with torch.inference_mode():  # inside the mode the normal buffer is kept
        assert plan.slot(1, a, 6, 4, 5).data_ptr() == slot.data_ptr()


def test_quantize_depthwise_false_keeps_depthwise_float():
    from dsconv_ext import DSConv2d, quantize

    model = trained_like()
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    want = _out(copy.deepcopy(model).fuse(verbose=False), x)
    convs = {n: m for n, m in model.named_modules() if type(m) is nn.Conv2d}
    q = quantize(model, depthwise=False, check_speed=False)
    depthwise = {n for n, m in convs.items() if m.in_channels == m.groups}
    assert set(q.dsconv_ext["converted"]) == set(convs) - depthwise - {
        "model.0.conv",
        "model.23.dfl.conv",
    }
    assert q.dsconv_ext["depthwise"] is False
    for n in depthwise:
        assert type(q.get_submodule(n)) is nn.Conv2d
    assert sum(isinstance(m, DSConv2d) for m in q.modules()) == len(q.dsconv_ext["converted"])
    got = _out(q, x)
    assert rel_err(got[:, :4], want[:, :4]) < 5e-3


def test_quantize_selects_layers():
    from dsconv_ext import DSConv2d, quantize

    q = quantize(
        trained_like(), layers=["model.2.*", "model.3.*"], exclude="*.m.*", check_speed=False
    )
    names = {n for n, m in q.named_modules() if isinstance(m, DSConv2d)}
    assert names == {"model.2.cv1.conv", "model.2.cv2.conv", "model.3.conv"}
    q = quantize(
        trained_like(),
        layers=lambda name, conv: conv.kernel_size == (3, 3),
        bits=4,
        check_speed=False,
    )
    convs = [m for m in q.modules() if isinstance(m, DSConv2d)]
    assert convs and all(m.kernel_size == (3, 3) and m.bits == 4 for m in convs)
    assert any(m.groups > 1 for m in convs)  # named layers may include depth-wise convs


def test_quantize_plain_module_and_qat_dsconv():
    from dsconv_ext import DSConv, DSConv2d, quantize

    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 64, 3, 2, 1), DSConv(64, 64, 3),
    ).eval()  # fmt: skip
    net[1].running_var.uniform_(0.5, 2)
    net[4].bn.running_mean.uniform_(-0.1, 0.1)
    x = torch.rand(1, 3, 16, 16)
    want = _out(net, x)
    shadow = net[4].conv.weight.detach().clone()
    quantize(net)
    # the 3-channel stem stays float (its BN folded in), unless asked for
    assert type(net[0]) is nn.Conv2d and isinstance(net[1], nn.Identity)
    assert isinstance(net[3], DSConv2d)
    # the QAT DSConv keeps its own quantiser (no re-quantisation), BN folded into CDS
    assert net[4].fused and net[4].conv.frozen and not hasattr(net[4], "bn")
    from dsconv_ext.dsconv.quant_primitives import quantize_weight

    assert torch.equal(net[4].conv.intweight, quantize_weight(shadow, 8, 32)[0])
    assert rel_err(_out(net, x), want) < 2e-2
    # <= 4 input channels per group (and not depth-wise): float by default, converted on request
    make = lambda: nn.Sequential(  # noqa: E731
        nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 10, 1)
    ).eval()
    assert make_types(quantize(make())) == [nn.Conv2d, nn.Conv2d, DSConv2d]
    assert make_types(quantize(make(), stem=True)) == [DSConv2d, DSConv2d, DSConv2d]


def make_types(net):
    return [type(m) for m in net]


def test_bad_conversion_names_the_layer():
    from dsconv_ext.yolo.convert import ConversionError, quantize

    net = nn.Sequential(nn.Conv2d(4, 4, 3), nn.Sequential(nn.Conv2d(4, 8, 1)))
    with pytest.raises(ConversionError, match=r"layer '1.0'.*bits"):
        quantize(net, bits=9, layers="1.*")


def _sizes(*paths):
    return [os.path.getsize(p) for p in paths]


def test_convert_cli_packed_checkpoints_load_in_ultralytics(tmp_path, capsys):
    """`python -m dsconv_ext convert best.pt --bits 4 -o best-ds4.pt`: smaller files, loadable by
    ultralytics in a fresh process (also with ULTRALYTICS_SAFE_LOAD=1), same outputs."""
    from ultralytics import YOLO

    from dsconv_ext import DSConv2d
    from dsconv_ext.__main__ import main as cli
    from dsconv_ext.yolo.convert import main

    yolo = YOLO(str(CONFIGS / "yolo11n-C3k2-DSConv.yaml"))
    yolo.model = trained_like(str(CONFIGS / "yolo11n-C3k2-DSConv.yaml"))
    src = tmp_path / "best.pt"
    yolo.save(str(src))
    ds8, ds4 = tmp_path / "best-ds8.pt", tmp_path / "best-ds4.pt"
    assert main([str(src), "-o", str(ds8), "--force"]) == 0
    # every plain conv but the stem and the DFL ramp; SPPF's pool and the two upsamplings
    n_convs = sum(type(m) is nn.Conv2d for m in yolo.model.modules()) - 2
    printed = capsys.readouterr().out
    assert f"converted {n_convs} convolutions" in printed and "swapped 3 pooling" in printed
    assert (
        cli(["convert", str(src), "--bits", "4", "--no-depthwise", "--force", "-o", str(ds4)]) == 0
    )
    float_size, size8, size4 = _sizes(src, ds8, ds4)
    assert size4 < 0.75 * size8 < 0.75 * float_size  # fp16 weights -> int8 -> packed 4-bit
    x = torch.rand(1, 3, IMGSZ, IMGSZ)
    np.save(tmp_path / "x.npy", x.numpy())
    for path, bits in ((ds8, 8), (ds4, 4)):
        model = YOLO(str(path)).model.float().eval()
        assert model.dsconv_ext["bits"] == bits
        assert model.dsconv_ext["depthwise"] == (bits == 8)
        dw = [m for m in model.modules() if getattr(m, "groups", 1) > 1]
        assert dw and all(isinstance(m, DSConv2d) == (bits == 8) for m in dw)
        want = _out(model, x)
        code = f"""
            import site, numpy as np, torch
            site.addsitedir({str(pth_site(tmp_path))!r})
            from ultralytics import YOLO
            model = YOLO({str(path)!r}).model.float().eval()
            with torch.no_grad():
                y = model(torch.from_numpy(np.load({str(tmp_path / "x.npy")!r})))
            np.save({str(tmp_path / "y.npy")!r}, y[0].numpy())
            YOLO({str(path)!r}).predict(np.zeros((64, 64, 3), np.uint8), imgsz=64, verbose=False)
        """
        run_python(code, timeout=180, ULTRALYTICS_SAFE_LOAD="1")
        assert rel_err(np.load(tmp_path / "y.npy"), want) < 1e-6


class _NotAModule:  # a global that no restricted load may rebuild
    pass


def test_convert_cli_errors(tmp_path, capsys):
    """Each way the command can fail says which, on one line, with exit status 1."""
    from ultralytics import YOLO

    from dsconv_ext.yolo.convert import main

    good = tmp_path / "good.pt"
    YOLO("yolo11n.yaml").save(str(good))
    (tmp_path / "text.pt").write_text("garbage\n")
    torch.save({"epoch": 3}, tmp_path / "nomodel.pt")
    torch.save([1, 2], tmp_path / "list.pt")
    cases = [
        ([str(tmp_path / "missing.pt")], "missing.pt: no such file"),
        ([str(tmp_path)], "is not a file"),
        ([str(tmp_path / "text.pt")], "text.pt is not a PyTorch checkpoint"),
        ([str(tmp_path / "nomodel.pt")], "nomodel.pt holds no model (keys: ['epoch'])"),
        ([str(tmp_path / "list.pt")], "holds a list, not an ultralytics checkpoint"),
        ([str(good), "-o", str(tmp_path / "no" / "dir" / "x.pt")], "does not exist"),
        ([str(good), "-o", str(tmp_path)], "it is a directory"),
    ]
    for argv, message in cases:
        assert main(argv) == 1, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
        assert "Traceback" not in err and err.count("\n") == 1, err
    assert main([str(good), "-o", str(tmp_path / "out.pt")]) == 0
    assert (tmp_path / "out.pt").is_file()


def test_convert_refuses_foreign_pickles_unless_trusted(tmp_path, capsys):
    """Restricted unpickling by default: a checkpoint that references anything but module
    classes is refused, named, and loads only with --trust-pickle."""
    from ultralytics import YOLO

    from dsconv_ext.yolo.convert import main

    ckpt = {"model": YOLO("yolo11n.yaml").model, "extra": _NotAModule()}
    torch.save(ckpt, tmp_path / "foreign.pt")
    assert main([str(tmp_path / "foreign.pt"), "-o", str(tmp_path / "a.pt")]) == 1
    err = capsys.readouterr().err
    assert "_NotAModule" in err and "--trust-pickle" in err, err
    assert not (tmp_path / "a.pt").exists()
    argv = [str(tmp_path / "foreign.pt"), "-o", str(tmp_path / "b.pt"), "--trust-pickle"]
    assert main(argv) == 0
    assert (tmp_path / "b.pt").is_file()


def test_other_format_version_names_the_layers(tmp_path, monkeypatch):
    from ultralytics import YOLO

    import dsconv_ext.dsconv.module as dsmod
    from dsconv_ext import DSConvFormatError, quantize

    yolo = YOLO("yolo11n.yaml")
    quantize(yolo.model, layers=["model.2.*", "model.4.cv1.conv"], check_speed=False)
    monkeypatch.setattr(dsmod, "FORMAT_VERSION", dsmod.FORMAT_VERSION + 100)  # "another version"
    path = tmp_path / "future.pt"
    yolo.save(str(path))
    monkeypatch.undo()
    for safe in ("0", "1"):
        code = f"""
            import dsconv_ext.yolo as dy
            dy.register()
            from dsconv_ext import DSConvFormatError
            from ultralytics import YOLO
            try:
                YOLO({str(path)!r})
            except DSConvFormatError as e:
                print("ERROR", e)
        """
        r = run_python(code, timeout=180, ULTRALYTICS_SAFE_LOAD=safe)
        assert "ERROR" in r.stdout, r.stdout
        for layer in ("model.2.cv1.conv", "model.2.m.0.cv2.conv", "model.4.cv1.conv"):
            assert f"'{layer}'" in r.stdout, (safe, r.stdout)
        assert "version" in r.stdout
    assert issubclass(DSConvFormatError, RuntimeError)
