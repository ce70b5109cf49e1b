"""Class labels on the data side: ``data.num_classes`` > 0 makes every source carry labels in [0, num_classes)
(class subfolders, EDM / EDM2 ``dataset.json``, dataset_tool's ``.zip``, an ``.npz``'s ``labels``, digits, the
Gaussian mixture) or refuses in one sentence naming the field; 0 drops them and reads exactly what it read before."""

from __future__ import annotations

import json
import os
import pickle
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from cmt_core.config import DataConfig
from cmt_core.data import heldout_split, load_data
from cmt_core.data.datasets import ClassLabelError
from cmt_core.data.images import load_digits, load_image_dataset


def write_images(root, names, seed=0) -> dict[str, np.ndarray]:
    """An 8x8 RGB PNG at each relative path of ``names`` under ``root``; returns their pixels ``(8, 8, 3)``."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for name in names:
        pixels[name] = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[name]).save(root / name)
    return pixels


def zip_folder(folder, archive):
    """``folder``'s files in a ``.zip`` as EDM's dataset_tool writes it (relative names, '/'-separated)."""
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            zf.write(path, path.relative_to(folder).as_posix())
    return archive


def whole(path, num_classes):
    """The image folder or zip ``path`` (not split), its samples and (``num_classes`` > 0) its labels, in order."""
    dataset = load_image_dataset("image_folder", path, None, num_classes)
    return dataset, dataset.all(), dataset.labels(slice(None)) if num_classes else None


def as_model(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.transpose(2, 0, 1).astype(np.float32) / 255 * 2 - 1)


SUBFOLDERS = ["n02/c.png", "n01440764/b.png", "n01440764/deeper/a.png", "cat/x.png"]


def test_class_subfolders_are_the_classes_in_sorted_order(tmp_path):
    pixels = write_images(tmp_path, SUBFOLDERS)
    dataset, x, labels = whole(tmp_path, 4)
    order = ["cat/x.png", "n01440764/b.png", "n01440764/deeper/a.png", "n02/c.png"]
    assert dataset.num_classes == 4 and labels.tolist() == [0, 1, 1, 2]  # fewer classes present than num_classes
    assert torch.equal(x, torch.stack([as_model(pixels[n]) for n in order]))
    plain, y, _ = whole(tmp_path, 0)
    assert plain.num_classes == 0 and torch.equal(x, y)
    with pytest.raises(ValueError, match="no class labels"):
        plain.labels([0])
    data = load_data(DataConfig(name="image_folder", path=tmp_path, num_classes=4, heldout_fraction=0.5))
    train, held = heldout_split(4, 0, 0.5)
    assert data.num_classes == 4 and torch.equal(data.heldout.labels(slice(None)), labels[held])
    assert torch.equal(data.train.all(), x[train]) and torch.equal(data.train.labels(slice(None)), labels[train])


def test_an_image_at_the_root_beside_class_subfolders_refuses_labels_only(tmp_path):
    write_images(tmp_path, [*SUBFOLDERS, "stray.png"])
    assert len(whole(tmp_path, 0)[1]) == 5  # unconditional: every image, labels never looked at
    with pytest.raises(ClassLabelError, match=r"data.num_classes=4 asks for class labels, but the image folder .* "
                                              r"'stray.png' at its root"):
        whole(tmp_path, 4)
    flat = tmp_path / "flat"
    write_images(flat, ["a.png", "b.png"])
    with pytest.raises(ClassLabelError, match="no dataset.json and no class subfolders"):
        whole(flat, 4)


# dataset_tool's layout: shards 00000/, 00001/ (not classes) and labels in dataset.json
SHARDED = ["00000/img00000000.png", "00000/img00000001.png", "00001/img00000002.png"]


@pytest.mark.parametrize("labels,expected", [([5, 0, 5], [5, 0, 5]), (None, None)], ids=["edm", "labels-null"])
@pytest.mark.parametrize("as_zip", [False, True], ids=["folder", "zip"])
def test_dataset_json_gives_the_labels_of_a_folder_or_zip(tmp_path, labels, expected, as_zip):
    folder = tmp_path / "ds"
    pixels = write_images(folder, SHARDED)
    entries = None if labels is None else [[n, k] for n, k in zip(reversed(SHARDED), reversed(labels))]
    (folder / "dataset.json").write_text(json.dumps({"labels": entries}))
    path = zip_folder(folder, tmp_path / "ds.zip") if as_zip else folder
    _, x, _ = whole(path, 0)
    assert torch.equal(x, torch.stack([as_model(pixels[n]) for n in SHARDED]))
    if expected is None:
        with pytest.raises(ClassLabelError, match=r'says it has none \("labels": null\)'):
            whole(path, 6)
        return
    dataset, y, got = whole(path, 6)
    assert got.tolist() == expected and dataset.num_classes == 6 and torch.equal(x, y)


def test_edm2_dataset_json_with_class_subfolders_takes_the_json(tmp_path):
    """EDM2's dataset_tool labels ImageNet-style folders into dataset.json: the file, not the folder names, decides."""
    write_images(tmp_path, ["n01/a.png", "n02/b.png"])
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [["n01/a.png", 7], ["n02/b.png", 3]]}))
    assert whole(tmp_path, 8)[2].tolist() == [7, 3]


