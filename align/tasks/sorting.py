"""A toy task with a programmatic gold score: sort a few digits in increasing order.

It is the demo the default job trains on: small enough to learn on a CPU, and scored exactly,
so each stage's effect (SFT, reward model, PPO) is measured against the truth instead of a
learned proxy. `python -m align.tasks.sorting` regenerates the demo files in data_recipes/demo/.

Prompt: ``Sort: 4 7 1`` (3 to 6 integers in 0..9, several phrasings; the prompt files carry the
exact answer as an ``answer`` column). Answer: ``1 4 7``, the numbers only; prose around them
("Sure! 1, 4, 7") makes the answer unparsable and scores 0.

The demonstrations are of mixed quality, as from many annotators: 30% are chatty (the right
kind of answer wrapped in prose) and 20% hold a mistake a small model makes (a swap, a dropped,
repeated or changed number, the input echoed). SFT imitates them, habits included, so the SFT
policy is partly competent. The preference pairs are two responses of writers of random quality
and chattiness, ranked by the gold score with 10% of the labels flipped; the reward model learns
them, and PPO on that learned reward alone moves the policy towards answers the gold score likes.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

MIN_NUMBERS, MAX_NUMBERS = 3, 6
MAX_VALUE = 9
PHRASINGS = (
    "Sort: {}",
    "Sort these numbers: {}",
    "Put in increasing order: {}",
    "Arrange from smallest to largest: {}",
)
SYSTEM_PROMPTS = (
    "You are a helpful assistant.",
    "You sort numbers. Reply with the numbers only, separated by spaces.",
)
FOLLOW_UP = "And these: {}"
MISTAKES = ("swap", "swap", "drop", "repeat", "echo", "change")
CHATTY = ("The sorted list is {}.", "Sure! {}", "I think: {}", "Here you go: {}")

# Sizes of the demo files; prefs are pairs from noisy writers, with LABEL_NOISE of the labels flipped.
NUM_SFT, NUM_PREFS, NUM_PROMPTS, NUM_EVAL_PROMPTS = 600, 1500, 500, 200
SYSTEM_SHARE, TWO_TURN_SHARE, LABEL_NOISE = 0.2, 0.1, 0.1
SFT_CHATTY_SHARE, SFT_ERROR_SHARE = 0.3, 0.2
DEMO_DIR = Path(__file__).resolve().parent.parent.parent / "data_recipes" / "demo"

_CHATML_USER = "<|im_start|>user\n"
_CHATML_END = "<|im_end|>"


def prompt_numbers(prompt: str) -> list[int]:
    """The numbers to sort; accepts the bare prompt or a rendered ChatML conversation."""
    if _CHATML_USER in prompt:  # the task is the last user turn, whatever came before it
        prompt = prompt.rsplit(_CHATML_USER, 1)[1].split(_CHATML_END, 1)[0]
    return [int(n) for n in re.findall(r"\d+", prompt)]


def parse_answer(response: str) -> list[int] | None:
    """Integers separated by spaces or commas; anything else makes the answer unparsable."""
    text = response.split(_CHATML_END, 1)[0].strip()
    tokens = [t for t in re.split(r"[\s,]+", text) if t]
    if not tokens or not all(t.isdigit() for t in tokens):
        return None
    return [int(t) for t in tokens]


def gold_score(prompt: str, response: str) -> float:
    """Score in [0, 1]: 0.5 * multiset overlap + 0.5 * share of adjacent pairs in order.

    The overlap is divided by the longer of answer and target, so extra numbers cost as much as
    missing ones. The exact answer, and only it, scores 1.0; an unparsable answer scores 0.
    """
    target = sorted(prompt_numbers(prompt))
    answer = parse_answer(response)
    if answer is None or not target:
        return 0.0
    overlap = sum((Counter(answer) & Counter(target)).values()) / max(len(answer), len(target))
    pairs = list(pairwise(answer))
    in_order = sum(a <= b for a, b in pairs) / len(pairs) if pairs else 0.0
    return 0.5 * overlap + 0.5 * in_order


def gold_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Batch form of gold_score, the signature ``ppo.reward_fn`` expects."""
    return [gold_score(p, r) for p, r in zip(prompts, responses, strict=True)]


def _numbers(rng: random.Random) -> list[int]:
    return [rng.randint(0, MAX_VALUE) for _ in range(rng.randint(MIN_NUMBERS, MAX_NUMBERS))]


