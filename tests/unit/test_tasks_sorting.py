"""The sorting task's gold score, by hand, and its demo data."""

from __future__ import annotations

import json
import random

import pytest

from align.tasks.sorting import gold_reward, gold_score, make_demo_data, noisy_response, prompt_numbers

P = "Sort: 42 7 19"


@pytest.mark.parametrize(
    ("response", "score"),
    [
        ("7 19 42", 1.0),
        ("  7, 19,42 \n", 1.0),  # commas and outer whitespace are fine
        ("7 19 42<|im_end|>", 1.0),
        ("19 7 42", 0.5 + 0.5 * 1 / 2),  # all numbers; one of two neighbour pairs in order
        ("42 19 7", 0.5),  # all numbers, no pair in order
        ("7 19", 0.5 * 2 / 3 + 0.5),  # one missing
        ("7 19 42 42", 0.5 * 3 / 4 + 0.5),  # one extra: overlap 3 of the longer 4
        ("7 20 42", 0.5 * 2 / 3 + 0.5),  # one wrong number
        ("7", 0.5 * 1 / 3),  # a single number has no pairs
        ("The answer is 7 19 42", 0.0),  # prose is unparsable
        ("", 0.0),
        ("7 19 -42", 0.0),
    ],
)
def test_gold_score_by_hand(response, score):
    assert gold_score(P, response) == pytest.approx(score)


def test_only_the_exact_answer_scores_one():
    assert gold_score("Put in increasing order: 5 5 1", "1 5 5") == 1.0
    assert gold_score("Put in increasing order: 5 5 1", "1 5") < 1.0


def test_prompt_numbers_from_rendered_chatml():
    rendered = (
        "<|im_start|>system\nBe 1 brief.<|im_end|>\n<|im_start|>user\nSort: 3 2 1<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompt_numbers(rendered) == [3, 2, 1]


def test_gold_reward_is_the_batch_form():
    assert gold_reward([P, P], ["7 19 42", "nope"]) == [1.0, 0.0]


def test_noisy_response_is_chatty_or_wrong_as_asked():
    rng = random.Random(0)
    numbers = [4, 7, 1, 7]
    assert noisy_response(rng, numbers, quality=1.0) == "1 4 7 7"
    chatty = [noisy_response(rng, numbers, quality=1.0, chatty=1.0) for _ in range(50)]
    assert all(gold_score("Sort: 4 7 1 7", r) == 0.0 for r in chatty)  # prose is unparsable
    wrong = [gold_score("Sort: 4 7 1 7", noisy_response(rng, numbers, quality=0.0)) for _ in range(200)]
    assert sum(0.0 < g < 1.0 for g in wrong) > 0.8 * len(wrong)  # partial credit (a mistake may be harmless)


def test_demo_data_is_deterministic_and_eval_is_held_out(tmp_path):
    counts = make_demo_data(tmp_path / "a", seed=3)
    make_demo_data(tmp_path / "b", seed=3)
    assert counts == {"sft.jsonl": 600, "prefs.jsonl": 1500, "prompts.jsonl": 500, "prompts_eval.jsonl": 200}
    for name in counts:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()

    def rows(name):
        return [json.loads(line) for line in (tmp_path / "a" / name).read_text().splitlines()]

    train = {tuple(prompt_numbers(r["prompt"])) for name in ("prefs.jsonl", "prompts.jsonl") for r in rows(name)}
    train |= {
        tuple(prompt_numbers(m["content"])) for r in rows("sft.jsonl") for m in r["messages"] if m["role"] == "user"
    }
    assert not train & {tuple(prompt_numbers(r["prompt"])) for r in rows("prompts_eval.jsonl")}
    sft = rows("sft.jsonl")
    assert 0.05 < sum(len(r["messages"]) > 3 for r in sft) / len(sft) < 0.2  # about 10% two-turn
    assert any(r["messages"][0]["role"] == "system" for r in sft)
    # Mixed-quality demonstrations: about 30% chatty (unparsable), some with mistakes, the rest exact.
    golds = [
        gold_score(messages[i - 1]["content"], m["content"])
        for messages in (r["messages"] for r in sft)
        for i, m in enumerate(messages)
        if m["role"] == "assistant"
    ]
    assert 0.25 < sum(g == 0 for g in golds) / len(golds) < 0.35
    assert 0.1 < sum(0 < g < 1 for g in golds) / len(golds) < 0.2
    assert 0.5 < sum(g == 1 for g in golds) / len(golds) < 0.65
    prefs = rows("prefs.jsonl")
    better = sum(gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in prefs)
    assert 0.85 < better / len(prefs) < 0.95  # 10% label noise


def test_committed_demo_files_match_the_generator(tmp_path):
    from align.tasks.sorting import DEMO_DIR

    make_demo_data(tmp_path, seed=0)
    for path in sorted(tmp_path.iterdir()):
        assert (DEMO_DIR / path.name).read_bytes() == path.read_bytes(), f"regenerate {path.name}"
