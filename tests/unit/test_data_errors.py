"""Malformed inputs: one clear line under on_error=raise, an exact drop count under on_error=skip."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from align.data import load_recipe_data
from align.errors import DataError

TINY = Path(__file__).resolve().parents[2] / "align" / "assets" / "tiny"
GOOD = {"prompt": "q", "chosen": "good answer", "rejected": "bad answer"}


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TINY))


def run(tmp_path: Path, tok, lines: list[str], on_error: str, kind: str = "preference", **recipe):
    (tmp_path / "rows.jsonl").write_text("".join(line + "\n" for line in lines))
    source = {"path": "rows.jsonl", "format": "preference" if kind == "preference" else "messages"}
    spec = {"kind": kind, "sources": [source], **recipe}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    return load_recipe_data(str(tmp_path / "r.yaml"), kind, tok, on_error=on_error, cache_dir=str(tmp_path / "cache"))


def rows(*extra: dict | str, good: int = 3) -> list[str]:
    """Good rows with the bad ones after them (so the bad ones are on lines good+1, ...)."""
    good_rows = [json.dumps({**GOOD, "prompt": f"q{i}"}) for i in range(good)]
    return good_rows + [e if isinstance(e, str) else json.dumps(e) for e in extra]


# (bad rows, the error's expected text after "source 'rows.jsonl' line 4: ", drop reason)
CORPUS = {
    "bad_json": (['{"prompt": "q", "chosen": '], "bad JSON (Expecting value at column 26)", "bad_json"),
    "missing": ([{"prompt": "q", "chosen": "c"}], "field 'rejected': missing", "missing"),
    "null": ([{"prompt": "q", "chosen": "c", "rejected": None}], "field 'rejected': missing", "missing"),
    "wrong_type": (
        [{"prompt": 7, "chosen": "c", "rejected": "r"}],
        "field 'prompt': wrong type: expected a string or list of messages, got int",
        "wrong_type",
    ),
    "not_an_object": (["[1, 2]"], "expected an object, got list", "wrong_type"),
    "empty": ([{"prompt": "q", "chosen": " \n ", "rejected": "r"}], "field 'chosen': empty text", "empty"),
    "bad_role": (
        [{"prompt": [{"role": "robot", "content": "x"}], "chosen": "c", "rejected": "r"}],
        "field 'prompt[0].role': unknown role 'robot'",
        "invalid",
    ),
}


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_row_raises_one_clear_line(tmp_path, tok, case):
    bad, expected, _ = CORPUS[case]
    with pytest.raises(DataError) as e:
        run(tmp_path, tok, rows(*bad), "raise")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'r.yaml'}: source 'rows.jsonl' line 4: ")
    assert expected in message


@pytest.mark.parametrize("case", sorted(CORPUS))
def test_malformed_row_is_counted_under_skip(tmp_path, tok, case):
    bad, _, reason = CORPUS[case]
    data = run(tmp_path, tok, rows(*bad, *bad), "skip")
    (report,) = data.reports
    assert (report.rows_read, report.rows_kept, report.dropped) == (5, 3, {reason: 2})
    assert len(data.train) == 3


def test_recipe_policy_is_used_when_the_caller_gives_none(tmp_path, tok):
    (tmp_path / "rows.jsonl").write_text("\n".join(rows("{oops")) + "\n")
    spec = {
        "kind": "preference",
        "on_error": "skip",
        "sources": [{"path": "rows.jsonl", "format": "preference"}],
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    data = load_recipe_data(str(tmp_path / "r.yaml"), "preference", tok, cache_dir=str(tmp_path / "c"))
    assert data.reports[0].dropped == {"bad_json": 1}


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_chosen_equals_rejected_is_filtered_and_counted(tmp_path, tok, on_error):
    same = {"prompt": "q", "chosen": "same", "rejected": "same"}
    data = run(tmp_path, tok, rows(same, {**same, "prompt": "other"}), on_error)
    assert data.reports[0].dropped == {"chosen_equals_rejected": 2}
    assert data.reports[0].rows_kept == 3


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_over_long_rows_are_filtered_and_counted(tmp_path, tok, on_error):
    long = {"prompt": "q", "chosen": "word " * 200, "rejected": "short"}
    data = run(tmp_path, tok, rows(long, long | {"prompt": "q2"}), on_error, max_length=64)
    assert data.reports[0].dropped == {"too_long": 2}
    assert all(len(ids) <= 64 for ids in data.train["chosen_input_ids"])


def test_a_source_left_empty_by_filters_is_an_error(tmp_path, tok):
    long = {"prompt": "q", "chosen": "word " * 200, "rejected": "short"}
    with pytest.raises(DataError, match=r"source 'rows.jsonl': no rows left of 3 read \(too_long 3\)"):
        run(
            tmp_path,
            tok,
            rows(long, long | {"prompt": "2"}, long | {"prompt": "3"}, good=0),
            "raise",
            max_length=64,
        )


def test_caller_max_length_and_recipe_limit_take_the_smaller(tmp_path, tok):
    mid = {"prompt": "q", "chosen": "word " * 20, "rejected": "short"}
    data = run(tmp_path, tok, rows(mid), "raise", max_length=1000)
    assert data.reports[0].dropped == {}
    data = load_recipe_data(str(tmp_path / "r.yaml"), "preference", tok, max_length=20, cache_dir=str(tmp_path / "c"))
    assert data.reports[0].dropped == {"too_long": 1}


def test_exact_duplicates_are_dropped_and_counted(tmp_path, tok):
    data = run(tmp_path, tok, rows(GOOD, GOOD, good=2), "raise")
    assert data.reports[0].dropped == {"duplicate": 1}
    assert data.reports[0].rows_kept == 3


def test_file_not_found(tmp_path, tok):
    spec = {"kind": "sft", "sources": [{"path": "nope.jsonl", "format": "messages"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    for on_error in ("raise", "skip"):  # a missing file is a recipe error, not a row to skip
        with pytest.raises(DataError, match=r"r\.yaml: source 'nope\.jsonl': file not found"):
            load_recipe_data(str(tmp_path / "r.yaml"), "sft", tok, on_error=on_error, cache_dir=str(tmp_path))


def test_unknown_format_name(tmp_path, tok):
    spec = {"kind": "sft", "sources": [{"path": "x.jsonl", "format": "alpacca"}]}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DataError, match=r"source 'x\.jsonl': unknown format 'alpacca' \(known: messages, "):
        load_recipe_data(str(tmp_path / "r.yaml"), "sft", tok, cache_dir=str(tmp_path))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({"kind": "dpo", "sources": []}, "'kind' must be one of sft, preference, prompt"),
        (
            {"kind": "sft", "sources": [{"path": "x", "format": "messages", "wieght": 1}]},
            "unknown key 'wieght'",
        ),
        ({"kind": "sft", "sorces": []}, "unknown key 'sorces'"),
        (
            {"kind": "sft", "sources": [{"path": "x", "format": "hh"}], "eval": {"fraction": 2}},
            "eval fraction",
        ),
        ({"kind": "sft", "sources": [{"path": "x", "format": "prompt"}]}, "gives prompt rows, not sft rows"),
        (
            {"kind": "sft", "sources": [{"path": "x", "format": "messages", "weight": 1, "num_samples": 3}]},
            "not both",
        ),
    ],
)
def test_bad_recipes_fail_before_reading_data(tmp_path, tok, spec, expected):
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(DataError, match=re.escape(expected)):
        load_recipe_data(str(tmp_path / "r.yaml"), spec.get("kind", "sft") if spec.get("kind") != "dpo" else "sft", tok)


def test_kind_mismatch(tok):
    with pytest.raises(DataError, match=r"demo_prompts\.yaml: recipe is of kind 'prompt', but this stage needs 'sft'"):
        load_recipe_data("demo_prompts", "sft", tok)


def test_sft_row_without_assistant_turn(tmp_path, tok):
    good = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
    bad = json.dumps({"messages": [{"role": "user", "content": "q"}]})
    with pytest.raises(DataError, match=r"line 2: field 'messages': no assistant turn"):
        run(tmp_path, tok, [good, bad], "raise", kind="sft")
