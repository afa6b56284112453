"""Sequence construction (docs/methods.md#sequence-construction), collation, and the deterministic global batch order."""

from __future__ import annotations

import json

import pytest

from kdcore.data import Collator, GlobalBatchPlan, PairDataset, encode_example, eval_batches
from kdcore.errors import DataError
from kdcore.task import Example
from kdcore_tasks.instruction import PROMPT_NO_INPUT, InstructionTask, format_prompt, read_jsonl


class CharTokenizer:
    """One id per character (ord), eos = 1, pad = 0: makes expected ids easy to write."""

    eos_token_id = 1
    pad_token_id = 0

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]


def test_sequence_construction_masks_the_prompt_and_appends_eos():
    enc = encode_example(CharTokenizer(), Example(prompt="ab", response="xyz"), max_length=512, max_prompt_length=256)
    seq = [97, 98, 120, 121, 122, 1]
    assert enc["input_ids"] == seq[:-1]
    # labels = seq[1:], with the first len(prompt) - 1 masked: the first label is the first response token
    assert enc["labels"] == [-100, 120, 121, 122, 1]


def test_truncation_keeps_first_prompt_tokens_and_caps_total_length():
    enc = encode_example(CharTokenizer(), Example(prompt="abcdef", response="xyz"), max_length=6, max_prompt_length=4)
    # prompt -> "abcd"; seq = a b c d x y (eos cut by max_length)
    assert enc["input_ids"] == [97, 98, 99, 100, 120]
    assert enc["labels"] == [-100, -100, -100, 120, 121]


def test_collate_right_pads_and_shares_teacher_tensors_for_one_tokenizer():
    tok = CharTokenizer()
    ds = PairDataset([Example("ab", "x"), Example("abcd", "xyz")], tok, None, 64, 32)
    batch = Collator(student_pad=0)([ds[0], ds[1]])
    s = batch["student"]
    assert s["input_ids"].shape == (2, 7)
    assert s["attention_mask"][0].tolist() == [1, 1, 1, 0, 0, 0, 0]
    assert s["labels"][0].tolist() == [-100, 120, 1, -100, -100, -100, -100]
    assert s["input_ids"][0, 3:].tolist() == [0, 0, 0, 0]
    assert batch["teacher"] is s


def test_two_tokenizers_are_collated_independently():
    class Doubler(CharTokenizer):
        eos_token_id = 2
        def encode(self, text, add_special_tokens=False):
            return [ord(c) for c in text for _ in range(2)]

    ds = PairDataset([Example("ab", "x")], CharTokenizer(), Doubler(), 64, 32)
    batch = Collator(0, 0)([ds[0]])
    assert batch["student"]["input_ids"].shape == (1, 3)
    assert batch["teacher"]["input_ids"].shape == (1, 6)
    assert batch["teacher"]["labels"][0].tolist() == [-100, -100, -100, 120, 120, 2]


@pytest.mark.parametrize("world, accum", [(1, 4), (2, 2), (4, 1)])
def test_global_batches_do_not_depend_on_the_layout(world, accum):
    reference = GlobalBatchPlan(50, micro_batch_size=2, grad_accum=4, world_size=1, seed=7)
    assert reference.steps_per_epoch == 6
    for step in range(14):  # crosses two epoch boundaries
        want = sorted(i for mb in reference.micro_batches(step) for i in mb)
        got = sorted(i for r in range(world)
                     for mb in GlobalBatchPlan(50, 2, accum, world, r, seed=7).micro_batches(step) for i in mb)
        assert got == want and len(set(got)) == 8


def test_plan_is_resumable_and_reshuffles_each_epoch():
    full = list(GlobalBatchPlan(20, 2, 1, seed=3, max_steps=12))
    resumed = list(GlobalBatchPlan(20, 2, 1, seed=3, start_step=5, max_steps=12))
    assert full[5:] == resumed
    plan = GlobalBatchPlan(20, 2, 1, seed=3)
    assert plan.epoch_order(0) != plan.epoch_order(1)
    assert sorted(plan.epoch_order(1)) == list(range(20))


def test_eval_batches_cover_every_example_once():
    got = sorted(i for r in range(3) for b in eval_batches(10, 3, world_size=3, rank=r) for i in b)
    assert got == list(range(10))


def test_instruction_formats(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"instruction": "Summarize.", "context": "Cats sleep a lot.", "response": "Cats sleep much."},
        {"prompt": "Q<n>A", "output": ["one", "two"]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    exs = read_jsonl(path)
    assert exs[0].prompt == PROMPT_NO_INPUT.format(instruction="Name a colour.")
    assert "### Input:\nCats sleep a lot.\n\n### Response:\n" in exs[1].prompt and exs[1].response == "Cats sleep much."
    assert exs[2].prompt == "Q\nA" and exs[2].references == ["one", "two"] and exs[2].response == "one"
    assert format_prompt("Do it.", "  ") == PROMPT_NO_INPUT.format(instruction="Do it.")


def test_malformed_data_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"instruction": "ok", "output": "fine"}) + "\n{not json\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text(json.dumps({"instruction": "no output"}) + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1: needs an 'output'"):
        read_jsonl(path)
    with pytest.raises(DataError, match="data file not found"):
        InstructionTask(data_dir=str(tmp_path / "nowhere")).check()


def test_committed_instruction_set_loads():
    from conftest import DATA_DIR

    task = InstructionTask(data_dir=str(DATA_DIR))
    sizes = {split: len(task.examples(split)) for split in ("train", "valid", "test")}
    assert sizes == {"train": 320, "valid": 40, "test": 40}
    train_prompts = {e.prompt for e in task.examples("train")}
    assert not train_prompts & {e.prompt for e in task.examples("test")}
