"""What DSConv's quantisation-aware training costs over a plain convolution.

In training, ``DSConv2d`` fake-quantises its float shadow weight (VQK + KDS) and its input (block
floating point) on every call, with straight-through gradients, then runs a float conv. This
times, forward + backward (input and weight gradients, as in training):

* layer rows, on the 3x3 stride-1 convs that C3k2_DSConv turns into DSConv2d (YOLO11n's
  bottlenecks at 640 px, ``conv_shapes.py``): ``conv`` (``nn.Conv2d``, no bias, as in
  ultralytics' ``Conv``), ``qat torch`` (DSConv2d with the PyTorch primitives,
  ``DSCONV_EXT_FAKE_QUANT=torch``) and, on CUDA, ``qat triton`` (the fused Triton fake
  quantisation the module takes there by default). ``fq act`` / ``fq w`` time the PyTorch
  activation and weight fake quantisers alone (forward), to show where the tax goes; ``ops``
  counts the ATen ops one forward + backward dispatches (each is a kernel launch on a GPU);
* ``--model``: one training step (zero_grad, forward, ultralytics' detection loss, backward,
  SGD step) of yolo11n-C3k2-DSConv against yolo11n, on random images and boxes (no dataset);
  on CUDA under fp16 autocast as ultralytics trains (``--no-amp`` for float32).

Candidates are timed interleaved (``_timing.time_interleaved``), medians in ms; ``x`` columns are
time / conv (or / yolo11n) time.

    python benchmarks/bench_qat.py                       # CPU: layers at batch 2, then exit
    python benchmarks/bench_qat.py --model --imgsz 320   # CPU: also the whole training step
    python benchmarks/bench_qat.py --device cuda --batch 16 --model --imgsz 640
    python benchmarks/bench_qat.py --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
from typing import Dict, List

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import (  # noqa: E402
    dump_json,
    environment,
    print_header,
    print_table,
    time_interleaved,
)
from conv_shapes import yolo11_conv_shapes  # noqa: E402

from dsconv_ext import DSConv2d  # noqa: E402
from dsconv_ext.dsconv.quant_primitives import (  # noqa: E402
    FAKE_QUANT_ENV,
    fake_quant_backend,
    fake_quantize_bfp,
    fake_quantize_weight,
)

os.environ.setdefault("YOLO_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LAYER_COLUMNS = [
    "layer",
    "batch",
    "conv ms",
    "qat torch ms",
    "x torch",
    "qat triton ms",
    "x triton",
    "fq act ms",
    "fq w ms",
    "ops conv",
    "ops torch",
    "ops triton",
]
MODEL_COLUMNS = ["model", "batch", "imgsz", "amp", "step ms", "x yolo11n", "DSConv2d layers"]


@contextlib.contextmanager
def fake_quant(backend: str):
    """Run the block with DSCONV_EXT_FAKE_QUANT=backend."""
    before = os.environ.get(FAKE_QUANT_ENV)
    os.environ[FAKE_QUANT_ENV] = backend
    try:
        yield
    finally:
        if before is None:
            del os.environ[FAKE_QUANT_ENV]
        else:
            os.environ[FAKE_QUANT_ENV] = before


def count_ops(fn) -> int:
    """ATen ops dispatched by one call of fn (forward and backward)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        fn()
    return Count.n


def has_triton(device: str) -> bool:
    if not device.startswith("cuda"):
        return False
    with fake_quant("auto"):
        return fake_quant_backend(torch.empty(1, device=device)) == "triton"


def layer_rows(device: str, batch: int, rounds: int, limit: int) -> List[Dict[str, object]]:
    shapes = [
        s for s in yolo11_conv_shapes("n", 3, unique=True) if s["stride"] == 1 and s["groups"] == 1
    ][:limit]
    triton_ok = has_triton(device)
    rows = []
    for s in shapes:
        torch.manual_seed(0)
        c1, c2, H, W = s["c_in"], s["c_out"], s["H"], s["W"]
        conv = nn.Conv2d(c1, c2, 3, padding=1, bias=False).to(device)
        ds = DSConv2d(c1, c2, 3, padding=1).to(device).train()
        ds.weight.data.copy_(conv.weight.data)
        x = torch.randn(batch, c1, H, W, device=device, requires_grad=True)
        gy = torch.randn(batch, c2, H, W, device=device)

        def step(m, backend=None, x=x, gy=gy):
            def run():
                with fake_quant(backend) if backend else contextlib.nullcontext():
                    x.grad = None
                    m.zero_grad(set_to_none=True)
                    m(x).backward(gy)

            return run

        fns = {"conv": step(conv), "torch": step(ds, "torch")}
        if triton_ok:
            fns["triton"] = step(ds, "triton")
        xd = x.detach()
        fns["fq act"] = lambda xd=xd: fake_quantize_bfp(xd, 32, 8, 1)
        fns["fq w"] = lambda ds=ds: fake_quantize_weight(ds.weight.detach(), 8, 32)
        t = time_interleaved(fns, rounds=rounds, warmup=2, device=device)
        row = {
            "layer": f"{c1}->{c2} 3x3 @{H}x{W}",
            "batch": batch,
            "conv ms": t["conv"],
            "qat torch ms": t["torch"],
            "x torch": t["torch"] / t["conv"],
            "fq act ms": t["fq act"],
            "fq w ms": t["fq w"],
            "ops conv": count_ops(fns["conv"]),
            "ops torch": count_ops(fns["torch"]),
        }
        if triton_ok:
            row.update({
                "qat triton ms": t["triton"],
                "x triton": t["triton"] / t["conv"],
                "ops triton": count_ops(fns["triton"]),
            })  # fmt: skip
        rows.append(row)
    return rows


