"""Drawing many samples from a generator to files: ``cmt sample`` and the ``cmt-sample`` flow.

``run_sampling(job, runtime)`` draws images ``0 .. num_samples - 1`` of a generator (``cmt_core.generator``: an
exported one, a mid-/post-training artifact folder or its id) with ``steps`` network calls and writes them as

* PNG files in EDM's layout, ``<out>/<i - i % 1000, 6 digits>/<i, 6 digits>.png`` (uint8, ``x * 127.5 + 128``
  rounded down and clipped, as EDM's ``generate.py``; grey images as 8-bit grey PNGs), and, for a class-conditional
  generator, ``<out>/dataset.json`` (EDM's ``{"labels": [[file, class], ...]}``); and/or
* ``<out>/samples.npz``: ``arr_0`` the images as uint8 ``(N, H, W, C)`` (the ADM evaluator's format) and, for a
  class-conditional generator, ``arr_1`` their labels int64 ``(N,)``. With ``format="npz"`` the PNG files are
  written under ``<out>/.parts`` and removed once the ``.npz`` is complete.

Image i is the same whatever the batch size or the number of processes (``cmt_core.generator``: its noise is a
function of (seed, i)). Under ``torchrun`` each process draws the noise blocks ``b`` (images ``1000 b`` to
``1000 b + 999``) with ``b % world == rank`` and writes its own files; when every process is done, rank 0 writes
the ``.npz``, ``dataset.json`` and ``grid.png`` (the first 64 images tiled). Each PNG is written to a temporary
name and renamed, so an interrupted run leaves whole files only (after a kill; nothing is fsynced per image, so
power loss can leave a renamed file empty), and a rerun with the same settings writes only the missing images.
``sampling.json`` records the settings and the throughput.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator
from tqdm.auto import tqdm

from cmt_core.artifacts import publish, publish_text
from cmt_core.data.images import to_uint8
from cmt_core.encoders import IDENTITY
from cmt_core.generator import BLOCK, MAX_STEPS, Generator, GeneratorError, open_generator
from cmt_core.runtime import Runtime

log = logging.getLogger("cmt")
PARTS_DIR, NPZ_FILE, LABELS_FILE, SUMMARY_FILE = ".parts", "samples.npz", "dataset.json", "sampling.json"
GRID_FILE, GRID_IMAGES = "grid.png", 64
MAX_SAMPLES = 10_000_000


class SampleJob(BaseModel):
    """What ``cmt sample`` draws and where it writes it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    model: str = Field(min_length=1, description="an exported generator's folder, a midtrain / posttrain artifact "
                       "folder, or the artifact id of one under artifact_root")
    out: Path = Field(description="the output folder (PNG files, samples.npz, sampling.json)")
    num_samples: int = Field(50_000, ge=1, le=MAX_SAMPLES, description="images 0 .. num_samples - 1")
    steps: int = Field(1, ge=1, le=MAX_STEPS, description="network calls per image")
    seed: int = Field(0, ge=0, description="the noise seed: image i's noise is a function of (seed, i)")
    class_label: int | None = Field(None, ge=0, description="class-conditional generators: every image this class "
                                    "(None and no labels_file: uniform random classes)")
    labels_file: Path | None = Field(None, description="class-conditional generators: one class per image, a .npy "
                                     "array or a text file of integers")
    format: Literal["png", "npz", "both"] = "png"
    batch_size: int = Field(256, ge=1, le=65_536)
    artifact_root: Path = Field(Path("artifacts"), description="where artifact ids are looked up")
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @model_validator(mode="after")
    def _one_label_source(self):
        if self.class_label is not None and self.labels_file is not None:
            raise ValueError("give class_label or labels_file, not both")
        return self


def png_path(folder: Path, i: int) -> Path:
    """Image ``i``'s file in EDM's layout."""
    return Path(folder) / f"{i - i % 1000:06d}" / f"{i:06d}.png"


def read_labels(path: Path, n: int) -> torch.Tensor:
    """The first ``n`` labels of a ``.npy`` array or a text file of integers (whitespace separated)."""
    try:
        values = np.load(path, allow_pickle=False) if path.suffix == ".npy" else np.loadtxt(path, dtype=np.int64,
                                                                                             ndmin=1)
    except (OSError, ValueError) as err:
        raise GeneratorError(f"labels_file={str(path)!r} cannot be read as integers: {err}") from None
    values = np.asarray(values)
    if values.ndim != 1 or values.dtype.kind not in "iu" or len(values) < n:
        raise GeneratorError(f"labels_file={str(path)!r} holds {values.dtype} {values.shape}; expected at least "
                             f"{n} integers, one per image")
    return torch.from_numpy(values[:n].astype(np.int64))


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise GeneratorError(f"out={str(out)!r} is a file, not a folder")


