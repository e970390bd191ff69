"""Leaf-order logits in the TRL adapter: ``LogitHead(row_order=...)`` and ``transport_from_hidden``.

Computing the logits with their columns in the structure's leaf order (LM-head rows gathered once)
must change nothing but speed: values, token log-probabilities and gradients w.r.t. the hidden
states and the LM head match the token-order computation.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("trl")
import torch
from torch import nn

from tokenmover import build_chains, build_cluster_forest
from tokenmover.head import LogitHead, leaf_order_pays, leaf_order_view, transport_from_hidden
from tokenmover.integrations.trl.config import TransportArguments
from tokenmover.regularizer import Regularizer
from tokenmover.structures import TransportStructure, build_cluster_tree

D, V = 6, 40


def _points(seed: int = 3) -> torch.Tensor:
    return torch.randn(V, 5, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _structure(kind: str) -> TransportStructure:
    if kind == "tree":
        return build_cluster_tree(_points(), branching=3, leaf_size=4)
    if kind == "forest":
        return build_cluster_forest(_points(), n_trees=3, leaf_size=4)
    return build_chains(_points(), 3)


def _order(seed: int = 0) -> torch.Tensor:
    return torch.randperm(V, generator=torch.Generator().manual_seed(seed))


class _Wrapped(nn.Module):
    """A head that is not a plain Linear (like a PEFT layer): LogitHead must fall back to full logits."""

    def __init__(self, inner: nn.Linear) -> None:
        super().__init__()
        self.inner = inner
        self.weight = inner.weight

    def forward(self, h):
        return self.inner(h) + 0.5


# ---------------------------------------------------------------------------------------------- LogitHead
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("extras", [{}, {"scale": 0.5, "softcap": 3.0, "temperature": 0.7}])
def test_row_order_gives_the_full_logits_columns_and_their_gradients(bias, extras):
    torch.manual_seed(0)
    lin = nn.Linear(D, V, bias=bias).double()
    order = _order()
    h = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    head = LogitHead(lin, row_order=order, **extras)
    assert head.ordered_linear() is not None  # the direct path (rows gathered), not the fallback
    ordered = head(h)
    full = LogitHead(lin, **extras)(h)
    torch.testing.assert_close(ordered, full[:, order], rtol=0, atol=1e-13)
    # the gradient reaches the weight (and bias) through the row gather
    cotangent = torch.randn(7, V, dtype=torch.float64)
    grads = torch.autograd.grad((ordered * cotangent).sum(), [h, *lin.parameters()])
    inv = torch.argsort(order)
    expected = torch.autograd.grad((full * cotangent[:, inv]).sum(), [h, *lin.parameters()])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_row_order_falls_back_to_gathering_full_logits_for_other_heads():
    torch.manual_seed(1)
    lin = nn.Linear(D, V).double()
    order = _order(1)
    h = torch.randn(4, D, dtype=torch.float64)
    wrapped = LogitHead(_Wrapped(lin), row_order=order, softcap=2.0)
    assert wrapped.ordered_linear() is None
    torch.testing.assert_close(wrapped(h), LogitHead(_Wrapped(lin), softcap=2.0)(h)[:, order])
    hooked = nn.Linear(D, V).double()
    hooked.register_forward_hook(lambda module, args, out: out * 2.0)  # e.g. DeepSpeed ZeRO-3 hooks
    head = LogitHead(hooked, row_order=order)
    assert head.ordered_linear() is None
    torch.testing.assert_close(head(h), 2.0 * nn.functional.linear(h, hooked.weight, hooked.bias)[:, order])


def test_row_order_understands_trls_float32_cast_of_the_head():
    """TRL's cast_lm_head_to_fp32 replaces lm_head.forward by F.linear(h.float(), W.float(), b.float())."""
    torch.manual_seed(2)
    lin = nn.Linear(D, V).float()

    def cast_forward_to_fp32(hidden_states):
        return nn.functional.linear(hidden_states.float(), lin.weight.float(), lin.bias.float())

    lin.forward = cast_forward_to_fp32
    order = _order(2)
    h = torch.randn(5, D, dtype=torch.bfloat16)
    head = LogitHead(lin, row_order=order)
    assert head.ordered_linear() is not None
    out = head(h)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, LogitHead(lin)(h)[:, order], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------- the term
def _run(method, structure, leaf_order, chunk_size, backend, *, policy, ref, h_pol, h_ref, tokens):
    kwargs = {"structure": structure, "backend": backend} if structure is not None else {}
    reg = Regularizer(method, **kwargs)
    h = h_pol.detach().clone().requires_grad_(True)
    for p in policy.parameters():
        p.grad = None
    term = transport_from_hidden(
        h, h_ref, LogitHead(policy, scale=0.9, temperature=0.7), LogitHead(ref, softcap=5.0, temperature=0.7), reg,
        tokens=tokens, chunk_size=chunk_size, want_entropy=True, want_policy_token_logps=True, leaf_order=leaf_order,
    )
    (term.penalty * torch.linspace(0.5, 1.5, h.shape[0], dtype=term.penalty.dtype)).sum().backward()
    return term, h.grad, [p.grad.clone() for p in policy.parameters()]


