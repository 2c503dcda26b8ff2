"""Format adapters: one raw row of a public dataset -> canonical rows of one kind.

Canonical rows (before tokenisation):
- conversation: ``{"messages": [{"role", "content"}, ...]}``
- preference:   ``{"prompt": [...ending with a user turn], "chosen": [assistant...], "rejected": [...]}``
- prompt:       ``{"prompt": [...ending with a user turn]}``, and, when loaded for a prompt
  recipe, the source row's other fields (``other_columns``) and whether it gave the prompt as
  messages (``conversational``)

An adapter returns a list (ranked formats turn one row into several pairs) or raises RowError,
which names the field and the reason; the loader turns it into a one-line DataError or a counted
drop, so no adapter decides what happens to a bad row.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from itertools import combinations
from typing import Any

Row = dict[str, Any]
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "model": "assistant",
}
# An HH-RLHF turn marker; the transcript is "\n\nHuman: ...\n\nAssistant: ..." and, in the real
# data, the first marker sometimes lacks its blank line or has stray spaces around it.
HH_MARKER = re.compile(r"(?:^|\n\n)[ \t]*(Human|Assistant):[ \t]?")


class RowError(Exception):
    """A row that cannot be adapted: ``reason`` is the report key, ``detail`` the human text."""

    def __init__(self, field: str, reason: str, detail: str | None = None):
        super().__init__(detail or reason)
        self.field, self.reason, self.detail = field, reason, detail or _REASON_TEXT.get(reason, reason)


_REASON_TEXT = {"missing": "missing", "empty": "empty text"}


def _get(row: Row, field: str, columns: dict[str, str]) -> Any:
    column = columns.get(field, field)
    if column not in row or row[column] is None:
        raise RowError(column, "missing")
    return row[column]


def _text(value: Any, field: str) -> str:
    if not isinstance(value, str):
        raise RowError(field, "wrong_type", f"wrong type: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(field, "empty")
    return value


def _messages(value: Any, field: str, default_role: str) -> list[dict[str, str]]:
    """A string (one turn of ``default_role``) or a list of {role, content} -> checked messages."""
    if isinstance(value, str):
        return [{"role": default_role, "content": _text(value, field)}]
    if not isinstance(value, list):
        raise RowError(
            field,
            "wrong_type",
            f"wrong type: expected a string or list of messages, got {type(value).__name__}",
        )
    if not value:
        raise RowError(field, "empty", "empty list of messages")
    out = []
    for i, message in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise RowError(where, "wrong_type", f"wrong type: expected a message, got {type(message).__name__}")
        for key in ("role", "content"):
            if message.get(key) is None:
                raise RowError(f"{where}.{key}", "missing")
        if message["role"] not in ROLES:
            raise RowError(f"{where}.role", "invalid", f"unknown role {message['role']!r} (known: {ROLES})")
        if message["role"] == "system" and isinstance(message["content"], str) and not message["content"].strip():
            continue  # public chat dumps often carry a blank system turn; it says nothing, so omit it
        out.append({"role": message["role"], "content": _text(message["content"], f"{where}.content")})
    if not out:
        raise RowError(field, "empty", "empty list of messages")
    return out


def _require_assistant(messages: list[dict[str, str]], field: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError(field, "invalid", "no assistant turn")


def cut_to_last_user(messages: list[dict[str, str]], field: str) -> list[dict[str, str]]:
    """The conversation up to and including its last user turn: what a policy is asked to answer."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
    if last is None:
        raise RowError(field, "invalid", "no user turn")
    return messages[: last + 1]


# --- conversations -------------------------------------------------------------------------------


def messages_format(row: Row, columns: dict[str, str]) -> list[Row]:
    messages = _messages(_get(row, "messages", columns), columns.get("messages", "messages"), "user")
    return [{"messages": messages}]


