"""Kernel options of :func:`~tokenmover.kernels.triton.tree_wasserstein_triton`: experimental.

``tree_wasserstein_triton(policy, ref, structure, mask)`` runs the defaults, which is what the
library does (``distance(..., backend="triton")``). :class:`TritonOptions` gathers every knob of
the kernels for benchmarks, tests and experiments; its fields, their defaults and their effects
may change in any release.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmover.kernels.triton.runtime import MAX_WORKSPACE_BYTES

ALGORITHMS = ("auto", "tiles", "levels", "scatter", "chains")
GRADIENT_MODES = ("backward", "forward")  # where "tiles" makes the gradient (see TritonOptions.gradient)
REQUESTABLE = ("sign_words", "fused_lse")  # "tiles" knobs that apply only to some calls (a True a caller set warns
# where it cannot apply: KnobNotAppliedWarning)


@dataclass(frozen=True)
class TritonOptions:
    """Experimental knobs of the Triton kernels; every field left at its default gives what
    :func:`~tokenmover.kernels.triton.tree_wasserstein_triton` runs without options. Whatever the
    knobs, the values and gradients are the same up to float rounding.

    Attributes:
        algorithm: the kernel family (:data:`ALGORITHMS`): ``"auto"`` (default) takes ``"tiles"``
            for structures whose members are all trees with at most ``MAX_LEVELS`` edge levels,
            ``"chains"`` for all-chain structures, else ``"scatter"``; ``"levels"`` runs the
            all-tree structures one program per row (:mod:`tokenmover.kernels.triton`).
        gradient: where the "tiles" kernels make the gradient (the other kernels always use
            ``"forward"``): ``"backward"`` (default) keeps ``S`` (N, E + 1) float32 plus
            references to both logit tensors and writes the scaled gradient in backward (one pass,
            nothing wasted under activation checkpointing, a retained graph can be reused);
            ``"forward"`` writes the gradient in forward in the logits' dtype and keeps only it
            (backward rescales it in place): less held memory when the caller frees its logits
            before backward.
        tune: ("tiles" only) pick ``block``, ``num_warps``, ``scan``, ``row_block``, ``chunk``,
            ``sign_words`` and ``fused_lse`` by timing a few candidates on this card and these
            rows, once per problem shape (:mod:`~tokenmover.kernels.triton.tuning`). ``None``
            (default): on CUDA when none of those seven is given and ``TOKENMOVER_TRITON_TUNE``
            is not ``0``; True: always (also on the CPU interpreter); False: never (the
            ``TILES_*`` defaults of :mod:`~tokenmover.kernels.triton.tiles`).
        block: positions per tile (default: the family's constant).
        num_warps: warps per program (default: the family's constant).
        chunk: positions per program of the tile-parallel families ("tiles", "chains").
        num_programs: persistent grid size of the one-program-per-row families ("levels",
            "scatter"; default a few programs per multiprocessor, within ``max_workspace_bytes``).
        edge_block, edge_warps: edges per tile and warps of the "tiles" edge launch.
        edge_stages: software-pipeline stages of the "tiles" edge loop (default 1: none).
        scan: prefix-scan form of the "tiles" prefix kernel (1-4, see ``prefix_kernel``).
        row_block: rows per "tiles" prefix program (a power of two; default 1): the member order,
            boundary indices and singleton weights are then read once for that many rows.
        sign_words: ("tiles" on logits in the tree's leaf order with a gradient for the policy
            only; default ``TILES_SIGN_WORDS``, True) forward also keeps ``sign(p - q)``, 2 bits
            a position (``V / 4`` bytes a row, until backward), and the gradient launch then
            reads the policy's logits but not the reference's: 4 bytes a position instead of 6
            for bf16 logits.
        fused_lse: ("tiles" on logits in the leaf order of one tree; default ``TILES_FUSED_LSE``,
            False) the log-sum-exp and prefix launches run as one, which reads the logits once
            for both: each program keeps its ``chunk`` of positions (``TILES_FUSED_CHUNK``, 2048,
            in tiles of ``block``, 256) in registers while it waits for the softmax partials of
            the row's other chunks.
        max_workspace_bytes: bound of the per-launch workspace (default 1 GiB); not of the
            gradients, nor of the "tiles" state kept for backward (``4 (E + 1)`` bytes a row).

    ``sign_words`` or ``fused_lse`` set True where it cannot apply (other logits, structures or
    kernels, the reference's gradient wanted for ``sign_words``, too few resident programs for
    ``fused_lse``) warns with the reason (:class:`~tokenmover.kernels.triton.KnobNotAppliedWarning`)
    and the call runs without it; left at None, each applies where it can without a word.
    """

    algorithm: str = "auto"
    gradient: str = "backward"
    tune: bool | None = None
    block: int | None = None
    num_warps: int | None = None
    chunk: int | None = None
    num_programs: int | None = None
    edge_block: int | None = None
    edge_warps: int | None = None
    edge_stages: int | None = None
    scan: int | None = None
    row_block: int | None = None
    sign_words: bool | None = None
    fused_lse: bool | None = None
    max_workspace_bytes: int = MAX_WORKSPACE_BYTES