@pytest.mark.parametrize("chunk_size", [3, None])  # 3: several checkpointed chunks; None: one plain chunk
@pytest.mark.parametrize(
    ("method", "kind", "backend"),
    [("tree", "tree", "torch"), ("tree", "tree", "numba"), ("forest", "forest", "torch"),
     ("sliced", "chains", "numba"), ("k3", None, None)],
)
def test_leaf_order_changes_nothing_but_the_work(method, kind, backend, chunk_size):
    torch.manual_seed(0)
    policy = nn.Linear(D, V, bias=True).double()
    ref = nn.Linear(D + 2, V, bias=True).double()
    h_pol = torch.randn(11, D, dtype=torch.float64)
    h_ref = torch.randn(11, D + 2, dtype=torch.float64)
    tokens = torch.randint(0, V, (11,))
    structure = None if kind is None else _structure(kind)
    common = dict(policy=policy, ref=ref, h_pol=h_pol, h_ref=h_ref, tokens=tokens)
    term0, gh0, gw0 = _run(method, structure, False, chunk_size, backend, **common)
    term1, gh1, gw1 = _run(method, structure, "always", chunk_size, backend, **common)
    assert term0.penalty.abs().max() > 1e-3
    torch.testing.assert_close(term1.penalty, term0.penalty, rtol=0, atol=1e-10)
    for name in ("ref_token_logps", "policy_token_logps", "policy_entropy"):
        torch.testing.assert_close(getattr(term1, name), getattr(term0, name), rtol=0, atol=1e-5)
    torch.testing.assert_close(gh1, gh0, rtol=0, atol=1e-10)
    for got, want in zip(gw1, gw0):  # lm_head weight and bias
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)