def sharegpt_format(row: Row, columns: dict[str, str]) -> list[Row]:
    field = columns.get("conversations", "conversations")
    turns = _get(row, "conversations", columns)
    if not isinstance(turns, list):
        raise RowError(field, "wrong_type", f"wrong type: expected a list of turns, got {type(turns).__name__}")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{field}[{i}]"
        if not isinstance(turn, dict):
            raise RowError(where, "wrong_type", f"wrong type: expected a turn, got {type(turn).__name__}")
        for key in ("from", "value"):
            if turn.get(key) is None:
                raise RowError(f"{where}.{key}", "missing")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise RowError(f"{where}.from", "invalid", f"unknown speaker {turn['from']!r}")
        if role == "system" and isinstance(turn["value"], str) and not turn["value"].strip():
            continue  # as in _messages: a blank system turn is omitted
        messages.append({"role": role, "content": _text(turn["value"], f"{where}.value")})
    return [{"messages": _messages(messages, field, "user")}]


def alpaca_format(row: Row, columns: dict[str, str]) -> list[Row]:
    instruction = _text(_get(row, "instruction", columns), columns.get("instruction", "instruction"))
    extra = row.get(columns.get("input", "input")) or ""
    if not isinstance(extra, str):
        raise RowError(columns.get("input", "input"), "wrong_type", "wrong type: expected a string")
    # The Alpaca template puts the optional input after the instruction; a blank line keeps them apart.
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = _text(_get(row, "output", columns), columns.get("output", "output"))
    return [{"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": output}]}]


def prompt_completion_format(row: Row, columns: dict[str, str]) -> list[Row]:
    prompt = _messages(_get(row, "prompt", columns), columns.get("prompt", "prompt"), "user")
    completion = _messages(_get(row, "completion", columns), columns.get("completion", "completion"), "assistant")
    return [{"messages": prompt + completion}]


# --- preferences ---------------------------------------------------------------------------------


