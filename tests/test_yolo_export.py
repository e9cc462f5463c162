"""Export to the CPU runtimes users deploy with: ``format=onnx`` and ``format=openvino``.

Layer level: the exporting forward of DSConv (block floating point and dequantised int8 weights
in standard operators) and BiLevelRoutingAttention, run by onnxruntime and OpenVINO, against the
eager modules (the integer kernel, the BRA torch backend).

Model level: every project config (n scale) and a checkpoint made by ``python -m dsconv_ext
convert`` are exported through ultralytics' own ``YOLO(...).export``; the exported file is loaded
back by ultralytics and predicts, and its raw outputs, run directly by onnxruntime / OpenVINO,
are compared with the eager PyTorch model on the same synthetic image.

Tolerances. The exported graph computes DSConv in float32 on bit-identical BFP mantissas; only
the order of float sums differs (and the rounding of the weight, which carries the folded channel
scale). So a single layer agrees with the kernel to float32 rounding (~1e-7 of its output's
scale), except where such a difference of a few ulps moves an activation across a BFP rounding
boundary of the next layer: one mantissa step there, up to 1/64 of the block's max at 8 bits.
Per layer that is a handful of elements out of ~10^4-10^5, so the layer tests ask for 99.9% of
the elements within 1e-5 of the output's scale and every element within 1e-3; dropping the BFP
step from the exported forward moves most elements by ~1e-3 and fails them.

Through a whole network, one such flip is itself a perturbation of the next layers' inputs and
can flip more mantissas there, then more, and a BiFormer routing decision on top: measured on
these random models at 64 px, from none to half of the inputs (depending on model and runtime)
end with outputs that differ from the eager model's at the 1e-3 to 1 level, as they differ
between the kernel and the same standard-ops forward run by PyTorch itself (a different float
order, not a bug). The model test therefore tries up to ``CANDIDATES`` synthetic images and
requires one on which the exported file agrees with the eager model as tightly as float rounding
allows: per output channel, relative to that channel's largest value, 99.9% of the elements
within 1e-4 and all within 1e-3 (at most 5 images were needed here; with half of the images
failing, all 12 fail once in ~4000 runs). A systematic error, such as a missing BFP step, a
runtime rounding differently or OpenVINO's dynamic quantisation left on, fails on every image.
OpenVINO's CPU plugin runs float32 models in bfloat16 by default on CPUs with bf16 support
(AVX512-BF16, AMX): the raw comparison compiles with ``INFERENCE_PRECISION_HINT=f32``; ultralytics'
predict uses the plugin's defaults, as users get them.
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from yolo_helpers import CONFIGS, IMGSZ

ov = pytest.importorskip("openvino")
ort = pytest.importorskip("onnxruntime")

FORMATS = ("onnx", "openvino")
RUNTIMES = ("onnxruntime", "openvino")

# Every project config at the n scale, and a converted yolo11n checkpoint.
MODELS = [p.name.replace("yolo11-", "yolo11n-") for p in sorted(CONFIGS.glob("*.yaml"))]
MODELS.append("converted-yolo11n")
CALIBRATION_IMAGES = 8  # synthetic images the random models' BatchNorm statistics come from
CANDIDATES = 12  # images tried before the model comparison gives up (see the module docstring)


@pytest.fixture(scope="module", autouse=True)
def setup():
    import dsconv_ext.yolo as dy

    dy.register()


# --------------------------------------------------------------------------- helpers


def run_onnx(model: nn.Module, x: torch.Tensor):
    """``model`` exported by the TorchScript ONNX exporter under export_mode, then run by
    onnxruntime on ``x``."""
    from dsconv_ext.yolo.export import export_mode

    f = io.BytesIO()
    with torch.no_grad(), export_mode(model):
        torch.onnx.export(model, (x,), f, opset_version=17, dynamo=False)
    sess = ort.InferenceSession(f.getvalue(), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0], f.getvalue()


def to_openvino(model: nn.Module, x: torch.Tensor, dynamic: bool = False):
    """``model`` traced under export_mode and converted as ultralytics does it (torch.jit.trace,
    then OpenVINO's PyTorch frontend), marked with keep_dsconv_numbers."""
    from dsconv_ext.yolo.export import export_mode, keep_dsconv_numbers

    with torch.no_grad(), export_mode(model):
        ts = torch.jit.trace(model, x, strict=False, check_trace=False)
    om = ov.convert_model(ts, example_input=x, input=None if dynamic else x.shape)
    keep_dsconv_numbers(om)
    return om


def compile_f32(om):
    """Compiled for the CPU in float32 (not bfloat16, the default on CPUs that have it); every
    other property, dynamic quantisation included, as the model's rt_info and OpenVINO say."""
    return ov.Core().compile_model(om, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})


