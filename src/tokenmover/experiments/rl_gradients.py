"""Claim 2 during RL: the distribution of per-token penalty gradients along a short GRPO run.

:mod:`~tokenmover.experiments.near_zero` pushes one logit by hand; here the probabilities come from
a real run. SmolLM2-135M-Instruct (float32) is trained with :class:`tokenmover.rl.GRPOTrainer` on
the VADER reward, **unregularized** (``beta = 0``, method ``k3``: the penalty is only logged, so the
policy drifts as far as the reward takes it), in one run that is paused at the plan's checkpoints
(``trainer.train(max_steps=...)`` continues where it stopped: one run, not one per checkpoint).

At every checkpoint, completions of held-out prompts (:data:`rl_frontier.HELD_OUT_PROMPTS`, fixed
sampling seeds, the trainer's own per-row sampler) are teacher-forced through the policy ``pi`` and
the frozen reference ``pi_ref``, and for **every completion token** the gradient with respect to
the policy logits of each penalty is taken: full KL(pi || pi_ref) over the vocabulary, JS, TRL's k3
at the sampled token, and W1 under the word2vec tree / forest (as :mod:`rl_frontier` builds them),
with the logits in float32 and rounded to bfloat16. Three sources of tokens:

- ``on_policy``: sampled from the current policy (what GRPO scores when every batch is fresh);
- ``stale``: the previous checkpoint's on-policy samples (replay / several updates per batch);
- ``reference``: sampled from ``pi_ref`` (the most off-policy case; equals ``stale`` at the first
  checkpoint after 0, and ``on_policy`` at step 0).

Per (checkpoint, source, dtype, penalty): percentiles 50/90/99 and max of the per-token
``||grad_x D||_2`` (norm in float64 as in ``near_zero``; tokens whose gradient has a non-finite entry
are left out of the percentiles and counted), tokens with a non-finite value or gradient, the
largest value, and for W1 the per-token bound ``diam * ||p||_2`` (``p`` = the policy's distribution
at the token, ``diam`` = :func:`common.diameter_bound`) with the largest ratio norm / bound. Also the
log-ratio ``r = log pi_ref(t) - log pi(t)`` of the sampled tokens, which drives k3
(``d k3 / d x = -(e^r - 1)(e_t - p)``).

Plans (``PLANS``): ``quick`` (checkpoints 0/5/10/20, 8 held-out prompts x 4 seeds, word2vec tree
and forest of 2 trees) and ``full`` (checkpoints up to 80 steps, 8 seeds, both geometries,
forest of 4 trees and sliced; not run). The quick run took 48.5 min wall on 2 CPU cores shared with
two other RL jobs (load average 4-5; median 88 s per GRPO step, against 8.2 s measured by the
``rl_frontier`` quick run on a quieter machine); scaled by that step-time ratio it would take about
5 min, not measured. ``render(out_dir)`` rewrites the report and the PNG from ``results.json``.
"""

from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenmover.experiments import common

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SOURCES = ("on_policy", "stale", "reference")
BASE_PENALTIES = ("kl", "k3", "js")
PERCENTILES = (50, 90, 99)

PLANS = {
    "quick": {
        "checkpoints": [0, 5, 10, 20],
        "reward": "vader",
        "learning_rate": 3e-5,
        "prompts_per_step": 2,
        "num_generations": 8,
        "max_new_tokens": 16,
        "eval_prompts": 8,
        "eval_seeds": [0, 1, 2, 3],
        "geometries": ["word2vec"],
        "kinds": ["tree", "forest"],
        "n_trees": 2,
        "dtypes": ["float32", "bfloat16"],
    },
    "full": {
        "checkpoints": [0, 5, 10, 20, 40, 80],
        "reward": "vader",
        "learning_rate": 3e-5,
        "prompts_per_step": 2,
        "num_generations": 8,
        "max_new_tokens": 16,
        "eval_prompts": 8,
        "eval_seeds": list(range(8)),
        "geometries": ["embeddings", "word2vec"],
        "kinds": ["tree", "forest", "sliced"],
        "n_trees": 4,
        "dtypes": ["float32", "bfloat16"],
    },
}


