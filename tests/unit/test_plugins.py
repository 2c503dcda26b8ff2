"""User score functions (ppo.reward_fn, ppo.monitor_fn, pipeline.gold_fn) are called through checks."""

import math

import numpy as np
import pytest
import torch

from align.errors import ConfigError, TrainingError
from align.rl.reward_fns import Episodes, ScoreFunction, import_reward_fn

PROMPTS, RESPONSES = ["p0", "p1", "p2"], ["r0", "a long answer " * 20, "r2"]


def episodes(prompts=PROMPTS, responses=RESPONSES, columns=None, conversational=False) -> Episodes:
    n = len(responses)
    return Episodes(
        prompts=[[{"role": "system", "content": "Be brief."}, {"role": "user", "content": p}] for p in prompts],
        responses=list(responses),
        response_ids=[[7] * (i + 1) for i in range(n)],
        ended=[True] * n,
        columns=columns if columns is not None else [{} for _ in range(n)],
        conversational=[conversational] * n,
    )


def scored(values):
    return ScoreFunction(lambda prompts, responses: values, "ppo.reward_fn=m:f")(episodes())


@pytest.mark.parametrize(
    "values",
    [
        [1, 0.5, True],
        (1.0, 0.5, 1.0),
        np.array([1.0, 0.5, 1.0]),
        torch.tensor([1.0, 0.5, 1.0]),
        [np.float32(1), 0.5, 1],
    ],
    ids=["mixed numbers", "tuple", "numpy", "tensor", "numpy scalars"],
)
def test_numbers_in_any_sequence_are_scores(values):
    assert scored(values) == [1.0, 0.5, 1.0]


@pytest.mark.parametrize(
    ("values", "shown"),
    [
        ([1.0, math.nan, 0.0], "nan"),
        ([1.0, -math.inf, 0.0], "-inf"),
        ([1.0, "0.5", 0.0], "'0.5'"),
    ],
    ids=["nan", "inf", "a string"],
)
def test_a_bad_score_names_the_function_the_response_and_the_value(values, shown):
    with pytest.raises(TrainingError) as err:
        scored(values)
    message = str(err.value)
    assert message.startswith(
        f"ppo.reward_fn=m:f returned {shown} for response 1 of 3; a score must be a finite number, or None for none"
    )
    assert "prompt 'p1'" in message
    assert "response 'a long answer a long answer" in message and "...'" in message and len(message) < 400


def test_none_is_no_score_as_in_trl():
    """trl.rewards.accuracy_reward gives None where it cannot parse the gold answer: no score, not 0."""
    assert scored([1.0, None, 0.0]) == [1.0, None, 0.0]
    fn = ScoreFunction(lambda prompts, responses: [None, 1.0, 0.5], "pipeline.gold_fn=m:f")
    assert fn.mean(episodes()) == 0.75  # over the scored ones
    assert math.isnan(ScoreFunction(lambda p, r: [None] * len(r), "k").mean(episodes()))


@pytest.mark.parametrize(
    ("values", "culprit"),
    [
        (1.0, "it returned float"),
        ("abc", "it returned str"),
        ({"a": 1}, "it returned dict"),
        ([1.0], "returned 1 scores for 3"),
    ],
)
def test_a_result_that_is_not_one_score_per_response(values, culprit):
    with pytest.raises(TrainingError, match=culprit):
        scored(values)


def test_an_exception_keeps_its_traceback_and_says_whose_call_it_was():
    def broken(prompts, responses):
        return [1 / 0 for _ in responses]

    with pytest.raises(ZeroDivisionError) as err:
        ScoreFunction(broken, "pipeline.gold_fn=m:broken")(episodes())
    assert err.value.__notes__ == ["align: raised by pipeline.gold_fn=m:broken scoring a batch of 3 responses"]
    assert any(entry.name == "broken" for entry in err.traceback)  # down into the user's function


def test_import_names_the_key_and_the_spec():
    fn = import_reward_fn("tests.rewards:brevity", "ppo.reward_fn")
    assert fn.key == "ppo.reward_fn=tests.rewards:brevity"
    assert fn(episodes(["p", "q"], ["", "one two"])) == [1.0, 0.8]
    with pytest.raises(ConfigError, match="must have the form module:function"):
        import_reward_fn("tests.rewards.brevity", "ppo.reward_fn")
    with pytest.raises(ConfigError, match="not callable"):
        import_reward_fn("tests.rewards:__doc__", "ppo.reward_fn")


COLUMNS = [{"answer": "1", "id": 0}, {"answer": "2", "id": 1}, {"id": 2}]


def test_named_columns_reach_the_function_one_value_per_response():
    seen = {}

    def exact(prompts, responses, answer, unit="", *, level=None):
        seen.update(answer=answer, unit=unit, level=level)
        return [float(a is not None) for a in answer]

    fn = ScoreFunction.wrap(exact, "ppo.reward_fn=m:exact")
    assert (fn.named_columns, fn.required_columns) == ({"answer", "unit", "level"}, {"answer"})
    assert fn(episodes(columns=COLUMNS)) == [1.0, 1.0, 0.0]
    assert seen == {"answer": ["1", "2", None], "unit": "", "level": None}  # absent columns keep their defaults


