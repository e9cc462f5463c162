"""DSConv modules: ``DSConv2d`` (the convolution) and ``DSConv`` (Ultralytics ``Conv`` shape).

``DSConv2d`` has two states:

- training / QAT (``frozen == False``): a float shadow ``weight`` is fake-quantised to the VQK and
  KDS on every call and activations to block floating point, both with straight-through
  gradients, and a float conv runs on the dequantised values (same numbers as the integer path up
  to float rounding; works on any device and under autocast);
- inference (``frozen == True``, after :meth:`freeze` or :meth:`from_float`): it holds the int8
  ``intweight`` and fp32 ``alpha`` (+ ``KDSb``) and runs :func:`dsconv_ext.dsconv2d`, the
  integer kernel.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading

import torch
import torch.nn as nn
import torch.nn.functional as F

from .checks import check_dsconv2d_args, pair, plane_dense
from .ops import dsconv2d, dsconv2d_backend
from .quant_primitives import (
    FUSED_DTYPES,
    check_bits,
    check_block_size,
    fake_quant_backend,
    fake_quantize_bfp,
    fake_quantize_bfp_fused,
    fake_quantize_weight,
    fake_quantize_weight_fused,
    num_blocks,
    pack_intweight,
    packed_bits,
    quantize_weight,
    unpack_intweight,
)

__all__ = [
    "FORMAT_VERSION",
    "DSConvFormatError",
    "DSConv2d",
    "DSConv",
    "autopad",
    "format_diagnosis",
]

# Version of the saved layout of a frozen DSConv2d (buffer names, packing). Bump on any change.
FORMAT_VERSION = 1

# Quantisation parameters stay fp32 when the module is cast with .half() (Ultralytics saves
# checkpoints that way): fp16 would perturb every KDS scale by up to 5e-4 relative.
_FP32_BUFFERS = ("alpha", "KDSb", "CDSw", "CDSb")


class DSConvFormatError(RuntimeError):
    """A saved DSConv2d uses a storage format this version of dsconv_ext cannot read."""


# Per thread: unpickling for a diagnosis (see DSConv2d.__setstate__ and format_diagnosis).
_diagnosis = threading.local()


@contextlib.contextmanager
def format_diagnosis():
    """Within this block (this thread only), a DSConv2d saved with another format version
    unpickles without error, unusable, with ``_saved_format_version`` set: error messages can
    then name every such layer."""
    before = getattr(_diagnosis, "active", False)
    _diagnosis.active = True
    try:
        yield
    finally:
        _diagnosis.active = before


def autopad(k, p=None, d=1):
    """'Same' padding for odd kernels (Ultralytics' convention), honouring dilation."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


# os.environ's mapping of encoded names (POSIX CPython): a membership test there costs ~50 ns, one
# through os.environ ~1.5 us, and the frozen layers' fast path asks on every call.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
if not isinstance(_ENVIRON_DATA, dict) or _ENCODE is None:
    _ENVIRON_DATA = None
_BACKEND_ENV_KEY = _ENCODE("DSCONV_EXT_DSCONV_BACKEND") if _ENVIRON_DATA is not None else None


def _backend_env_set() -> bool:
    """Whether DSCONV_EXT_DSCONV_BACKEND is set (it sends frozen layers through dsconv2d())."""
    if _ENVIRON_DATA is not None:
        return _BACKEND_ENV_KEY in _ENVIRON_DATA
    return "DSCONV_EXT_DSCONV_BACKEND" in os.environ


class DSConv2d(nn.Module):
    """Distribution-shifting convolution (Nascimento et al., ICCV 2019).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as
            ``nn.Conv2d``.
        block_size: input channels per KDS / BFP block (1..1024).
        bits: VQK width (2..8).
        act_bits: BFP mantissa width of the activations (2..8).
        KDSBias: fit a KDS bias per (output channel, block, tap).
        CDS: learn a per-output-channel scale and shift (``CDSw``, ``CDSb``).

    Shapes: x [N, in_channels, H, W] -> [N, out_channels, Ho, Wo].
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = False,
        block_size: int = 32,
        bits: int = 8,
        act_bits: int = 8,
        KDSBias: bool = False,
        CDS: bool = False,
    ):
        super().__init__()
        for name, v in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("groups", groups),
        ):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"in_channels ({in_channels}) and out_channels ({out_channels}) must "
                f"be divisible by groups ({groups})"
            )
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride, "stride")
        self.padding = pair(padding, "padding")
        self.dilation = pair(dilation, "dilation")
        if min(self.kernel_size) < 1 or min(self.stride) < 1 or min(self.dilation) < 1:
            raise ValueError("kernel_size, stride and dilation must be >= 1")
        if min(self.padding) < 0:
            raise ValueError(f"padding must be >= 0, got {self.padding}")
        self.block_size = check_block_size(block_size)
        self.bits = check_bits(bits)
        self.act_bits = check_bits(act_bits, "act_bits")
        self.KDSBias = bool(KDSBias)
        self.fuse_silu = False
        self.frozen = False
        self.format_version = FORMAT_VERSION

        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, kh, kw))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))  # nn.Conv2d's initialisation
        if bias:
            bound = 1 / math.sqrt((in_channels // groups) * kh * kw)
            self.bias = nn.Parameter(torch.empty(out_channels).uniform_(-bound, bound))
        else:
            self.register_parameter("bias", None)
        if CDS:
            self.CDSw = nn.Parameter(torch.ones(out_channels))
            self.CDSb = nn.Parameter(torch.zeros(out_channels))
        else:
            self.register_parameter("CDSw", None)
            self.register_parameter("CDSb", None)
        for name in ("intweight", "alpha", "KDSb"):
            self.register_buffer(name, None)

    @property
    def nblocks(self) -> int:
        return num_blocks(self.in_channels // self.groups, self.block_size)

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        s += f", block_size={self.block_size}, bits={self.bits}, act_bits={self.act_bits}"
        if self.KDSBias:
            s += ", KDSBias=True"
        if self.CDSw is not None:
            s += ", CDS=True"
        return s + (", frozen" if self.frozen else "") + (", silu" if self.fuse_silu else "")

    # ------------------------------------------------------------------ forward
    # Frozen inference on CPU float32 skips ops.dsconv2d's full argument check on every call
    # (~25 us of Python per layer, a few % of a batch-1 YOLO11n forward): the weights' side of it
    # runs once, when the call's arguments are cached (_fast_call), and each call only checks x
    # (type, rank, channels, dtype, device, spatial size) before calling the op. Any input that
    # fails those checks takes the validated path, which raises the clear error. The cache drops
    # whenever an attribute, buffer or device changes (__setattr__, register_buffer, _apply...).
    _fast = None  # per instance, in __dict__: (op, tail args, min H, min W) or False

    def __setattr__(self, name, value):
        if name != "training":  # .eval() / .train() leave the frozen call unchanged
            self.__dict__.pop("_fast", None)
        super().__setattr__(name, value)

    def __delattr__(self, name):
        self.__dict__.pop("_fast", None)
        super().__delattr__(name)

    def register_buffer(self, name, tensor, persistent=True):
        self.__dict__.pop("_fast", None)
        super().register_buffer(name, tensor, persistent)

    def _op_tensors(self):
        """The frozen op's tensor arguments after x, in its schema's order."""
        return (self.intweight, self.alpha, self.KDSb, self.CDSw, self.CDSb, self.bias)

    def _conv_args(self):
        """The op's arguments after the tensors: stride ... fuse_silu."""
        return (
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
            self.block_size,
            self.act_bits,
            bool(self.fuse_silu),
        )

    def _build_fast(self):
        """The cached tail of the op call, or False when the fast path does not apply."""
        fast = False
        bufs = self._op_tensors()
        if (
            self.frozen
            and all(t is None or t.device.type == "cpu" for t in bufs)
            and self.intweight.dtype == torch.int8
            and all(t is None or t.dtype == torch.float32 for t in bufs[1:])
            and dsconv2d_backend("cpu") == "kernel"
        ):
            # The full validation once, on a probe of the smallest valid spatial size.
            kh, kw = self.kernel_size
            min_h = max(1, self.dilation[0] * (kh - 1) + 1 - 2 * self.padding[0])
            min_w = max(1, self.dilation[1] * (kw - 1) + 1 - 2 * self.padding[1])
            probe = torch.empty(1, self.in_channels, min_h, min_w)
            call = check_dsconv2d_args(probe, *bufs, *self._conv_args())
            fast = (torch.ops.dsconv_ext.dsconv2d.default, call.op_args()[1:], min_h, min_w)
        self.__dict__["_fast"] = fast
        return fast

    def _fast_for(self, x: torch.Tensor):
        """The cached kernel call if ``x`` may skip the Python checks (frozen layer, float32 CPU
        tensor of the right channels and at least the probed size), else None."""
        fast = self._fast
        if fast is None and self.frozen:
            fast = self._build_fast()
        if (
            fast
            and type(x) is torch.Tensor
            and x.dim() == 4
            and x.dtype is torch.float32
            and x.is_cpu
            and not _backend_env_set()
        ):
            _, c, h, w = x.shape
            if c == self.in_channels and h >= fast[2] and w >= fast[3]:
                return fast
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self._fast_for(x)
        if fast:
            return fast[0](x, *fast[1])
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"{type(self).__name__} expects x of shape [N, {self.in_channels}, "
                f"H, W], got {tuple(x.shape)}"
            )
        if self.frozen:
            return self._kernel_call(x)
        w, xq = self._fake_quantize(x)
        y = F.conv2d(
            xq,
            w.to(xq.dtype) if not torch.is_autocast_enabled() else w,
            None,
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )
        shape = (1, -1, 1, 1)
        if self.CDSw is not None:
            y = y * self.CDSw.view(shape).to(y.dtype) + self.CDSb.view(shape).to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.view(shape).to(y.dtype)
        return F.silu(y) if self.fuse_silu else y

    def _fake_quantize(self, x: torch.Tensor):
        """QAT: the fake-quantised shadow weight and input, both with straight-through gradients.

        CUDA tensors take one fused Triton kernel each (bit-identical to the PyTorch primitives;
        ``DSCONV_EXT_FAKE_QUANT=torch`` forces the primitives): the primitives cost a dozen
        elementwise ops, a float64 pass and a host sync per call. The weight kernel has no KDS
        bias (the least-squares line's sums are not exact in float64): KDSBias layers keep the
        PyTorch weight quantiser."""
        if fake_quant_backend(x) == "triton":
            xq = fake_quantize_bfp_fused(x, self.block_size, self.act_bits, self.groups)
            if self.KDSBias or self.weight.dtype not in FUSED_DTYPES:
                w = fake_quantize_weight(self.weight, self.bits, self.block_size, self.KDSBias)
            else:
                w = fake_quantize_weight_fused(self.weight, self.bits, self.block_size)
            return w, xq
        w = fake_quantize_weight(self.weight, self.bits, self.block_size, self.KDSBias)
        return w, fake_quantize_bfp(x, self.block_size, self.act_bits, self.groups)

    def forward_into(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``self(x)`` written into ``out`` (a channel slice of a concatenation, say) and
        returned. A frozen layer with no hooks, outside autograd, stores there directly (see
        :func:`dsconv_ext.dsconv2d`'s ``out``); anything else computes ``self(x)`` and copies."""
        if (
            not self.frozen
            or (torch.is_grad_enabled() and x.requires_grad)
            or self._forward_hooks
            or self._forward_pre_hooks
        ):
            return out.copy_(self(x))
        fast = self._fast_for(x)
        if (
            fast
            and type(out) is torch.Tensor
            and out.dtype is torch.float32
            and out.is_cpu
            and out.dim() == 4
            and plane_dense(out)
        ):
            # The per-call Python checks of dsconv2d() cost as much as the copy saved here; the
            # op checks shapes and overlap itself.
            torch.ops.dsconv_ext.dsconv2d_out.default(x, *fast[1], out)
            return out
        return self._kernel_call(x, out)

    def _kernel_call(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The frozen layer through :func:`dsconv_ext.dsconv2d` (checked, any device)."""
        return dsconv2d(x, *self._op_tensors(), *self._conv_args(), out=out)

    # ------------------------------------------------------------------ conversion
    @torch.no_grad()
    def freeze(self, refine_steps: int = 0) -> DSConv2d:
        """Quantise the shadow weight once and switch to the integer kernel (in place).

        The default is the quantiser QAT trained against; ``refine_steps > 0`` refits it."""
        if self.frozen:
            return self
        q, alpha, kdsb = quantize_weight(
            self.weight, self.bits, self.block_size, self.KDSBias, refine_steps
        )
        del self.weight
        self.register_buffer("intweight", q)
        self.register_buffer("alpha", alpha)
        self.register_buffer("KDSb", kdsb)
        self.frozen = True
        return self

    @classmethod
    @torch.no_grad()
    def from_float(
        cls,
        conv: nn.Conv2d,
        bits: int = 8,
        block_size: int = 32,
        act_bits: int = 8,
        KDSBias: bool = False,
        refine_steps: int = 4,
    ) -> DSConv2d:
        """Frozen DSConv2d approximating a trained ``nn.Conv2d`` (no retraining).

        ``refine_steps``: alternating refits of the quantiser (see
        :func:`dsconv_ext.dsconv.quant_primitives.quantize_weight`; 0 is the paper's single pass).
        """
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"conv must be an nn.Conv2d, got {type(conv).__name__}")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(
                "conv must use numeric zero padding (padding_mode='zeros'); got "
                f"padding={conv.padding!r}, padding_mode={conv.padding_mode!r}"
            )
        m = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            conv.bias is not None,
            block_size,
            bits,
            act_bits,
            KDSBias,
        )
        m = m.to(conv.weight.device)
        m.weight.copy_(conv.weight.float())
        if conv.bias is not None:
            m.bias.copy_(conv.bias.float())
        return m.freeze(refine_steps)

    @torch.no_grad()
    def fold_bn(self, bn: nn.BatchNorm2d) -> DSConv2d:
        """Fold an eval-mode BatchNorm after this conv into the Channel Distribution Shift.

        ``bn(CDSw * acc + CDSb + bias) = (CDSw * s) * acc + ((CDSb + bias - mean) * s + beta)``
        with ``s = gamma / sqrt(var + eps)``: the VQK and KDS are untouched (no re-quantisation).
        """
        if not isinstance(bn, nn.BatchNorm2d) or bn.num_features != self.out_channels:
            raise ValueError(f"bn must be a BatchNorm2d({self.out_channels}), got {bn!r}")
        self.freeze()
        dev = self.alpha.device
        s = (
            bn.weight if bn.affine else torch.ones(bn.num_features, device=dev)
        ).float() / torch.sqrt(bn.running_var.float() + bn.eps)
        beta = bn.bias.float() if bn.affine else torch.zeros_like(s)
        cdsw = self.CDSw.float() if self.CDSw is not None else torch.ones_like(s)
        cdsb = self.CDSb.float() if self.CDSb is not None else torch.zeros_like(s)
        if self.bias is not None:
            cdsb = cdsb + self.bias.float()
        new_w, new_b = cdsw * s, (cdsb - bn.running_mean.float()) * s + beta
        for name in ("CDSw", "CDSb", "bias"):
            if name in self._parameters:
                del self._parameters[name]
        self.register_buffer("CDSw", new_w.detach().clone())
        self.register_buffer("CDSb", new_b.detach().clone())
        self.register_buffer("bias", None)
        return self

    # ------------------------------------------------------------------ storage
    def _apply(self, fn, recurse=True):
        self.__dict__.pop("_fast", None)
        kept = {n: self._buffers.pop(n) for n in _FP32_BUFFERS if self._buffers.get(n) is not None}
        try:
            super()._apply(fn, recurse)
        finally:
            for n, b in kept.items():
                # Apply fn to an empty probe to learn the target device, keep the fp32 dtype.
                target = fn(torch.empty(0, dtype=b.dtype, device=b.device)).device
                self._buffers[n] = b.to(target)
        return self

    # Extra state is an int32 tensor, not a dict: Ultralytics walks state dicts assuming every
    # value is a tensor (ModelEMA reads .dtype, intersect_dicts reads .shape). Integer tensors
    # are also left alone by EMA and by .half().
    _EXTRA_FIELDS = ("format_version", "frozen", "bits", "block_size", "act_bits", "fuse_silu")

    def get_extra_state(self):
        values = (
            FORMAT_VERSION,
            self.frozen,
            self.bits,
            self.block_size,
            self.act_bits,
            self.fuse_silu,
        )
        return torch.tensor([int(v) for v in values], dtype=torch.int32)

    @classmethod
    def _extra_dict(cls, state):
        if isinstance(state, dict):
            return state
        if isinstance(state, torch.Tensor) and state.dim() == 1:
            return dict(zip(cls._EXTRA_FIELDS, (int(v) for v in state.tolist())))
        return {}

    def set_extra_state(self, state):
        self.fuse_silu = bool(self._extra_dict(state).get("fuse_silu", False))

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.frozen and packed_bits(self.bits) < 8:
            # Really smaller checkpoints: 2 (bits 3-4) or 4 (bits 2) VQK values per byte.
            q = destination.pop(prefix + "intweight")
            destination[prefix + "intweight_packed"] = pack_intweight(q.detach(), self.bits)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        extra = state_dict.get(prefix + "_extra_state")
        layer = prefix.rstrip(".") or type(self).__name__
        if extra is not None:
            extra = self._extra_dict(extra)
            version = extra.get("format_version")
            if version != FORMAT_VERSION:
                raise DSConvFormatError(
                    f"layer '{layer}': saved with dsconv_ext format version {version}, this "
                    f"dsconv_ext reads version {FORMAT_VERSION}; convert the model again"
                )
            for key in ("bits", "block_size", "act_bits"):
                if extra.get(key) != getattr(self, key):
                    raise DSConvFormatError(
                        f"layer '{layer}': saved with {key}={extra.get(key)}, this module has "
                        f"{key}={getattr(self, key)}"
                    )
        packed = state_dict.get(prefix + "intweight_packed")
        if packed is not None:
            kh, kw = self.kernel_size
            shape = (self.out_channels, self.in_channels // self.groups, kh, kw)
            state_dict = dict(state_dict)
            state_dict[prefix + "intweight"] = unpack_intweight(packed, self.bits, shape)
            del state_dict[prefix + "intweight_packed"]
        if prefix + "intweight" in state_dict and not self.frozen:
            self._become_frozen_like(state_dict, prefix)
        if self.frozen and prefix + "weight" in state_dict:
            raise DSConvFormatError(
                f"layer '{layer}': cannot load a float (QAT) state into a "
                "frozen DSConv2d; load it before freeze()"
            )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _become_frozen_like(self, state_dict, prefix):
        """Turn a fresh module into a frozen one with the saved buffers' shapes, so that a frozen
        checkpoint loads into a model built from its YAML / constructor."""
        del self.weight
        self.register_buffer("intweight", torch.empty_like(state_dict[prefix + "intweight"]))
        self.register_buffer("alpha", torch.empty_like(state_dict[prefix + "alpha"]).float())
        kb = state_dict.get(prefix + "KDSb")
        self.register_buffer("KDSb", None if kb is None else torch.empty_like(kb).float())
        for name in ("CDSw", "CDSb", "bias"):
            t = state_dict.get(prefix + name)
            if t is not None and getattr(self, name) is None:
                if name in self._parameters:
                    del self._parameters[name]
                self.register_buffer(name, torch.empty_like(t).float())
        self.frozen = True

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_fast", None)
        buffers = dict(state["_buffers"])
        if self.frozen and packed_bits(self.bits) < 8 and buffers.get("intweight") is not None:
            q = buffers.pop("intweight")
            state["_packed_intweight"] = (pack_intweight(q, self.bits), tuple(q.shape))
        state["_buffers"] = buffers
        state["format_version"] = FORMAT_VERSION
        return state

    def __setstate__(self, state):
        version = state.get("format_version")
        if version != FORMAT_VERSION and getattr(_diagnosis, "active", False):
            # Diagnosing a failed load (dsconv_ext.yolo.checkpoint): keep the saved state as is,
            # unreadable, so that the caller can list every such layer by its path.
            nn.Module.__setstate__(self, {**state, "_saved_format_version": version})
            return
        if version != FORMAT_VERSION:
            desc = (
                f"DSConv2d({state.get('in_channels')}, {state.get('out_channels')}, "
                f"kernel_size={state.get('kernel_size')})"
            )
            if state.get("layer_name"):  # set by dsconv_ext.quantize and the YOLO registration
                desc = f"layer '{state['layer_name']}' ({desc})"
            raise DSConvFormatError(
                f"{desc}: saved with dsconv_ext format version {version}, this dsconv_ext reads "
                f"version {FORMAT_VERSION}; convert the model again with this version"
            )
        packed = state.pop("_packed_intweight", None)
        state.pop("_fast", None)
        super().__setstate__(state)
        if packed is not None:
            self._buffers["intweight"] = unpack_intweight(packed[0], self.bits, packed[1])


class DSConv(nn.Module):
    """Ultralytics ``Conv`` with a DSConv2d inside: conv -> BatchNorm -> activation.

    Args (YAML order, as ``Conv``): c1 in channels, c2 out channels, k kernel, s stride,
    p padding (None: same), g groups, d dilation, act (True: SiLU, a module, or False),
    then block_size, bits, act_bits of the DSConv2d.

    Shapes: x [N, c1, H, W] -> [N, c2, H/s, W/s].
    """

    default_act = nn.SiLU()

    def __init__(
        self,
        c1: int,
        c2: int,
        k=1,
        s=1,
        p=None,
        g: int = 1,
        d=1,
        act=True,
        block_size: int = 32,
        bits: int = 8,
        act_bits: int = 8,
    ):
        super().__init__()
        self.conv = DSConv2d(
            c1,
            c2,
            k,
            s,
            autopad(k, p, d),
            dilation=d,
            groups=g,
            bias=False,
            block_size=block_size,
            bits=bits,
            act_bits=act_bits,
        )
        self.bn = nn.BatchNorm2d(c2)
        self.act = (
            self.default_act
            if act is True
            else act
            if isinstance(act, nn.Module)
            else nn.Identity()
        )
        self.fused = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return self.forward_fuse(x)
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv(x))

    @torch.no_grad()
    def fuse_bn(self) -> DSConv:
        """Fold BN into the conv's channel shift and SiLU into its kernel call; freezes the conv."""
        if self.fused:
            return self
        self.conv.fold_bn(self.bn)
        del self.bn
        if type(self.act) is nn.SiLU:
            self.conv.fuse_silu = True
            self.act = nn.Identity()
        self.fused = True
        return self
