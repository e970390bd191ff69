"""The shared machinery: chunked logits from hidden states, the logit head, the regularizer from a config."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("trl")
import torch
from torch import nn

import tokenmover
from tokenmover.geometry import VocabGeometry
from tokenmover.head import GPU_CHUNK_BYTES, LogitHead, transport_chunk_size, transport_from_hidden
from tokenmover.integrations.trl.regularizer import build_regularizer
from tokenmover.regularizer import Regularizer
from tokenmover.rl.models import tiny_model
from tokenmover.structures import build_cluster_tree

D, V = 6, 40


def _heads(dtype=torch.float64):
    torch.manual_seed(0)
    policy = nn.Linear(D, V, bias=False).to(dtype)
    ref = nn.Linear(D + 2, V, bias=True).to(dtype)
    return policy, ref


def _structure():
    return build_cluster_tree(torch.randn(V, 5, generator=torch.Generator().manual_seed(3)), branching=3, leaf_size=4)


@pytest.mark.parametrize("chunk_size", [3, None])  # 3: several checkpointed chunks; None: one plain chunk
@pytest.mark.parametrize("method", ["tree", "kl", "k3"])
def test_transport_from_hidden_matches_distance_on_full_logits(method, chunk_size):
    policy, ref = _heads()
    structure = _structure()
    kwargs = {"structure": structure} if method == "tree" else {}
    reg = Regularizer(method, **kwargs)
    h_pol = torch.randn(11, D, dtype=torch.float64, requires_grad=True)
    h_ref = torch.randn(11, D + 2, dtype=torch.float64)
    tokens = torch.randint(0, V, (11,))
    pol_head = LogitHead(policy, temperature=0.7)
    ref_head = LogitHead(ref, temperature=0.7)
    term = transport_from_hidden(h_pol, h_ref, pol_head, ref_head, reg, tokens=tokens, chunk_size=chunk_size,
                                 want_entropy=True, want_policy_token_logps=True)
    term.penalty.sum().backward()
    grad_chunked = h_pol.grad.clone()

    h_pol.grad = None
    full_pol = policy(h_pol) / 0.7
    full_ref = (ref(h_ref) / 0.7).detach()
    tok_kw = {"tokens": tokens} if method == "k3" else {}
    expected = tokenmover.distance(full_pol, full_ref, method, **kwargs, **tok_kw)
    expected.sum().backward()
    torch.testing.assert_close(term.penalty, expected.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad_chunked, h_pol.grad, rtol=1e-9, atol=1e-12)
    logp_ref = torch.log_softmax(full_ref, -1)
    logp_pol = torch.log_softmax(full_pol.detach(), -1)
    torch.testing.assert_close(term.ref_token_logps, logp_ref[torch.arange(11), tokens].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(term.policy_token_logps, logp_pol[torch.arange(11), tokens].float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(term.policy_entropy, -(logp_pol.exp() * logp_pol).sum(-1).float(), rtol=1e-5, atol=1e-6)


def test_transport_from_hidden_empty_selection_is_a_connected_zero():
    policy, ref = _heads(torch.float32)
    h = torch.randn(0, D, requires_grad=True)
    term = transport_from_hidden(h, torch.randn(0, D + 2), LogitHead(policy), LogitHead(ref), Regularizer("kl"))
    assert term.penalty.shape == (0,)
    term.penalty.sum().backward()  # must not raise


def test_transport_from_hidden_refuses_mismatched_rows_and_missing_tokens():
    policy, ref = _heads(torch.float32)
    with pytest.raises(ValueError, match="same N"):
        transport_from_hidden(torch.randn(3, D), torch.randn(4, D + 2), LogitHead(policy), LogitHead(ref),
                              Regularizer("kl"))
    with pytest.raises(ValueError, match="needs the completion token ids"):
        transport_from_hidden(torch.randn(3, D), torch.randn(3, D + 2), LogitHead(policy), LogitHead(ref),
                              Regularizer("k3"))


def test_logit_head_applies_scale_softcap_and_temperature():
    head = nn.Linear(D, V)
    h = torch.randn(5, D)
    logit_head = LogitHead(head, scale=0.5, softcap=3.0, temperature=2.0)
    raw = head(h)
    expected = 3.0 * torch.tanh(raw * 0.5 / 3.0) / 2.0
    torch.testing.assert_close(logit_head(h), expected)


def test_logit_head_reads_the_config_like_trl():
    model = tiny_model(V, 16, 1)
    model.config.final_logit_softcapping = 30.0
    model.config.logit_scale = 0.25
    head = LogitHead.from_model(model, temperature=0.9)
    assert (head.scale, head.softcap, head.temperature) == (0.25, 30.0, 0.9)
    assert head.lm_head is model.get_output_embeddings()


def _args(**overrides):
    values = dict(transport_method="tree", transport_structure=None, transport_geometry="embeddings",
                  transport_structure_kind="auto", transport_backend="auto", seed=0, transport_geometry_abtt=0,
                  transport_top_k=16, transport_scale_to_ground=False)
    values.update(overrides)
    return SimpleNamespace(**values)


def test_build_regularizer_defaults_build_the_hybrid_on_scaled_abtt_embeddings():
    from tokenmover import defaults
    from tokenmover.geometry.quality import scaled_to_ground

    model = tiny_model(V, 16, 1)
    args = _args(transport_method=defaults.DEFAULT_METHOD, transport_geometry_abtt=defaults.DEFAULT_ABTT,
                 transport_top_k=defaults.DEFAULT_TOP_K, transport_scale_to_ground=True)
    reg = build_regularizer(args, model)
    assert reg.method == "hybrid" and reg.method_kwargs["k"] == defaults.DEFAULT_TOP_K
    geometry = VocabGeometry.from_model(model, "input").all_but_the_top(defaults.DEFAULT_ABTT)
    torch.testing.assert_close(reg.method_kwargs["geometry"].points, geometry.points)
    expected = scaled_to_ground(geometry.build_structure("tree", seed=0), geometry, seed=0)
    assert torch.equal(reg.structure.perms, expected.perms)
    torch.testing.assert_close(reg.structure.edge_weights, expected.edge_weights)


def test_build_regularizer_builds_a_tree_from_the_model_embeddings():
    model = tiny_model(V, 16, 1)
    reg = build_regularizer(_args(), model)
    assert reg.method == "tree" and reg.num_tokens == V
    expected = VocabGeometry.from_model(model, "input").build_structure("tree", seed=0)
    assert torch.equal(reg.structure.perms, expected.perms)
    assert torch.equal(reg.structure.edge_weights, expected.edge_weights)


@pytest.mark.parametrize(("method", "kind", "members", "built"), [
    ("forest", "auto", 4, "forest"), ("sliced", "auto", 16, "chains"), ("kl", "auto", None, None),
    ("tree", "auto", 1, "tree"), ("forest", "tree", 1, "tree"),
])
def test_build_regularizer_builds_the_structure_of_the_method(method, kind, members, built):
    """transport_structure_kind="auto" (the default) builds the method's own structure: a forest of
    4 trees for "forest", 16 chains for "sliced" (it had built one tree for both); an explicit kind wins."""
    model = tiny_model(V, 16, 1)
    reg = build_regularizer(_args(transport_method=method, transport_structure_kind=kind), model)
    if members is None:
        assert reg.structure is None
        return
    assert (reg.structure.num_members, reg.structure.kind) == (members, built)


def test_build_regularizer_refuses_another_vocabulary_size(tmp_path):
    model = tiny_model(V, 16, 1)
    small = build_cluster_tree(np.random.default_rng(0).normal(size=(V - 3, 4)))
    with pytest.raises(ValueError, match=f"vocabulary size mismatch.*V={V - 3}.*V={V}"):
        build_regularizer(_args(), model, structure=small)
    small.save_pretrained(tmp_path / "structure")
    with pytest.raises(ValueError, match="vocabulary size mismatch"):
        build_regularizer(_args(transport_structure=str(tmp_path / "structure")), model)
    VocabGeometry.from_array(torch.randn(V + 5, 4)).save_pretrained(tmp_path / "geometry")
    with pytest.raises(ValueError, match=f"vocabulary size mismatch.*V={V + 5}"):
        build_regularizer(_args(transport_geometry=str(tmp_path / "geometry")), model)
    with pytest.raises(ValueError, match="neither 'embeddings'"):
        build_regularizer(_args(transport_geometry=str(tmp_path / "missing")), model)


def test_build_regularizer_loads_a_saved_structure(tmp_path):
    model = tiny_model(V, 16, 1)
    structure = VocabGeometry.from_model(model, "input").build_structure("forest", n_trees=2)
    structure.save_pretrained(tmp_path / "s")
    reg = build_regularizer(_args(transport_method="forest", transport_structure=str(tmp_path / "s")), model)
    assert torch.equal(reg.structure.perms, structure.perms)


def test_build_regularizer_without_structure_for_kl():
    reg = build_regularizer(_args(transport_method="js"), tiny_model(V, 16, 1))
    assert reg.method == "js" and reg.structure is None


def test_default_chunk_is_larger_on_cuda():
    """CPU: a (chunk, V) float32 block near 64 MiB; CUDA: near 1 GiB (fewer launches and host
    syncs per step: 1,024 rows instead of 64 at V = 262,144). The device is only inspected."""
    assert transport_chunk_size(262_144, "cpu") == 64
    assert transport_chunk_size(262_144, torch.device("cuda")) == GPU_CHUNK_BYTES // (4 * 262_144) == 1024
    assert transport_chunk_size(49_152, "cuda:0") == 5461
    assert transport_chunk_size(1 << 40, "cuda") == 1  # never 0