def test_kwargs_take_every_column_except_the_first_two_parameter_names():
    seen = {}

    def everything(prompts, responses, **kwargs):
        seen.update(kwargs)
        return [0.0] * len(responses)

    ScoreFunction.wrap(everything, "k")(episodes(columns=[{**row, "prompts": "clash"} for row in COLUMNS]))
    assert seen == {"answer": ["1", "2", None], "id": [0, 1, 2]}


def test_two_argument_functions_get_no_columns():
    fn = ScoreFunction.wrap(lambda p, r: [1.0] * len(r), "k")
    assert fn(episodes(columns=COLUMNS)) == [1.0, 1.0, 1.0]
    assert ScoreFunction.wrap(max, "k") == ScoreFunction(max, "k")  # a builtin without a signature: no columns


def test_a_required_column_absent_from_the_data_fails_before_any_compute():
    fn = ScoreFunction.wrap(lambda prompts, responses, answer, source=None: [], "ppo.reward_fn=m:f")
    fn.check_columns({"answer", "id"}, "data.recipe=qa.yaml")
    with pytest.raises(ConfigError) as err:
        fn.check_columns({"solution", "id"}, "data.recipe=qa.yaml")
    assert str(err.value) == (
        "ppo.reward_fn=m:f takes 'answer', which no prompt row of data.recipe=qa.yaml has "
        "(their other columns: id, solution)"
    )


def test_a_function_written_for_trl_is_called_by_keyword():
    """TRL calls reward functions as fn(prompts=..., completions=..., completion_ids=..., **columns);
    a positional call would hand such a function (completions, solution, **kwargs) the prompts as
    completions. Text prompts (TRL's standard format) come as the last user turn."""
    seen = {}

    def accuracy_reward(completions, solution, **kwargs):
        seen.update(completions=completions, solution=solution, **kwargs)
        return [float(c.endswith(s)) for c, s in zip(completions, solution, strict=True)]

    fn = ScoreFunction.wrap(accuracy_reward, "ppo.reward_fn=m:accuracy_reward")
    assert fn.required_columns == {"solution"}
    columns = [{"solution": "0", "id": 0}, {"solution": "x", "id": 1}, {"solution": "2", "id": 2}]
    assert fn(episodes(columns=columns)) == [1.0, 0.0, 1.0]
    assert seen == {
        "completions": RESPONSES,
        "solution": ["0", "x", "2"],
        "prompts": PROMPTS,
        "completion_ids": [[7], [7, 7], [7, 7, 7]],
        "id": [0, 1, 2],
    }

    def no_prompts(completions):
        return [1.0] * len(completions)

    assert ScoreFunction.wrap(no_prompts, "k")(episodes(columns=columns)) == [1.0, 1.0, 1.0]


def test_trl_functions_get_messages_where_the_data_gave_messages():
    """TRL's conversational format: each prompt its messages, each completion one assistant message."""
    seen = {}

    def conversational(prompts, completions, **kwargs):
        seen.update(prompts=prompts, completions=completions)
        return [float(len(c[0]["content"])) for c in completions]

    assert ScoreFunction.wrap(conversational, "k")(episodes(conversational=True)) == [2.0, 280.0, 2.0]
    assert seen["prompts"][1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "p1"}]
    assert seen["completions"][0] == [{"role": "assistant", "content": "r0"}]


def test_trl_shipped_reward_functions_run_as_in_trl():
    think = import_reward_fn("trl.rewards:think_format_reward", "ppo.reward_fn")
    answers = ["<think>\nadd them\n</think>\n4", "4", "<think>no end"]
    assert think(episodes(responses=answers, conversational=True)) == [1.0, 0.0, 0.0]

    from trl.rewards import get_repetition_penalty_reward  # a callable object scoring completion_ids

    penalty = ScoreFunction.wrap(get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0), "k")
    # ids [7], [7, 7], [7, 7, 7]: no 2-gram; one, unique; two, one of them unique (1 - 1/2 = 0.5 repeated)
    assert penalty(episodes()) == [0.0, 0.0, -0.5]


def test_trl_trainer_internals_without_a_default_are_refused():
    def needs_state(completions, trainer_state, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ConfigError, match="needs TRL's 'trainer_state', which align does not pass"):
        ScoreFunction.wrap(needs_state, "ppo.reward_fn=m:needs_state")


def test_a_trl_function_for_the_other_format_is_told_which_format_the_data_has():
    think = import_reward_fn("trl.rewards:think_format_reward", "ppo.reward_fn")
    with pytest.raises(TypeError) as err:
        think(episodes())  # text prompts: completions are strings
    assert err.value.__notes__[-1].startswith("align: some prompts of this data are text (TRL's standard format)")

    def for_text(completions, **kwargs):
        return [float(c.startswith("r")) for c in completions]

    with pytest.raises(AttributeError) as err:  # 'list' object has no attribute 'startswith'
        ScoreFunction.wrap(for_text, "k")(episodes(conversational=True))
    assert err.value.__notes__[-1].startswith("align: this data gives its prompts as messages")

    def broken(completions, **kwargs):
        return [1 / 0 for _ in completions]

    with pytest.raises(ZeroDivisionError) as err:  # not a format slip: no hint
        ScoreFunction.wrap(broken, "k")(episodes())
    assert len(err.value.__notes__) == 1
