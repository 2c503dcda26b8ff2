"""A toy task with a programmatic gold score: sort a few integers in increasing order.

It is the demo the default job trains on: small enough to learn on a CPU, and scored exactly,
so each stage's effect (SFT, reward model, PPO) is measured against the truth instead of a
learned proxy. `python -m align.tasks.sorting` regenerates the demo files in data_recipes/demo/.

Prompt: ``Sort: 42 7 19`` (3 to 6 integers in 0..99, several phrasings). Answer: ``7 19 42``.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

MIN_NUMBERS, MAX_NUMBERS = 3, 6
MAX_VALUE = 99
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

# Sizes of the demo files; prefs are pairs from a noisy policy with this share of flipped labels.
NUM_SFT, NUM_PREFS, NUM_PROMPTS, NUM_EVAL_PROMPTS = 600, 1500, 500, 100
SYSTEM_SHARE, TWO_TURN_SHARE, SFT_ERROR_SHARE, LABEL_NOISE = 0.2, 0.1, 0.03, 0.1
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


def _answer(numbers: list[int]) -> str:
    return " ".join(map(str, sorted(numbers)))


def noisy_response(rng: random.Random, numbers: list[int], quality: float) -> str:
    """A response from a policy that is right with probability ``quality`` and otherwise errs.

    Its mistakes are the kinds a small model makes: swapped neighbours, a dropped or repeated
    number, the input echoed unsorted, or prose the gold score cannot parse.
    """
    answer = sorted(numbers)
    if rng.random() < quality:
        return _answer(answer)
    mistake = rng.choice(("swap", "swap", "drop", "repeat", "echo", "change", "prose"))
    if mistake == "swap":
        i = rng.randrange(len(answer) - 1)
        answer[i], answer[i + 1] = answer[i + 1], answer[i]
    elif mistake == "drop":
        answer.pop(rng.randrange(len(answer)))
    elif mistake == "repeat":
        answer.insert(rng.randrange(len(answer)), rng.choice(answer))
    elif mistake == "echo":
        answer = list(numbers)
    elif mistake == "change":
        answer[rng.randrange(len(answer))] = rng.randint(0, MAX_VALUE)
    else:
        return rng.choice(("The sorted list is {}.", "Sure! {}", "I think: {}")).format(", ".join(map(str, answer)))
    return " ".join(map(str, answer))


def _sft_row(rng: random.Random, seen: set[tuple[int, ...]]) -> dict:
    messages = []
    if rng.random() < SYSTEM_SHARE:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = 2 if rng.random() < TWO_TURN_SHARE else 1
    for turn in range(turns):
        numbers = _unseen_numbers(rng, seen)
        template = FOLLOW_UP if turn else None
        # A few imperfect demonstrations, as in any human-written set.
        answer = noisy_response(rng, numbers, 0.0) if rng.random() < SFT_ERROR_SHARE else _answer(numbers)
        messages += [
            {"role": "user", "content": _prompt(rng, numbers, template)},
            {"role": "assistant", "content": answer},
        ]
    return {"messages": messages}


def _pref_row(rng: random.Random, seen: set[tuple[int, ...]]) -> dict:
    numbers = _unseen_numbers(rng, seen)
    prompt = _prompt(rng, numbers)
    while True:  # two responses of different gold score, so the better one is well defined
        a = noisy_response(rng, numbers, rng.uniform(0.1, 0.9))
        b = noisy_response(rng, numbers, rng.uniform(0.1, 0.9))
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


def make_demo_data(out_dir: str | Path = DEMO_DIR, seed: int = 0) -> dict[str, int]:
    """Write sft.jsonl, prefs.jsonl, prompts.jsonl and prompts_eval.jsonl; return rows per file."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    files = {
        "sft.jsonl": [_sft_row(rng, seen) for _ in range(NUM_SFT)],
        "prefs.jsonl": [_pref_row(rng, seen) for _ in range(NUM_PREFS)],
        "prompts.jsonl": [{"prompt": _prompt(rng, _unseen_numbers(rng, seen))} for _ in range(NUM_PROMPTS)],
        "prompts_eval.jsonl": [{"prompt": _prompt(rng, _unseen_numbers(rng, seen))} for _ in range(NUM_EVAL_PROMPTS)],
    }
    for name, rows in files.items():
        with open(out / name, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    return {name: len(rows) for name, rows in files.items()}


if __name__ == "__main__":
    for name, count in make_demo_data().items():
        print(f"{DEMO_DIR / name}: {count} rows")
