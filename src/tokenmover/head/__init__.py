"""Hidden states -> LM head -> transport penalty, chunk by chunk, without TRL.

- :class:`LogitHead`: ``softcap(scale * lm_head(h)) / temperature``, optionally with the logit
  columns in a structure's leaf order (:mod:`tokenmover.head.logit_head`);
- :func:`transport_from_hidden`: the per-position penalty from policy and reference hidden
  states, no (N, V) logits held (:mod:`tokenmover.head.transport`);
- :func:`leaf_order_pays` / :func:`leaf_order_view`: when the leaf-order logits are used
  (:mod:`tokenmover.head.leaf_order`);
- :class:`HiddenCapture`, :func:`backbone`, :func:`unwrap`, :func:`adapter_free`,
  :func:`logits_vocab_size`: reading a Hugging Face model (:mod:`tokenmover.head.models`).
"""

from tokenmover.head.leaf_order import leaf_order_pays, leaf_order_view
from tokenmover.head.logit_head import LogitHead, head_is_frozen
from tokenmover.head.models import HiddenCapture, adapter_free, backbone, logits_vocab_size, unwrap
from tokenmover.head.transport import (
    GPU_CHUNK_BYTES,
    TransportTerm,
    transport_chunk_size,
    transport_from_hidden,
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