def _models(device: str):
    import yaml
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel

    with open(os.path.join(ROOT, "configs", "yolo11-C3k2-DSConv.yaml")) as f:
        ds_cfg = yaml.safe_load(f)
    ds_cfg["scale"] = "n"
    torch.manual_seed(0)
    models = {
        "yolo11n": DetectionModel("yolo11n.yaml", verbose=False),
        "yolo11n-C3k2-DSConv": DetectionModel(ds_cfg, verbose=False),
    }
    for m in models.values():
        m.args = get_cfg()  # the loss reads its gains (box, cls, dfl) from here
        m.to(device).train()
    return models


def model_rows(device: str, batch: int, imgsz: int, amp: bool, rounds: int):
    models = _models(device)
    g = torch.Generator().manual_seed(0)
    nbox = 6
    data = dict(
        img=torch.rand(batch, 3, imgsz, imgsz, generator=g),
        batch_idx=torch.arange(batch).repeat_interleave(nbox).float(),
        cls=torch.randint(0, 80, (batch * nbox, 1), generator=g).float(),
        bboxes=torch.rand(batch * nbox, 4, generator=g) * 0.5 + 0.25,
    )
    data = {k: v.to(device) for k, v in data.items()}
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=amp)

    def step(m):
        opt = torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9)

        def run():
            opt.zero_grad(set_to_none=True)
            with torch.autocast(device.split(":")[0], enabled=amp):
                loss, _ = m.loss(data)
            scaler.scale(loss.sum()).backward()
            scaler.step(opt)
            scaler.update()

        return run

    t = time_interleaved({k: step(m) for k, m in models.items()}, rounds=rounds, warmup=2,
                         device=device)  # fmt: skip
    base = t["yolo11n"]
    return [
        {
            "model": name,
            "batch": batch,
            "imgsz": imgsz,
            "amp": amp,
            "step ms": t[name],
            "x yolo11n": t[name] / base,
            "DSConv2d layers": sum(isinstance(x, DSConv2d) for x in m.modules()),
        }
        for name, m in models.items()
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 16 on CUDA")
    ap.add_argument("--rounds", type=int, default=None, help="default: 7 on CPU, 30 on CUDA")
    ap.add_argument("--layers", type=int, default=100, help="at most this many layer shapes")
    ap.add_argument("--model", action="store_true", help="also time whole training steps")
    ap.add_argument("--imgsz", type=int, default=640)
    ap.add_argument("--model-batch", type=int, default=None, help="default: --batch")
    ap.add_argument("--no-amp", action="store_true", help="CUDA: train in float32")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--json", default=None, help="write the rows and environment here ('-')")
    args = ap.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = args.batch or (16 if cuda else 2)
    rounds = args.rounds or (30 if cuda else 7)
    env = environment()
    env["fake_quant_backend"] = "triton" if has_triton(args.device) else "torch"
    print_header("bench_qat", env)
    print(f"# device {args.device}; forward + backward; medians of {rounds} interleaved rounds")
    rows = layer_rows(args.device, batch, rounds, args.layers)
    print_table(rows, [c for c in LAYER_COLUMNS if any(c in r for r in rows)])
    for col in ("x torch", "x triton"):
        vals = [r[col] for r in rows if col in r]
        if vals:
            print(f"# geomean {col}: {math.exp(sum(map(math.log, vals)) / len(vals)):.2f}")
    payload = {"environment": env, "layers": rows}
    if args.model:
        amp = cuda and not args.no_amp
        mrows = model_rows(args.device, args.model_batch or batch, args.imgsz, amp, rounds)
        print()
        print_table(mrows, MODEL_COLUMNS)
        payload["model"] = mrows
    if args.json:
        dump_json(args.json, payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
