"""Built-in verifiable rewards for `ppo.reward_fn`: a response's final answer against the prompt row's
`answer` column (`ppo.reward_fn=align.rl.verifiable:number_match` or `...:exact_match`).

The gold answer may be the bare answer (`72`), GSM8K's worked solution ending `#### 72`, or a MATH
solution with its answer in `\\boxed{...}`. A response's final answer is, in this order, its last
`\\boxed{...}`, the text after its last `####`, the rest of its last line saying "answer is" /
"answer:", or else the whole response. Both functions return 1.0 or 0.0, and None (TRL's "no
score": the episode is left out of the update) for a row whose gold answer is missing or, for
`number_match`, holds no number.
"""

from __future__ import annotations

import math
import re
from typing import Any

_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(.+)", re.IGNORECASE)
_NUMBER = re.compile(
    r"\\d?frac\{\s*(?P<num>-?\d+)\s*\}\{\s*(?P<den>-?\d+)\s*\}"  # LaTeX \frac{3}{4}
    r"|(?P<value>-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)(?:/(?P<over>\d+)(?![\d.]))?"  # 1,234.5 3/4 .5
)
_TEXT_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}")


def number_match(prompts: list[str], responses: list[str], answer: list[Any]) -> list[float | None]:
    """1.0 where the numbers ending the response's final answer equal the gold answer's, in order.

    With a gold answer of k numbers, the last k numbers of the final answer count, so working before
    it ("5 + 3 = 8, so the answer is 8") and units or thousands separators around it ("$1,200.")
    do not matter; 0.5, 1/2 and \\frac{1}{2} are one value. A list answer (`1 4 7`) is matched as a list.
    """
    scores: list[float | None] = []
    for response, gold in zip(responses, answer, strict=True):
        target = numbers(gold_answer(gold)) if gold is not None else []
        if not target:
            scores.append(None)
            continue
        found = numbers(final_answer(response))[-len(target) :]
        scores.append(float(len(found) == len(target) and all(map(_same_number, found, target))))
    return scores


def exact_match(prompts: list[str], responses: list[str], answer: list[Any]) -> list[float | None]:
    """1.0 where the response's final answer is the gold answer, up to case, spacing, surrounding `$`
    and a final full stop."""
    scores: list[float | None] = []
    for response, gold in zip(responses, answer, strict=True):
        target = normalize(gold_answer(gold)) if gold is not None else ""
        scores.append(float(normalize(final_answer(response)) == target) if target else None)
    return scores


def gold_answer(gold: Any) -> str:
    """The answer part of a gold column: after GSM8K's `####`, inside a MATH solution's last
    `\\boxed{}`, else the whole value."""
    text = str(gold)
    if "####" in text:
        return text.rsplit("####", 1)[1].strip()
    return last_boxed(text) or text.strip()


def final_answer(response: str) -> str:
    """The part of a response that states its answer (see the module's docstring)."""
    boxed = last_boxed(response)
    if boxed is not None:
        return boxed
    if "####" in response:
        return response.rsplit("####", 1)[1].strip()
    stated = _ANSWER_IS.findall(response)
    return stated[-1].strip() if stated else response.strip()


def last_boxed(text: str) -> str | None:
    """The contents of the last `\\boxed{...}` (nested braces kept), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, begin = 0, start + len("\\boxed{")
    for i in range(begin, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            if depth == 0:
                return text[begin:i].strip()
            depth -= 1
    return None  # unclosed: no answer stated


def numbers(text: str) -> list[float]:
    """Every number in a text, in order, as a float (`1,234` -> 1234.0, `3/4` and `\\frac{3}{4}` -> 0.75)."""
    found = []
    for match in _NUMBER.finditer(text):
        if match["num"] is not None:
            num, den = int(match["num"]), int(match["den"])
        else:
            num, den = float(match["value"].replace(",", "")), int(match["over"] or 1)
        if den:
            found.append(num / den)
    return found


def normalize(text: str) -> str:
    text = _TEXT_WRAPPERS.sub(r"\1", text).strip().strip("$").strip()
    return " ".join(text.rstrip(".").split()).casefold()


def _same_number(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
