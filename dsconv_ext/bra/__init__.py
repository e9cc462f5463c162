"""Bi-Level Routing Attention (BiFormer) for YOLO11: reference, PyTorch and Triton backends."""

from .backend import bra_backend_report, resolve_backend, routed_attention
from .module import BiLevelRoutingAttention, KVGather, QKVLinear, TopkRouting
from .naive import bra_forward_naive, kv_gather_naive, routed_attention_naive
from .torch_impl import linear_cl, routed_attention_torch

__all__ = [
    "BiLevelRoutingAttention",
    "KVGather",
    "QKVLinear",
    "TopkRouting",
    "bra_backend_report",
    "bra_forward_naive",
    "kv_gather_naive",
    "linear_cl",
    "resolve_backend",
    "routed_attention",
    "routed_attention_naive",
    "routed_attention_torch",
]
