"""Generated arithmetic word problems (deterministic by seed) as a TFDS dataset.

Each problem is a short word problem with one operation (+, −, ×) on small integers and an integer
answer. The split of a problem is a hash of its question, so train and test are disjoint by
construction and every seed gives the same sets.
"""

from __future__ import annotations

import hashlib
import random

import tensorflow_datasets as tfds

NAMES = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun"]
ITEMS = ["apples", "books", "coins", "pens", "shells", "stamps", "cards", "marbles"]
TEMPLATES = {
    "+": "{n} has {a} {i} and gets {b} more. How many {i} does {n} have?",
    "-": "{n} has {a} {i} and gives away {b}. How many {i} does {n} have left?",
    "*": "{n} has {a} bags with {b} {i} each. How many {i} does {n} have?",
}


def problem(rng: random.Random) -> tuple[str, str]:
    op = rng.choice("+-*")
    a, b = (rng.randint(2, 12), rng.randint(2, 12)) if op == "*" else (rng.randint(5, 99), rng.randint(1, 60))
    if op == "-" and b > a:
        a, b = b, a
    question = TEMPLATES[op].format(n=rng.choice(NAMES), i=rng.choice(ITEMS), a=a, b=b)
    return question, str({"+": a + b, "-": a - b, "*": a * b}[op])


def split_of(question: str, test_fraction: float = 0.1) -> str:
    h = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "train"


def problems(split: str, count: int, seed: int = 0):
    """`count` distinct problems of `split`, deterministic in `seed`."""
    rng, seen = random.Random(seed), set[str]()
    while len(seen) < count:
        q, a = problem(rng)
        if q not in seen and split_of(q) == split:
            seen.add(q)
            yield q, a


class Arithmetic(tfds.core.GeneratorBasedBuilder):
    """TFDS builder: `{"question": str, "answer": str}`, splits train / test."""

    VERSION = tfds.core.Version("1.0.0")
    TRAIN_SIZE, TEST_SIZE, SEED = 20000, 500, 0

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"question": tfds.features.Text(), "answer": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train", self.TRAIN_SIZE),
                "test": self._generate_examples("test", self.TEST_SIZE)}

    def _generate_examples(self, split, count):
        for i, (q, a) in enumerate(problems(split, count, self.SEED)):
            yield i, {"question": q, "answer": a}
