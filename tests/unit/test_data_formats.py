"""Each format adapter on rows written in that format, read through a recipe like a user's data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from align.data import load_recipe_data
from align.data.formats import RowError, hh_format, parse_hh_transcript, preference_format
from align.modeling.chat import encode, render

TINY = Path(__file__).resolve().parents[2] / "align" / "assets" / "tiny"
U, A, S = "user", "assistant", "system"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TINY))


def msg(role: str, content: str) -> dict:
    return {"role": role, "content": content}


def load(tmp_path: Path, tok, kind: str, fmt: str, rows: list, **source) -> list[dict]:
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {"kind": kind, "sources": [{"path": "rows.jsonl", "format": fmt, **source}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    data = load_recipe_data(str(tmp_path / "r.yaml"), kind, tok, cache_dir=str(tmp_path / "cache"))
    # The mixture is shuffled; sort back to file order by content for readable asserts.
    return list(data.train)


def test_messages_sft_has_tokens_and_assistant_mask(tmp_path, tok):
    rows = [{"messages": [msg(S, "Be brief."), msg(U, "hi"), msg(A, "hello")]}]
    (row,) = load(tmp_path, tok, "sft", "messages", rows)
    assert row["messages"] == rows[0]["messages"]
    text = render(tok, rows[0]["messages"], False)
    assert row["input_ids"] == encode(tok, text)
    learned = tok.decode([t for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m])
    assert learned == "hello<|im_end|>\n"


def test_sharegpt_roles_are_mapped(tmp_path, tok):
    conv = [
        {"from": "system", "value": "sys"},
        {"from": "human", "value": "q1"},
        {"from": "gpt", "value": "a1"},
        {"from": "human", "value": "q2"},
        {"from": "gpt", "value": "a2"},
    ]
    (row,) = load(tmp_path, tok, "sft", "sharegpt", [{"conversations": conv, "id": "x"}])
    assert row["messages"] == [msg(S, "sys"), msg(U, "q1"), msg(A, "a1"), msg(U, "q2"), msg(A, "a2")]


def test_alpaca_with_and_without_input(tmp_path, tok):
    rows = [
        {"instruction": "Translate.", "input": "bonjour", "output": "hello"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    got = sorted(r["messages"][0]["content"] for r in load(tmp_path, tok, "sft", "alpaca", rows))
    assert got == ["Say hi.", "Translate.\n\nbonjour"]


def test_prompt_completion_strings_and_messages(tmp_path, tok):
    rows = [
        {"prompt": "2+2?", "completion": "4"},
        {"prompt": [msg(S, "math"), msg(U, "3+3?")], "completion": [msg(A, "6")]},
    ]
    got = sorted((r["messages"] for r in load(tmp_path, tok, "sft", "prompt_completion", rows)), key=len)
    assert got == [[msg(U, "2+2?"), msg(A, "4")], [msg(S, "math"), msg(U, "3+3?"), msg(A, "6")]]


def test_explicit_preference_strings(tmp_path, tok):
    (row,) = load(tmp_path, tok, "preference", "preference", [{"prompt": "q", "chosen": "good", "rejected": "bad"}])
    assert (row["prompt"], row["chosen"], row["rejected"]) == (
        [msg(U, "q")],
        [msg(A, "good")],
        [msg(A, "bad")],
    )
    assert row["chosen_input_ids"] == encode(tok, render(tok, [msg(U, "q"), msg(A, "good")], False))
    assert row["rejected_input_ids"] == encode(tok, render(tok, [msg(U, "q"), msg(A, "bad")], False))


def test_a_preference_pair_keeps_its_margin(tmp_path, tok):
    (row,) = load(
        tmp_path, tok, "preference", "preference", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}]
    )
    assert row["margin"] == 2.0
    (pair,) = preference_format({"prompt": "q", "chosen": "a", "rejected": "b", "gap": 0.5}, {"margin": "gap"})
    assert pair["margin"] == 0.5
    with pytest.raises(RowError, match="expected a number"):
        preference_format({"prompt": "q", "chosen": "a", "rejected": "b", "margin": "big"}, {})


def test_ultrafeedback_binarized_repeats_prompt_in_responses():
    row = {
        "prompt": "q",
        "chosen": [msg(U, "q"), msg(A, "good")],
        "rejected": [msg(U, "q"), msg(A, "bad")],
        "score_chosen": 8.0,
        "score_rejected": 3.0,
    }
    (pair,) = preference_format(row, {})
    assert pair == {"prompt": [msg(U, "q")], "chosen": [msg(A, "good")], "rejected": [msg(A, "bad")]}


def test_implicit_prompt_is_the_shared_prefix():
    conv = [msg(U, "q1"), msg(A, "a1"), msg(U, "q2")]
    row = {"chosen": [*conv, msg(A, "good")], "rejected": [*conv, msg(A, "bad")]}
    (pair,) = preference_format(row, {})
    assert pair["prompt"] == conv and pair["chosen"] == [msg(A, "good")]


HH_MULTI = (
    "\n\nHuman: What is a good pet?"
    "\n\nAssistant: A cat or a dog."
    "\n\nHuman: Which is quieter?"
    "\n\nAssistant: Cats, usually."
    "\n\nHuman: And cheaper?"
    "\n\nAssistant: "
)


def test_hh_multi_turn_prompt_keeps_all_exchanges(tmp_path, tok):
    row = {"chosen": HH_MULTI + "Cats, in most places.", "rejected": HH_MULTI + "No idea."}
    (pair,) = load(tmp_path, tok, "preference", "hh", [row])
    assert pair["prompt"] == [
        msg(U, "What is a good pet?"),
        msg(A, "A cat or a dog."),
        msg(U, "Which is quieter?"),
        msg(A, "Cats, usually."),
        msg(U, "And cheaper?"),
    ]
    assert pair["chosen"] == [msg(A, "Cats, in most places.")]
    assert pair["rejected"] == [msg(A, "No idea.")]


def test_hh_unusual_whitespace():
    # No leading blank line, a leading space, double spaces after the colon, trailing newlines,
    # and a newline (not a turn) inside a turn.
    text = " Human:  hi there \n\n Assistant:hello\nworld \n\n\nHuman: bye\n\nAssistant:   ok  \n"
    assert parse_hh_transcript(text, "chosen") == [
        msg(U, "hi there"),
        msg(A, "hello\nworld"),
        msg(U, "bye"),
        msg(A, "ok"),
    ]


def test_hh_prompts_must_match():
    row = {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}
    with pytest.raises(RowError) as e:
        hh_format(row, {})
    assert e.value.reason == "invalid" and "differ before the final turn" in e.value.detail


def test_ranked_best_vs_rest_and_all_pairs(tmp_path, tok):
    row = {"prompt": "q", "responses": ["r1", "r2", "r3", "r4"], "scores": [2, 9, 5, 5]}
    best = load(tmp_path, tok, "preference", "ranked", [row])
    assert sorted((p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in best) == [
        ("r2", "r1"),
        ("r2", "r3"),
        ("r2", "r4"),
    ]
    every = load(tmp_path, tok, "preference", "ranked", [row], pairs="all_pairs")
    # 6 pairs minus the r3/r4 tie.
    assert len(every) == 5
    assert ("r3", "r1") in {(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in every}


def test_ultrafeedback_completions_with_scores(tmp_path, tok):
    row = {
        "instruction": "q",
        "completions": [
            {"response": "meh", "overall_score": 4.0},
            {"response": "best", "overall_score": 9.5},
            {"response": "bad", "overall_score": 1.0},
        ],
    }
    pairs = load(tmp_path, tok, "preference", "ultrafeedback", [row])
    assert sorted(p["rejected"][0]["content"] for p in pairs) == ["bad", "meh"]
    assert all(p["chosen"] == [msg(A, "best")] and p["prompt"] == [msg(U, "q")] for p in pairs)


def test_prompt_kind_from_strings_messages_and_conversations(tmp_path, tok):
    rows = [
        {"prompt": "plain"},
        {"prompt": [msg(S, "s"), msg(U, "u1"), msg(A, "a1"), msg(U, "u2"), msg(A, "a2")]},
    ]
    got = sorted((r["prompt"] for r in load(tmp_path, tok, "prompt", "prompt", rows)), key=len)
    assert got == [[msg(U, "plain")], [msg(S, "s"), msg(U, "u1"), msg(A, "a1"), msg(U, "u2")]]
    row = got[0]
    (loaded,) = load(tmp_path, tok, "prompt", "prompt", [{"prompt": "plain"}])
    assert loaded["prompt_input_ids"] == encode(tok, render(tok, row, True))
    # A conversation source gives prompts too: cut after its last user turn.
    conv = [{"messages": [msg(U, "q"), msg(A, "a")]}]
    (p,) = load(tmp_path, tok, "prompt", "messages", conv)
    assert p["prompt"] == [msg(U, "q")]


def test_hh_as_prompts_and_as_sft(tmp_path, tok):
    row = {"chosen": HH_MULTI + "yes", "rejected": HH_MULTI + "no"}
    (p,) = load(tmp_path, tok, "prompt", "hh", [row])
    assert p["prompt"][-1] == msg(U, "And cheaper?")
    (s,) = load(tmp_path, tok, "sft", "hh", [row])
    assert s["messages"][-1] == msg(A, "yes")


@pytest.mark.parametrize("suffix", ["json", "parquet", "csv"])
def test_other_file_types(tmp_path, tok, suffix):
    import datasets

    rows = [{"instruction": f"i{k}", "input": "", "output": f"o{k}"} for k in range(3)]
    path = tmp_path / f"rows.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        getattr(datasets.Dataset.from_list(rows), f"to_{suffix}")(str(path))
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump({"kind": "sft", "sources": [{"path": path.name, "format": "alpaca"}]})
    )
    data = load_recipe_data(str(tmp_path / "r.yaml"), "sft", tok, cache_dir=str(tmp_path / "c"))
    assert sorted(r["messages"][1]["content"] for r in data.train) == ["o0", "o1", "o2"]


def test_directory_and_glob_sources(tmp_path, tok):
    (tmp_path / "d").mkdir()
    for k in range(3):
        (tmp_path / "d" / f"part{k}.jsonl").write_text(json.dumps({"prompt": f"p{k}"}) + "\n")
    for path, expected in (("d", 3), ("d/part[01].jsonl", 2)):
        (tmp_path / "r.yaml").write_text(
            yaml.safe_dump({"kind": "prompt", "sources": [{"path": path, "format": "prompt"}]})
        )
        data = load_recipe_data(str(tmp_path / "r.yaml"), "prompt", tok, cache_dir=str(tmp_path / "c"))
        assert len(data.train) == expected


def test_columns_map_renamed_fields(tmp_path, tok):
    rows = [{"question": "q", "good": "g", "bad": "b"}]
    columns = {"prompt": "question", "chosen": "good", "rejected": "bad"}
    (pair,) = load(tmp_path, tok, "preference", "preference", rows, columns=columns)
    assert pair["chosen"] == [msg(A, "g")]


def test_blank_system_turn_is_omitted(tmp_path, tok):
    conv = [{"from": "system", "value": ""}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    (row,) = load(tmp_path, tok, "sft", "sharegpt", [{"conversations": conv}])
    assert row["messages"] == [msg(U, "q"), msg(A, "a")]


def test_all_tied_scores_are_counted_not_raised(tmp_path, tok):
    rows = [
        {"prompt": "q", "responses": ["a", "b"], "scores": [1, 2]},
        {"prompt": "t", "responses": ["a", "b"], "scores": [3, 3]},
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(
        yaml.safe_dump({"kind": "preference", "sources": [{"path": "rows.jsonl", "format": "ranked"}]})
    )
    data = load_recipe_data(str(tmp_path / "r.yaml"), "preference", tok, cache_dir=str(tmp_path / "c"))
    assert (data.reports[0].rows_kept, data.reports[0].dropped) == (1, {"tied_scores": 1})


def test_hub_ids_go_through_load_dataset(tmp_path, tok, monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, **kwargs):
        calls.append((path, kwargs))
        transcript = "\n\nHuman: hi\n\nAssistant: "
        return [{"chosen": transcript + "hello", "rejected": transcript + "go away"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    spec = {
        "kind": "preference",
        "sources": [{"path": "Anthropic/hh-rlhf", "data_dir": "helpful-base", "split": "test", "format": "hh"}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    data = load_recipe_data(str(tmp_path / "r.yaml"), "preference", tok, cache_dir=str(tmp_path / "c"))
    assert calls == [
        ("Anthropic/hh-rlhf", {"name": None, "data_dir": "helpful-base", "revision": None, "split": "test"})
    ]
    assert data.train[0]["chosen"] == [msg(A, "hello")]
