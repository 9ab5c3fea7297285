"""The arithmetic task: deterministic, disjoint splits, correct answers, TFDS + grain round trip."""

import re

from experiments.data import arithmetic, shakespeare, source


def solve(question):
    a, b = map(int, re.findall(r"\d+", question))
    if "bags with" in question:
        return a * b
    return a - b if "gives away" in question else a + b


def test_problems_are_deterministic_correct_and_disjoint():
    train = list(arithmetic.problems("train", 2000, seed=0))
    assert train == list(arithmetic.problems("train", 2000, seed=0))
    assert train != list(arithmetic.problems("train", 2000, seed=1))
    test = list(arithmetic.problems("test", 200, seed=0))
    assert not {q for q, _ in train} & {q for q, _ in test}
    assert all(str(solve(q)) == a for q, a in train + test)
    assert len({q for q, _ in train}) == 2000


def test_tfds_array_record_and_grain_read_back(tmp_path):
    class Small(arithmetic.Arithmetic):
        TRAIN_SIZE, TEST_SIZE = 64, 16

    ds = source.dataset(Small, str(tmp_path), "train")
    assert len(ds) == 64 and len(source.dataset(Small, str(tmp_path), "test")) == 16
    assert list(tmp_path.rglob("*.array_record*"))
    first = ds[0]
    assert set(first) == {"question", "answer"} and str(solve(first["question"])) == first["answer"]
    batches = list(ds.shuffle(seed=3).batch(8))
    assert len(batches) == 8 and batches[0]["question"].shape == (8,)


def test_shakespeare_holds_out_whole_works(tmp_path):
    works = shakespeare.text_files()
    assert len(works) > 30 and {shakespeare.split_of(w) for w in works} == {"train", "test"}
    train = source.dataset(shakespeare.Shakespeare, str(tmp_path), "train")
    test = source.dataset(shakespeare.Shakespeare, str(tmp_path), "test")
    assert len(train) > 5000 and len(test) > 100
    sample = [test[i] for i in range(0, len(test), 50)]
    assert {ex["work"] for ex in sample} <= {w for w in works if shakespeare.split_of(w) == "test"}
    assert all(len(ex["text"]) >= shakespeare.PASSAGE_CHARS for ex in sample)
