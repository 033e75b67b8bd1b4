"""The demo's generated arithmetic problems: distinct, seeded, and every worked step and answer is exact."""

import re

import pytest

from tlora.demo.arithmetic import ANSWER_PREFIX, TEMPLATES, arithmetic_problems, split_problems

EQUATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")


def test_every_equation_and_final_answer_is_exact():
    rows = arithmetic_problems(600, seed=3)
    for row in rows:
        steps, answer_line = row["response"].rsplit("\n", 1)
        assert answer_line == f"{ANSWER_PREFIX}{row['answer']}"
        equations = EQUATION.findall(steps)
        assert equations, row
        for left, operator, right, result in equations:
            value = {"+": int(left) + int(right), "-": int(left) - int(right), "*": int(left) * int(right),
                     "/": int(left) / int(right)}[operator]
            assert value == int(result), (row["query"], left, operator, right, result)
        assert int(equations[-1][3]) == int(row["answer"]) >= 0


def test_problems_are_distinct_and_cover_every_template():
    rows = arithmetic_problems(120, seed=0)
    assert len({row["query"] for row in rows}) == 120
    starts = {row["query"].split()[1] for row in rows}  # "box", "notebook", "train", names ...
    assert {"box", "notebook", "train"} <= starts
    assert len(rows) // len(TEMPLATES) == 20


def test_same_seed_same_problems_other_seed_other_problems():
    assert arithmetic_problems(50, seed=7) == arithmetic_problems(50, seed=7)
    assert arithmetic_problems(50, seed=7) != arithmetic_problems(50, seed=8)


def test_training_and_held_out_problems_share_no_question():
    train, held_out = split_problems(400, 48, seed=0)
    assert len(train) == 400 and len(held_out) == 48
    assert not {row["query"] for row in train} & {row["query"] for row in held_out}


def test_asking_for_more_distinct_problems_than_exist_is_a_clear_error(monkeypatch):
    import tlora.demo.arithmetic as arithmetic

    monkeypatch.setattr(arithmetic, "TEMPLATES", (lambda rng: ("same question", "1 + 1 = 2.", 2),))
    with pytest.raises(ValueError, match="distinct arithmetic problems"):
        arithmetic.arithmetic_problems(3)
