"""User-supplied Python functions named in the config as 'module:function'."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from align.errors import ConfigError, TrainingError

RewardFn = Callable[[list[str], list[str]], list[float]]


@dataclass(frozen=True)
class ScoreFunction:
    """A user's reward (or gold, or monitor) function, called as ``fn(prompts, responses, **columns)``.

    Like TRL's reward functions it may take the prompt rows' other columns by name (``answer``
    for a verifiable reward) or all of them with ``**kwargs``: each is a list with one value per
    response (None where a row lacks it). A function with a ``completions`` parameter is written
    for TRL, which passes everything by keyword, so it is called that way (``prompts=``,
    ``completions=``); positionally its arguments could land in the wrong parameters. What it
    returns is checked: one finite number per response. A bad score stops the run naming the
    function, the response and the value; a silently wrong reward would train the policy on it.
    """

    fn: RewardFn
    key: str
    named_columns: frozenset[str] = frozenset()  # its parameters after (prompts, responses)
    required_columns: frozenset[str] = frozenset()  # ... those without a default
    all_columns: bool = False  # it takes **kwargs
    reserved: tuple[str, ...] = ()  # the names its prompts and responses are passed as
    by_keyword: bool = False  # TRL's convention: prompts=, completions=
    takes_prompts: bool = True

    @classmethod
    def wrap(cls, fn: RewardFn, key: str) -> ScoreFunction:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: two arguments, no columns
            return cls(fn, key)
        by_keyword = any(p.name == "completions" for p in params)
        if by_keyword:
            reserved = ("prompts", "completions")
        else:
            reserved = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))[:2]
        named = [p for p in params if p.name not in reserved and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        all_columns = any(p.kind is p.VAR_KEYWORD for p in params)
        return cls(
            fn,
            key,
            named_columns=frozenset(p.name for p in named),
            required_columns=frozenset(p.name for p in named if p.default is p.empty),
            all_columns=all_columns,
            reserved=reserved,
            by_keyword=by_keyword,
            takes_prompts=not by_keyword or all_columns or any(p.name == "prompts" for p in params),
        )

    def check_columns(self, available: set[str], data: str) -> None:
        """Before any compute: every column the function cannot do without is in the data."""
        missing = sorted(self.required_columns - available)
        if missing:
            have = ", ".join(sorted(available)) or "none besides the prompt"
            raise ConfigError(
                f"{self.key} takes {', '.join(map(repr, missing))}, which no prompt row of {data} has "
                f"(their other columns: {have})"
            )

    def __call__(
        self, prompts: list[str], responses: list[str], columns: list[dict[str, Any]] | None = None
    ) -> list[float]:
        kwargs = self._column_arguments(columns) if columns is not None else {}
        try:
            if self.by_keyword:
                given = {"prompts": prompts} if self.takes_prompts else {}
                values = self.fn(completions=responses, **given, **kwargs)
            else:
                values = self.fn(prompts, responses, **kwargs)
        except Exception as exc:
            # The user's own traceback is what helps here, so it is kept; this says whose call it was.
            exc.add_note(f"align: raised by {self.key} scoring a batch of {len(responses)} responses")
            raise
        if isinstance(values, str | bytes | dict) or not hasattr(values, "__len__"):
            raise TrainingError(
                f"{self.key} must return a list of {len(responses)} numbers, one per response; "
                f"it returned {type(values).__name__}"
            )
        if len(values) != len(responses):
            raise TrainingError(f"{self.key} returned {len(values)} scores for {len(responses)} responses")
        return [self._check(value, i, prompts, responses) for i, value in enumerate(values)]

    def _column_arguments(self, columns: list[dict[str, Any]]) -> dict[str, list[Any]]:
        present = set().union(*columns)
        names = (present if self.all_columns else present & self.named_columns) - set(self.reserved)
        return {name: [row.get(name) for row in columns] for name in sorted(names)}

    def _check(self, value, i: int, prompts: list[str], responses: list[str]) -> float:
        try:
            score = None if isinstance(value, str | bytes) else float(value)
        except (TypeError, ValueError):
            score = None
        if score is None or not math.isfinite(score):
            raise TrainingError(
                f"{self.key} returned {value!r} for response {i} of {len(responses)}; a score must be a finite "
                f"number (prompt {_excerpt(prompts[i])!r}, response {_excerpt(responses[i])!r})"
            )
        return score


def import_reward_fn(spec: str, key: str) -> ScoreFunction:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key} '{spec}' must have the form module:function")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(f"{key} '{spec}' is not an importable module:function ({exc})") from exc
    if not callable(fn):
        raise ConfigError(f"{key} '{spec}' is not callable")
    return ScoreFunction.wrap(fn, f"{key}={spec}")


def _excerpt(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
