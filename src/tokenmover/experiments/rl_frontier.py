"""Claim 3 (driver only): reward vs drift frontier of GRPO on SmolLM2 with KL or Wasserstein regularizers.

For each regularizer (``k3``, full ``kl``, ``tree``, ``forest``; ``sinkhorn`` when registered),
beta and seed, :class:`tokenmover.rl.GRPOTrainer` fine-tunes SmolLM2-135M-Instruct toward a reward
(``vader``, or the rule-based ``length``), then the trained policy is scored on *held-out* prompts
with yardsticks that favour neither side:

- reward of completions sampled at fixed seeds;
- full KL(pi || pi_ref) per completion token on those completions (teacher-forced);
- the reference model's perplexity of the completions;
- distinct-2 (unique bigrams / bigrams) over all completions.

Sentence-embedding similarity (all-MiniLM-L6-v2) is not computed: ``sentence_transformers`` is not
installed here. The full sweep (``PLANS["full"]``) takes hours on 2 CPU cores and was not run;
``--quick`` is a smoke configuration (1 seed, 2 betas, few steps) and its numbers say nothing
about the claim.
"""

from __future__ import annotations

import copy
import gc
import time
from pathlib import Path

import numpy as np
import torch

from tokenmover.experiments import common

TRAIN_PROMPTS = [
    "Describe your morning in one sentence.", "Write one sentence about the weather today.",
    "Tell me about your neighbour.", "What do you think of Mondays?", "Describe the food at a school canteen.",
    "Write a sentence about a long train journey.", "How was the meeting yesterday?", "Describe an old house.",
]
HELD_OUT_PROMPTS = ["Describe a rainy afternoon.", "Tell me about your commute.", "What is your opinion of winter?",
                    "Describe a crowded supermarket."]

PLANS = {
    "quick": {"methods": ["k3", "tree"], "betas": [0.1], "seeds": [0], "rewards": ["vader"], "steps": 2,
              "max_new_tokens": 12, "prompts_per_step": 2, "num_generations": 4, "eval_seeds": [0, 1]},
    "full": {"methods": ["k3", "kl", "tree", "forest", "sinkhorn"], "betas": [0.0, 0.02, 0.05, 0.1, 0.2, 0.5],
             "seeds": [0, 1, 2], "rewards": ["vader", "length"], "steps": 40, "max_new_tokens": 20,
             "prompts_per_step": 2, "num_generations": 4, "eval_seeds": [0, 1, 2, 3]},
}


