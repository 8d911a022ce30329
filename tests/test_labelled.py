"""Labelled readers (issue 14): text JSONL sets with a fixed test split, the idx reader, Fashion-MNIST."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from ralm.data.idx import read_idx
from ralm.data.tasks.base import LabelledData, LabelledExample
from ralm.data.tasks.fashion_mnist import CLASSES, fashion_mnist_arrays, read_fashion_mnist
from ralm.data.tasks.labelled import LABELLED, TEST_FRACTION, load_labelled, read_labelled
from ralm.errors import RalmError


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _reviews(n: int = 50) -> list[dict]:
    return [{"text": f"review number {i}", "label": "fresh" if i % 3 else "rotten"} for i in range(n)]


def test_fixed_test_split_is_deterministic_and_keeps_repeated_texts_together(tmp_path: Path) -> None:
    recs = _reviews(50) + [{"text": "review number 7", "label": "fresh"}] * 3  # a text repeated 4 times
    data = read_labelled(_jsonl(tmp_path / "rt.jsonl", recs))
    assert data.classes == ("fresh", "rotten")
    train, test = data.splits["train"], data.splits["test"]
    assert data.splits["validation"] == [] and len(train) + len(test) == 53
    assert len({e.text for e in test}) == round(50 * TEST_FRACTION)  # 20 % of the distinct texts
    assert not {e.text for e in train} & {e.text for e in test}
    assert [e.id for e in test] == [e.id for e in read_labelled(tmp_path / "rt.jsonl").splits["test"]]
    # independent of file order
    again = read_labelled(_jsonl(tmp_path / "rev.jsonl", recs[::-1]))
    assert {e.text for e in again.splits["test"]} == {e.text for e in test}
    assert all(e.id == f"line-{int(e.text.split()[-1]) + 1}" for e in train[:5]) and train[0].image is None
    assert data.label_ids(train).tolist() == [int(e.label == "rotten") for e in train]


def test_named_sets_read_from_the_data_folder(tmp_path: Path) -> None:
    _jsonl(tmp_path / "rotten_tomatoes.jsonl", _reviews(20))
    data = load_labelled("rotten-tomatoes", data_dir=tmp_path)
    assert data.classes == LABELLED["rotten-tomatoes"].classes and len(data.splits["test"]) == 4
    with pytest.raises(RalmError, match=r"bbc-news: no data .*bbc_news.jsonl; fetch it with `ralm data get bbc-news`"):
        load_labelled("bbc-news", data_dir=tmp_path)
    # BBC News names five classes: a file with four of them is refused
    topics = [{"text": f"article {i}", "label": t} for i, t in enumerate(["business", "politics", "sports", "tech"] * 3)]
    with pytest.raises(RalmError, match=r"class 'entertainment' has no examples"):
        load_labelled("bbc-news", _jsonl(tmp_path / "bbc.jsonl", topics))
    # any other labelled JSONL: by path, classes from its labels (ints allowed), ids from the file
    other = _jsonl(tmp_path / "o.jsonl", [{"id": f"x{i}", "text": f"t {i}", "label": i % 2} for i in range(10)])
    got = load_labelled("my-set", other)
    assert got.classes == ("0", "1") and {e.id for e in got.splits["train"]} <= {f"x{i}" for i in range(10)}
    with pytest.raises(RalmError, match=r"unknown labelled set 'my-set' and no file given"):
        load_labelled("my-set")


@pytest.mark.parametrize(("line", "error"), [
    ('{"text": "a"}', r"b.jsonl: line 3: no 'label' field"),
    ('{"text": "a", "label": ""}', r"b.jsonl: line 3: 'label': expected a non-empty string or an integer"),
    ('{"text": "a", "label": true}', r"b.jsonl: line 3: 'label': expected a non-empty string or an integer"),
    ('{"label": "fresh"}', r"b.jsonl: line 3: no 'text' field"),
    ('{"text": "a", "label": "fresh"', r"b.jsonl: line 3: not valid JSON"),
    ('["a", "fresh"]', r"b.jsonl: line 3: expected a JSON object"),
    ('{"text": "a", "label": "meh"}', r"b.jsonl: line 3: label 'meh' is not a class \(fresh, rotten\)"),
])
def test_bad_lines_get_one_line_errors_naming_file_and_line(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "b.jsonl"
    path.write_text('{"text": "x", "label": "fresh"}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(RalmError, match=error) as e:
        load_labelled("rotten-tomatoes", path)
    assert "\n" not in str(e.value)


def test_a_class_with_no_examples_and_an_empty_file_are_refused(tmp_path: Path) -> None:
    only_fresh = _jsonl(tmp_path / "f.jsonl", [r for r in _reviews(10) if r["label"] == "fresh"])
    with pytest.raises(RalmError, match=r"f.jsonl: class 'rotten' has no examples"):
        read_labelled(only_fresh, ["fresh", "rotten"])
    (tmp_path / "e.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(RalmError, match=r"e.jsonl: no examples \(empty file\)"):
        read_labelled(tmp_path / "e.jsonl")
    # a class whose only example fell into the test split leaves train without it
    lonely = LabelledExample("line-1", "lonely", "rare")
    with pytest.raises(RalmError, match=r"train split: class 'rare' has no examples"):
        LabelledData(("fresh", "rare"), {"train": [LabelledExample("line-2", "x", "fresh")], "test": [lonely]})


# ---------------------------------------------------------------- idx files and Fashion-MNIST


def _idx(arr: np.ndarray) -> bytes:
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C, np.dtype(">f4"): 0x0D}[arr.dtype]
    return (bytes([0, 0, code, arr.ndim]) + np.array(arr.shape, ">u4").tobytes() + arr.tobytes())


def test_idx_reader_reads_plain_and_gzip_files(tmp_path: Path) -> None:
    imgs = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.idx").write_bytes(_idx(imgs))
    (tmp_path / "a.gz").write_bytes(gzip.compress(_idx(imgs)))
    for name in ("a.idx", "a.gz"):
        got = read_idx(tmp_path / name)
        assert got.dtype == np.uint8 and np.array_equal(got, imgs)
    ints = np.array([1, -2, 70000], dtype=">i4")
    (tmp_path / "i.idx").write_bytes(_idx(ints))
    got = read_idx(tmp_path / "i.idx")
    assert got.dtype.byteorder in "=|" and got.tolist() == [1, -2, 70000]


def test_idx_reader_refuses_truncated_and_malformed_files(tmp_path: Path) -> None:
    raw = _idx(np.zeros((3, 28, 28), dtype=np.uint8))
    cases = {
        "cut.idx": (raw[:-5], r"cut.idx: truncated idx file: shape \(3, 28, 28\) needs 2,352 data bytes, found 2,347"),
        "head.idx": (raw[:9], r"head.idx: truncated idx file \(header cut off\)"),
        "long.idx": (raw + b"x", r"long.idx: malformed idx file"),
        "magic.idx": (b"\x01\x02" + raw[2:], r"magic.idx: not an idx file \(bad magic 0102"),
        "empty.idx": (b"", r"empty.idx: not an idx file \(bad magic empty\)"),
        "cut.gz": (gzip.compress(raw)[:-20], r"cut.gz: unreadable idx file \(EOFError"),
    }
    for name, (data, error) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(RalmError, match=error):
            read_idx(tmp_path / name)
    with pytest.raises(RalmError, match=r"nope.idx: no such file"):
        read_idx(tmp_path / "nope.idx")


def _fashion(folder: Path, n_train: int = 30, n_test: int = 10, labels_max: int = 9) -> Path:
    folder.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % (labels_max + 1)).astype(np.uint8)
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(gzip.compress(_idx(imgs)))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(_idx(labels)))
    return folder


def test_fashion_mnist_reader(tmp_path: Path) -> None:
    folder = _fashion(tmp_path / "fashion_mnist")
    data = load_labelled("fashion-mnist", data_dir=tmp_path)
    assert data.classes == CLASSES and len(CLASSES) == 10 and CLASSES[9] == "Ankle boot"
    assert [len(data.splits[s]) for s in ("train", "validation", "test")] == [30, 0, 10]
    e = data.splits["train"][11]
    images, labels = fashion_mnist_arrays(folder, "train")
    assert e.id == "train-00011" and e.label == CLASSES[1] and e.text == "" and np.array_equal(e.image, images[11])
    assert images.shape == (30, 28, 28) and labels.dtype == np.int64
    assert data.label_ids(data.splits["test"]).tolist() == list(range(10))
    with pytest.raises(RalmError, match=r"fashion-mnist has no split 'validation'"):
        fashion_mnist_arrays(folder, "validation")


def test_fashion_mnist_refuses_bad_files(tmp_path: Path) -> None:
    folder = _fashion(tmp_path / "f")
    lab = folder / "t10k-labels-idx1-ubyte.gz"
    lab.write_bytes(gzip.compress(_idx(np.zeros(9, dtype=np.uint8))))
    with pytest.raises(RalmError, match=r"t10k-labels-idx1-ubyte.gz: \(9,\) labels for 10 images"):
        read_fashion_mnist(folder)
    lab.write_bytes(gzip.compress(_idx(np.full(10, 10, dtype=np.uint8))))
    with pytest.raises(RalmError, match=r"t10k-labels-idx1-ubyte.gz: label 10 outside 0-9"):
        read_fashion_mnist(folder)
    img = folder / "train-images-idx3-ubyte.gz"
    img.write_bytes(img.read_bytes()[:100])
    with pytest.raises(RalmError, match=r"train-images-idx3-ubyte.gz: unreadable idx file"):
        read_fashion_mnist(folder)
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    _fashion(tmp_path / "g", n_train=5, labels_max=3)  # train lacks classes 4-9
    with pytest.raises(RalmError, match=r"train split: class 'Coat' has no examples"):
        read_fashion_mnist(tmp_path / "g")
