"""tokenmover.head needs no TRL: plain PyTorch loops (and GPU benchmarks on machines without TRL)
use LogitHead and transport_from_hidden directly; tokenmover.fused_head re-exports them."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_head_runs_with_trl_unimportable():
    code = textwrap.dedent("""
        import sys
        sys.modules["trl"] = None  # any import of trl now fails
        import torch
        from torch import nn
        from tokenmover import build_cluster_tree, distance
        from tokenmover.regularizer import Regularizer
        from tokenmover.head import LogitHead, transport_from_hidden
        from tokenmover import fused_head
        assert fused_head.LogitHead is LogitHead and fused_head.transport_from_hidden is transport_from_hidden

        torch.manual_seed(0)
        v, d, n = 40, 6, 9
        policy, ref = nn.Linear(d, v, bias=False), nn.Linear(d, v, bias=False)
        ref.requires_grad_(False)
        tree = build_cluster_tree(torch.randn(v, 4), branching=3, leaf_size=4)
        h = torch.randn(n, d, requires_grad=True)
        h_ref = torch.randn(n, d)
        reg = Regularizer("tree", structure=tree, backend="torch")
        term = transport_from_hidden(h, h_ref, LogitHead(policy), LogitHead(ref), reg, chunk_size=4)
        want = distance(policy(h), ref(h_ref), "tree", structure=tree, backend="torch")
        assert torch.allclose(term.penalty, want, rtol=1e-5, atol=1e-7), (term.penalty, want)
        term.penalty.sum().backward()
        assert h.grad is not None and policy.weight.grad is not None
        try:
            import tokenmover.integrations.trl  # noqa: F401
        except ImportError as err:
            assert "needs TRL" in str(err)
        else:
            raise AssertionError("the TRL adapters imported without TRL")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