@pytest.mark.parametrize("entries,words", [
    ([["00000/img00000000.png", 1], ["00000/img00000001.png", 1]], "gives no label for the image "
                                                                    "'00001/img00000002.png'"),
    ([[n, 0] for n in SHARDED] + [["00002/gone.png", 0]], "labels '00002/gone.png', which is no image of it"),
    ([[n, 1.5] for n in SHARDED], "is not"),
    ([[n, 9] for n in SHARDED], r"reach 9 \(they must lie in \[0, 3\)\)"),
], ids=["missing entry", "missing file", "float label", "out of range"])
def test_dataset_json_that_does_not_fit_is_refused_when_labels_are_asked_for(tmp_path, entries, words):
    write_images(tmp_path, SHARDED)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": entries}))
    assert len(whole(tmp_path, 0)[1]) == 3
    with pytest.raises(ClassLabelError, match=words):
        whole(tmp_path, 3)


def test_zip_without_dataset_json_takes_subfolder_labels_and_opens_per_process(tmp_path, monkeypatch):
    folder = tmp_path / "ds"
    pixels = write_images(folder, SUBFOLDERS)
    data, x, labels = whole(zip_folder(folder, tmp_path / "ds.zip"), 4)
    assert labels.tolist() == [0, 1, 1, 2]
    assert torch.equal(x, whole(folder, 4)[1]) and torch.equal(x[0], as_model(pixels["cat/x.png"]))
    copy = pickle.loads(pickle.dumps(data))  # a spawned worker's copy opens the archive itself
    assert torch.equal(copy.read([3, 1]), x[[3, 1]]) and torch.equal(copy.labels([3, 1]), labels[[3, 1]])
    parents = data._archive()
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as in a forked data-loader worker
    assert data._archive() is not parents and torch.equal(data.read([2]), x[[2]])


def test_a_path_neither_folder_nor_zip_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no images")
    with pytest.raises(ValueError, match="neither a folder of images nor a .zip archive"):
        whole(tmp_path / "notes.txt", 0)


def npz(path, n=12, **arrays):
    images = np.random.default_rng(0).integers(0, 256, size=(n, 8, 8, 1), dtype=np.uint8)
    np.savez(path, images=images, **arrays)
    return path


def test_npz_labels_are_read_when_asked_for(tmp_path):
    labels = np.arange(12) % 4
    cfg = DataConfig(name="npz", path=npz(tmp_path / "d.npz", labels=labels), num_classes=4)
    data = load_data(cfg)
    train, held = heldout_split(12, cfg.seed, cfg.heldout_fraction)
    assert data.num_classes == 4
    assert data.train.labels(slice(None)).tolist() == labels[train].tolist()
    assert data.heldout.labels(slice(None)).tolist() == labels[held].tolist()
    plain = load_data(cfg.model_copy(update={"num_classes": 0}))
    assert plain.num_classes == 0 and torch.equal(plain.train.all(), data.train.all())


