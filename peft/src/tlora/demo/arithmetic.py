"""Arithmetic word problems with worked solutions, generated from templates (seeded, exact answers).

The demo fine-tunes on these instead of copies of public test sets. Each problem is a row
`{"query": question, "response": worked solution ending in "The answer is: N", "answer": "N"}`, the MetaMathQA
fields the math training script reads.
"""

from __future__ import annotations

import random
from typing import Callable

NAMES = ("Ava", "Ben", "Chloe", "Daniel", "Emma", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Keira", "Liam",
         "Maya", "Noah", "Olga", "Priya", "Quinn", "Rosa", "Sam", "Tariq")
ITEMS = ("apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards", "balloons")
ANSWER_PREFIX = "The answer is: "

Problem = tuple[str, str, int]  # question, worked steps (without the answer line), answer


def _buy_and_give(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(5, 40), rng.randint(2, 30)
    c = rng.randint(1, a + b - 1)
    question = (f"{name} has {a} {item}. {name} buys {b} more and then gives {c} to a friend. "
                f"How many {item} does {name} have now?")
    steps = (f"{name} starts with {a} {item}. After buying {b} more, {name} has {a} + {b} = {a + b}. "
             f"After giving away {c}, {name} has {a + b} - {c} = {a + b - c}.")
    return question, steps, a + b - c


def _boxes(rng: random.Random) -> Problem:
    item = rng.choice(ITEMS)
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    question = f"A box holds {a} {item}. How many {item} are there in {b} boxes?"
    steps = f"Each box holds {a} {item}, so {b} boxes hold {b} * {a} = {a * b}."
    return question, steps, a * b


def _share(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    each, friends = rng.randint(2, 12), rng.randint(2, 8)
    total = each * friends
    question = f"{name} shares {total} {item} equally among {friends} friends. How many {item} does each friend get?"
    steps = f"{total} {item} shared equally among {friends} friends gives {total} / {friends} = {each} each."
    return question, steps, each


def _packs_plus(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    packs, per_pack, had = rng.randint(2, 6), rng.randint(2, 10), rng.randint(1, 20)
    question = (f"{name} already has {had} {item} and buys {packs} packs with {per_pack} {item} in each pack. "
                f"How many {item} does {name} have in total?")
    steps = (f"The packs hold {packs} * {per_pack} = {packs * per_pack} {item}. "
             f"Together with the {had} {name} already had, that is {packs * per_pack} + {had} = {packs * per_pack + had}.")
    return question, steps, packs * per_pack + had


def _change(rng: random.Random) -> Problem:
    name = rng.choice(NAMES)
    price, count = rng.randint(2, 15), rng.randint(2, 6)
    cost = price * count
    paid = (cost // 10 + 1 + rng.randint(0, 3)) * 10
    question = (f"A notebook costs ${price}. {name} buys {count} notebooks and pays with ${paid}. "
                f"How much change does {name} get, in dollars?")
    steps = (f"{count} notebooks cost {count} * {price} = {cost} dollars. "
             f"The change is {paid} - {cost} = {paid - cost} dollars.")
    return question, steps, paid - cost


def _distance(rng: random.Random) -> Problem:
    speed, hours = rng.randint(20, 90), rng.randint(2, 5)
    question = f"A train travels {speed} kilometres every hour. How many kilometres does it travel in {hours} hours?"
    steps = f"In {hours} hours the train travels {hours} * {speed} = {speed * hours} kilometres."
    return question, steps, speed * hours


TEMPLATES: tuple[Callable[[random.Random], Problem], ...] = (
    _buy_and_give, _boxes, _share, _packs_plus, _change, _distance
)


def arithmetic_problems(count: int, seed: int = 0) -> list[dict[str, str]]:
    """`count` distinct problems (templates in turn, numbers drawn with `seed`) as query/response/answer rows."""
    rng = random.Random(seed)
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    attempts = 0
    while len(rows) < count:
        attempts += 1
        if attempts > 100 * count + 1000:
            raise ValueError(f"cannot draw {count} distinct arithmetic problems; ask for fewer")
        question, steps, answer = TEMPLATES[len(rows) % len(TEMPLATES)](rng)
        if question in seen:
            continue
        seen.add(question)
        rows.append({"query": question, "response": f"{steps}\n{ANSWER_PREFIX}{answer}", "answer": str(answer)})
    return rows


def split_problems(count_train: int, count_held_out: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Disjoint training and held-out problem sets (no question appears in both)."""
    rows = arithmetic_problems(count_train + count_held_out, seed=seed)
    return rows[:count_train], rows[count_train:]
