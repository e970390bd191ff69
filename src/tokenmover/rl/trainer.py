"""GRPO-style online RL for Hugging Face causal LMs, with any tokenmover distance as the regularizer.

One step (``max_steps`` of them):

1. **Sample.** ``P = prompts_per_step`` prompts (global; process ``r`` of ``W`` takes ``P / W``),
   ``G = num_generations`` completions each, every completion from its own seeded random stream
   (:mod:`tokenmover.rl.sampling`), so the batch is the same on 1 or W processes and after a resume.
2. **Score.** ``r_i = sum_f w_f f(prompt_i, completion_i)``. In ``regularizer_mode="reward"`` the
   detached penalty is subtracted: ``r_i <- r_i - beta * sum_t D_t``. Advantages are normalised in
   each group of G: ``A_i = (r_i - mean_g) / (std_g + 1e-4)`` (``scale_rewards="none"``: no division).
3. **Update** (``num_iterations = mu`` times on the same batch). Per completion token t, with
   ``ratio_t = pi(y_t) / pi_old(y_t)`` (``pi_old = pi.detach()`` when mu = 1, as in TRL):

       l_t = -min(ratio_t A_i, clip(ratio_t, 1 - eps, 1 + eps_high) A_i) + beta * D_t   (loss mode)

   where ``D_t = Regularizer(policy_logits_t, ref_logits_t)`` (tree/forest/sliced Wasserstein, KL,
   k3, ...). ``loss_type="token"`` averages l over every completion token of the step (across
   processes), ``"sequence"`` per completion then over completions. Gradients are accumulated over
   micro-batches; one AdamW step (+ clipping, scheduler) per iteration.

The reference is a frozen copy of the initial policy. Its logits are computed per micro-batch under
``no_grad``, used for the regularizer and the KL metric, and dropped before the next micro-batch:
no (N, V) copy outlives the micro-batch that needs it.

Distribution is accelerate's: ``accelerate launch`` with DDP / FSDP / DeepSpeed; the loss is
scaled so that DDP's gradient averaging gives the global mean. Checkpoints are accelerate's
``save_state`` of the policy (weights, optimizer, scheduler, RNG states) plus ``trainer_state.json``
(step and data position; the data order and the sampling seeds are functions of the step). The
frozen reference is not saved: on resume it is rebuilt as it was at the start (a copy of the policy
loaded from the config, or the ``ref_model`` passed in), before the policy's weights are restored.
A checkpoint is written under a temporary name and renamed when complete, and only the newest
``save_total_limit`` are kept.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tokenmover.distances.api import distance
from tokenmover.regularizer import Regularizer
from tokenmover.rl.config import GRPOConfig
from tokenmover.rl.data import PromptOrder, load_prompts
from tokenmover.rl.metrics_log import MetricsLog
from tokenmover.rl.models import disable_dropout, eos_token_ids, frozen_copy, load_policy, logits_vocab_size
from tokenmover.rl.rewards import check_rewards, make_reward
from tokenmover.rl.sampling import (
    _takes_logits_to_keep,
    completion_logits,
    completion_seed,
    entropy,
    left_pad,
    sample_completions,
    token_logprobs,
)
from tokenmover.rl.structure import method_inputs

CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
PARTIAL_SUFFIX = ".partial"  # a checkpoint folder being written; renamed when complete


@dataclass
class Rollout:
    """One process's share of a step's sampled batch (B = its completions)."""

    step: int
    prompts: list[str]  # (B,) prompt text of each completion
    prompt_ids: torch.Tensor  # (B, P) left-padded
    prompt_mask: torch.Tensor  # (B, P) bool
    completion_ids: torch.Tensor  # (B, C) right-padded
    completion_mask: torch.Tensor  # (B, C) bool, True up to and including EOS
    completions: list[str]  # (B,) decoded completions
    generation_seconds: float = 0.0
    rewards: torch.Tensor | None = None  # (B,) weighted reward before any penalty
    reward_parts: dict[str, torch.Tensor] | None = None  # name -> (B,)
    penalty_sums: torch.Tensor | None = None  # (B,) sum_t D_t (reward mode)
    advantages: torch.Tensor | None = None  # (B,)
    old_logps: torch.Tensor | None = None  # (B, C) when num_iterations > 1


class GRPOTrainer:
    """GRPO-style trainer (see module docstring).

    Args:
        config: a :class:`GRPOConfig`.
        model, tokenizer: the policy (default: loaded from ``config.model_name_or_path``).
        ref_model: the frozen reference (default: a copy of the policy before training).
        reward_funcs: names or callables (default: ``config.reward_funcs``); weights from the config.
        prompts: prompt texts (default: from the config's dataset / file / inline list).
        structure: a TransportStructure for tree methods (default: built from the config's geometry).
        accelerator: an ``accelerate.Accelerator`` (default: one built from the config).
        progress: show progress bars (geometry building, steps) on the main process.
    """

    def __init__(self, config: GRPOConfig, *, model=None, tokenizer=None, ref_model=None, reward_funcs=None,
                 prompts: list[str] | None = None, structure=None, accelerator=None, progress: bool | None = None):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        config.validate()
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.accelerator = accelerator or Accelerator(
            mixed_precision=config.mixed_precision,
            log_with=["tensorboard"] if "tensorboard" in config.report_to else None,
            project_dir=str(self.output_dir),
            step_scheduler_with_optimizer=False,  # one scheduler step per optimizer step, any W
        )
        acc = self.accelerator
        self.show_progress = (not config.disable_progress_bar if progress is None else progress) and acc.is_main_process
        world = acc.num_processes
        if config.prompts_per_step % world:
            raise ValueError(
                f"prompts_per_step={config.prompts_per_step} must be a multiple of the {world} processes"
            )
        set_seed(config.seed)

        # -- model, tokenizer, reference
        if model is None:
            model, loaded_tokenizer = load_policy(config)
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ValueError("pass the tokenizer together with the model")
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.vocab_size = logits_vocab_size(model)
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.pad_id = int(tokenizer.pad_token_id)

        # -- regularizer (fails here, before any training, on a method/geometry mismatch)
        inputs = method_inputs(config, model, tokenizer, structure=structure, progress=self.show_progress)
        self.regularizer = Regularizer(config.method, mode=config.regularizer_mode,
                                       chunk_size=config.regularizer_chunk_size, **inputs[config.method])
        self.regularizer.check_vocab_size(self.vocab_size)
        self.extra_distances = {
            m: Regularizer(m, mode="reward", chunk_size=config.regularizer_chunk_size, **inputs[m])
            for m in config.log_distances
        }
        for reg in self.extra_distances.values():
            reg.check_vocab_size(self.vocab_size)

        ref = ref_model if ref_model is not None else frozen_copy(model)
        if config.disable_dropout:  # the policy trains in train mode; without this its logits are noisy
            disable_dropout(model)
            disable_dropout(ref)
        ref.requires_grad_(False)
        ref.eval()
        if logits_vocab_size(ref) != self.vocab_size:
            raise ValueError(
                f"vocabulary size mismatch: reference logits have V={logits_vocab_size(ref)}, policy V={self.vocab_size}"
            )

        # -- rewards
        names = reward_funcs if reward_funcs is not None else config.reward_funcs
        self.reward_fns = []
        for i, item in enumerate(names):
            name = item if isinstance(item, str) else getattr(item, "__name__", f"reward_{i}")
            fn = make_reward(item, config) if isinstance(item, str) else item
            self.reward_fns.append((name, fn))
        weights = config.reward_weights or [1.0] * len(self.reward_fns)
        if len(weights) != len(self.reward_fns):
            raise ValueError(f"reward_weights has {len(weights)} entries for {len(self.reward_fns)} rewards")
        self.reward_weights = [float(w) for w in weights]

        # -- prompts
        self.prompts = list(prompts) if prompts is not None else load_prompts(config)
        if not self.prompts:
            raise ValueError("no prompts")
        self.prompt_tokens = [self._encode_prompt(p) for p in self.prompts]
        self.order = PromptOrder(len(self.prompts), config.prompts_per_step, config.seed)

        # -- optimisation
        from transformers import get_scheduler

        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad],
            lr=config.learning_rate, weight_decay=config.weight_decay, eps=config.adam_epsilon,
        )
        scheduler = get_scheduler(
            config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps,
            num_training_steps=config.max_steps * config.num_iterations,
        )
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.ref_model = acc.prepare_model(ref, evaluation_mode=True)
        # accelerate's save_state writes every prepared model: the frozen reference would double the size
        # of each checkpoint, yet it is rebuilt identically from the config before a resume loads the state
        acc._models[:] = [m for m in acc._models if m is not self.ref_model]
        self._keep_kwarg = _takes_logits_to_keep(acc.unwrap_model(self.model))
        self.step = 0
        self.history: list[dict] = []
        self._resume_step: int | None = None
        self._log_opened = False  # True once a train() call has opened (reset or cut back) metrics.csv
        if config.resume_from_checkpoint:
            self._resume(config.resume_from_checkpoint)

    # ------------------------------------------------------------------ prompts
    def _encode_prompt(self, text: str) -> list[int]:
        tok = self.tokenizer
        if self.config.use_chat_template and getattr(tok, "chat_template", None):
            text = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=False)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(text)["input_ids"]
        ids = ids[-self.config.max_prompt_length:]
        if not ids:
            raise ValueError(f"prompt {text!r} encodes to no tokens")
        return ids

    # ------------------------------------------------------------------ 1. sample
    def make_rollout(self, step: int) -> Rollout:
        """Sample this process's completions for ``step``."""
        cfg, acc = self.config, self.accelerator
        t0 = time.perf_counter()
        per_process = cfg.prompts_per_step // acc.num_processes
        first = acc.process_index * per_process
        global_prompts = self.order.global_indices(step)
        mine = global_prompts[first:first + per_process]
        g = cfg.num_generations
        rows = [(i, (first + j) * g + k) for j, i in enumerate(mine) for k in range(g)]
        seeds = [completion_seed(cfg.seed, step, index) for _, index in rows]
        prompt_ids, prompt_mask = left_pad([self.prompt_tokens[i] for i, _ in rows], self.pad_id)
        prompt_ids, prompt_mask = prompt_ids.to(acc.device), prompt_mask.to(acc.device)
        completion_ids, completion_mask = sample_completions(
            acc.unwrap_model(self.model), prompt_ids, prompt_mask, seeds,
            max_new_tokens=cfg.max_new_tokens, eos_ids=self.eos_ids, pad_id=self.pad_id,
            temperature=cfg.temperature, top_k=cfg.top_k,
        )
        texts = [
            self.tokenizer.decode(ids[m].tolist(), skip_special_tokens=True)
            for ids, m in zip(completion_ids.cpu(), completion_mask.cpu())
        ]
        return Rollout(
            step=step, prompts=[self.prompts[i] for i, _ in rows], prompt_ids=prompt_ids, prompt_mask=prompt_mask,
            completion_ids=completion_ids, completion_mask=completion_mask, completions=texts,
            generation_seconds=time.perf_counter() - t0,
        )

    # ------------------------------------------------------------------ 2. score
    def _micro_batches(self, n: int) -> list[slice]:
        size = self.config.micro_batch_size
        return [slice(s, min(n, s + size)) for s in range(0, n, size)]

    def _logits(self, model, r: Rollout, sl: slice) -> torch.Tensor:
        logits = completion_logits(model, r.prompt_ids[sl], r.prompt_mask[sl], r.completion_ids[sl],
                                   r.completion_mask[sl], keep_kwarg=self._keep_kwarg)  # (b, C, V)
        return logits / self.config.temperature if self.config.temperature != 1.0 else logits

    def score(self, r: Rollout) -> Rollout:
        """Rewards, the reward-mode penalty, old log-probs (mu > 1) and group advantages."""
        cfg = self.config
        b = len(r.completions)
        device = r.completion_ids.device
        ids_lists = [ids[m].tolist() for ids, m in zip(r.completion_ids.cpu(), r.completion_mask.cpu())]
        total = torch.zeros(b, dtype=torch.float32)
        parts = {}
        for (name, fn), w in zip(self.reward_fns, self.reward_weights):
            values = check_rewards(fn(r.prompts, r.completions, completion_ids=ids_lists), b, name)
            parts[name] = torch.tensor(values, dtype=torch.float32)
            total += w * parts[name]
        r.rewards, r.reward_parts = total.to(device), {k: v.to(device) for k, v in parts.items()}
        need_old = cfg.num_iterations > 1
        reward_mode = cfg.regularizer_mode == "reward"
        shaped = r.rewards.clone()
        if need_old or reward_mode:
            old, sums = [], []
            with torch.no_grad():
                for sl in self._micro_batches(b):
                    logits = self._logits(self.model, r, sl)  # (b, C, V)
                    if need_old:
                        old.append(token_logprobs(logits, r.completion_ids[sl]))
                    if reward_mode:
                        ref_logits = self._logits(self.ref_model, r, sl)
                        mask = r.completion_mask[sl]
                        pen = self.regularizer(logits, ref_logits, mask, tokens=r.completion_ids[sl]).penalty
                        sums.append((pen * mask).sum(1).float())
                        del ref_logits
                    del logits
            r.old_logps = torch.cat(old) if need_old else None
            if reward_mode:
                r.penalty_sums = torch.cat(sums)
                shaped = shaped - cfg.beta * r.penalty_sums
        groups = shaped.view(-1, cfg.num_generations)  # (B / G, G)
        centred = groups - groups.mean(1, keepdim=True)
        if cfg.scale_rewards == "group":
            centred = centred / (groups.std(1, keepdim=True) + 1e-4)
        r.advantages = centred.reshape(-1)
        return r

    # ------------------------------------------------------------------ 3. update
    def update(self, r: Rollout) -> dict[str, float]:
        """``num_iterations`` optimizer steps on the rollout; returns the step's metrics (global)."""
        cfg, acc = self.config, self.accelerator
        mask_all = r.completion_mask
        b = mask_all.shape[0]
        if cfg.loss_type == "token":
            local = mask_all.sum().to(torch.float64)
            norm = float(acc.reduce(local.reshape(1), reduction="sum")) / acc.num_processes
        else:
            norm = float(b)  # the same on every process
        sums = torch.zeros(8 + len(self.extra_distances), dtype=torch.float64, device=acc.device)
        grad_norm = float("nan")
        batches = self._micro_batches(b)
        for iteration in range(cfg.num_iterations):
            for k, sl in enumerate(batches):
                sync = k == len(batches) - 1
                ctx = contextlib.nullcontext() if sync else acc.no_sync(self.model)
                with ctx:
                    loss, stats = self._micro_batch_loss(r, sl, norm, collect=iteration == 0)
                    acc.backward(loss)
                if iteration == 0:
                    sums += stats
            if cfg.max_grad_norm > 0:
                grad_norm = float(acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm))
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        total = acc.reduce(sums, reduction="sum")
        tokens = max(1.0, float(total[0]))
        metrics = {
            "loss": float(total[1]) / tokens,
            "policy_loss": float(total[2]) / tokens,
            "regularizer": float(total[3]) / tokens,
            "kl": float(total[4]) / tokens,
            "entropy": float(total[5]) / tokens,
            "clip_ratio": float(total[6]) / tokens,
            "ratio_mean": float(total[7]) / tokens,
        }
        for j, m in enumerate(self.extra_distances):
            metrics[f"distance/{m}"] = float(total[8 + j]) / tokens
        metrics["grad_norm"] = grad_norm
        metrics["learning_rate"] = float(self.scheduler.get_last_lr()[0])
        return metrics

    def _micro_batch_loss(self, r: Rollout, sl: slice, norm: float, collect: bool):
        """Loss of one micro-batch, already divided by the step's normaliser, and its metric sums."""
        cfg = self.config
        ids = r.completion_ids[sl]  # (b, C)
        mask = r.completion_mask[sl]  # (b, C)
        maskf = mask.float()
        with torch.no_grad():
            ref_logits = self._logits(self.ref_model, r, sl)  # (b, C, V), no graph
        logits = self._logits(self.model, r, sl)  # (b, C, V)
        logp = token_logprobs(logits, ids)  # (b, C)
        old = r.old_logps[sl] if r.old_logps is not None else logp.detach()
        ratio = torch.exp(logp - old)  # (b, C)
        adv = r.advantages[sl].unsqueeze(1)  # (b, 1)
        eps_high = cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon
        clipped_ratio = torch.clamp(ratio, 1 - cfg.epsilon, 1 + eps_high)
        policy_tok = -torch.min(ratio * adv, clipped_ratio * adv)  # (b, C)
        if cfg.regularizer_mode == "loss" and cfg.beta > 0:
            penalty = self.regularizer(logits, ref_logits, mask, tokens=ids).penalty  # (b, C), with graph
            per_tok = policy_tok + cfg.beta * penalty
        else:
            with torch.no_grad():
                penalty = self.regularizer(logits.detach(), ref_logits, mask, tokens=ids).penalty
            per_tok = policy_tok
        if cfg.loss_type == "token":
            loss = (per_tok * maskf).sum() / norm
        else:
            loss = ((per_tok * maskf).sum(1) / maskf.sum(1).clamp(min=1)).sum() / norm
        stats = torch.zeros(8 + len(self.extra_distances), dtype=torch.float64, device=logits.device)
        if collect:
            with torch.no_grad():
                detached = logits.detach()
                stats[0] = maskf.sum()
                stats[1] = (per_tok.detach() * maskf).sum()
                stats[2] = (policy_tok.detach() * maskf).sum()
                stats[3] = (penalty.detach() * maskf).sum()
                stats[4] = (distance(detached, ref_logits, "kl", mask=mask,
                                     chunk_size=cfg.regularizer_chunk_size) * maskf).sum()
                stats[5] = entropy(detached, mask) * maskf.sum()
                clipped = (ratio < 1 - cfg.epsilon) | (ratio > 1 + eps_high)
                stats[6] = (clipped.float() * maskf).sum()
                stats[7] = (ratio.detach() * maskf).sum()
                for j, reg in enumerate(self.extra_distances.values()):
                    stats[8 + j] = (reg(detached, ref_logits, mask, tokens=ids).penalty * maskf).sum()
        del ref_logits
        return loss, stats

    # ------------------------------------------------------------------ one step, the loop
    def train_step(self) -> dict[str, float]:
        """Sample, score and update once; returns the step's metrics (identical on every process)."""
        acc = self.accelerator
        t0 = time.perf_counter()
        r = self.make_rollout(self.step)
        self.score(r)
        metrics = self.update(r)
        rewards = acc.gather(r.rewards.reshape(-1).float())
        lengths = acc.gather(r.completion_mask.sum(1).float())
        row = {"step": self.step + 1, "reward": float(rewards.mean()), "reward_std": float(rewards.std())
               if rewards.numel() > 1 else 0.0}
        for name, values in r.reward_parts.items():
            row[f"reward/{name}"] = float(acc.gather(values.float()).mean())
        if r.penalty_sums is not None:
            row["penalty_per_completion"] = float(acc.gather(r.penalty_sums.float()).mean())
        row.update(metrics)
        row["completion_length"] = float(lengths.mean())
        row["completion_length_min"] = float(lengths.min())
        row["completion_length_max"] = float(lengths.max())
        row["generation_time"] = float(acc.reduce(torch.tensor([r.generation_seconds], device=acc.device),
                                                  reduction="mean"))
        row["step_time"] = time.perf_counter() - t0
        self.step += 1
        self.last_rollout = r
        return row

    def train(self, max_steps: int | None = None, *, deadline: float | None = None) -> list[dict]:
        """Run until ``config.max_steps``; returns the history.

        A later call continues where the previous one stopped (same run: its rows stay in
        ``metrics.csv``). Reaching ``config.max_steps`` saves a final checkpoint unless
        ``save_steps == -1``, and the model to ``output_dir/final`` when ``save_final_model``.
        ``KeyboardInterrupt`` (Ctrl-C) propagates after the logs are closed; a checkpoint or final model
        being written when it came is removed, so only complete ones are left on disk.

        Args:
            max_steps: stop after this many more steps (default: run to ``config.max_steps``).
            deadline: a ``time.perf_counter()`` value; after the first step of this call, a step is not
                started when the previous step's duration says it would end after the deadline.
        """
        cfg, acc = self.config, self.accelerator
        end = cfg.max_steps if max_steps is None else min(cfg.max_steps, self.step + max_steps)
        start = self.step
        # The first call starts the CSV afresh (or cuts it back to the resumed checkpoint); a later call
        # continues this trainer's run, so it keeps every row written so far.
        keep_up_to = self.step if self._log_opened else self._resume_step
        log = MetricsLog(self.output_dir, cfg.report_to, acc, resume_step=keep_up_to,
                         tracker_config=cfg.to_dict())
        self._log_opened = True
        self._write_run_info()
        bar = None
        if self.show_progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"GRPO {cfg.method}", unit="step",
                       dynamic_ncols=True)
        try:
            while self.step < end:
                if deadline is not None and self.step > start:
                    if time.perf_counter() + self.history[-1]["step_time"] >= deadline:
                        break
                row = self.train_step()
                self.history.append(row)
                log.log(row, row["step"])
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{row['reward']:.3f}", reg=f"{row['regularizer']:.3g}",
                                    kl=f"{row['kl']:.3g}", s=f"{row['step_time']:.1f}")
                if cfg.save_steps > 0 and self.step % cfg.save_steps == 0 and self.step < cfg.max_steps:
                    self.save_checkpoint()
            if self.step >= cfg.max_steps:
                if cfg.save_steps >= 0:  # -1: no checkpoints at all
                    self.save_checkpoint()
                if cfg.save_final_model:
                    self._save_final_model()
        finally:
            if bar is not None:
                bar.close()
            log.close()
        return self.history

    def _write_run_info(self) -> None:
        """``output_dir/run.json``: how the run was set up (processes, device, V, config)."""
        acc = self.accelerator
        if not acc.is_main_process:
            return
        import tokenmover

        info = {"tokenmover_version": tokenmover.__version__, "num_processes": acc.num_processes,
                "distributed_type": str(acc.distributed_type), "device": str(acc.device),
                "vocab_size": self.vocab_size, "num_prompts": len(self.prompts), "start_step": self.step,
                "regularizer": repr(self.regularizer), "config": self.config.to_dict()}
        self.output_dir.mkdir(parents=True, exist_ok=True)
        (self.output_dir / "run.json").write_text(json.dumps(info, indent=2), encoding="utf-8")

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_dir(self, step: int) -> Path:
        return self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step:06d}"

    def save_checkpoint(self) -> Path:
        """Save the policy, optimizer, scheduler, RNG states (accelerate) and the step / data position.

        Written to ``step-XXXXXX.partial`` and renamed when complete, so an interrupted save leaves no
        folder that :func:`list_checkpoints` (hence ``resume_from_checkpoint: latest``) would pick.
        Then the oldest checkpoints beyond ``save_total_limit`` are deleted (never this one).
        """
        acc = self.accelerator
        folder = self.checkpoint_dir(self.step)
        partial = folder.with_name(folder.name + PARTIAL_SUFFIX)
        try:
            if acc.is_main_process and partial.exists():
                shutil.rmtree(partial)  # left by a save that was killed
            acc.wait_for_everyone()
            acc.save_state(str(partial))
            acc.wait_for_everyone()
            if acc.is_main_process:
                state = {"step": self.step, "data": self.order.position(self.step),
                         "data_order": self.order.version, "num_processes": acc.num_processes,
                         "config": self.config.to_dict()}
                (partial / STATE_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
                if folder.exists():  # the same step saved again (a run resumed from an earlier checkpoint)
                    shutil.rmtree(folder)
                partial.replace(folder)
        except BaseException:
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        if acc.is_main_process:
            self._rotate_checkpoints(keep=folder)
        acc.wait_for_everyone()
        return folder

    def _rotate_checkpoints(self, keep: Path) -> None:
        """Delete the oldest checkpoints until ``save_total_limit`` remain, never ``keep``."""
        limit = self.config.save_total_limit
        if limit is None:
            return
        found = list_checkpoints(self.output_dir)
        excess = len(found) - limit
        for old in found:
            if excess <= 0:
                break
            if old != keep:
                shutil.rmtree(old, ignore_errors=True)
                excess -= 1

    def _resume(self, which: str) -> None:
        folder = resolve_checkpoint(self.output_dir, which)
        if folder is None:
            return  # 'latest' with no checkpoint yet: a fresh start
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        saved = state.get("config", {})
        for key in ("prompts_per_step", "num_generations", "seed", "method", "max_new_tokens"):
            if key in saved and saved[key] != getattr(self.config, key):
                raise ValueError(
                    f"cannot resume from {folder}: it was trained with {key}={saved[key]!r}, the config says "
                    f"{getattr(self.config, key)!r}"
                )
        # a checkpoint written before the order had a version was drawn with seed + epoch (version 1)
        self.order = PromptOrder(len(self.prompts), self.config.prompts_per_step, self.config.seed,
                                 version=int(state.get("data_order", 1)))
        self.accelerator.load_state(str(folder))
        self.step = int(state["step"])
        self._resume_step = self.step

    def _save_final_model(self) -> None:
        """``save_model`` to ``output_dir/final.partial``, renamed to ``final`` when complete."""
        acc = self.accelerator
        final = self.output_dir / "final"
        partial = final.with_name(final.name + PARTIAL_SUFFIX)
        try:
            if acc.is_main_process and partial.exists():
                shutil.rmtree(partial)
            self.save_model(partial)
            if acc.is_main_process:
                if final.exists():
                    shutil.rmtree(final)
                partial.replace(final)
        except BaseException:
            if acc.is_main_process:
                shutil.rmtree(partial, ignore_errors=True)
            raise
        acc.wait_for_everyone()

    def save_model(self, folder: str | Path) -> None:
        """``save_pretrained`` of the policy (and tokenizer), main process only."""
        acc = self.accelerator
        acc.wait_for_everyone()
        state = acc.get_state_dict(self.model)
        if acc.is_main_process:
            acc.unwrap_model(self.model).save_pretrained(str(folder), state_dict=state)
            self.tokenizer.save_pretrained(str(folder))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints (``step-N`` with trainer_state.json; not ``.partial`` ones) in ``output_dir``, oldest first."""
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(CHECKPOINT_PREFIX)
             and p.name[len(CHECKPOINT_PREFIX):].isdigit() and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(output_dir: str | Path, which: str) -> Path | None:
    """'latest' -> the newest complete checkpoint (None if none); otherwise the folder, checked."""
    if which == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    folder = Path(which)
    if not (folder / STATE_FILE).is_file():
        raise ValueError(f"resume_from_checkpoint: {folder} is not a checkpoint (no {STATE_FILE})")
    return folder