def run_openvino(model: nn.Module, x: torch.Tensor):
    om = to_openvino(model, x)
    return compile_f32(om)(x.numpy())[0], om


def rel(got, want) -> np.ndarray:
    """Element errors relative to the largest |want|."""
    want = np.asarray(want, np.float64)
    return np.abs(np.asarray(got, np.float64) - want) / max(np.abs(want).max(), 1e-30)


def assert_layer_close(got, want):
    """Float rounding, plus at most a few one-step BFP flips (see the module docstring)."""
    e = rel(got, want)
    assert e.max() <= 1e-3 and (e <= 1e-5).mean() >= 0.999, (
        f"max {e.max():.2e}, within 1e-5: {(e <= 1e-5).mean():.5f}"
    )


# --------------------------------------------------------------------------- layer level


class _BFP(nn.Module):
    def __init__(self, channels, block_size, groups, act_bits=8):
        super().__init__()
        self.args = (channels, block_size, act_bits, groups)

    def forward(self, x):
        from dsconv_ext.yolo.export import bfp_standard_ops

        c, bs, bits, g = self.args
        return bfp_standard_ops(x, c, bs, bits, g)


def bfp_edge_input(channels: int, block_size: int, groups: int, seed: int = 0) -> torch.Tensor:
    """Activations that probe every edge of the exponent and the rounding, one kind per row: block
    maxima that are exact powers of two (row 0) and the floats just below them (row 1, where
    ln(x) / ln(2) rounds up to the integer), mantissas that tie at .5 (row 2: half to even), an
    all-zero pixel and a pixel of 2^-60 (row 3); random values across 2^-8 .. 2^8 elsewhere."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, channels, 6, 7, generator=g)
    x *= 2.0 ** torch.randint(-8, 9, (1, 1, 6, 7), generator=g)
    cg = channels // groups
    first = [k * cg + j for k in range(groups) for j in range(0, cg, block_size)]
    p = 2.0 ** torch.randint(-10, 11, (2, 1, 2, 7), generator=g).float()
    x[:, :, :2] = p * (torch.rand(2, channels, 2, 7, generator=g) * 1.98 - 0.99)
    x[:, first, 0] = p[:, :, 0].expand(-1, len(first), -1)
    x[:, first, 1] = torch.nextafter(p[:, :, 1], torch.zeros(())).expand(-1, len(first), -1)
    # block max 100 * 2^-6 gives E = -6 at 8 bits: the others are ties k + 0.5 in its steps
    x[:, :, 2] = (torch.randint(-60, 60, (2, channels, 7), generator=g) + 0.5) * 2.0**-6
    x[:, first, 2] = 100 * 2.0**-6
    x[:, :, 3, 0] = 0.0
    x[:, :, 3, 1] = x[:, :, 3, 1].sign() * 2.0**-60
    return x


@pytest.mark.parametrize("runtime", ("eager", *RUNTIMES))
@pytest.mark.parametrize(
    "channels,block_size,groups",
    [(64, 32, 1), (80, 32, 1), (40, 16, 2), (24, 32, 24), (3, 32, 1), (32, 1, 1)],
    ids=["whole-blocks", "short-last-block", "groups", "depthwise", "stem", "block-1"],
)
def test_bfp_standard_ops_bit_exact(channels, block_size, groups, runtime):
    """The activations the exported conv multiplies are exactly the kernel's mantissas times
    2^E (bfp_quantize, frexp-based), in PyTorch and in both runtimes."""
    from dsconv_ext.dsconv.quant_primitives import bfp_dequantize, bfp_quantize

    x = bfp_edge_input(channels, block_size, groups)
    want = bfp_dequantize(*bfp_quantize(x, block_size, 8, groups), block_size, groups)
    m = _BFP(channels, block_size, groups)
    if runtime == "eager":
        got = m(x).numpy()
    elif runtime == "onnxruntime":
        got = run_onnx(m, x)[0]
    else:
        got = run_openvino(m, x)[0]
    np.testing.assert_array_equal(got, want.numpy())


def _folded(conv: nn.Conv2d, seed: int, **kw):
    """A frozen DSConv2d from ``conv`` with a BatchNorm folded into its channel shift."""
    from dsconv_ext import DSConv2d

    g = torch.Generator().manual_seed(seed)
    m = DSConv2d.from_float(conv, **kw)
    bn = nn.BatchNorm2d(conv.out_channels).eval()
    bn.running_mean.uniform_(-0.3, 0.3, generator=g)
    bn.running_var.uniform_(0.5, 2.0, generator=g)
    bn.weight.data.uniform_(0.5, 1.5, generator=g)
    bn.bias.data.uniform_(-0.2, 0.2, generator=g)
    return m.fold_bn(bn)


def dsconv_layer(case: str) -> nn.Module:
    from dsconv_ext import DSConv2d

    torch.manual_seed(0)
    if case == "dense3x3-silu":
        m = _folded(nn.Conv2d(64, 48, 3, 1, 1, bias=False), 1)
        m.fuse_silu = True
    elif case == "1x1-short-block":  # 80 channels: blocks 32, 32, 16; the CPU's 1x1-as-FC path
        m = _folded(nn.Conv2d(80, 64, 1, bias=True), 2)
    elif case == "depthwise-stride2":
        m = _folded(nn.Conv2d(32, 32, 3, 2, 1, groups=32, bias=False), 3)
        m.fuse_silu = True
    elif case == "groups-kds-bias-4bit":
        m = DSConv2d.from_float(nn.Conv2d(48, 32, 3, 1, 1, groups=2), bits=4, KDSBias=True)
    elif case == "qat-cds":  # the float shadow weight, quantised when the export starts
        m = DSConv2d(40, 24, 3, 1, 1, block_size=16, CDS=True, bias=True)
        with torch.no_grad():
            m.CDSw.uniform_(0.5, 1.5)
            m.CDSb.uniform_(-0.5, 0.5)
    else:
        raise ValueError(case)
    return m.eval()


DSCONV_CASES = (
    "dense3x3-silu",
    "1x1-short-block",
    "depthwise-stride2",
    "groups-kds-bias-4bit",
    "qat-cds",
)


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize("case", DSCONV_CASES)
def test_dsconv_layer_export_matches_eager(case, runtime):
    """One DSConv2d exported as ultralytics exports it, against its eager forward (the integer
    kernel when frozen, the fake-quantised float conv for QAT)."""
    m = dsconv_layer(case)
    x = torch.randn(2, m.in_channels, 13, 11, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = m(x).numpy()
    if runtime == "onnxruntime":
        got, blob = run_onnx(m, x)
        import onnx

        graph = onnx.load_from_string(blob).graph
        assert {n.domain for n in graph.node} <= {"", "ai.onnx"}  # no custom op left
    else:
        got, om = run_openvino(m, x)
        # The VQK stays int8 in the IR: one int8 constant, the conv weight's size.
        int8 = [
            op
            for op in om.get_ordered_ops()
            if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8
        ]
        assert len(int8) == 1
        assert int(np.prod(int8[0].get_output_shape(0))) >= m.out_channels * m.in_channels // (
            m.groups
        ) * int(np.prod(m.kernel_size))
    assert_layer_close(got, want)


def test_openvino_mark_turns_dynamic_quantisation_off():
    """Without the mark, OpenVINO's CPU plugin quantises the activations of 1x1 convolutions
    with compressed weights on the fly (a second rounding the DSConv numbers do not have)."""
    from dsconv_ext.yolo.export import export_mode

    m = dsconv_layer("1x1-short-block")
    x = torch.randn(1, m.in_channels, 16, 16)
    marked = to_openvino(m, x)
    assert compile_f32(marked).get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") == 0
    with torch.no_grad(), export_mode(m):
        ts = torch.jit.trace(m, x)
    plain = ov.convert_model(ts, example_input=x, input=x.shape)
    assert compile_f32(plain).get_property("DYNAMIC_QUANTIZATION_GROUP_SIZE") != 0


def _bra_after_conv(dim=64, **kw):
    """Conv, then BiLevelRoutingAttention: the BRA's input is computed (as in a model), which is
    what made OpenVINO's transformations mis-size the cropped map before the fix."""
    from dsconv_ext.bra import BiLevelRoutingAttention

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(dim, dim, 1), BiLevelRoutingAttention(dim, num_heads=4, **kw)
    ).eval()


