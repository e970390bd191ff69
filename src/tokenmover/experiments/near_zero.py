"""Claim 2: KL is unstable when probabilities are near zero; W1 over a vocabulary metric is not.

Per context (a real SmolLM2 next-token distribution, logits ``y``), a token ``t`` is sampled from
it (seeded). Two scenarios push one logit down by ``delta`` nats (``delta`` in ``DELTAS``):

- ``ref``: the *reference* probability of the sampled token goes to 0: policy ``x = y``,
  reference ``y' = y - delta e_t``. KL(p || q) grows like ``p_t delta``.
- ``policy``: the *policy* probability of the sampled token goes to 0 (an off-policy / stale
  sample): ``x = y - delta e_t``, reference ``y``. TRL's k3 at ``t``, ``exp(r) - r - 1`` with
  ``r = log q_t - log p_t = delta``, grows like ``e^delta``.

For every penalty ``D`` and dtype (float32, bfloat16 logits), the gradient ``grad_x D`` with
respect to the policy logits is taken per position; reported: median and max L2 norm over
positions (the norm in float64, so that a finite gradient never reads as inf), and the number of
positions with a non-finite value or gradient entry.

Bound: for W1 under a metric of diameter ``diam`` (tree/forest/chains: ``2 max_u A(u)``, see
:func:`~tokenmover.experiments.common.diameter_bound`), the gradient in probability space is a
Kantorovich potential of range <= diam, so ``||grad_x W||_2 <= diam * ||p||_2 <= diam``,
whatever ``delta`` is.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from tokenmover.experiments import common

DELTAS = (0.0, 5.0, 10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 80.0, 100.0)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def pushed_logits(y: torch.Tensor, tokens: torch.Tensor, delta: float, scenario: str):
    """``(policy_logits, ref_logits)`` (n, V) for one scenario (see the module docstring)."""
    rows = torch.arange(y.shape[0])
    pushed = y.clone()
    pushed[rows, tokens] -= delta
    if scenario == "ref":
        return y.clone(), pushed
    if scenario == "policy":
        return pushed, y.clone()
    raise ValueError(f"scenario must be 'ref' or 'policy', got {scenario!r}")


def gradient_stats(fn, x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor) -> dict:
    """Per-position value and ``||grad_x D||_2`` of ``D = fn(x, y, tokens)`` (n,): summary dict."""
    x = x.detach().requires_grad_(True)
    vals = fn(x, y.detach(), tokens)  # (n,)
    vals.sum().backward()
    g = x.grad.double()  # (n, V) float64 so that the norm itself cannot overflow
    norms = g.norm(dim=-1)  # (n,)
    bad = (~torch.isfinite(vals.detach())) | (~torch.isfinite(g).all(-1))  # (n,)
    fin = norms[torch.isfinite(norms)]
    v = vals.detach().float()
    return {
        "median_grad": float(fin.median()) if fin.numel() else float("nan"),
        "max_grad": float(fin.max()) if fin.numel() else float("nan"),
        "median_value": float(v[torch.isfinite(v)].median()) if torch.isfinite(v).any() else float("nan"),
        "non_finite": int(bad.sum()),
        "n": int(vals.numel()),
    }


PLANS = {
    "quick": {"n_positions": 32, "geometries": ["word2vec"], "n_trees": 2, "sinkhorn": False},
    "full": {"n_positions": 128, "geometries": ["embeddings", "word2vec"], "n_trees": 4, "sinkhorn": True},
}


def run(*, quick: bool = False, out_dir: str | Path = "outputs/near_zero", seed: int = 0) -> Path:
    from tokenmover.assets import load_smollm2

    plan = PLANS["quick" if quick else "full"]
    t0 = time.perf_counter()
    common.say("loading SmolLM2-135M-Instruct")
    model, tokenizer = load_smollm2()
    model = model.float()
    texts = common.shakespeare_texts(plan["n_positions"] // 8 + 1, seed=seed)
    logits = torch.cat([lg for lg, _ in common.reference_positions(model, tokenizer, texts)])
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(logits.shape[0], generator=gen)[: plan["n_positions"]]
    y = logits[pick]  # (n, V) float32
    tokens = torch.multinomial(torch.softmax(y, -1), 1, generator=gen).reshape(-1)  # (n,)
    geoms = common.load_geometries(model, tokenizer, plan["geometries"])
    structures = common.build_structures(geoms, seed=seed, n_trees=plan["n_trees"])
    fns = common.penalty_fns(structures, geoms, sinkhorn=plan["sinkhorn"])
    bounds = {name: common.diameter_bound(s) for name, s in structures.items()}
    p_norm = torch.softmax(y, -1).norm(dim=-1)  # (n,)
    results = {}
    for scenario in ("ref", "policy"):
        for dname, dtype in DTYPES.items():
            for delta in DELTAS:
                x, yy = pushed_logits(y, tokens, delta, scenario)
                x, yy = x.to(dtype), yy.to(dtype)
                for name, fn in fns.items():
                    key = f"{scenario}|{dname}|{delta}|{name}"
                    try:
                        results[key] = gradient_stats(fn, x, yy, tokens)
                    except (ValueError, RuntimeError) as err:  # a refusal is a result too
                        results[key] = {"error": str(err)[:200], "non_finite": int(x.shape[0]),
                                        "median_grad": float("nan"), "max_grad": float("nan"),
                                        "median_value": float("nan"), "n": int(x.shape[0])}
            common.say(f"{scenario} {dname} done")
    data = {"plan": plan | {"seed": seed, "quick": quick, "deltas": list(DELTAS)}, "n_positions": int(y.shape[0]),
            "bounds": bounds, "max_p_norm": float(p_norm.max()), "results": results,
            "seconds": time.perf_counter() - t0, "environment": common.environment_note()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(data, list(fns), out / "grad_norms.png")
    return common.write_outputs(out, _markdown(data, list(fns), quick), data)


def _plot(d: dict, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(12, 8), sharex=True)
    for i, scenario in enumerate(("ref", "policy")):
        for j, dname in enumerate(DTYPES):
            ax = axes[i, j]
            for name in names:
                ys = [d["results"][f"{scenario}|{dname}|{delta}|{name}"]["max_grad"] for delta in DELTAS]
                ax.semilogy(DELTAS, np.maximum(np.array(ys, dtype=float), 1e-12), marker="o", ms=3, label=name)
            for b in d["bounds"].values():
                ax.axhline(b, color="gray", lw=0.6, ls=":")
            ax.set_title(f"{scenario} prob. of sampled token -> 0, {dname} logits")
            ax.set_xlabel("delta (nats pushed down)")
            ax.set_ylabel("max over positions of ||grad_x D||_2")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle("Gradient norms as a probability goes to 0 (dotted: W1 diameter bounds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(d: dict, names: list[str], quick: bool) -> str:
    cmd = "tokenmover experiment near_zero" + (" --quick" if quick else "")
    lines = [
        "# Near-zero probabilities: gradient norms and non-finite values", "",
        f"Regenerate: `{cmd}` (seed {d['plan']['seed']}, configuration `{'quick' if quick else 'full'}`: "
        f"{d['plan']}). Took {d['seconds']:.0f} s. {d['environment']}.", "",
        f"{d['n_positions']} real next-token distributions of SmolLM2-135M-Instruct (Shakespeare lines); "
        "one token sampled from each; its reference (scenario `ref`) or policy (scenario `policy`) logit "
        "pushed down by delta nats. Gradient w.r.t. the policy logits; k3 is evaluated at the sampled token.",
        "", "![gradient norms](grad_norms.png)", "",
        "W1 bounds (diameter of the structure's metric; ||grad_x W||_2 <= diam * ||p||_2, and max ||p||_2 "
        f"over these positions = {d['max_p_norm']:.3f}):", "",
        common.md_table(["structure", "diameter bound"], [[k, v] for k, v in d["bounds"].items()]), "",
    ]
    for scenario in ("ref", "policy"):
        for dname in DTYPES:
            lines += [f"## scenario `{scenario}`, {dname} logits: max ||grad|| (non-finite positions)", ""]
            rows = []
            for name in names:
                row = [name]
                for delta in DELTAS:
                    r = d["results"][f"{scenario}|{dname}|{delta}|{name}"]
                    cell = "error" if "error" in r else f"{r['max_grad']:.3g}"
                    row.append(cell + (f" ({r['non_finite']})" if r["non_finite"] else ""))
                rows.append(row)
            lines += [common.md_table(["penalty"] + [f"d={x:g}" for x in DELTAS], rows), ""]
    errors = {k: v["error"] for k, v in d["results"].items() if "error" in v}
    if errors:
        lines += ["## Refusals (ValueError/RuntimeError raised by the penalty)", ""]
        lines += [f"- `{k}`: {v}" for k, v in list(errors.items())[:20]]
    return "\n".join(lines) + "\n"