@pytest.mark.parametrize("arrays,words", [
    ({}, r"data.num_classes=4 asks for class labels, but the npz file .*d.npz has no array 'labels'"),
    ({"labels": np.zeros((12, 1), np.int64)}, r"the array 'labels' of .*d.npz is int64 of shape \(12, 1\)"),
    ({"labels": np.zeros(12, np.float32)}, r"the array 'labels' of .*d.npz is float32"),
    ({"labels": np.full(12, -1)}, r"data.num_classes=4, but the labels of .*d.npz \(its array 'labels'\) go down "
                                  r"to -1"),
    ({"labels": np.arange(12) % 10}, r"data.num_classes=4, but the labels of .*d.npz \(its array 'labels'\) reach "
                                     r"9 \(they must lie in \[0, 4\)\)"),
], ids=["missing", "wrong shape", "float", "negative", "out of range"])
def test_npz_labels_that_do_not_fit_name_the_file_and_array(tmp_path, arrays, words):
    path = npz(tmp_path / "d.npz", **arrays)
    assert load_data(DataConfig(name="npz", path=path)).num_classes == 0  # unconditional: never read
    with pytest.raises(ClassLabelError, match=words):
        load_data(DataConfig(name="npz", path=path, num_classes=4))


def test_digits_keep_their_labels_with_num_classes_and_drop_them_without():
    images, labels = load_digits()
    train, held = heldout_split(len(images), 0, 0.2)
    plain = load_data(DataConfig(name="digits"))
    assert plain.num_classes == 0 and plain.source(1).batch(0, 8)["cond"] == {}
    assert torch.equal(plain.train.all(), images[train]) and torch.equal(plain.heldout.all(), images[held])
    conditional = load_data(DataConfig(name="digits", num_classes=10))
    assert conditional.num_classes == 10 and torch.equal(conditional.train.all(), images[train])
    assert torch.equal(conditional.train.labels(slice(None)), labels[train])
    assert torch.equal(conditional.heldout.labels(slice(None)), labels[held])
    with pytest.raises(ClassLabelError, match=r"data.num_classes=5, but the labels of scikit-learn's digits reach 9 "
                                              r"\(they must lie in \[0, 5\)\)"):
        load_data(DataConfig(name="digits", num_classes=5))


def test_dataset_batches_carry_the_one_hot_labels_of_their_rows():
    data = load_data(DataConfig(name="digits", num_classes=12))  # more classes than the data holds is allowed
    source = data.source(seed=3)
    idx = source.sampler.indices(2, 16)
    batch = source.batch(2, 16)
    assert batch["cond"]["class_labels"].shape == (16, 12)
    assert torch.equal(batch["cond"]["class_labels"], torch.nn.functional.one_hot(data.train.labels(idx), 12).float())
    assert torch.equal(batch["x"], data.train.read(idx))
    half = data.source(seed=3).batch(2, 16, rank=1, world=2)["cond"]["class_labels"]
    assert torch.equal(half, batch["cond"]["class_labels"][8:])
    assert data.source(seed=3, labels=False).batch(2, 16)["cond"] == {}  # an explicit override still holds


def test_gaussian_mixture_labels_follow_its_mode_classes():
    plain = load_data(DataConfig(name="gaussian_mixture", num_modes=6))
    data = load_data(DataConfig(name="gaussian_mixture", num_modes=6, num_classes=3))
    assert data.num_classes == 3 and data.distribution.num_classes == 3
    assert torch.equal(data.train.all(), plain.train.all())  # the same draws, labelled
    for split in (data.train, data.heldout):
        x, labels = split.all(), split.labels(slice(None))
        nearest = torch.cdist(x.double(), data.distribution.means).argmin(1)
        assert torch.equal(data.distribution.mode_class[nearest], labels)
    assert set(data.train.labels(slice(None)).tolist()) == {0, 1, 2}
    batch = data.source(seed=0).batch(0, 64)
    nearest = torch.cdist(batch["x"].double(), data.distribution.means).argmin(1)
    assert torch.equal(batch["cond"]["class_labels"].argmax(1), data.distribution.mode_class[nearest])
    assert plain.num_classes == 0 and plain.source(seed=0).batch(0, 4)["cond"] == {}


def test_preflight_takes_an_image_folder_or_its_zip(tmp_path):
    from cmt_core.preflight import _check_archive

    write_images(tmp_path / "ds", SUBFOLDERS)
    for path in (tmp_path / "ds", zip_folder(tmp_path / "ds", tmp_path / "ds.ZIP")):
        _check_archive("data.path", str(path), path, "an image folder")
