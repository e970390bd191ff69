"""One entry point for every distance: ``tokenmover.distance(policy_logits, ref_logits, method=...)``."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from tokenmover.distances import exact as _exact
from tokenmover.distances import hybrid as _hybrid
from tokenmover.distances import kl as _kl
from tokenmover.distances import sinkhorn as _sinkhorn
from tokenmover.distances import tree as _tree
from tokenmover.distances import vocab_parallel as _vocab_parallel
from tokenmover.distances._inputs import check_not_probabilities, flatten_inputs


@dataclass(frozen=True)
class Method:
    """A registered distance: its function, what it needs, and one line of help."""

    fn: Callable[..., torch.Tensor]
    needs: tuple[str, ...]  # keyword arguments of distance() the method requires ("structure", ...)
    accepts: tuple[str, ...]  # optional keyword arguments it takes
    differentiable: bool
    help: str


METHODS: dict[str, Method] = {}


def register_method(name: str, method: Method) -> None:
    """Add a method to :func:`distance` (and to everything built on it, e.g. the regularizer)."""
    if name in METHODS:
        raise ValueError(f"method {name!r} is already registered")
    METHODS[name] = method


def _tree_method(policy_logits, ref_logits, structure, *, process_group=None, **kwargs) -> torch.Tensor:
    """The tree methods: on full logits, or, with ``process_group``, on this rank's vocabulary shard
    (:func:`tokenmover.distances.vocab_parallel.vocab_parallel_tree_wasserstein`)."""
    if process_group is not None:
        return _vocab_parallel.vocab_parallel_tree_wasserstein(
            policy_logits, ref_logits, structure, process_group=process_group, **kwargs
        )
    return _tree.tree_wasserstein(policy_logits, ref_logits, structure, **kwargs)


_TREE_ACCEPTS = ("backend", "process_group")
register_method(
    "tree",
    Method(_tree_method, ("structure",), _TREE_ACCEPTS, True,
           "exact W1 under the tree metric of one tree (kind 'tree', or a one-member forest); needs structure="),
)
register_method(
    "forest",
    Method(_tree_method, ("structure",), _TREE_ACCEPTS, True,
           "average of exact tree W1 over the trees of a forest (kind 'forest', or one tree); needs structure="),
)
register_method(
    "sliced",
    Method(
        _tree_method,
        ("structure",),
        _TREE_ACCEPTS,
        True,
        "sliced W1 on fixed support: average 1-D W1 over the chains of build_chains() (kind 'chains'); "
        "needs structure=",
    ),
)
register_method(
    "exact",
    Method(
        _exact.exact_wasserstein,
        (),
        ("cost", "points", "max_tokens", "num_iter_max"),
        False,
        "exact W1 by network simplex (POT), small V only, no gradient; needs cost= or points=",
    ),
)
register_method(
    "sinkhorn",
    Method(
        _sinkhorn.sinkhorn_wasserstein,
        (),
        ("points", "geometry", "k", "epsilon", "objective", "tail", "dust_cost", "metric", "grad",
         "formulation", "tol", "max_iter", "scaling", "stats"),
        True,
        "entropic OT on the union of both top-k supports, tail mass kept (Sinkhorn divergence between "
        "(p-q)+ and (q-p)+ by default); needs points= (V, d) or geometry=",
    ),
)
register_method(
    "hybrid",
    Method(
        _hybrid.hybrid_wasserstein,
        ("structure",),
        ("points", "geometry", "metric", "k", "backend"),
        True,
        "exact W1 under the ground metric on the union of both top-k supports, the tree for the tail mass "
        "(exact for moves among likely tokens); needs structure= and points= (V, d) or geometry=",
    ),
)
register_method("kl", Method(_kl.kl, (), (), True, "full KL(policy || reference)"))
register_method("reverse_kl", Method(_kl.reverse_kl, (), (), True, "full KL(reference || policy)"))
register_method("js", Method(_kl.js, (), (), True, "Jensen-Shannon divergence (nats)"))
register_method("k1", Method(_kl.k1, ("tokens",), (), True, "sampled-token KL estimator log pi - log pi_ref"))
register_method("k2", Method(_kl.k2, ("tokens",), (), True, "sampled-token KL estimator (log ratio)^2 / 2"))
register_method("k3", Method(_kl.k3, ("tokens",), (), True, "sampled-token KL estimator exp(r) - r - 1 (TRL GRPO)"))


# distance()'s own keyword arguments, beside each method's (named in messages about unknown ones)
DISTANCE_KEYWORDS = ("mask", "chunk_size", "allow_probability_like_logits")


def check_method_arguments(method: str, given: dict, *, own: Iterable[str] = DISTANCE_KEYWORDS,
                           ignore_missing: Iterable[str] = ()) -> None:
    """Raise ``ValueError`` for a keyword ``method`` does not take (naming it, with the closest valid
    one), then for one it needs that is missing or None (``ignore_missing``: given later, at call time).

    ``given``: the method's keyword arguments; ``own``: the caller's keywords, also suggested.
    """
    spec = METHODS[method]
    takes = sorted(set(spec.needs) | set(spec.accepts))
    unknown = sorted(set(given) - set(takes))
    if unknown:
        valid = sorted(set(takes) | set(own))
        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            if close:
                hints.append(f"did you mean {close[0]}= instead of {name}=?")
        hint = f" ({'; '.join(hints)})" if hints else ""
        takes_text = ", ".join(f"{k}=" for k in takes) or "no method keyword"
        raise ValueError(
            f"method {method!r} does not take {unknown}{hint}; it takes {takes_text} "
            f"(besides {', '.join(f'{k}=' for k in own)})"
        )
    missing = [k for k in spec.needs if k not in set(ignore_missing) and given.get(k) is None]
    if missing:
        raise ValueError(f"method {method!r} needs {', '.join(f'{k}=' for k in missing)} ({spec.help})")


def distance(
    policy_logits: torch.Tensor,
    ref_logits: torch.Tensor,
    method: str = "tree",
    *,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
    allow_probability_like_logits: bool = False,
    **kwargs,
) -> torch.Tensor:
    """Per-position distance between the policy's and the reference's next-token distributions.

    Args:
        policy_logits: (..., V) logits of the policy (float16/bfloat16/float32/float64).
        ref_logits: (..., V) logits of the reference, same shape.
        method: one of ``tokenmover.METHODS`` (see ``available_methods()``). Default ``"tree"``.
        mask: optional (...) boolean; False positions get 0 and no gradient.
        chunk_size: positions processed at a time; peak extra memory is O(chunk_size * V).
        allow_probability_like_logits: skip the check that refuses inputs that are plainly
            probabilities (a few rows, each in [0, 1] and summing to 1: see
            :func:`~tokenmover.distances._inputs.check_not_probabilities`). Default False: pass
            logits or log-probabilities (``softmax(log p) = p``), never probabilities.
        **kwargs: what the method needs or accepts: ``structure`` (tree/forest/sliced; its
            ``kind`` must suit the method, :data:`tokenmover.distances.tree.METHOD_KINDS`),
            ``tokens`` (k1/k2/k3: sampled ids, shape (...)), ``cost`` or ``points`` (exact),
            ``backend`` ("auto" | "numba" | "torch" for tree methods), ``process_group`` (tree
            methods: the logits are this rank's slice of a vocabulary sharded over the group, in the
            structure's leaf order; see :mod:`tokenmover.distances.vocab_parallel`), ...

    Returns:
        (...) tensor: float32 (float64 for float64 logits), differentiable w.r.t. the logits,
        for every method except ``exact``, which returns float64 whatever the logits' dtype (a
        reference, solved in float64) and no gradient.

    Raises:
        ValueError: an unknown method or keyword (naming the closest valid one), a missing one, a
            structure of a kind the method does not run on, inputs that are plainly probabilities,
            and whatever the method refuses (shapes, dtypes, NaN, ...).
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of: {', '.join(sorted(METHODS))}")
    spec = METHODS[method]
    check_method_arguments(method, kwargs)
    if method in _tree.METHOD_KINDS:
        _tree.check_structure_kind(method, kwargs["structure"])
    if not allow_probability_like_logits:
        check_not_probabilities(flatten_inputs(policy_logits, ref_logits, mask))
    if method == "exact":
        return spec.fn(policy_logits, ref_logits, mask=mask, **kwargs)
    return spec.fn(policy_logits, ref_logits, mask=mask, chunk_size=chunk_size, **kwargs)


def available_methods() -> dict[str, str]:
    """Method name -> one line of help."""
    return {name: m.help for name, m in sorted(METHODS.items())}
