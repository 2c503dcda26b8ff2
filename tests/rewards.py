"""Rule-based rewards for end-to-end PPO tests (`ppo.reward_fn=tests.rewards:brevity`)."""

from __future__ import annotations


def brevity(prompts: list[str], responses: list[str]) -> list[float]:
    """1 for an empty answer, falling by 0.1 a word: a reward a tiny policy can chase in minutes."""
    return [max(0.0, 1.0 - 0.1 * len(response.split())) for response in responses]


def none_when_unparsed(prompts: list[str], responses: list[str]) -> list[float | None]:
    """A verifiable reward that gives None where it cannot read an answer (here: the second response)."""
    return [None if i == 1 else 1.0 for i in range(len(responses))]


def never_parses(prompts: list[str], responses: list[str]) -> list[float | None]:
    """A verifiable reward pointed at the wrong column: no response gets a score."""
    return [None] * len(responses)


def matches_its_answer(prompts: list[str], responses: list[str], answer: list[str]) -> list[float]:
    """1 where the prompt ends with its row's `answer` column: the columns reach the reward aligned."""
    return [float(prompt.endswith(a)) for prompt, a in zip(prompts, answer, strict=True)]


def in_trls_shape(prompts, completions, completion_ids, given_as, **kwargs) -> list[float]:
    """Written for TRL (called by keyword): 1 where the prompt and completion come as TRL hands them
    over for the row's source, messages where it gave messages (`given_as`), text otherwise."""
    scores = []
    for prompt, completion, ids, given in zip(prompts, completions, completion_ids, given_as, strict=True):
        if given == "messages":
            ok = prompt[-1]["role"] == "user" and completion[0]["role"] == "assistant"
            ok = ok and isinstance(completion[0]["content"], str)
        else:
            ok = isinstance(prompt, str) and isinstance(completion, str)
        scores.append(float(ok and len(ids) > 0 and all(isinstance(i, int) for i in ids)))
    return scores


def constant(prompts: list[str], responses: list[str]) -> list[float]:
    """The same score for every response: whatever PPO trains on besides it comes from the loop's shaping."""
    return [0.5] * len(responses)