def _write_png(path: Path, image: np.ndarray) -> None:
    """``image: (H, W, C)`` uint8, C = 1 or 3, to ``path`` by a temporary name and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image).save(tmp, format="PNG", compress_level=1)
    tmp.replace(path)


def _check_images(samples: torch.Tensor) -> None:
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise GeneratorError(f"this generator's samples have shape {tuple(samples.shape[1:])}: cmt sample writes "
                             "images (1 or 3 channels, height, width)")


def rank_indices(n: int, rank: int, world: int) -> list[int]:
    """The images ``0 .. n - 1`` process ``rank`` of ``world`` draws: those of the blocks ``b % world == rank``."""
    return [i for b in range(rank, -(-n // BLOCK), world) for i in range(b * BLOCK, min((b + 1) * BLOCK, n))]


def _read_png(path: Path) -> np.ndarray:
    """An image written by ``_write_png`` as uint8 ``(H, W, C)``."""
    with Image.open(path) as image:
        array = np.asarray(image)
    return array[:, :, None] if array.ndim == 2 else array


def write_grid(path: Path, images: np.ndarray, min_cell: int = 64) -> None:
    """The first up to 64 images ``(N, H, W, C)`` uint8 tiled 8 to a row (1-pixel white gaps), each enlarged by an
    integer factor to at least ``min_cell`` pixels (nearest neighbour), as one PNG."""
    images = images[:GRID_IMAGES]
    n, h, w, c = images.shape
    cols = min(n, 8)
    rows = -(-n // cols)
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1, c), 255, dtype=np.uint8)
    for k, image in enumerate(images):
        r, q = divmod(k, cols)
        canvas[1 + r * (h + 1):1 + r * (h + 1) + h, 1 + q * (w + 1):1 + q * (w + 1) + w] = image
    scale = max(1, -(-min_cell // max(h, w)))
    canvas = canvas.repeat(scale, axis=0).repeat(scale, axis=1)
    publish(path, lambda tmp: Image.fromarray(canvas[:, :, 0] if c == 1 else canvas).save(tmp, format="PNG"))


def _write_npz(folder: Path, out: Path, n: int, labels: torch.Tensor | None) -> Path:
    """``out/samples.npz`` from the PNG files of images ``0 .. n - 1`` in ``folder``."""
    images = np.empty((n, *_read_png(png_path(folder, 0)).shape), dtype=np.uint8)
    for i in tqdm(range(n), desc="samples.npz", dynamic_ncols=True):
        images[i] = _read_png(png_path(folder, i))
    arrays = {"arr_0": images, **({} if labels is None else {"arr_1": labels.numpy()})}
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    publish(out / NPZ_FILE, write)
    return out / NPZ_FILE


def check_job(job: SampleJob) -> tuple[Generator, torch.Tensor | None]:
    """The generator ``job`` names and the labels of its images (None: uniform, or unconditional), every request
    checked (model, steps, labels, output folder) before anything is written; ``GeneratorError`` names the field."""
    _check_out(job.out)
    gen = open_generator(job.model, job.artifact_root)
    if gen.encoder.name == IDENTITY.name:  # samples are the model's (a latent model's are checked once decoded)
        _check_images(torch.empty(0, *gen.sample_shape))
    gen.check_steps(job.steps)
    given = read_labels(job.labels_file, job.num_samples) if job.labels_file is not None else job.class_label
    return gen, gen.check_labels(given, job.num_samples)


def run_sampling(job: SampleJob, runtime: Runtime, checked: tuple[Generator, torch.Tensor | None] | None = None
                 ) -> dict:
    """Draw and write ``job``'s images (module docstring); returns the summary written to ``sampling.json``
    (on rank 0; other ranks return their own counts). ``checked``: ``check_job(job)``, when the caller ran it."""
    gen, labels = checked or check_job(job)
    gen.to(runtime.device)
    n = job.num_samples
    folder = job.out if job.format != "npz" else job.out / PARTS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    mine = rank_indices(n, runtime.rank, runtime.world)
    for block in range(runtime.rank, -(-n // BLOCK), runtime.world):  # this process's folders: one per block
        for stale in png_path(folder, block * BLOCK).parent.glob(".*.png.tmp"):  # left by a killed run
            stale.unlink(missing_ok=True)
    missing = [i for i in mine if not png_path(folder, i).exists()]
    log.info("sampling %d images with %d steps on %s: %d of this process's %d to draw, %d already written", n,
             job.steps, runtime.device, len(missing), len(mine), len(mine) - len(missing))
    cache: dict = {}
    started = time.perf_counter()
    bar = tqdm(total=len(missing), desc=f"sampling ({job.steps} step{'s' if job.steps > 1 else ''})",
               disable=not runtime.is_main, dynamic_ncols=True)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pending = []
        for start in range(0, len(missing), job.batch_size):
            rows = torch.tensor(missing[start:start + job.batch_size])
            samples, _ = gen.draw(rows, job.steps, job.seed, None if labels is None else labels[rows], cache)
            _check_images(samples)
            images = to_uint8(samples).permute(0, 2, 3, 1).cpu().numpy()
            if len(pending) >= 2:  # at most two batches wait for their files; a failed write raises here
                pending.pop(0).result()
            pending.append(pool.submit(lambda r, im: [_write_png(png_path(folder, i), x) for i, x in zip(r, im)],
                                       rows.tolist(), images))
            bar.update(len(rows))
        for f in pending:
            f.result()
    bar.close()
    seconds = time.perf_counter() - started
    runtime.barrier()  # every process's images are written
    summary = {"drawn": len(missing), "seconds": seconds, "images_per_s": len(missing) / seconds if seconds else None}
    if not runtime.is_main:
        return summary
    all_labels = labels if labels is not None else gen.uniform_labels(job.seed, n)
    if all_labels is not None and job.format != "npz":
        entries = [[png_path(folder, i).relative_to(folder).as_posix(), int(c)] for i, c in enumerate(all_labels)]
        publish_text(job.out / LABELS_FILE, json.dumps({"labels": entries}) + "\n")
    write_grid(job.out / GRID_FILE, np.stack([_read_png(png_path(folder, i)) for i in range(min(n, GRID_IMAGES))]))
    npz = _write_npz(folder, job.out, n, all_labels) if job.format != "png" else None
    if job.format == "npz":
        shutil.rmtree(folder)
    summary = {**job.model_dump(mode="json"), **summary, "processes": runtime.world, "device": str(runtime.device),
               "generator": gen.source, "sampler": gen.sampler, "mid_sigma": gen.mid_sigma, "npz": str(npz) if npz
               else None, "note": "images_per_s: this process's images drawn and written per second"}
    publish_text(job.out / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")
    return summary
