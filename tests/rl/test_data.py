"""Prompt sources and the step -> prompts order (deterministic, epoch-complete, split over processes)."""

from __future__ import annotations

import json

import pytest

from tokenmover.rl.config import GRPOConfig
from tokenmover.rl.data import PromptOrder, load_prompts


def test_text_and_jsonl_files_and_inline(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt  \n")
    assert load_prompts(GRPOConfig(prompts_file=str(txt))) == ["first prompt", "second prompt"]
    jl = tmp_path / "p.jsonl"
    jl.write_text(json.dumps({"question": "a?"}) + "\n\n" + json.dumps({"question": "b?"}) + "\n")
    assert load_prompts(GRPOConfig(prompts_file=str(jl), prompt_field="question")) == ["a?", "b?"]
    assert load_prompts(GRPOConfig(prompts=["x", "y"])) == ["x", "y"]


def test_datasets_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"prompt": ["p1", "p2", "p3"]}).save_to_disk(str(folder))
    assert load_prompts(GRPOConfig(dataset_name=str(folder))) == ["p1", "p2", "p3"]
    with pytest.raises(ValueError, match="no column 'text'"):
        load_prompts(GRPOConfig(dataset_name=str(folder), prompt_field="text"))


def test_bad_prompt_sources(tmp_path):
    with pytest.raises(ValueError, match="no prompts"):
        load_prompts(GRPOConfig())
    with pytest.raises(ValueError, match="does not exist"):
        load_prompts(GRPOConfig(prompts_file=str(tmp_path / "none.txt")))


@pytest.mark.parametrize(("name", "text", "message"), [
    ("bad.jsonl", '{"prompt": "ok"}\n{not json}\n', "bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"text": "no prompt field"}\n', "bad.jsonl:1: expected an object with a 'prompt' field"),
    ("p.json", '{"prompt": "x"}', "expected a JSON list"),  # a .json file must hold a list
    ("p.json", '[{"text": "x"}]', "entry 0 is neither a string nor an object with a 'prompt' field"),
])
def test_bad_prompt_files_name_the_problem(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_prompts(GRPOConfig(prompts_file=str(path)))


def test_order_is_a_function_of_the_step_and_covers_each_epoch():
    order = PromptOrder(num_prompts=5, prompts_per_step=2, seed=3)
    seq = [i for step in range(10) for i in order.global_indices(step)]  # 20 = 4 epochs of 5
    for epoch in range(4):
        assert sorted(seq[5 * epoch:5 * epoch + 5]) == list(range(5))
    fresh = PromptOrder(num_prompts=5, prompts_per_step=2, seed=3)
    assert fresh.global_indices(7) == order.global_indices(7)  # no hidden state: resuming is exact
    assert order.position(3) == {"prompts_consumed": 6, "epoch": 1, "offset_in_epoch": 1}


def test_neighbouring_seeds_do_not_share_their_orders():
    """seed + epoch would give seed 1 the orders of seed 0 one epoch later."""
    a, b = PromptOrder(8, 2, seed=0), PromptOrder(8, 2, seed=1)
    later_a = [a.global_indices(s) for s in range(4, 20)]
    assert [b.global_indices(s) for s in range(16)] != later_a
    epochs = [tuple(PromptOrder(8, 8, seed=sd).global_indices(e)) for sd in range(3) for e in range(3)]
    assert len(set(epochs)) == len(epochs)  # 9 epochs of 3 seeds, 8! orders: all distinct


@pytest.mark.parametrize("name", ["p.JSONL", "p.jsonl", "p.json", "p.Json"])
def test_json_prompt_files_whatever_the_case_of_the_suffix(tmp_path, name):
    path = tmp_path / name
    if name.lower().endswith(".jsonl"):
        path.write_text('{"prompt": "hello there"}\n{"prompt": "bye"}\n')
    else:
        path.write_text('[{"prompt": "hello there"}, "bye"]')
    assert load_prompts(GRPOConfig(prompts_file=str(path))) == ["hello there", "bye"]