def _pair(prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> Row:
    if not prompt or prompt[-1]["role"] != "user":
        raise RowError("prompt", "invalid", "the prompt must end with a user turn")
    for name, reply in (("chosen", chosen), ("rejected", rejected)):
        if not reply:
            raise RowError(name, "empty", "no response after the prompt")
        if reply[0]["role"] != "assistant":
            raise RowError(name, "invalid", "the response must start with an assistant turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _split_shared_prompt(chosen: list[dict], rejected: list[dict]) -> tuple[list[dict], list, list]:
    """Implicit prompt (TRL's term): the longest shared prefix that ends with a user turn."""
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    while shared and chosen[shared - 1]["role"] != "user":
        shared -= 1
    if not shared:
        raise RowError("chosen", "invalid", "chosen and rejected share no prompt ending in a user turn")
    return chosen[:shared], chosen[shared:], rejected[shared:]


def preference_format(row: Row, columns: dict[str, str]) -> list[Row]:
    """prompt/chosen/rejected as strings or message lists; the prompt may be implicit or repeated.

    UltraFeedback binarized repeats the user turn at the head of ``chosen`` and ``rejected``; TRL's
    implicit-prompt form has no ``prompt`` at all. Both reduce to the shared prefix. An optional
    ``margin`` number (TRL's column, which ``rm.margin=true`` subtracts inside the loss) stays with its pair.
    """
    chosen = _messages(_get(row, "chosen", columns), columns.get("chosen", "chosen"), "assistant")
    rejected = _messages(_get(row, "rejected", columns), columns.get("rejected", "rejected"), "assistant")
    prompt_column = columns.get("prompt", "prompt")
    if row.get(prompt_column) is None:
        pair = _pair(*_split_shared_prompt(chosen, rejected))
    else:
        prompt = _messages(row[prompt_column], prompt_column, "user")
        if chosen[: len(prompt)] == prompt and rejected[: len(prompt)] == prompt:
            chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
        elif chosen[0]["role"] != "assistant" and chosen[0] == rejected[0]:
            # Full conversations whose head differs from the given prompt text (e.g. whitespace).
            prompt, chosen, rejected = _split_shared_prompt(chosen, rejected)
        pair = _pair(prompt, chosen, rejected)
    margin_column = columns.get("margin", "margin")
    if row.get(margin_column) is not None:
        pair["margin"] = _score(row[margin_column], margin_column)
    return [pair]


def parse_hh_transcript(text: Any, field: str) -> list[dict[str, str]]:
    """``"\\n\\nHuman: hi\\n\\nAssistant: hello"`` -> messages (contents stripped of outer whitespace)."""
    text = _text(text, field)
    parts = HH_MARKER.split(text)
    if parts[0].strip():
        raise RowError(field, "invalid", "the transcript does not start with 'Human:'")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role = "user" if speaker == "Human" else "assistant"
        messages.append({"role": role, "content": _text(content.strip(), f"{field} turn {len(messages)}")})
    if not messages:
        raise RowError(field, "invalid", "no 'Human:'/'Assistant:' turns")
    return messages


def hh_format(row: Row, columns: dict[str, str]) -> list[Row]:
    """Anthropic HH-RLHF: two full transcripts that differ only in the final assistant turn."""
    chosen = parse_hh_transcript(_get(row, "chosen", columns), columns.get("chosen", "chosen"))
    rejected = parse_hh_transcript(_get(row, "rejected", columns), columns.get("rejected", "rejected"))
    for name, messages in (("chosen", chosen), ("rejected", rejected)):
        if messages[-1]["role"] != "assistant":
            raise RowError(columns.get(name, name), "invalid", "the transcript does not end with 'Assistant:'")
    if chosen[:-1] != rejected[:-1]:
        raise RowError(
            columns.get("rejected", "rejected"), "invalid", "chosen and rejected differ before the final turn"
        )
    return [_pair(chosen[:-1], chosen[-1:], rejected[-1:])]


def scored_pairs(prompt: list[dict], scored: list[tuple[float, list[dict]]], pairs: str) -> list[Row]:
    """k scored responses -> preference pairs; ties make no pair.

    ``best_vs_rest`` (default): the top response against each lower-scored one, k-1 pairs, as
    UltraFeedback binarisation does with one random rejected. ``all_pairs``: every pair with
    different scores, up to k(k-1)/2, as in InstructGPT's reward-model training.
    """
    ranked = sorted(scored, key=lambda s: -s[0])
    if pairs == "best_vs_rest":
        candidates = [(ranked[0], other) for other in ranked[1:]]
    else:
        candidates = list(combinations(ranked, 2))
    out = [_pair(prompt, a[1], b[1]) for a, b in candidates if a[0] > b[0]]
    if not out:
        raise RowError("scores", "tied_scores", "no two responses have different scores")
    return out


def _score(value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RowError(field, "wrong_type", f"wrong type: expected a number, got {type(value).__name__}")
    return float(value)


def ranked_format(row: Row, columns: dict[str, str], pairs: str = "best_vs_rest") -> list[Row]:
    """``prompt`` + ``responses`` (k strings or message lists) + ``scores`` (k numbers)."""
    prompt = _messages(_get(row, "prompt", columns), columns.get("prompt", "prompt"), "user")
    responses, scores = _get(row, "responses", columns), _get(row, "scores", columns)
    for name, value in (("responses", responses), ("scores", scores)):
        if not isinstance(value, list):
            raise RowError(columns.get(name, name), "wrong_type", "wrong type: expected a list")
    if len(responses) != len(scores):
        raise RowError("scores", "invalid", f"{len(scores)} scores for {len(responses)} responses")
    scored = [
        (_score(s, f"scores[{i}]"), _messages(r, f"responses[{i}]", "assistant"))
        for i, (r, s) in enumerate(zip(responses, scores, strict=True))
    ]
    return scored_pairs(prompt, scored, pairs)


def ultrafeedback_format(row: Row, columns: dict[str, str], pairs: str = "best_vs_rest") -> list[Row]:
    """openbmb/UltraFeedback: ``instruction`` + ``completions`` [{response, overall_score}]."""
    prompt_field = columns.get("instruction", "instruction")
    if row.get(prompt_field) is None and row.get("prompt") is not None:
        prompt_field = "prompt"
    prompt = _messages(_get(row, prompt_field, {}), prompt_field, "user")
    completions = _get(row, "completions", columns)
    if not isinstance(completions, list):
        raise RowError("completions", "wrong_type", "wrong type: expected a list")
    scored = []
    for i, c in enumerate(completions):
        if not isinstance(c, dict):
            raise RowError(f"completions[{i}]", "wrong_type", "wrong type: expected an object")
        score_key = next((k for k in ("overall_score", "score") if c.get(k) is not None), None)
        if score_key is None:
            raise RowError(f"completions[{i}].overall_score", "missing")
        if c.get("response") is None:
            raise RowError(f"completions[{i}].response", "missing")
        scored.append(
            (
                _score(c[score_key], f"completions[{i}].{score_key}"),
                _messages(c["response"], f"completions[{i}].response", "assistant"),
            )
        )
    return scored_pairs(prompt, scored, pairs)


def prompt_format(row: Row, columns: dict[str, str]) -> list[Row]:
    field = columns.get("prompt", "prompt")
    return [{"prompt": cut_to_last_user(_messages(_get(row, "prompt", columns), field, "user"), field)}]


def other_columns(raw: Row, format_name: str, columns: dict[str, str]) -> str:
    """A source row's fields besides the one its prompt came from, as JSON. Prompt rows carry them
    to the reward function, as TRL passes dataset columns: a verifiable reward needs the answer."""
    prompt_field = columns.get("prompt", "prompt") if format_name == "prompt" else None
    return json.dumps({k: v for k, v in raw.items() if k != prompt_field}, sort_keys=True, default=str)


def conversational_prompt(raw: Row, format_name: str, columns: dict[str, str]) -> bool:
    """Whether a source row gives its prompt as messages (TRL's conversational format) or as text.

    TRL hands reward functions prompts and completions in the format of the dataset, so a function
    written for one format breaks on the other (``completion[0]["content"]`` of a string); prompt
    rows remember their source's so that reward functions get what TRL would give them.
    """
    if format_name in ("messages", "sharegpt"):
        return True
    if format_name in ("alpaca", "hh"):
        return False
    field = columns.get("prompt", "prompt")
    if format_name == "ultrafeedback" and raw.get(columns.get("instruction", "instruction")) is not None:
        field = columns.get("instruction", "instruction")
    value = raw.get(field)
    if value is None and format_name == "preference":  # implicit prompt: the head of `chosen`
        value = raw.get(columns.get("chosen", "chosen"))
    return isinstance(value, list)


def read_other_columns(row: Row) -> dict[str, Any]:
    return json.loads(row["other_columns"])


def other_column_names(rows: Any) -> set[str]:
    """Every name `other_columns` holds in a prompt dataset, read from its column in one go."""
    return set().union(*(json.loads(text) for text in rows["other_columns"]))


# Each format's native kind; the loader converts between kinds where it makes sense (see to_kind).
FORMATS: dict[str, tuple[str, Callable[..., list[Row]]]] = {
    "messages": ("conversation", messages_format),
    "sharegpt": ("conversation", sharegpt_format),
    "alpaca": ("conversation", alpaca_format),
    "prompt_completion": ("conversation", prompt_completion_format),
    "preference": ("preference", preference_format),
    "hh": ("preference", hh_format),
    "ultrafeedback": ("preference", ultrafeedback_format),
    "ranked": ("preference", ranked_format),
    "prompt": ("prompt", prompt_format),
}
PAIRING = ("best_vs_rest", "all_pairs")


def to_kind(row: Row, native: str, kind: str) -> Row:
    """A canonical row of the format's native kind -> the recipe's kind.

    sft from preferences trains on prompt + chosen; prompts come from any conversation (cut to its
    last user turn) or preference (its prompt). Other combinations are refused by the recipe check.
    """
    if kind == "sft":
        messages = row["messages"] if native == "conversation" else row["prompt"] + row["chosen"]
        _require_assistant(messages, "messages")
        return {"messages": messages}
    if kind == "prompt":
        if native == "conversation":
            return {"prompt": cut_to_last_user(row["messages"], "messages")}
        return {"prompt": cut_to_last_user(row["prompt"], "prompt")}
    return row


def kinds_for(native: str) -> tuple[str, ...]:
    return {"conversation": ("sft", "prompt"), "preference": ("preference", "sft", "prompt")}.get(native, ("prompt",))
