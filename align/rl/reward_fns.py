"""User-supplied Python functions named in the config as 'module:function'."""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from align.errors import ConfigError, TrainingError

RewardFn = Callable[..., list[float]]
# What TRL passes a reward function besides the dataset's columns; never taken as column names.
TRL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
_NOT_PASSED = ("trainer_state", "log_extra", "log_metric")  # TRL trainer internals align has no equal of


@dataclass
class Episodes:
    """Sampled episodes as reward functions see them."""

    prompts: list[list[dict[str, str]]]  # each prompt's messages
    responses: list[str]
    response_ids: list[list[int]]  # each response's tokens, up to and including its end
    ended: list[bool]  # stopped at EOS or the end of turn
    columns: list[dict[str, Any]]  # the prompt rows' other columns
    conversational: list[bool]  # the source gave the prompt as messages, not as text

    @property
    def prompt_texts(self) -> list[str]:
        """Each prompt's last user turn: what align-style reward functions get as the prompt."""
        return [messages[-1]["content"] for messages in self.prompts]


@dataclass(frozen=True)
class ScoreFunction:
    """A user's reward (or gold, or monitor) function, called through checks.

    align's convention is ``fn(prompts, responses, **columns)`` with texts (each prompt's last user
    turn). Like TRL's reward functions it may take the prompt rows' other columns by name
    (``answer`` for a verifiable reward) or all of them with ``**kwargs``: each is a list with one
    value per response (None where a row lacks it). A function with a ``completions`` or
    ``completion_ids`` parameter is written for TRL and is called as TRL calls it: everything by
    keyword, prompts and completions as messages where the data gave its prompts as messages (TRL's
    conversational format: ``completion[0]["content"]``) and as text otherwise, and the response
    tokens as ``completion_ids``. What it returns is checked: one finite number, or None, per
    response. None is TRL's "no score for this example" (``trl.rewards.accuracy_reward`` returns it
    for a gold answer it cannot parse): the caller leaves that response out. Anything else (NaN,
    inf, a string) stops the run naming the function, the response and the value; a silently
    wrong reward would train the policy on it.
    """

    fn: RewardFn
    key: str
    named_columns: frozenset[str] = frozenset()  # its parameters after (prompts, responses)
    required_columns: frozenset[str] = frozenset()  # ... those without a default
    all_columns: bool = False  # it takes **kwargs
    reserved: tuple[str, ...] = ()  # the names its prompts and responses are passed as
    by_keyword: bool = False  # TRL's convention
    parameters: frozenset[str] = frozenset()

    @classmethod
    def wrap(cls, fn: RewardFn, key: str) -> ScoreFunction:
        try:
            params = list(inspect.signature(fn).parameters.values())
        except (TypeError, ValueError):  # a builtin without a signature: two arguments, no columns
            return cls(fn, key)
        by_keyword = any(p.name in ("completions", "completion_ids") for p in params)
        if by_keyword:
            reserved = TRL_ARGUMENTS
            needs = [p.name for p in params if p.name in _NOT_PASSED and p.default is p.empty]
            if needs:
                raise ConfigError(f"{key} needs TRL's {needs[0]!r}, which align does not pass (give it a default)")
        else:
            reserved = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))[:2]
        named = [p for p in params if p.name not in reserved and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        return cls(
            fn,
            key,
            named_columns=frozenset(p.name for p in named),
            required_columns=frozenset(p.name for p in named if p.default is p.empty),
            all_columns=any(p.kind is p.VAR_KEYWORD for p in params),
            reserved=reserved,
            by_keyword=by_keyword,
            parameters=frozenset(p.name for p in params),
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

    def __call__(self, episodes: Episodes) -> list[float | None]:
        prompts, responses = episodes.prompt_texts, episodes.responses
        kwargs = self._column_arguments(episodes.columns)
        try:
            if self.by_keyword:
                values = self.fn(**self._trl_arguments(episodes), **kwargs)
            else:
                values = self.fn(prompts, responses, **kwargs)
        except Exception as exc:
            # The user's own traceback is what helps here, so it is kept; this says whose call it was.
            exc.add_note(f"align: raised by {self.key} scoring a batch of {len(responses)} responses")
            if self.by_keyword and isinstance(exc, TypeError | KeyError | IndexError | AttributeError):
                exc.add_note(_FORMAT_HINT[all(episodes.conversational)])
            raise
        if isinstance(values, str | bytes | dict) or not hasattr(values, "__len__"):
            raise TrainingError(
                f"{self.key} must return a list of {len(responses)} numbers, one per response; "
                f"it returned {type(values).__name__}"
            )
        if len(values) != len(responses):
            raise TrainingError(f"{self.key} returned {len(values)} scores for {len(responses)} responses")
        return [self._check(value, i, prompts, responses) for i, value in enumerate(values)]

    def _trl_arguments(self, e: Episodes) -> dict[str, list[Any]]:
        given = {
            "prompts": [m if conv else m[-1]["content"] for m, conv in zip(e.prompts, e.conversational, strict=True)],
            "completions": [
                [{"role": "assistant", "content": r}] if conv else r
                for r, conv in zip(e.responses, e.conversational, strict=True)
            ],
            "completion_ids": e.response_ids,
        }
        return {name: value for name, value in given.items() if self.all_columns or name in self.parameters}

    def _column_arguments(self, columns: list[dict[str, Any]]) -> dict[str, list[Any]]:
        present = set().union(*columns)
        names = (present if self.all_columns else present & self.named_columns) - set(self.reserved)
        return {name: [row.get(name) for row in columns] for name in sorted(names)}

    def _check(self, value, i: int, prompts: list[str], responses: list[str]) -> float | None:
        if value is None:
            return None
        try:
            score = None if isinstance(value, str | bytes) else float(value)
        except (TypeError, ValueError):
            score = None
        if score is None or not math.isfinite(score):
            raise TrainingError(
                f"{self.key} returned {value!r} for response {i} of {len(responses)}; a score must be a finite "
                f"number, or None for none (prompt {_excerpt(prompts[i])!r}, response {_excerpt(responses[i])!r})"
            )
        return score

    def mean(self, episodes: Episodes) -> float:
        """The mean score over the responses it scored (NaN when it scored none): a metric."""
        scores = [s for s in self(episodes) if s is not None]
        return sum(scores) / len(scores) if scores else math.nan


# A function written for the other of TRL's two formats fails on its first completion.
_FORMAT_HINT = {
    False: "align: some prompts of this data are text (TRL's standard format), so their completions are strings; "
    'a function for the conversational format reads completion[0]["content"] and needs prompts given as messages',
    True: "align: this data gives its prompts as messages (TRL's conversational format), so each completion is "
    '[{"role": "assistant", "content": ...}], not a string',
}


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