def _prompt(rng: random.Random, numbers: list[int], template: str | None = None) -> str:
    return (template or rng.choice(PHRASINGS)).format(" ".join(map(str, numbers)))


def noisy_response(rng: random.Random, numbers: list[int], quality: float, chatty: float = 0.0) -> str:
    """A response from a writer that is right with probability ``quality`` and chatty with ``chatty``.

    Its mistakes are the kinds a small model makes: swapped neighbours, a dropped or repeated
    number, a changed number, the input echoed unsorted. A chatty reply wraps the list in prose
    ("Sure! 1, 3, 7"), which breaks the numbers-only format: the gold score cannot parse it.
    """
    answer = sorted(numbers)
    if rng.random() >= quality:
        mistake = rng.choice(MISTAKES)
        if mistake == "swap":
            i = rng.randrange(len(answer) - 1)
            answer[i], answer[i + 1] = answer[i + 1], answer[i]
        elif mistake == "drop":
            answer.pop(rng.randrange(len(answer)))
        elif mistake == "repeat":
            answer.insert(rng.randrange(len(answer)), rng.choice(answer))
        elif mistake == "echo":
            answer = list(numbers)
        else:  # change
            answer[rng.randrange(len(answer))] = rng.randint(0, MAX_VALUE)
    if rng.random() < chatty:
        return rng.choice(CHATTY).format(", ".join(map(str, answer)))
    return " ".join(map(str, answer))


def _sft_row(rng: random.Random, seen: set[tuple[int, ...]]) -> dict:
    messages = []
    if rng.random() < SYSTEM_SHARE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = 2 if rng.random() < TWO_TURN_SHARE else 1
    for turn in range(turns):
        numbers = _unseen_numbers(rng, seen)
        template = FOLLOW_UP if turn else None
        # Demonstrations of mixed quality: some chatty, some wrong, as from many annotators.
        answer = noisy_response(rng, numbers, 1.0 - SFT_ERROR_SHARE, SFT_CHATTY_SHARE)
        messages += [
            {"role": "user", "content": _prompt(rng, numbers, template)},
            {"role": "assistant", "content": answer},
        ]
    return {"messages": messages}


def _pref_row(rng: random.Random, seen: set[tuple[int, ...]]) -> dict:
    numbers = _unseen_numbers(rng, seen)
    prompt = _prompt(rng, numbers)
    while True:  # two responses of different gold score, so the better one is well defined
        a, b = (noisy_response(rng, numbers, rng.uniform(0.1, 0.9), rng.uniform(0.0, 0.6)) for _ in range(2))
        if gold_score(prompt, a) != gold_score(prompt, b):
            break
    chosen, rejected = (a, b) if gold_score(prompt, a) > gold_score(prompt, b) else (b, a)
    if rng.random() < LABEL_NOISE:
        chosen, rejected = rejected, chosen
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _unseen_numbers(rng: random.Random, seen: set[tuple[int, ...]]) -> list[int]:
    # Distinct number lists keep the eval prompts held out from every training file.
    while True:
        numbers = _numbers(rng)
        if tuple(numbers) not in seen:
            seen.add(tuple(numbers))
            return numbers


def _prompt_row(rng: random.Random, seen: set[tuple[int, ...]]) -> dict:
    # The exact answer rides along, as a math dataset's does: a verifiable reward reads it
    # (align.rl.verifiable:exact_match); the gold score needs only the prompt.
    numbers = _unseen_numbers(rng, seen)
    return {"prompt": _prompt(rng, numbers), "answer": " ".join(map(str, sorted(numbers)))}


def make_demo_data(out_dir: str | Path = DEMO_DIR, seed: int = 0) -> dict[str, int]:
    """Write sft.jsonl, prefs.jsonl, prompts.jsonl and prompts_eval.jsonl; return rows per file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    files = {
        "sft.jsonl": [_sft_row(rng, seen) for _ in range(NUM_SFT)],
        "prefs.jsonl": [_pref_row(rng, seen) for _ in range(NUM_PREFS)],
        "prompts.jsonl": [_prompt_row(rng, seen) for _ in range(NUM_PROMPTS)],
        "prompts_eval.jsonl": [_prompt_row(rng, seen) for _ in range(NUM_EVAL_PROMPTS)],
    }
    for name, rows in files.items():
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return {name: len(rows) for name, rows in files.items()}


if __name__ == "__main__":
    for name, count in make_demo_data().items():
        print(f"{DEMO_DIR / name}: {count} rows")
