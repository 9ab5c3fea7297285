"""Topic classification over the Debian package `fortunes` as a TFDS dataset.

Each topic file under `/usr/share/games/fortunes` (not the `.dat` indexes, the `.u8` links or the
offensive `off/` folder) holds fortunes separated by lines that are only `%`; the label of a
fortune is its file's name. Topics with fewer than `MIN_COUNT` fortunes are dropped and the
`MAX_TOPICS` largest are kept (labels in name order), so training is quick. The split of a fortune
is a hash of its text (~10% test), so the splits are disjoint and deterministic.
"""

from __future__ import annotations

import hashlib
import os

import tensorflow_datasets as tfds

FORTUNES_DIR = "/usr/share/games/fortunes"
MIN_COUNT, MAX_TOPICS = 50, 8


def read_topic(path: str) -> list[str]:
    """The fortunes of one topic file: stripped, non-empty, in file order, duplicates dropped."""
    with open(path, encoding="utf-8", errors="replace") as f:
        text = f.read()
    out: list[str] = []
    chunk: list[str] = []
    for line in text.splitlines() + ["%"]:
        if line.strip() == "%":
            fortune = "\n".join(chunk).strip()
            if fortune and fortune not in out:
                out.append(fortune)
            chunk = []
        else:
            chunk.append(line)
    return out


def topics(directory: str = FORTUNES_DIR, min_count: int = MIN_COUNT, max_topics: int = MAX_TOPICS) -> dict:
    """`{topic: [fortune, ...]}` for the kept topics, sorted by name."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no fortunes at {directory}: `apt-get install -y fortunes` (Debian package)")
    found = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.endswith((".dat", ".u8")) or name.startswith(".") or os.path.islink(path) or not os.path.isfile(path):
            continue  # indexes, UTF-8 aliases, and folders (the offensive `off/`)
        fortunes = read_topic(path)
        if len(fortunes) >= min_count:
            found[name] = fortunes
    largest = sorted(found, key=lambda t: (-len(found[t]), t))[:max_topics]
    return {t: found[t] for t in sorted(largest)}


def split_of(text: str, test_fraction: float = 0.1) -> str:
    h = int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "test" if h < test_fraction else "train"


class Fortunes(tfds.core.GeneratorBasedBuilder):
    """TFDS builder: `{"text": str, "label": int}` (label names: the topics), splits train / test."""

    VERSION = tfds.core.Version("1.0.0")
    DIRECTORY = FORTUNES_DIR

    def __init__(self, *args, **kwargs):
        self._topics = topics(self.DIRECTORY)
        super().__init__(*args, **kwargs)

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "label": tfds.features.ClassLabel(names=list(self._topics))}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples("train"), "test": self._generate_examples("test")}

    def _generate_examples(self, split):
        seen = set()
        for label, (topic, fortunes) in enumerate(self._topics.items()):
            for i, text in enumerate(fortunes):
                if text not in seen and split_of(text) == split:  # a fortune in two topics: first one
                    seen.add(text)
                    yield f"{topic}/{i}", {"text": text, "label": label}
