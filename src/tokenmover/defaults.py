"""The defaults every pipeline starts from: one place decides the method, the geometry and the scale.

Measured on SmolLM2-135M-Instruct (``tokenmover geometry fidelity``, docs/geometry.md):

- **geometry**: the model's input embeddings after all-but-the-top(2) (centre, remove the top 2
  principal directions), unit-normalised, Euclidean. Its Spearman with SimLex-999 human
  similarity is 0.52 (raw embeddings 0.38, word2vec on Shakespeare lower still);
- **method**: ``hybrid`` with ``k = 16``: exact W1 under that ground metric on the union of both
  distributions' top-16 tokens, a cluster tree for the tail mass. It keeps all of the ground
  metric's SimLex-999 and WordNet-synonym signal between point masses (a tree alone: 14% / 31%)
  at about KL's cost on a CPU;
- **scale**: every structure is scaled to the ground metric (median tree / ground distance 1 over
  random token pairs, :func:`tokenmover.geometry.quality.scaled_to_ground`), so tree, forest,
  sliced and hybrid penalties share one unit and a coefficient means the same for each.

The RL trainer's config (:class:`tokenmover.rl.TrainConfig`), the TRL adapters' ``transport_*``
fields and the demo read these names.
"""

from __future__ import annotations

DEFAULT_METHOD = "hybrid"
DEFAULT_TOP_K = 16
DEFAULT_GEOMETRY = "embeddings"
DEFAULT_ABTT = 2
DEFAULT_SCALE_TO_GROUND = True


def embedding_geometry(model, which: str = "input", *, abtt: int = DEFAULT_ABTT, tokenizer=None):
    """A model's embedding rows as a :class:`~tokenmover.geometry.VocabGeometry`, after
    all-but-the-top(``abtt``) (``abtt=0`` keeps the raw rows)."""
    from tokenmover.geometry import VocabGeometry

    if isinstance(abtt, bool) or not isinstance(abtt, int) or abtt < 0:
        raise ValueError(f"abtt must be an integer >= 0, got {abtt!r}")
    geometry = VocabGeometry.from_model(model, which, tokenizer=tokenizer)
    return geometry.all_but_the_top(abtt) if abtt else geometry


def method_inputs(method: str, geometry, structure, *, top_k: int = DEFAULT_TOP_K,
                  scale_to_ground: bool = DEFAULT_SCALE_TO_GROUND, seed: int = 0) -> dict:
    """Keyword arguments of :func:`tokenmover.distance` for ``method`` on a built ``structure``.

    ``structure`` is scaled to ``geometry``'s ground metric when ``scale_to_ground`` (and a
    geometry is given); ``hybrid`` also gets ``geometry=`` and ``k=top_k``.
    """
    from tokenmover.distances.api import METHODS

    kwargs: dict = {}
    spec = METHODS[method]
    if "structure" in spec.needs and structure is not None:
        if scale_to_ground and geometry is not None and "ground_scale" not in structure.metadata:
            from tokenmover.geometry.quality import scaled_to_ground

            structure = scaled_to_ground(structure, geometry, seed=seed)
        kwargs["structure"] = structure
    if method == "hybrid":
        if geometry is None:
            raise ValueError("method 'hybrid' needs a geometry (its ground metric on the top-k support)")
        kwargs["geometry"] = geometry
        kwargs["k"] = top_k
    return kwargs
