"""Recipes as a whole: mixtures, eval split, include, cache, ranks, the shipped recipes."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

import align.data.load
from align.data import load_recipe_data, resolve_recipe_path
from align.data.formats import other_column_names, read_other_columns
from align.data.mix import mixture_counts
from align.data.recipe import RECIPE_DIR, load_recipe
from align.errors import DataError

TINY = Path(__file__).resolve().parents[2] / "align" / "assets" / "tiny"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(TINY))


def write_prompts(path: Path, tag: str, n: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"prompt": f"{tag} {i}"}) + "\n" for i in range(n)))


def write_recipe(path: Path, **spec) -> str:
    path.write_text(yaml.safe_dump({"kind": "prompt", **spec}))
    return str(path)


def tags(data) -> Counter:
    return Counter(row["prompt"][0]["content"].split()[0] for row in data.train)


def two_sources(tmp_path: Path, a: dict, b: dict, **spec) -> str:
    write_prompts(tmp_path / "a.jsonl", "a", 100)
    write_prompts(tmp_path / "b.jsonl", "b", 50)
    sources = [{"path": "a.jsonl", "format": "prompt", **a}, {"path": "b.jsonl", "format": "prompt", **b}]
    return write_recipe(tmp_path / "mix.yaml", sources=sources, **spec)


def test_weights_are_probabilities_of_the_mixture(tmp_path, tok):
    recipe = two_sources(tmp_path, {"weight": 3}, {"weight": 1}, num_samples=400)
    data = load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c"))
    counts = tags(data)
    assert len(data.train) == 400
    assert abs(counts["a"] / 400 - 0.75) < 0.01
    # b has 50 rows and is drawn 100 times: every row exactly twice.
    assert set(
        Counter(r["prompt"][0]["content"] for r in data.train if r["prompt"][0]["content"][0] == "b").values()
    ) == {2}
    assert [r.rows_train for r in data.reports] == [300, 100]


def test_weights_without_a_total_reshare_the_sources_rows(tmp_path, tok):
    recipe = two_sources(tmp_path, {"weight": 1}, {"weight": 1})
    counts = tags(load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c")))
    assert counts == {"a": 75, "b": 75}


def test_counts_and_take_all(tmp_path, tok):
    recipe = two_sources(tmp_path, {"num_samples": 10}, {})
    counts = tags(load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c")))
    assert counts == {"a": 10, "b": 50}


def test_mixture_counts_add_up_exactly():
    assert mixture_counts([10, 10, 10], [1, 1, 1], [None] * 3, 100) == [34, 33, 33]
    assert sum(mixture_counts([5, 7], [0.3, 0.7], [None, None], 1001)) == 1001
    assert mixture_counts([5, 7, 9], [None, 2.0, None], [3, None, None], 4) == [3, 4, 9]


def test_same_seed_same_data_other_seed_other_order(tmp_path, tok):
    recipe = two_sources(tmp_path, {"weight": 1}, {"weight": 2}, eval={"fraction": 0.1})
    first = load_recipe_data(recipe, "prompt", tok, seed=1, cache_dir=str(tmp_path / "c1"))
    again = load_recipe_data(recipe, "prompt", tok, seed=1, cache_dir=str(tmp_path / "c2"))
    other = load_recipe_data(recipe, "prompt", tok, seed=2, cache_dir=str(tmp_path / "c3"))
    assert first.fingerprint == again.fingerprint
    assert list(first.train) == list(again.train)
    assert first.fingerprint != other.fingerprint


def test_eval_fraction_is_held_out_per_source(tmp_path, tok):
    recipe = two_sources(tmp_path, {}, {}, eval={"fraction": 0.1})
    data = load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c"))
    assert (len(data.train), len(data.eval)) == (135, 15)
    assert [(r.rows_train, r.rows_eval) for r in data.reports] == [(90, 10), (45, 5)]
    train = {r["prompt"][0]["content"] for r in data.train}
    assert not train & {r["prompt"][0]["content"] for r in data.eval}


def test_eval_sources_never_overlap_training(tmp_path, tok):
    write_prompts(tmp_path / "train.jsonl", "t", 20)
    # The eval file repeats two training prompts; they are dropped from eval as duplicates.
    (tmp_path / "eval.jsonl").write_text(
        "".join(json.dumps({"prompt": p}) + "\n" for p in ["t 0", "t 1", "e 0", "e 1", "e 2"])
    )
    recipe = write_recipe(
        tmp_path / "r.yaml",
        sources=[{"path": "train.jsonl", "format": "prompt"}],
        eval={"sources": [{"path": "eval.jsonl", "format": "prompt"}]},
    )
    data = load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c"))
    assert len(data.eval) == 3
    assert data.reports[1].role == "eval" and data.reports[1].dropped == {"duplicate": 2}


def test_include_another_recipe(tmp_path, tok):
    write_prompts(tmp_path / "base" / "data" / "x.jsonl", "x", 8)
    write_prompts(tmp_path / "y.jsonl", "y", 4)
    # The included recipe's relative paths start at its own folder.
    write_recipe(tmp_path / "base" / "base.yaml", sources=[{"path": "data/x.jsonl", "format": "prompt"}], seed=5)
    top = write_recipe(
        tmp_path / "top.yaml", include=["base/base.yaml"], sources=[{"path": "y.jsonl", "format": "prompt"}]
    )
    data = load_recipe_data(top, "prompt", tok, cache_dir=str(tmp_path / "c"))
    assert tags(data) == {"x": 8, "y": 4}
    assert load_recipe(top).seed == 5  # included settings are defaults the includer may override


def test_include_kind_mismatch_and_cycle(tmp_path):
    write_recipe(tmp_path / "a.yaml", include=["b.yaml"], sources=[{"path": "x", "format": "prompt"}])
    write_recipe(tmp_path / "b.yaml", include=["a.yaml"], sources=[{"path": "x", "format": "prompt"}])
    with pytest.raises(DataError, match="include cycle"):
        load_recipe(tmp_path / "a.yaml")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"kind": "sft", "sources": [{"path": "x", "format": "messages"}]}))
    write_recipe(tmp_path / "p.yaml", include=["s.yaml"])
    with pytest.raises(DataError, match=r"includes 's\.yaml' of kind 'sft', but this recipe is of kind 'prompt'"):
        load_recipe(tmp_path / "p.yaml")


def test_second_run_reads_the_cache_without_tokenising(tmp_path, tok, monkeypatch):
    recipe = two_sources(tmp_path, {}, {}, eval={"fraction": 0.1})
    first = load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c"))

    def fail(*args, **kwargs):
        raise AssertionError("tokenised again")

    monkeypatch.setattr(align.data.load, "tokenize_row", fail)
    second = load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c"))
    assert second.fingerprint == first.fingerprint
    assert list(second.train) == list(first.train) and list(second.eval) == list(first.eval)
    assert [r.line() for r in second.reports] == [r.line() for r in first.reports]
    # A changed source file, a different max_length or tokenizer template is a miss.
    for change in (
        lambda: write_prompts(tmp_path / "b.jsonl", "b", 51),
        lambda: load_recipe_data(recipe, "prompt", tok, max_length=100, cache_dir=str(tmp_path / "c")),
    ):
        with pytest.raises(AssertionError, match="tokenised again"):
            change()
            load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c"))


def test_cache_key_covers_the_chat_template(tmp_path, tok, monkeypatch):
    recipe = two_sources(tmp_path, {}, {})
    load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c"))
    other = AutoTokenizer.from_pretrained(str(TINY))
    other.chat_template = other.chat_template.replace("<|im_start|>", "<|im_start|> ")
    monkeypatch.setattr(align.data.load, "tokenize_row", lambda *a: (_ for _ in ()).throw(AssertionError("miss")))
    with pytest.raises(AssertionError, match="miss"):
        load_recipe_data(recipe, "prompt", other, cache_dir=str(tmp_path / "c"))


def test_other_ranks_wait_for_rank_zero(tmp_path, tok, monkeypatch):
    recipe = two_sources(tmp_path, {}, {})
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("ALIGN_DATA_WAIT_S", "0.2")
    with pytest.raises(DataError, match="rank 1 waited 0s for rank 0"):
        load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c"))
    monkeypatch.setenv("RANK", "0")
    prepared = load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c"))
    monkeypatch.setenv("RANK", "1")
    assert load_recipe_data(recipe, "prompt", tok, cache_dir=str(tmp_path / "c")).fingerprint == prepared.fingerprint


@pytest.mark.slow  # two Python processes, ~10 s; deselect with -m "not slow"
def test_rank_waits_while_another_process_prepares(tmp_path, tok):
    """Rank 1 starts first and polls; rank 0, a second process, publishes the folder."""
    recipe = two_sources(tmp_path, {}, {})
    code = (
        "import sys; from transformers import AutoTokenizer; from align.data import load_recipe_data;"
        f"d = load_recipe_data({recipe!r}, 'prompt', AutoTokenizer.from_pretrained({str(TINY)!r}),"
        f" cache_dir={str(tmp_path / 'c')!r}); print(d.fingerprint)"
    )
    env = {"PATH": "", "ALIGN_DATA_WAIT_S": "60", "HOME": str(tmp_path)}
    waiter = subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": "1"}, stdout=subprocess.PIPE, text=True)
    prepared = subprocess.run([sys.executable, "-c", code], env={**env, "RANK": "0"}, capture_output=True, text=True)
    out, _ = waiter.communicate(timeout=90)
    assert prepared.returncode == 0 and waiter.returncode == 0
    assert out.strip() == prepared.stdout.strip()


def test_resolve_recipe_path():
    assert resolve_recipe_path("demo_sft") == RECIPE_DIR / "demo_sft.yaml"
    assert resolve_recipe_path(str(RECIPE_DIR / "demo_sft.yaml")) == RECIPE_DIR / "demo_sft.yaml"
    with pytest.raises(DataError, match=r"unknown data recipe 'nope'.*known: .*demo_sft"):
        resolve_recipe_path("nope")
    with pytest.raises(DataError, match=r"data recipe file not found: missing\.yaml"):
        resolve_recipe_path("missing.yaml")


@pytest.mark.parametrize("path", sorted(RECIPE_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_recipes_parse(path):
    recipe = load_recipe(path)
    assert recipe.sources and recipe.kind in ("sft", "preference", "prompt")


@pytest.mark.parametrize(
    ("name", "kind", "train", "eval"),
    [
        ("demo_sft", "sft", 540, 60),
        ("demo_prefs", "preference", 1350, 150),
        ("demo_prompts", "prompt", 500, 0),
    ],
)
def test_demo_recipes_load(tmp_path, tok, name, kind, train, eval):
    data = load_recipe_data(name, kind, tok, cache_dir=str(tmp_path))
    assert (len(data.train), len(data.eval) if data.eval is not None else 0) == (train, eval)
    assert sum(sum(r.dropped.values()) for r in data.reports) == 0


def test_prompt_rows_carry_their_other_columns(tmp_path, tok):
    """A verifiable reward needs each prompt's answer: prompt rows keep the rest of their source row."""
    (tmp_path / "qa.jsonl").write_text(
        json.dumps({"question": "2 + 2?", "answer": "4", "meta": {"level": 1}}) + "\n"
        + json.dumps({"question": "2 + 2?", "answer": "four", "meta": {"level": 2}}) + "\n"
        + json.dumps({"question": "3 + 3?", "answer": "6"}) + "\n"
    )  # fmt: skip
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "chat.jsonl").write_text(json.dumps({"messages": chat, "id": 7}) + "\n")
    sources = [
        {"path": "qa.jsonl", "format": "prompt", "columns": {"prompt": "question"}},
        {"path": "chat.jsonl", "format": "messages"},
    ]
    data = load_recipe_data(write_recipe(tmp_path / "r.yaml", sources=sources, dedup=True), "prompt", tok, seed=0)
    by_prompt = {row["prompt"][-1]["content"]: read_other_columns(row) for row in data.train}
    # The prompt's own column is not repeated; a duplicate prompt is dropped whatever else its row holds.
    assert by_prompt["2 + 2?"] == {"answer": "4", "meta": {"level": 1}}
    assert by_prompt["3 + 3?"] == {"answer": "6"}
    # A prompt cut from a conversation keeps the whole row (its reference reply is there too).
    assert by_prompt["hi"]["id"] == 7 and by_prompt["hi"]["messages"][1]["content"] == "hello"
    assert other_column_names(data.train) == {"answer", "meta", "id", "messages"}
    assert [r.dropped for r in data.reports] == [{"duplicate": 1}, {}]