@pytest.mark.parametrize("hw", [(8, 8), (14, 14), (11, 9)], ids=["pad", "no-pad", "odd"])
def test_bra_traced_graph_matches_eager(hw):
    """The graph tracing exporters record (F.linear projections, pad / crop always present)
    computes the eager numbers (oneDNN 1x1 convolutions as projections) to float rounding."""
    m = _bra_after_conv()
    x = torch.randn(2, 64, *hw)
    with torch.no_grad():
        want = m(x)
        got = torch.jit.trace(m, x, check_trace=False)(x)
    assert rel(got, want).max() <= 1e-6


def test_bra_openvino_static_and_dynamic_shapes():
    m = _bra_after_conv()
    x = torch.randn(1, 64, 8, 8)  # padded to 14 x 14: the size that failed to convert
    with torch.no_grad():
        want = m(x)
    got, _ = run_openvino(m, x)
    assert rel(got, want).max() <= 1e-5
    # Dynamic: traced at a size that needs no padding, run at sizes that do (and a batch of 2).
    dyn = compile_f32(to_openvino(m, torch.randn(1, 64, 14, 14), dynamic=True))
    for shape in [(1, 64, 14, 14), (1, 64, 8, 8), (2, 64, 11, 9), (1, 64, 21, 28)]:
        x = torch.randn(*shape)
        with torch.no_grad():
            want = m(x)
        assert rel(dyn(x.numpy())[0], want).max() <= 1e-5, shape


