"""The built-in verifiable rewards on answers as public math datasets write them."""

import pytest

from align.rl.verifiable import exact_match, final_answer, gold_answer, number_match, numbers

GSM8K_GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
MATH_GOLD = "The slope is $\\frac{3-1}{2-0} = 1$, so the line is $y = x + 1$ and $f(4) = \\boxed{\\frac{5}{2}}$."


@pytest.mark.parametrize(
    ("gold", "expected"),
    [(GSM8K_GOLD, "72"), (MATH_GOLD, "\\frac{5}{2}"), (" 1 4 7 ", "1 4 7"), (12, "12"), ("#### 1,200", "1,200")],
)
def test_the_gold_answer_is_read_where_each_dataset_puts_it(gold, expected):
    assert gold_answer(gold) == expected


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("So x = 3 and then \\boxed{4}. Check: \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("She has 5 + 3 = 8 apples.\n#### 8", "8"),
        ("5 + 3 = 8.\nThe answer is: 8 apples", "8 apples"),
        ("Final answer: 42\n", "42"),
        ("  just 7 ", "just 7"),
        ("\\boxed{unclosed", "\\boxed{unclosed"),
    ],
)
def test_the_final_answer_is_the_part_that_states_it(response, expected):
    assert final_answer(response) == expected


def test_numbers_read_separators_signs_and_fractions():
    assert numbers("$1,234.50 and -3, then 3/4 or \\frac{1}{4} or \\dfrac{-1}{2}; .5; 1,2,3") == [
        1234.5, -3, 0.75, 0.25, -0.5, 0.5, 1, 2, 3,
    ]  # fmt: skip
    assert numbers("x/0 and 1/0 and \\frac{1}{0}") == [0]  # no value for a zero denominator


def test_number_match_scores_the_last_numbers_of_the_final_answer():
    responses = [
        "48 / 2 = 24 in May, so 48 + 24 = 72.",  # no marker: the last number
        "The answer is 72.0 clips",
        "The answer is 71",
        "#### $1,200",
        "I don't know",
        "\\boxed{2.5}",
        "Sorted: 1, 4, 7",
        "7 4 1",
        "anything",
        "anything",
    ]
    gold = ["72", GSM8K_GOLD, GSM8K_GOLD, "1200", "3", MATH_GOLD, "1 4 7", "1 4 7", None, "no number here"]
    assert number_match([""] * 10, responses, gold) == [1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, None, None]


def test_exact_match_is_the_whole_final_answer_up_to_case_space_and_dollars():
    responses = ["1 4  7.", "1 4 7 8", "The answer is: $\\text{Paris}$", "paris", "1, 4, 7", "x"]
    gold = ["1 4 7", "1 4 7", "Paris", "#### Paris", "1 4 7", ""]
    assert exact_match([""] * 6, responses, gold) == [1.0, 0.0, 1.0, 1.0, 0.0, None]