def test_prompt_rows_remember_whether_their_source_gave_messages_or_text(tmp_path, tok):
    """TRL hands reward functions messages or text as the dataset has them; so do we (align.rl.reward_fns)."""
    user = [{"role": "user", "content": "as messages"}]
    files = {
        "text.jsonl": {"prompt": "as text"},
        "listed.jsonl": {"prompt": user},
        "chat.jsonl": {"messages": [{"role": "user", "content": "a chat"}, {"role": "assistant", "content": "hi"}]},
        "alpaca.jsonl": {"instruction": "an instruction", "input": "", "output": "done"},
        "implicit.jsonl": {
            "chosen": [{"role": "user", "content": "implicit"}, {"role": "assistant", "content": "a"}],
            "rejected": [{"role": "user", "content": "implicit"}, {"role": "assistant", "content": "b"}],
        },
        "pair.jsonl": {"prompt": "a text pair", "chosen": "a", "rejected": "b"},
    }
    formats = {"text": "prompt", "listed": "prompt", "chat": "messages", "alpaca": "alpaca"}
    sources = []
    for name, row in files.items():
        (tmp_path / name).write_text(json.dumps(row) + "\n")
        sources.append({"path": name, "format": formats.get(name.split(".")[0], "preference")})
    data = load_recipe_data(write_recipe(tmp_path / "r.yaml", sources=sources), "prompt", tok, seed=0)
    given = {row["prompt"][-1]["content"]: row["conversational"] for row in data.train}
    assert given == {
        "as text": False,
        "as messages": True,
        "a chat": True,
        "an instruction": False,
        "implicit": True,
        "a text pair": False,
    }