def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over ``texts`` (0 when there are none)."""
    grams = [tuple(ws[i:i + n]) for t in texts for ws in [t.split()] for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


@torch.no_grad()
def drift_yardsticks(policy, ref, tokenizer, prompts: list[str], seeds: list[int], max_new_tokens: int) -> dict:
    """Sample from ``policy`` at fixed seeds; KL(pi||ref) per token, ref perplexity, distinct-2, VADER."""
    import tokenmover
    from tokenmover.rl.demo import sample_fixed

    samples = sample_fixed(policy, tokenizer, prompts, seeds=seeds, max_new_tokens=max_new_tokens)
    kls, nlls = [], []
    for s in samples:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": s["prompt"]}], add_generation_prompt=True,
                                             tokenize=False)
        p_ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
        c_ids = tokenizer(s["completion"], add_special_tokens=False)["input_ids"]
        if not c_ids:
            continue
        ids = torch.tensor([p_ids + c_ids])
        sl = slice(len(p_ids) - 1, ids.shape[1] - 1)
        x = policy(input_ids=ids).logits[0, sl].float()  # (c, V)
        y = ref(input_ids=ids).logits[0, sl].float()  # (c, V)
        kls.append(tokenmover.distance(x, y, "kl").mean().item())
        nlls.append(torch.nn.functional.cross_entropy(y, torch.tensor(c_ids)).item())
    return {"vader": float(np.mean([s["vader"] for s in samples])), "kl_per_token": float(np.mean(kls)),
            "ref_perplexity": float(np.exp(np.mean(nlls))), "distinct_2": distinct_n([s["completion"] for s in samples]),
            "n_samples": len(samples)}


def run(*, quick: bool = False, out_dir: str | Path = "docs/results/rl_frontier", seed: int = 0) -> Path:
    from tokenmover.assets import load_smollm2
    from tokenmover.rl.config import GRPOConfig
    from tokenmover.rl.trainer import GRPOTrainer

    plan = PLANS["quick" if quick else "full"]
    t0 = time.perf_counter()
    base, tokenizer = load_smollm2()
    base = base.float()
    geoms = common.load_geometries(base, tokenizer, ["word2vec"])
    kinds = tuple(k for k in ("tree", "forest") if k in plan["methods"])
    structures = common.build_structures(geoms, kinds, seed=seed)
    ref = copy.deepcopy(base).eval()
    runs = []
    for reward in plan["rewards"]:
        for method in plan["methods"]:
            if method == "sinkhorn" and not common.has_sinkhorn():
                runs.append({"reward": reward, "method": method, "skipped": "sinkhorn not registered"})
                continue
            for beta in plan["betas"]:
                for s in plan["seeds"]:
                    common.say(f"{reward} {method} beta={beta} seed={s}")
                    cfg = GRPOConfig(model_name_or_path="smollm2", prompts=list(TRAIN_PROMPTS), reward_funcs=[reward],
                                     method=method, beta=beta, max_steps=plan["steps"], learning_rate=2e-5,
                                     prompts_per_step=plan["prompts_per_step"],
                                     num_generations=plan["num_generations"], max_new_tokens=plan["max_new_tokens"],
                                     micro_batch_size=8, seed=s, save_final_model=False, report_to=["csv"],
                                     output_dir=str(Path(out_dir) / "runs" / f"{reward}-{method}-{beta}-{s}"))
                    policy = copy.deepcopy(base).train()
                    structure = structures.get(f"word2vec/{method}")
                    trainer = GRPOTrainer(cfg, model=policy, tokenizer=tokenizer, ref_model=ref, structure=structure,
                                          progress=False)
                    history = trainer.train()
                    model = trainer.accelerator.unwrap_model(trainer.model).eval()
                    ys = drift_yardsticks(model, ref, tokenizer, HELD_OUT_PROMPTS, plan["eval_seeds"],
                                          plan["max_new_tokens"])
                    runs.append({"reward": reward, "method": method, "beta": beta, "seed": s, "steps": len(history),
                                 "final_train_reward": float(history[-1].get("reward", float("nan"))), **ys})
                    del trainer, policy, model
                    gc.collect()
    data = {"plan": plan | {"quick": quick}, "runs": runs, "seconds": time.perf_counter() - t0,
            "environment": common.environment_note()}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, out / "frontier.png")
    return common.write_outputs(out, _markdown(data, quick), data)


def _plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    done = [r for r in runs if "skipped" not in r]
    for ax, key in zip(axes, ("kl_per_token", "ref_perplexity", "distinct_2")):
        for method in sorted({r["method"] for r in done}):
            rs = [r for r in done if r["method"] == method]
            ax.plot([r[key] for r in rs], [r["vader"] for r in rs], "o", label=method)
        ax.set_xlabel(key + " (held-out)")
        ax.set_ylabel("held-out reward (VADER)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(d: dict, quick: bool) -> str:
    cmd = "tokenmover experiment rl_frontier" + (" --quick" if quick else "")
    keys = ["reward", "method", "beta", "seed", "steps", "final_train_reward", "vader", "kl_per_token",
            "ref_perplexity", "distinct_2"]
    rows = [[r.get(k, r.get("skipped", "")) for k in keys] for r in d["runs"]]
    return "\n".join([
        "# RL frontier: reward vs drift (driver; " + ("smoke run only" if quick else "full sweep") + ")", "",
        f"Regenerate: `{cmd}` (configuration `{'quick' if quick else 'full'}`: {d['plan']}). "
        f"Took {d['seconds']:.0f} s. {d['environment']}.", "",
        "**The quick configuration is a smoke test of the driver (1 seed, a couple of steps): its numbers "
        "are not evidence for or against the claim.** Sentence-embedding similarity is not computed "
        "(sentence_transformers is not installed).", "", "![frontier](frontier.png)", "",
        common.md_table(keys, rows), "",
    ])
