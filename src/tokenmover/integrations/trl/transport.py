"""Re-exports :mod:`tokenmover.fused_head` (its home before session 5 of the GPU work): the
transport term from hidden states needs no TRL, so it lives outside this package."""

from tokenmover.fused_head import (
    GPU_CHUNK_BYTES,
    HiddenCapture,
    LogitHead,
    TransportTerm,
    backbone,
    build_regularizer,
    completion_hidden,
    global_masked_mean,
    global_max,
    head_is_frozen,
    leaf_order_pays,
    leaf_order_view,
    logits_vocab_size,
    transport_chunk_size,
    transport_from_hidden,
    unwrap,
)

__all__ = [
    "GPU_CHUNK_BYTES",
    "HiddenCapture",
    "LogitHead",
    "TransportTerm",
    "backbone",
    "build_regularizer",
    "completion_hidden",
    "global_masked_mean",
    "global_max",
    "head_is_frozen",
    "leaf_order_pays",
    "leaf_order_view",
    "logits_vocab_size",
    "transport_chunk_size",
    "transport_from_hidden",
    "unwrap",
]