def validate_plan(plan: dict) -> dict:
    """Check a plan; return it with sorted checkpoints. ValueError naming the first problem."""
    from tokenmover.experiments.rl_frontier import HELD_OUT_PROMPTS

    need = ("checkpoints", "reward", "learning_rate", "prompts_per_step", "num_generations", "max_new_tokens",
            "eval_prompts", "eval_seeds", "geometries", "kinds", "n_trees", "dtypes")
    missing = [k for k in need if k not in plan]
    if missing:
        raise ValueError(f"plan is missing {missing}")
    cps = [int(c) for c in plan["checkpoints"]]
    if not cps or len(set(cps)) != len(cps) or min(cps) < 0:
        raise ValueError(f"checkpoints must be distinct steps >= 0, got {plan['checkpoints']}")
    bad = [d for d in plan["dtypes"] if d not in DTYPES]
    if bad or not plan["dtypes"]:
        raise ValueError(f"dtypes must be a non-empty subset of {tuple(DTYPES)}, got {plan['dtypes']}")
    bad = [k for k in plan["kinds"] if k not in ("tree", "forest", "sliced")]
    if bad:
        raise ValueError(f"kinds must be among tree, forest, sliced, got {plan['kinds']}")
    bad = [g for g in plan["geometries"] if g not in ("embeddings", "word2vec")]
    if bad:
        raise ValueError(f"geometries must be among embeddings, word2vec, got {plan['geometries']}")
    if not plan["eval_seeds"] or not 1 <= plan["eval_prompts"] <= len(HELD_OUT_PROMPTS):
        raise ValueError(f"need eval seeds and 1..{len(HELD_OUT_PROMPTS)} eval prompts")
    if plan["num_generations"] < 2:
        raise ValueError("GRPO needs num_generations >= 2 (group-normalised advantages)")
    for k in ("prompts_per_step", "max_new_tokens", "n_trees"):
        if int(plan[k]) < 1:
            raise ValueError(f"plan {k} must be >= 1, got {plan[k]}")
    return plan | {"checkpoints": sorted(cps)}


# ----------------------------------------------------------------------------- per-token gradients
@dataclass
class TokenGradients:
    """Per token (n,): the penalty's value, ``||grad_x D||_2`` (float64; NaN where the gradient has a
    non-finite entry) and whether value or gradient is non-finite."""

    values: np.ndarray
    norms: np.ndarray
    bad: np.ndarray


