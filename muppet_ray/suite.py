"""The built-in task suite: generated at run time, deterministic, no files, no downloads.

Every task draws on one small world (people, things, colours, feelings, numbers), so tasks share
vocabulary and facts and multi-task training has something to transfer. Each example is a pure
function of (seed, task, split, index). Tasks marked `downstream` stay out of the default
pre-finetuning mixture: they are for fine-tuning later.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

NAMES = [
    "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan", "judy", "kim",
    "leo", "mia", "noah", "olga", "paul"
]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "pink", "brown"]
THINGS = ["ball", "kite", "book", "lamp", "cup", "hat", "box", "key", "bike", "drum"]
POSITIVE = ["great", "lovely", "wonderful", "excellent", "fun", "delightful", "amazing", "pleasant"]
NEGATIVE = ["awful", "boring", "terrible", "dull", "horrible", "dreadful", "poor", "nasty"]
NEUTRAL = ["okay", "average", "ordinary", "fine"]
TOPICS = {
    "sports": ["tennis", "soccer", "hockey", "golf", "rugby"],
    "food": ["bread", "soup", "apple", "cake", "rice"],
    "weather": ["rain", "snow", "wind", "storm", "fog"],
    "music": ["piano", "song", "guitar", "violin", "choir"],
}
NEEDS = {"hungry": "eat", "tired": "sleep", "thirsty": "drink", "bored": "play",
         "dirty": "wash", "sad": "cry", "cold": "shiver", "sick": "rest"}
NUMBERS = [
    "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
    "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen",
    "twenty"
]
FILLERS = ["yesterday", "today", "at home", "in the park", "after lunch", "with a smile"]


@dataclass(frozen=True)
class SuiteTask:
    name: str
    type: str
    train_size: int
    make: Callable[[random.Random], dict[str, Any]]
    labels: tuple[str, ...] = ()
    downstream: bool = False

    def validation_size(self, scale: float) -> int:
        return max(64, round(self.train_size * scale / 10))


def _facts(rng: random.Random, count: int) -> list[tuple[str, str, str]]:
    names = rng.sample(NAMES, count)
    return [(n, rng.choice(COLORS), rng.choice(THINGS)) for n in names]


def _say(facts) -> str:
    return " ".join(f"{n} has a {c} {t} ." for n, c, t in facts)


def sentiment(rng):
    positive, negated = rng.random() < 0.5, rng.random() < 0.3
    adjective = rng.choice(POSITIVE if positive else NEGATIVE)
    text = (f"{rng.choice(NAMES)} thought the {rng.choice(COLORS)} {rng.choice(THINGS)} was "
            f"{'not ' if negated else ''}{adjective} {rng.choice(FILLERS)}")
    return {"text": text, "label": "positive" if positive != negated else "negative"}


def topic(rng):
    label = rng.choice(sorted(TOPICS))
    a, b = rng.sample(NAMES, 2)
    text = f"{a} told {b} about the {rng.choice(TOPICS[label])} {rng.choice(FILLERS)}"
    return {"text": text, "label": label}


def entailment(rng):
    facts = _facts(rng, rng.randint(2, 3))
    name, color, thing = rng.choice(facts)
    kind = rng.choice(["entailment", "contradiction", "neutral"])
    if kind == "contradiction":
        color = rng.choice([c for c in COLORS if c != color])
    elif kind == "neutral":
        name = rng.choice([n for n in NAMES if n not in {f[0] for f in facts}])
    return {"text": _say(facts), "text_pair": f"{name} has a {color} {thing} .", "label": kind}


def rating(rng):
    count = rng.randint(1, 4)
    positive = rng.randint(0, count)
    words = rng.sample(POSITIVE, positive) + rng.sample(NEGATIVE, count - positive)
    rng.shuffle(words)
    text = f"{rng.choice(NAMES)} rated the {rng.choice(THINGS)} : {' and '.join(words)}"
    return {"text": text, "label": positive / count}


def needs(rng):
    name, state = rng.choice(NAMES), rng.choice(sorted(NEEDS))
    choices = [NEEDS[state]] + rng.sample([a for s, a in NEEDS.items() if s != state], 3)
    rng.shuffle(choices)
    return {"context": f"{name} is {state} .", "question": f"so {name} wants to",
            "choices": choices, "label": choices.index(NEEDS[state])}


def next_number(rng):
    k = rng.randrange(len(NUMBERS) - 1)
    wrong = [w for w in NUMBERS if w != NUMBERS[k + 1]]
    choices = [NUMBERS[k + 1]] + rng.sample(wrong, rng.randint(2, 4))
    rng.shuffle(choices)
    return {"context": f"count : {NUMBERS[k]} ,", "question": "what comes next ?",
            "choices": choices, "label": choices.index(NUMBERS[k + 1])}


def what_has(rng):
    facts = _facts(rng, rng.randint(2, 4))
    name, color, thing = rng.choice(facts)
    context, answer = _say(facts), f"{color} {thing}"
    start = context.index(f"{name} has a {answer}") + len(f"{name} has a ")
    return {"question": f"what does {name} have ?", "context": context, "answer": answer,
            "answer_start": start}


def summarize(rng):
    facts = _facts(rng, rng.randint(2, 4))
    sentences = [f"{n} has a {c} {t} ." if rng.random() < 0.5 else
                 f"{n} is {rng.choice(sorted(NEEDS))} {rng.choice(FILLERS)} ." for n, c, t in facts]
    return {"source": " ".join(sentences), "target": " ".join(f[0] for f in facts)}


def review(rng):
    kind = rng.choice(["negative", "neutral", "positive"])
    words = {"negative": NEGATIVE, "neutral": NEUTRAL, "positive": POSITIVE}[kind]
    text = (f"the {rng.choice(THINGS)} that {rng.choice(NAMES)} bought is {rng.choice(words)} "
            f"{rng.choice(FILLERS)}")
    return {"text": text, "label": kind}


def who_has(rng):
    facts = _facts(rng, rng.randint(2, 4))
    name, color, thing = rng.choice(facts)
    choices = [f[0] for f in facts]
    return {"context": _say(facts), "question": f"who has the {color} {thing} ?",
            "choices": choices, "label": choices.index(name)}


SUITE: dict[str, SuiteTask] = {t.name: t for t in [
    SuiteTask("sentiment", "classification", 3000, sentiment, ("negative", "positive")),
    SuiteTask("topic", "classification", 2000, topic, tuple(sorted(TOPICS))),
    SuiteTask("entailment", "classification", 3000, entailment,
              ("entailment", "neutral", "contradiction")),
    SuiteTask("rating", "regression", 1500, rating),
    SuiteTask("needs", "multiple_choice", 2000, needs),
    SuiteTask("next_number", "multiple_choice", 1500, next_number),
    SuiteTask("what_has", "span", 2500, what_has),
    SuiteTask("summarize", "generation", 2000, summarize),
    SuiteTask("review", "classification", 1500, review, ("negative", "neutral", "positive"),
              downstream=True),
    SuiteTask("who_has", "multiple_choice", 1500, who_has, downstream=True),
]}

DEFAULT_MIXTURE = [name for name, t in SUITE.items() if not t.downstream]


def example(task: str, split: str, index: int, seed: int) -> dict[str, Any]:
    """Example `index` of a task's split: the same for the same (seed, task, split, index)."""
    return SUITE[task].make(random.Random(f"{seed}/{task}/{split}/{index}"))


def size(task: str, split: str, scale: float) -> int:
    """Examples in a split; the test split is as large as the validation split."""
    spec = SUITE[task]
    return max(64, round(spec.train_size * scale)) if split == "train" else spec.validation_size(
        scale)