def test_token_log_probs_are_read_at_the_tokens_columns_exactly():
    """In float64 the token log-probabilities agree to round-off, not just to float32 output precision."""
    torch.manual_seed(4)
    policy, ref = nn.Linear(D, V).double(), nn.Linear(D, V).double()
    h_pol, h_ref = torch.randn(9, D, dtype=torch.float64), torch.randn(9, D, dtype=torch.float64)
    tokens = torch.randint(0, V, (9,))
    reg = Regularizer("tree", structure=_structure("tree"))
    term = transport_from_hidden(h_pol, h_ref, LogitHead(policy), LogitHead(ref), reg, tokens=tokens,
                                 want_policy_token_logps=True)
    full_ref = torch.log_softmax(ref(h_ref).float(), -1)[torch.arange(9), tokens]
    full_pol = torch.log_softmax(policy(h_pol).detach().float(), -1)[torch.arange(9), tokens]
    torch.testing.assert_close(term.ref_token_logps, full_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(term.policy_token_logps, full_pol, rtol=1e-6, atol=1e-6)


def test_leaf_order_view_is_built_once_and_only_where_it_helps():
    structure = _structure("tree")
    reg = Regularizer("tree", structure=structure, backend="torch")
    view = leaf_order_view(reg)
    assert view is not None and leaf_order_view(reg) is view
    assert torch.equal(view.order, structure.leaf_order())
    assert torch.equal(view.order[view.inverse], torch.arange(V))
    assert view.regularizer.method == "tree" and view.regularizer.mode == reg.mode
    assert view.regularizer._kwargs["backend"] == "torch"
    assert torch.equal(view.regularizer.structure.perms[0], torch.arange(V))
    assert leaf_order_view(Regularizer("k3")) is None
    assert leaf_order_view(Regularizer("kl")) is None
    # already in leaf order: nothing to relabel
    assert leaf_order_view(Regularizer("tree", structure=structure.in_leaf_order())) is None


def test_leaf_order_view_is_built_once_per_regularizer_over_an_immutable_structure():
    """The twin is cached per regularizer; the structure cannot change under it (its fields cannot be
    reassigned, and a tensor changed in place is refused when the distance packs it), and a
    regularizer over new weights gets its own twin with those weights."""
    structure = _structure("tree")
    reg = Regularizer("tree", structure=structure, backend="torch")
    view = leaf_order_view(reg)
    assert leaf_order_view(reg) is view
    with pytest.raises(dataclasses.FrozenInstanceError):
        structure.edge_weights = 2 * structure.edge_weights
    doubled = reg.with_structure(structure.with_edge_weights(2 * structure.edge_weights))
    fresh = leaf_order_view(doubled)
    assert fresh is not view and leaf_order_view(reg) is view
    assert torch.equal(fresh.regularizer.structure.edge_weights, 2 * structure.edge_weights)
    x, y = torch.randn(3, V, dtype=torch.float64), torch.randn(3, V, dtype=torch.float64)
    o = fresh.order
    assert torch.allclose(fresh.regularizer(x[:, o], y[:, o]).penalty, doubled(x, y).penalty, rtol=1e-12)
    assert torch.allclose(doubled(x, y).penalty, 2 * reg(x, y).penalty, rtol=1e-12)


def test_leaf_order_is_used_by_default_only_where_it_pays():
    tree, forest = _structure("tree"), _structure("forest")
    torch_tree = Regularizer("tree", structure=tree, backend="torch")
    assert leaf_order_pays(torch_tree, "cpu", num_rows=2 * D, hidden_size=D)
    assert not leaf_order_pays(torch_tree, "cpu", num_rows=2 * D - 1, hidden_size=D)  # gathers cost more
    assert not leaf_order_pays(Regularizer("tree", structure=tree, backend="numba"), "cpu", 10**6, D)
    assert not leaf_order_pays(Regularizer("tree", structure=tree), "cpu", 10**6, D)  # auto: numba on CPU
    assert not leaf_order_pays(Regularizer("forest", structure=forest, backend="torch"), "cpu", 10**6, D)
    assert not leaf_order_pays(Regularizer("k3"), "cpu", 10**6, D)
    # the default (leaf_order=True) on a tree with the torch backend and N >= 2d equals token order
    torch.manual_seed(5)
    policy, ref = nn.Linear(D, V).double(), nn.Linear(D, V).double()
    h_pol, h_ref = torch.randn(2 * D, D, dtype=torch.float64), torch.randn(2 * D, D, dtype=torch.float64)
    on = transport_from_hidden(h_pol, h_ref, LogitHead(policy), LogitHead(ref), torch_tree)
    assert leaf_order_view(torch_tree) is not None
    off = transport_from_hidden(h_pol, h_ref, LogitHead(policy), LogitHead(ref), torch_tree, leaf_order=False)
    torch.testing.assert_close(on.penalty, off.penalty, rtol=0, atol=1e-12)
    reg = torch_tree
    with pytest.raises(ValueError, match="leaf_order must be"):
        transport_from_hidden(h_pol, h_ref, LogitHead(policy), LogitHead(ref), reg, leaf_order="auto")


def test_transport_from_hidden_refuses_heads_with_their_own_row_order():
    lin = nn.Linear(D, V)
    reg = Regularizer("tree", structure=_structure("tree"))
    with pytest.raises(ValueError, match="without row_order"):
        transport_from_hidden(torch.randn(3, D), torch.randn(3, D), LogitHead(lin, row_order=_order()), LogitHead(lin),
                              reg)


def test_config_field_defaults_to_leaf_order():
    assert TransportArguments().transport_leaf_order is True


# ---------------------------------------------------------------------------------------------- GRPO adapter
def _grpo(tiny_dir, tokenizer, tmp_path, **overrides):
    from datasets import Dataset

    from tokenmover.integrations.trl import TransportGRPOConfig, TransportGRPOTrainer

    values = dict(output_dir=str(tmp_path), use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                  logging_steps=1, learning_rate=1e-2, seed=0, disable_tqdm=True, per_device_train_batch_size=4,
                  num_generations=4, max_completion_length=6, max_steps=1, beta=0.0, transport_coef=0.3,
                  transport_backend="torch")
    values.update(overrides)
    prompts = ["w3 w4 w5", "w6 w7 w8", "w9 w10 w11", "w12 w13 w14"]
    return TransportGRPOTrainer(model=tiny_dir, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                                args=TransportGRPOConfig(**values), train_dataset=Dataset.from_dict({"prompt": prompts}),
                                processing_class=tokenizer), prompts


def test_grpo_adapter_with_leaf_order_gives_the_same_loss_and_gradient(tiny_dir, tokenizer, tmp_path, monkeypatch):
    from tokenmover.head import transport

    # the tiny batch (< 2 d positions) would not pay for the row gathers: take the leaf-order path anyway
    monkeypatch.setattr(transport, "leaf_order_pays", lambda *args: True)
    on, prompts = _grpo(tiny_dir, tokenizer, tmp_path / "on")
    off, _ = _grpo(tiny_dir, tokenizer, tmp_path / "off", transport_leaf_order=False)
    assert on.args.transport_leaf_order is True
    torch.manual_seed(0)
    for trainer in (on, off):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1
    batch = on._generate_and_score_completions([{"prompt": p} for p in prompts])
    grads, losses = [], []
    for trainer in (on, off):
        with torch.no_grad():  # move the policy away from the reference, the same way in both
            head = trainer.model.get_output_embeddings().weight
            head.add_(0.5 * torch.randn(head.shape, generator=torch.Generator().manual_seed(1)))
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(trainer.model.get_output_embeddings().weight.grad.clone())
    assert leaf_order_view(on.transport) is not None  # the leaf-order twin was built and used
    assert on._metrics["train"]["transport/distance"][-1] > 1e-3
    assert on._metrics["train"]["transport/distance"][-1] == pytest.approx(
        off._metrics["train"]["transport/distance"][-1], rel=1e-5)
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