# --------------------------------------------------------------------------- model level


def lifelike(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give a freshly built model the activations of a trained one, in place: BatchNorm
    statistics measured on the synthetic images the test uses (an untrained net's activations
    shrink layer after layer until every output is the same constant) with random affine terms,
    and class logits around 0 (ultralytics initialises them to about -9, where the sigmoid
    hides every error)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # running stats = the statistics of the one batch below
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.uniform_(-0.2, 0.2, generator=g)
    for seq in model.model[-1].cv3:
        seq[-1].bias.data.zero_()
    model.train()
    with torch.no_grad():
        model(torch.cat([as_input(synthetic_image(i)) for i in range(CALIBRATION_IMAGES)]))
    return model.eval()


def synthetic_image(seed: int = 0) -> np.ndarray:
    """A BGR uint8 image: colour gradients, texture and a few coloured rectangles.

    The gradients make every attention window's mean distinct: on a flat background the
    windows' routing affinities nearly tie, and which of two near-equal regions BiFormer's top-k
    routing picks then hangs on float rounding."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:IMGSZ, 0:IMGSZ] / IMGSZ
    a, b = rng.uniform(-1, 1, (2, 3))
    img = 128 + 100 * (a * xx[..., None] + b * yy[..., None] - (a + b) / 2)
    img += rng.normal(0, 8, img.shape)
    for _ in range(3):
        x0, y0 = rng.integers(0, IMGSZ // 2, 2)
        w, h = rng.integers(IMGSZ // 6, IMGSZ // 2, 2)
        img[y0 : y0 + h, x0 : x0 + w] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def as_input(img: np.ndarray) -> torch.Tensor:
    """What ultralytics feeds the model for ``img`` at IMGSZ: RGB, [0, 1], NCHW."""
    return torch.from_numpy(img[..., ::-1].copy()).permute(2, 0, 1)[None].float() / 255


def eager_outputs(model: nn.Module, x: torch.Tensor):
    """The exported outputs' counterparts of an ultralytics model in eval mode, as numpy."""
    with torch.no_grad():
        out = model(x)
    first = out[0] if isinstance(out, (tuple, list)) else out
    if isinstance(first, (tuple, list)):  # segment: (boxes + mask coefficients, prototypes)
        return [t.numpy() for t in first]
    return [first.numpy()]


def channel_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """|got - want| over the largest |want| of the element's channel (dim 1): box coordinates
    are ~100, class probabilities ~1, mask prototypes ~0.1."""
    n, c = want.shape[:2]
    d = np.abs(got.astype(np.float64) - want).reshape(n, c, -1)
    scale = np.abs(want.astype(np.float64)).reshape(n, c, -1).max(axis=(0, 2), keepdims=True)
    return d / np.maximum(scale, 1e-12)


class Model:
    """One model under test: its checkpoint, eager reference and exports (each made once)."""

    def __init__(self, name: str, root: Path):
        from ultralytics import YOLO

        from dsconv_ext.__main__ import main as cli

        torch.manual_seed(0)
        if name == "converted-yolo11n":
            yolo = YOLO("yolo11n.yaml")
            lifelike(yolo.model)
            yolo.save(str(root / "yolo11n.pt"))
            self.pt = root / "yolo11n-ds8.pt"
            # --force: every eligible layer, whatever this CPU path's speed check keeps float
            assert cli(["convert", str(root / "yolo11n.pt"), "--force", "-o", str(self.pt)]) == 0
        else:
            yolo = YOLO(str(CONFIGS / name.replace("yolo11n-", "yolo11-")))
            lifelike(yolo.model)
            self.pt = root / name.replace(".yaml", ".pt")
            yolo.save(str(self.pt))
        self.yolo = YOLO(str(self.pt))
        # What the exporter exports: the checkpoint's model, fused (BN folded, DSConv frozen).
        self.ref = copy.deepcopy(self.yolo.model).float().eval().fuse(verbose=False)
        self.files = {}

    def export(self, fmt: str) -> str:
        if fmt not in self.files:
            # simplify=False: onnxslim takes ~20 s on a converted model's BFP graph at 2 cores,
            # and only folds constants (the graph computes the same numbers).
            extra = {"simplify": False} if fmt == "onnx" else {}
            self.files[fmt] = self.yolo.export(format=fmt, imgsz=IMGSZ, **extra)
        return self.files[fmt]


def exported_runner(path: str, fmt: str):
    """A function running the exported file's raw graph on an NCHW float32 array."""
    if fmt == "onnx":
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        return lambda x: sess.run(None, {sess.get_inputs()[0].name: x})
    compiled = compile_f32(ov.Core().read_model(str(next(Path(path).glob("*.xml")))))
    return lambda x: [compiled(x)[o] for o in compiled.outputs]


_models = {}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    def get(name: str) -> Model:
        if name not in _models:
            _models[name] = Model(name, tmp_path_factory.mktemp(name.replace(".", "_")))
        return _models[name]

    yield get
    _models.clear()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", MODELS)
def test_export_predict_and_match_eager(name, fmt, models, record_property):
    from ultralytics import YOLO

    from dsconv_ext import DSConv2d

    m = models(name)
    path = m.export(fmt)
    dsconvs = [x for x in m.ref.modules() if isinstance(x, DSConv2d)]

    # What the file holds: no custom op; OpenVINO keeps each DSConv's VQK as one int8 constant
    # and carries the mark that keeps its activations out of dynamic quantisation.
    if fmt == "onnx":
        import onnx

        assert {n.domain for n in onnx.load(path).graph.node} <= {"", "ai.onnx"}
    else:
        om = ov.Core().read_model(str(next(Path(path).glob("*.xml"))))
        int8 = [
            op
            for op in om.get_ordered_ops()
            if op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8
        ]
        assert len(int8) == len(dsconvs)
        if dsconvs:
            key = ["runtime_options", "DYNAMIC_QUANTIZATION_GROUP_SIZE"]
            assert om.get_rt_info(key).astype(str) == "0"

    # Loaded back by ultralytics, it predicts (OpenVINO at its default precision).
    img = synthetic_image(0)
    res = YOLO(path, task=m.yolo.task).predict(img, imgsz=IMGSZ, verbose=False)
    assert len(res) == 1
    r = res[0]
    boxes = r.obb if m.yolo.task == "obb" else r.boxes
    assert boxes is not None and len(boxes) > 0 and torch.isfinite(boxes.data).all()
    if m.yolo.task == "segment":
        assert r.masks is not None and len(r.masks) == len(boxes)

    # Raw outputs against the eager model (see the module docstring for the candidates).
    run = exported_runner(path, fmt)
    tried = []
    for seed in range(CANDIDATES):
        x = as_input(synthetic_image(seed))
        want = eager_outputs(m.ref, x)
        got = run(x.numpy())
        assert [g.shape for g in got] == [w.shape for w in want]
        err = np.concatenate([channel_errors(g, w).ravel() for g, w in zip(got, want)])
        tried.append((float(err.max()), float((err <= 1e-4).mean())))
        if err.max() <= 1e-3 and (err <= 1e-4).mean() >= 0.999:
            break
    else:
        pytest.fail(f"no image among {CANDIDATES} agrees: (max, within 1e-4) = {tried}")
    record_property("images_tried", len(tried))
    record_property("max_error", tried[-1][0])
    print(f"\n{name} {fmt}: images tried {len(tried)}, max error {tried[-1][0]:.2e}", end="")
