"""Local image datasets: layouts, exact pixel values in [-1, 1], resizing and the errors that name the file."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cmt_core.config import DataConfig
from cmt_core.data import load_data
from cmt_core.data.images import load_image_dataset

BATCH = 20  # images per fake CIFAR-10 batch


def load_images(cfg: DataConfig) -> torch.Tensor:
    """Every image of the data set ``cfg`` names, in memory."""
    return load_image_dataset(cfg.name, cfg.path, cfg.resolution).all()


def fake_cifar10(root, batches=range(1, 6)):
    """A ``cifar-10-batches-py`` folder under ``root``; returns the (5 * BATCH, 3, 32, 32) uint8 images."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5 * BATCH, 3, 32, 32), dtype=np.uint8)
    images[0, :, 0, 0] = (255, 0, 128)
    for k in batches:
        chunk = images[(k - 1) * BATCH:k * BATCH]
        batch = {b"data": chunk.reshape(BATCH, 3072), b"labels": list(range(BATCH)), b"batch_label": b"fake"}
        (folder / f"data_batch_{k}").write_bytes(pickle.dumps(batch))
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((BATCH, 3072), np.uint8)}))
    return images


def as_model_range(pixels: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(pixels.astype(np.float32) / 255 * 2 - 1)


@pytest.mark.parametrize("point_at", ["parent", "batches_folder"])
def test_cifar10_reads_the_five_training_batches_in_order(tmp_path, point_at):
    images = fake_cifar10(tmp_path)
    path = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    x = load_images(DataConfig(name="cifar10", path=path))
    assert x.shape == (5 * BATCH, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert x[0, :, 0, 0].tolist() == [1.0, -1.0, pytest.approx(128 / 255 * 2 - 1, abs=1e-6)]
    torch.testing.assert_close(x, as_model_range(images), rtol=0, atol=1e-6)


def test_cifar10_missing_batch_names_the_file(tmp_path):
    fake_cifar10(tmp_path, batches=(1, 2, 4, 5))
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        load_images(DataConfig(name="cifar10", path=tmp_path))


def test_cifar10_resolution_resizes(tmp_path):
    fake_cifar10(tmp_path)
    x = load_images(DataConfig(name="cifar10", path=tmp_path, resolution=16))
    assert x.shape == (5 * BATCH, 3, 16, 16) and x.min() >= -1 and x.max() <= 1


def random_uint8(shape, seed=0):
    pixels = np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)
    pixels.reshape(-1)[:2] = (0, 255)
    return pixels


@pytest.mark.parametrize("channels", [1, 3])
def test_npz_channels_last_and_channels_first_give_the_same_images(tmp_path, channels):
    nchw = random_uint8((6, channels, 8, 8))
    np.savez(tmp_path / "first.npz", images=nchw)
    np.savez(tmp_path / "last.npz", images=nchw.transpose(0, 2, 3, 1))
    first = load_images(DataConfig(name="npz", path=tmp_path / "first.npz"))
    last = load_images(DataConfig(name="npz", path=tmp_path / "last.npz"))
    assert first.shape == (6, channels, 8, 8)
    assert torch.equal(first, last)
    assert first.reshape(-1)[:2].tolist() == [-1.0, 1.0]
    torch.testing.assert_close(first, as_model_range(nchw), rtol=0, atol=1e-6)


def test_npz_float_images_in_unit_interval(tmp_path):
    pixels = np.random.default_rng(0).random((4, 5, 5, 3), dtype=np.float32)
    pixels[0, 0, 0] = (0.0, 1.0, 0.5)
    np.savez(tmp_path / "f.npz", images=pixels)
    x = load_images(DataConfig(name="npz", path=tmp_path / "f.npz"))
    assert x.shape == (4, 3, 5, 5)
    assert x[0, :, 0, 0].tolist() == [-1.0, 1.0, 0.0]


def test_npz_errors_name_the_file(tmp_path):
    np.savez(tmp_path / "nokey.npz", pictures=random_uint8((2, 8, 8, 3)))
    with pytest.raises(ValueError, match=r"nokey\.npz.*'images'"):
        load_images(DataConfig(name="npz", path=tmp_path / "nokey.npz"))
    np.savez(tmp_path / "big.npz", images=np.full((2, 8, 8, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match=r"big\.npz.*\[0, 1\]"):
        load_images(DataConfig(name="npz", path=tmp_path / "big.npz"))


def test_npz_resolution_resizes_with_antialiasing(tmp_path):
    pixels = np.zeros((3, 16, 16, 1), np.uint8)
    pixels[0] = 255
    pixels[1, :, ::4] = 255  # one white column in four: antialiasing averages, plain bilinear would miss it
    np.savez(tmp_path / "r.npz", images=pixels)
    x = load_images(DataConfig(name="npz", path=tmp_path / "r.npz", resolution=4))
    assert x.shape == (3, 1, 4, 4)
    torch.testing.assert_close(x[0], torch.ones(1, 4, 4))
    torch.testing.assert_close(x[1], torch.full((1, 4, 4), -0.5), rtol=0, atol=0.15)
    torch.testing.assert_close(x[2], -torch.ones(1, 4, 4))


def write_png(path, pixels):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folder_reads_pngs_recursively_in_sorted_order(tmp_path):
    a, b, c = (random_uint8((8, 8, 3), seed) for seed in range(3))
    write_png(tmp_path / "b" / "2.png", c)
    write_png(tmp_path / "a.png", a)
    write_png(tmp_path / "b" / "1.PNG", b)
    (tmp_path / "notes.txt").write_text("not an image")
    x = load_images(DataConfig(name="image_folder", path=tmp_path))
    assert x.shape == (3, 3, 8, 8)
    assert x[0, :2, 0, 0].tolist() == [-1.0, 1.0]
    torch.testing.assert_close(x, as_model_range(np.stack([a, b, c]).transpose(0, 3, 1, 2)), rtol=0, atol=1e-6)


def test_image_folder_of_grey_images_has_one_channel(tmp_path):
    for k in range(3):
        write_png(tmp_path / f"{k}.png", random_uint8((6, 6), k))
    x = load_images(DataConfig(name="image_folder", path=tmp_path))
    assert x.shape == (3, 1, 6, 6)
    assert x.min() == -1.0 and x.max() == 1.0


def test_image_folder_mixed_sizes_need_a_resolution(tmp_path):
    write_png(tmp_path / "small.png", random_uint8((8, 8, 3)))
    write_png(tmp_path / "wide.png", np.full((12, 16, 3), 255, np.uint8))
    with pytest.raises(ValueError, match=r"small\.png.*resolution|resolution"):
        load_images(DataConfig(name="image_folder", path=tmp_path))
    x = load_images(DataConfig(name="image_folder", path=tmp_path, resolution=8))
    assert x.shape == (2, 3, 8, 8)
    torch.testing.assert_close(x[1], torch.ones(3, 8, 8))


def test_empty_image_folder_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        load_images(DataConfig(name="image_folder", path=tmp_path))


def test_digits_resolution_resizes():
    x = load_images(DataConfig(name="digits", resolution=16))
    assert x.shape[1:] == (1, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_load_data_splits_npz_images(tmp_path):
    np.savez(tmp_path / "d.npz", images=random_uint8((10, 8, 8, 3)))
    data = load_data(DataConfig(name="npz", path=tmp_path / "d.npz", heldout_fraction=0.2))
    assert len(data.train) == 8 and len(data.heldout) == 2 and data.heldout.all().shape == (2, 3, 8, 8)
    assert data.sample_shape == (3, 8, 8)


class _RunsCode:
    def __reduce__(self):
        return (print, ("code ran",))


def test_cifar10_batch_is_read_without_running_its_code(tmp_path, capsys):
    fake_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(pickle.dumps({b"data": _RunsCode()}))
    with pytest.raises(ValueError, match=r"data.path: .*data_batch_3 is not a CIFAR-10 batch: refused global "
                                         r"builtins.print"):
        load_images(DataConfig(name="cifar10", path=tmp_path))
    assert "code ran" not in capsys.readouterr().out
