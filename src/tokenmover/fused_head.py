"""Re-exports :mod:`tokenmover.head` (hidden states -> LM head -> transport penalty, no TRL needed)
under the name the docs use; new code imports from :mod:`tokenmover.head`."""

from tokenmover.head import (
    GPU_CHUNK_BYTES,
    HiddenCapture,
    LogitHead,
    TransportTerm,
    adapter_free,
    backbone,
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
    "adapter_free",
    "backbone",
    "head_is_frozen",
    "leaf_order_pays",
    "leaf_order_view",
    "logits_vocab_size",
    "transport_chunk_size",
    "transport_from_hidden",
    "unwrap",
]
