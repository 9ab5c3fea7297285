"""The tasks' data: deterministic, disjoint splits, correct answers, TFDS + grain round trip."""

import re

import pytest

from experiments.data import arithmetic, fortunes, shakespeare, source


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


def test_tfds_array_record_and_grain_read_back(tmp_path, capfd):
    class Small(arithmetic.Arithmetic):
        TRAIN_SIZE, TEST_SIZE = 64, 16

    ds = source.dataset(Small, str(tmp_path), "train")
    # the build says one line of its own; TFDS's banners and progress bars are not shown
    out, err = capfd.readouterr()
    assert out == f"data: building small under {tmp_path}/small/1.0.0\n" and "Generating" not in err
    assert len(ds) == 64 and len(source.dataset(Small, str(tmp_path), "test")) == 16
    assert capfd.readouterr().out == ""   # built once
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


def write_topics(directory, counts):
    directory.mkdir()
    for topic, n in counts.items():
        (directory / topic).write_text("\n%\n".join(f"{topic} saying number {i}\nsecond line" for i in range(n)))
        (directory / f"{topic}.dat").write_bytes(b"\x00index")
    (directory / "off").mkdir()  # the offensive folder is skipped
    (directory / "off" / "rude").write_text("no\n%\nno")


def test_fortunes_topics_keep_the_largest_and_split_disjointly(tmp_path, monkeypatch):
    write_topics(tmp_path / "fortunes", {"art": 60, "law": 80, "food": 55, "tiny": 10})
    kept = fortunes.topics(str(tmp_path / "fortunes"), min_count=50, max_topics=2)
    assert list(kept) == ["art", "law"]  # the two largest above min_count, in name order
    assert kept["art"][1] == "art saying number 1\nsecond line" and len(kept["law"]) == 80

    monkeypatch.setattr(fortunes, "FORTUNES_DIR", str(tmp_path / "fortunes"))
    monkeypatch.setattr(fortunes.Fortunes, "DIRECTORY", str(tmp_path / "fortunes"))
    train = source.dataset(fortunes.Fortunes, str(tmp_path / "tfds"), "train")
    test = source.dataset(fortunes.Fortunes, str(tmp_path / "tfds"), "test")
    texts = lambda ds: {ex["text"] for ex in (ds[i] for i in range(len(ds)))}  # noqa: E731
    assert len(train) + len(test) == 60 + 80 + 55 and not texts(train) & texts(test)
    assert 0 < len(test) < 0.25 * len(train)
    label_of = {ex["text"].split()[0]: ex["label"] for ex in (train[i] for i in range(len(train)))}
    assert label_of == {"art": 0, "food": 1, "law": 2}


def test_fortunes_missing_package_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y fortunes"):
        fortunes.topics(str(tmp_path / "absent"))
