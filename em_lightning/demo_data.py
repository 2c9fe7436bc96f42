"""The built-in demo chat dataset (``train_file: builtin:demo``), generated from this project's templates.

Every row is a small task with one correct, consistently formatted answer: arithmetic with a worked answer,
unit conversions, reversing a word, sorting numbers. A small instruct model picks up the answer formats within
a few dozen steps, so the quickstart's training loss visibly goes down. Some rows carry a system turn and some
have a follow-up question, so both chat shapes are exercised. The same ``(n, seed)`` always gives the same
rows.
"""

from __future__ import annotations

import random

DEMO_SIZE = 300

_SYSTEM_PROMPTS = (
    "You are a patient maths tutor. Show the working, then give the answer.",
    "You are a concise assistant. Answer in one or two sentences.",
)

# fmt: off
_WORDS = (
    "garden", "planet", "window", "silver", "bridge", "pencil", "forest", "rocket", "candle", "harbor",
    "market", "button", "copper", "meadow", "island", "rabbit", "violin", "lantern", "compass", "thunder",
    "orange", "marble", "kitten", "saddle", "glacier", "pepper", "puzzle", "anchor", "velvet", "falcon",
)
# fmt: on

# (from unit, to unit, factor, question noun for the target unit)
_CONVERSIONS = (
    ("km", "m", 1000, "metres", "kilometres"),
    ("kg", "g", 1000, "grams", "kilograms"),
    ("h", "min", 60, "minutes", "hours"),
    ("m", "cm", 100, "centimetres", "metres"),
    ("L", "mL", 1000, "millilitres", "litres"),
    ("min", "s", 60, "seconds", "minutes"),
)


def _arithmetic(rng: random.Random) -> list[dict]:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        tens, ones = (a // 10 + b // 10) * 10, a % 10 + b % 10
        answer = a + b
        working = f"Tens: {a // 10 * 10} + {b // 10 * 10} = {tens}. Ones: {a % 10} + {b % 10} = {ones}."
        question = f"What is {a} + {b}?"
    elif op == "-":
        a = rng.randint(30, 99)
        b = rng.randint(10, a - 1)
        answer = a - b
        working = (
            f"Start at {a} and take away {b // 10 * 10} to get {a - b // 10 * 10}, then take away {b % 10}."
        )
        question = f"What is {a} - {b}?"
    else:
        a, b = rng.randint(3, 19), rng.randint(3, 9)
        answer = a * b
        working = (
            f"{a} groups of {b}: {' + '.join([str(b)] * min(a, 4))}{' + ...' if a > 4 else ''}, {a} times."
        )
        question = f"What is {a} × {b}?"
    turns = [
        {"role": "user", "content": question},
        {"role": "assistant", "content": f"{working} So the answer is {answer}."},
    ]
    if rng.random() < 0.25:  # a follow-up turn: rows with two assistant turns
        turns += [
            {"role": "user", "content": "And twice that?"},
            {"role": "assistant", "content": f"Twice {answer} is {answer} + {answer} = {2 * answer}."},
        ]
    return turns


def _conversion(rng: random.Random) -> list[dict]:
    src, dst, factor, dst_name, src_name = rng.choice(_CONVERSIONS)
    amount = rng.randint(2, 40)
    question = rng.choice(
        (f"How many {dst_name} are in {amount} {src_name}?", f"Convert {amount} {src} to {dst}.")
    )
    answer = f"1 {src} = {factor} {dst}, so {amount} {src} = {amount} × {factor} = {amount * factor} {dst}."
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _reverse(rng: random.Random) -> list[dict]:
    word = rng.choice(_WORDS)
    backwards = word[::-1]
    question = rng.choice((f'Reverse the word "{word}".', f'Spell "{word}" backwards.'))
    answer = f'Letters from last to first: {"-".join(backwards)}. The reversed word is "{backwards}".'
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _sort(rng: random.Random) -> list[dict]:
    numbers = rng.sample(range(1, 100), rng.randint(4, 7))
    listed = ", ".join(map(str, numbers))
    question = f"Sort these numbers from smallest to largest: {listed}."
    answer = f"In ascending order: {', '.join(map(str, sorted(numbers)))}."
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


_TASKS = (_arithmetic, _conversion, _reverse, _sort)


def demo_rows(n: int = DEMO_SIZE, seed: int = 0) -> list[dict]:
    """``n`` chat rows ``{"messages": [...]}``, the same for the same ``(n, seed)``; the tasks take turns."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        messages = _TASKS[i % len(_TASKS)](rng)
        if rng.random() < 0.2:
            messages = [{"role": "system", "content": rng.choice(_SYSTEM_PROMPTS)}, *messages]
        rows.append({"messages": messages})
    return rows
