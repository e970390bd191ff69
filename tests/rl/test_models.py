"""Model helpers: disable_dropout zeroes every dropout probability (modules and attention floats)."""

from __future__ import annotations

import torch

from tokenmover.rl.models import disable_dropout


def test_disable_dropout_zeroes_dropout_modules_and_attention_probabilities():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=1, n_head=2))
    assert any(m.p > 0 for m in gpt2.modules() if isinstance(m, torch.nn.Dropout))
    disable_dropout(gpt2)
    assert all(m.p == 0 for m in gpt2.modules() if isinstance(m, torch.nn.Dropout))

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2, attention_dropout=0.1))
    attention = llama.model.layers[0].self_attn
    assert attention.attention_dropout == 0.1  # a float the attention passes to SDPA in train mode
    disable_dropout(llama)
    assert attention.attention_dropout == 0.0
    assert llama.config.attention_dropout == 0.1  # the saved config is left as it is