def per_token_gradients(fn, x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor, *,
                        chunk_size: int = 256) -> TokenGradients:
    """Value and gradient norm of ``D = fn(x, y, tokens)`` (n,) w.r.t. the policy logits ``x`` (n, V).

    Each position's penalty depends only on its own row, so ``grad sum_i D_i`` gives every
    position's own gradient; rows are processed ``chunk_size`` at a time to bound memory.
    """
    values, norms, bad = [], [], []
    for start in range(0, x.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        xc = x[sl].detach().clone().requires_grad_(True)
        vals = fn(xc, y[sl].detach(), tokens[sl])  # (c,)
        vals.sum().backward()
        g = xc.grad.double()  # (c, V): float64 so that the norm itself cannot overflow
        finite_g = torch.isfinite(g).all(-1)  # (c,)
        nrm = torch.where(finite_g, g.norm(dim=-1), torch.full_like(finite_g, float("nan"), dtype=torch.float64))
        v = vals.detach().double()
        values.append(v.numpy())
        norms.append(nrm.numpy())
        bad.append(((~torch.isfinite(v)) | (~finite_g)).numpy())
    return TokenGradients(np.concatenate(values), np.concatenate(norms), np.concatenate(bad))


def summarize(tg: TokenGradients, bounds: np.ndarray | None = None) -> dict:
    """Percentiles (:data:`PERCENTILES`) and max of the finite per-token gradient norms, non-finite
    count, largest finite value; with per-token ``bounds`` (n,), the largest norm / bound and the
    number of tokens above their bound (relative slack 1e-4)."""
    fin = tg.norms[np.isfinite(tg.norms)]
    vals = tg.values[np.isfinite(tg.values)]
    out = {f"p{q}": float(np.percentile(fin, q)) if fin.size else float("nan") for q in PERCENTILES}
    out |= {
        "max": float(fin.max()) if fin.size else float("nan"),
        "non_finite": int(tg.bad.sum()),
        "n": int(tg.norms.size),
        "max_value": float(vals.max()) if vals.size else float("nan"),
    }
    if bounds is not None:
        ok = np.isfinite(tg.norms)
        ratio = tg.norms[ok] / np.maximum(bounds[ok], 1e-300)
        out["max_bound"] = float(bounds.max()) if bounds.size else float("nan")
        out["max_ratio_to_bound"] = float(ratio.max()) if ratio.size else float("nan")
        out["above_bound"] = int((tg.norms[ok] > bounds[ok] * (1 + 1e-4) + 1e-12).sum())
    return out


def log_ratios(x: torch.Tensor, y: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """``log pi_ref(t) - log pi(t)`` of each sampled token (n,), float64 (k3's ``r``)."""
    lp = torch.log_softmax(x.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    lq = torch.log_softmax(y.double(), -1).gather(-1, tokens[:, None]).squeeze(-1)
    return (lq - lp).numpy()


def ratio_summary(r: np.ndarray) -> dict:
    """Median, p99, max of ``r`` and how many tokens have ``r > 2, 5, 10`` (pi_ref / pi > e^2, ...)."""
    if r.size == 0:
        return {"n": 0}
    return {"n": int(r.size), "p50": float(np.median(r)), "p99": float(np.percentile(r, 99)),
            "max": float(r.max()), "min": float(r.min()),
            "above_2": int((r > 2).sum()), "above_5": int((r > 5).sum()), "above_10": int((r > 10).sum())}


# ----------------------------------------------------------------------------- teacher forcing
@torch.no_grad()
def token_logits(policy, ref, samples, *, micro_batch: int = 8):
    """Teacher-force ``samples`` (:class:`rl_frontier.HeldOutSamples`) through both models: policy
    logits (n, V), reference logits (n, V), both float32, and the tokens (n,), over completion tokens."""
    from tokenmover.rl.sampling import completion_logits

    xs, ys, ts = [], [], []
    modes = (policy.training, ref.training)
    policy.eval()
    ref.eval()
    try:
        for start in range(0, samples.completion_ids.shape[0], micro_batch):
            sl = slice(start, start + micro_batch)
            args = (samples.prompt_ids[sl], samples.prompt_mask[sl], samples.completion_ids[sl],
                    samples.completion_mask[sl])
            m = samples.completion_mask[sl]  # (b, C)
            xs.append(completion_logits(policy, *args).float()[m])  # (k, V)
            ys.append(completion_logits(ref, *args).float()[m])  # (k, V)
            ts.append(samples.completion_ids[sl][m])  # (k,)
    finally:
        policy.train(modes[0])
        ref.train(modes[1])
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


def measure(policy, ref, samples, fns: dict, diameters: dict, dtypes=("float32", "bfloat16"), *,
            keep_norms: bool = False) -> dict:
    """Everything reported for one (checkpoint, source): per dtype and penalty :func:`summarize`,
    the log-ratio summary, the token with the largest k3 gradient, and (``keep_norms``) the raw
    per-token norms. ``diameters``: penalty name -> diameter of its metric (W1 penalties only)."""
    x, y, tokens = token_logits(policy, ref, samples)
    r = log_ratios(x, y, tokens)
    out = {"n_tokens": int(tokens.numel()), "log_ratio": ratio_summary(r), "stats": {}, "norms": {}}
    for dname in dtypes:
        xd, yd = x.to(DTYPES[dname]), y.to(DTYPES[dname])
        p_norm = torch.softmax(xd.double(), -1).norm(dim=-1).numpy()  # (n,) of the p the penalty sees
        for name, fn in fns.items():
            try:
                tg = per_token_gradients(fn, xd, yd, tokens)
            except (ValueError, RuntimeError) as err:  # a refusal is a result too
                out["stats"][f"{dname}|{name}"] = {"error": str(err)[:200], "n": int(tokens.numel()),
                                                   "non_finite": int(tokens.numel())}
                continue
            bounds = diameters[name] * p_norm if name in diameters else None
            out["stats"][f"{dname}|{name}"] = summarize(tg, bounds)
            if keep_norms:
                out["norms"][f"{dname}|{name}"] = [float(f"{v:.4g}") for v in tg.norms]
            if name == "k3" and dname == "float32" and np.isfinite(tg.norms).any():
                i = int(np.nanargmax(tg.norms))
                out["worst_k3"] = {"token_id": int(tokens[i]), "log_ratio": float(r[i]), "grad": float(tg.norms[i]),
                                   "p": float(torch.softmax(x[i].double(), -1)[tokens[i]]),
                                   "q": float(torch.softmax(y[i].double(), -1)[tokens[i]])}
    return out


# ----------------------------------------------------------------------------- the run
def train_and_measure(base, ref, tokenizer, fns: dict, diameters: dict, plan: dict, *, train_prompts: list[str],
                      eval_prompts: list[str], seed: int = 0, config_overrides: dict | None = None) -> dict:
    """One unregularized GRPO run from a copy of ``base``, paused at each checkpoint of the (validated)
    ``plan`` to :func:`measure` the three sources. Returns ``{"checkpoints": [...], "history": [...]}``."""
    from tokenmover.experiments.rl_frontier import sample_held_out
    from tokenmover.rl.config import GRPOConfig
    from tokenmover.rl.trainer import GRPOTrainer

    cps = plan["checkpoints"]
    seeds = list(plan["eval_seeds"])
    ref_samples = sample_held_out(ref, tokenizer, eval_prompts, seeds, plan["max_new_tokens"])
    out = {"checkpoints": [], "history": []}
    with tempfile.TemporaryDirectory(prefix="rl_gradients_") as tmp:
        values = dict(model_name_or_path="smollm2", prompts=list(train_prompts), reward_funcs=[plan["reward"]],
                      method="k3", beta=0.0, max_steps=max(max(cps), 1), learning_rate=plan["learning_rate"],
                      prompts_per_step=plan["prompts_per_step"], num_generations=plan["num_generations"],
                      max_new_tokens=plan["max_new_tokens"], micro_batch_size=8, seed=seed,
                      save_steps=-1, save_final_model=False, report_to=[], output_dir=tmp, disable_progress_bar=True)
        values.update(config_overrides or {})
        cfg = GRPOConfig(**values)
        policy = copy.deepcopy(base).train()
        trainer = GRPOTrainer(cfg, model=policy, tokenizer=tokenizer, ref_model=ref, progress=False)
        previous = None
        for step in cps:
            if step > trainer.step:
                t = time.perf_counter()
                trainer.train(max_steps=step - trainer.step)
                common.say(f"trained to step {trainer.step} in {time.perf_counter() - t:.0f} s "
                           f"(reward {trainer.history[-1]['reward']:.3f}, kl {trainer.history[-1]['kl']:.3f})")
            model = trainer.accelerator.unwrap_model(trainer.model)
            t = time.perf_counter()
            on = ref_samples if trainer.step == 0 else sample_held_out(model, tokenizer, eval_prompts, seeds,
                                                                        plan["max_new_tokens"])
            row = {"step": trainer.step, "sources": {}}
            last = step == cps[-1]
            for source, samples in (("on_policy", on), ("stale", previous), ("reference", ref_samples)):
                if samples is None:
                    continue
                row["sources"][source] = measure(model, ref, samples, fns, diameters, plan["dtypes"],
                                                 keep_norms=last)
            row["stale_from"] = out["checkpoints"][-1]["step"] if out["checkpoints"] else None
            row["measure_seconds"] = time.perf_counter() - t
            row["example_completion"] = on.texts[0]
            common.say(f"measured step {trainer.step} in {row['measure_seconds']:.0f} s")
            out["checkpoints"].append(row)
            previous = on
        out["history"] = [{k: float(v) for k, v in h.items() if isinstance(v, (int, float))}
                          for h in trainer.history]
    return out


def run(*, quick: bool = False, out_dir: str | Path = "outputs/rl_gradients", seed: int = 0,
        plan: dict | None = None) -> Path:
    """Train, measure, write ``report.md``, ``results.json`` and ``grad_distributions.png``.

    ``seed`` seeds the training run and the tree/forest structures; ``plan`` overrides ``quick``."""
    from tokenmover.assets import load_smollm2
    from tokenmover.experiments.rl_frontier import HELD_OUT_PROMPTS, TRAIN_PROMPTS

    name = "custom" if plan is not None else ("quick" if quick else "full")
    plan = validate_plan(plan if plan is not None else PLANS[name])
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    common.say("loading SmolLM2-135M-Instruct")
    base, tokenizer = load_smollm2()
    base = base.float()
    geoms = common.load_geometries(base, tokenizer, plan["geometries"])
    structures = common.build_structures(geoms, tuple(plan["kinds"]), seed=seed, n_trees=plan["n_trees"])
    fns = {k: v for k, v in common.penalty_fns(structures, geoms, sinkhorn=False).items()
           if k in BASE_PENALTIES or k in structures}
    diameters = {k: common.diameter_bound(s) for k, s in structures.items()}
    ref = copy.deepcopy(base).eval()
    result = train_and_measure(base, ref, tokenizer, fns, diameters, plan, train_prompts=list(TRAIN_PROMPTS),
                               eval_prompts=HELD_OUT_PROMPTS[: plan["eval_prompts"]], seed=seed)
    for cp in result["checkpoints"]:
        for src in cp["sources"].values():
            if "worst_k3" in src:
                src["worst_k3"]["token"] = tokenizer.decode([src["worst_k3"]["token_id"]])
    data = {"plan_name": name, "plan": plan | {"seed": seed}, "penalties": list(fns), "diameters": diameters,
            **result, "seconds": time.perf_counter() - t0, "environment": common.environment_note()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot(data, out / "grad_distributions.png")
    return common.write_outputs(out, markdown(data), data)


# ----------------------------------------------------------------------------- report
def render(out_dir: str | Path = "outputs/rl_gradients") -> Path:
    """Rewrite ``report.md`` and the PNG from an existing ``results.json`` (no training)."""
    import json

    out = Path(out_dir)
    data = json.loads((out / "results.json").read_text(encoding="utf-8"))
    plot(data, out / "grad_distributions.png")
    (out / "report.md").write_text(markdown(data), encoding="utf-8")
    return out / "report.md"


def plot(d: dict, path: Path) -> None:
    """Top row: survival curves (fraction of tokens with ||grad|| > g, log-log) at the last checkpoint,
    float32, one panel per source, one line per penalty, W1 bounds dotted. Bottom row: max and p99
    of ||grad|| against the training step, per source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = d["penalties"]
    last = d["checkpoints"][-1]
    colors = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    fig, axes = plt.subplots(2, len(SOURCES), figsize=(5.2 * len(SOURCES), 8.5), squeeze=False)
    for j, source in enumerate(SOURCES):
        ax = axes[0, j]
        src = last["sources"].get(source)
        if src is None:
            ax.text(0.5, 0.5, "no samples", ha="center", transform=ax.transAxes)
        else:
            for name in names:
                g = np.array(src["norms"].get(f"float32|{name}", []), dtype=float)
                nbad = int(np.sum(~np.isfinite(g)))
                g = np.sort(np.maximum(g[np.isfinite(g)], 1e-12))
                if g.size == 0:
                    continue
                surv = 1.0 - np.arange(g.size) / (g.size + nbad)
                label = name + (f" ({nbad} non-finite)" if nbad else "")
                ax.loglog(g, surv, color=colors[name], label=label, lw=1.4)
            for name in d["diameters"]:
                st = src["stats"].get(f"float32|{name}", {})
                if "max_bound" in st:
                    ax.axvline(st["max_bound"], color=colors[name], lw=0.8, ls=":",
                               label=f"{name} bound max diam*||p||")
        ax.set_title(f"{source} tokens, step {last['step']} (float32 logits)", fontsize=10)
        ax.set_xlabel("per-token ||grad_x D||_2")
        ax.set_ylabel("fraction of tokens with a larger gradient")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
        ax = axes[1, j]
        for name in names:
            pts = [(cp["step"], cp["sources"][source]["stats"][f"float32|{name}"]) for cp in d["checkpoints"]
                   if source in cp["sources"] and cp["step"] > 0]  # step 0: policy = reference, all ~0
            pts = [(s, st) for s, st in pts if "error" not in st]
            if not pts:
                continue
            steps = [s for s, _ in pts]
            ax.semilogy(steps, [max(st["max"], 1e-12) for _, st in pts], marker="o", ms=3, color=colors[name],
                        label=f"{name} max")
            ax.semilogy(steps, [max(st["p99"], 1e-12) for _, st in pts], ls="--", color=colors[name], lw=0.9)
        ax.set_title(f"{source}: max (solid) and p99 (dashed) over tokens, steps > 0", fontsize=10)
        ax.set_xlabel("GRPO step (beta = 0)")
        ax.set_ylabel("||grad_x D||_2")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle("Per-token penalty gradients w.r.t. the policy logits during unregularized GRPO on SmolLM2 "
                 "(dotted: the largest W1 bound diam * ||p||_2)", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _cell(st: dict, key: str) -> str:
    if "error" in st:
        return "error"
    v = st.get(key, float("nan"))
    return "nan" if v != v else f"{v:.3g}"


def markdown(d: dict) -> str:
    plan, names = d["plan"], d["penalties"]
    name = d["plan_name"]
    cmd = {"quick": "tokenmover experiment rl_gradients --quick", "full": "tokenmover experiment rl_gradients"}.get(
        name, "python -c 'from tokenmover.experiments import rl_gradients; rl_gradients.run(plan=...)'")
    last = d["checkpoints"][-1]
    n_eval = plan["eval_prompts"] * len(plan["eval_seeds"])
    hist = d["history"]
    step_s = float(np.median([h["step_time"] for h in hist])) if hist else float("nan")
    lines = [
        f"# Per-token penalty gradients during a short GRPO run (plan `{name}`)", "",
        f"Regenerate: `{cmd}` (seed {plan['seed']}). Took {d['seconds']:.0f} s wall ({d['seconds'] / 60:.1f} min); "
        f"median {step_s:.1f} s per GRPO step. {d['environment']}.", "",
        f"Configuration `{name}`: {plan}.", "",
        f"GRPO on SmolLM2-135M-Instruct (float32, CPU), reward `{plan['reward']}`, **beta = 0** (method k3 only "
        f"logged), {plan['prompts_per_step']} prompts x {plan['num_generations']} completions x <= "
        f"{plan['max_new_tokens']} tokens per step, learning rate {plan['learning_rate']}; one run paused at steps "
        f"{plan['checkpoints']}. At each checkpoint {plan['eval_prompts']} held-out prompts x "
        f"{len(plan['eval_seeds'])} sampling seeds = {n_eval} completions are teacher-forced through the policy and "
        "the reference; every completion token counts. Sources of tokens: `on_policy` (sampled from the current "
        "policy), `stale` (the previous checkpoint's on-policy samples: replay / several updates per batch; at the "
        "first checkpoint after 0 these are the reference's samples), `reference` (sampled from the reference: the "
        "most off-policy case). Gradient w.r.t. the policy logits, L2 norm per token in float64; bfloat16 = the "
        "same logits rounded to bfloat16. k3 is TRL's estimator at the sampled token; KL and JS are full over the "
        "vocabulary; W1 penalties on the structures named (diameters: "
        + ", ".join(f"{k} {v:.3g}" for k, v in d["diameters"].items())
        + "), with the per-token bound ||grad_x W||_2 <= diam * ||p||_2.", "",
        "![per-token gradient distributions](grad_distributions.png)", "",
        f"## Last checkpoint (step {last['step']}), float32 logits", "",
    ]
    heads = ["penalty", "p50", "p90", "p99", "max", "non-finite", "max value", "max ratio to W1 bound"]
    for source in SOURCES:
        src = last["sources"].get(source)
        if src is None:
            continue
        lines += [f"### `{source}` tokens ({src['n_tokens']})", ""]
        rows = []
        for pen in names:
            st = src["stats"][f"float32|{pen}"]
            rows.append([pen] + [_cell(st, k) for k in ("p50", "p90", "p99", "max")]
                        + [st.get("non_finite", 0), _cell(st, "max_value"),
                           _cell(st, "max_ratio_to_bound") if "max_bound" in st else "-"])
        lines += [common.md_table(heads, rows), ""]
    lines += ["## Log-ratio r = log pi_ref(t) - log pi(t) of the scored tokens (drives k3)", "",
              "Tokens with r > 5 have pi(t) < e^-5 pi_ref(t): k3's gradient there is about e^r.", ""]
    rows = []
    for cp in d["checkpoints"]:
        for source in SOURCES:
            if source in cp["sources"]:
                lr = cp["sources"][source]["log_ratio"]
                wk = cp["sources"][source].get("worst_k3", {})
                tok = (f"{wk.get('token', wk['token_id'])!r} (pi {wk['p']:.2g}, pi_ref {wk['q']:.2g}, "
                       f"grad {wk['grad']:.3g})") if wk and wk["grad"] > 0 else "-"
                rows.append([cp["step"], source, lr["n"], f"{lr['p50']:.3g}", f"{lr['p99']:.3g}", f"{lr['max']:.3g}",
                             lr["above_2"], lr["above_5"], lr["above_10"], tok])
    lines += [common.md_table(["step", "source", "tokens", "median r", "p99 r", "max r", "r > 2", "r > 5", "r > 10",
                               "token with the largest k3 gradient"], rows), ""]
    for dname in plan["dtypes"]:
        for key, label in (("max", "max"), ("p99", "p99")):
            lines += [f"## {label} per-token ||grad|| by checkpoint, {dname} logits (non-finite tokens in brackets)", ""]
            cols, rows = [], []
            for cp in d["checkpoints"]:
                for source in SOURCES:
                    if source in cp["sources"]:
                        cols.append((cp, source))
            for pen in names:
                row = [pen]
                for cp, source in cols:
                    st = cp["sources"][source]["stats"][f"{dname}|{pen}"]
                    row.append(_cell(st, key) + (f" ({st['non_finite']})" if st.get("non_finite") else ""))
                rows.append(row)
            lines += [common.md_table(["penalty"] + [f"{cp['step']} {s}" for cp, s in cols], rows), ""]
    lines += ["## Training (beta = 0)", "",
              common.md_table(["step", "reward", "KL (logged)", "k3 penalty (logged)", "step s"],
                              [[int(h["step"]), f"{h['reward']:.3f}", f"{h['kl']:.3g}", f"{h['regularizer']:.3g}",
                                f"{h['step_time']:.1f}"] for h in hist]), "",
              "On-policy completion of the first held-out prompt, first seed, per checkpoint:", "",
              common.md_table(["step", "completion"], [[cp["step"], cp["example_completion"]]
                                                      for cp in d["checkpoints"]]), ""]
    errors = {f"{cp['step']}|{s}|{k}": v["error"] for cp in d["checkpoints"] for s, src in cp["sources"].items()
              for k, v in src["stats"].items() if "error" in v}
    if errors:
        lines += ["## Refusals (ValueError/RuntimeError raised by the penalty)", ""]
        lines += [f"- `{k}`: {v}" for k, v in list(errors.items())[:20]]
    if name != "full":
        lines += ["", f"The `full` plan ({PLANS['full']}) was not run."]
    return "\n".join(lines) + "\n"
