"""Throughput of the latent-space path on this machine, as ratios measured in one run:
``benchmarks/results/latent.json``.

* **Encoding stage vs the bare encoder.** A random ``AutoencoderKL`` of SD's VAE's layout at reduced width
  (``VAE``: 4 resolutions, 4 latent channels, downsampling 8; random weights: SD's cannot be downloaded here, and
  the cost does not depend on the values) encodes ``--images`` 64x64 images. ``bare``: ``StabilityVAE.moments`` on
  tensors already in memory, in this process; ``stage_in_process``: ``encode_dataset`` (reading the images from a
  data set, writing the zarr store: chunking, zstd, crc32c, done markers) in this process; ``stage_dask``: the same
  on a LocalCluster of ``--workers`` one-thread workers. The ratio is images per second of the stage over the bare
  forward's at the same thread count (one torch thread each).
* **Rollouts in latent space vs pixel space at equal network cost.** The rollouts stage of the same EDM2 U-Net
  (``ROLLOUT_NET``) solving 16-step DPM-Solver++ trajectories on 4x16x16 latents and on 4x16x16 "pixels" (a
  pixel data set of four channels, so that every network call costs the same), and on 3x16x16 pixels. Latent
  rollouts are data-free and never run the VAE: the ratio says what the latent path adds to the solver (store
  writing of the same number of values).

    .venv/bin/python benchmarks/latent.py [--images 512] [--workers 2]
"""

from __future__ import annotations

import argparse
import functools
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT = ROOT / "benchmarks" / "results" / "latent.json"
VAE = {"block_out_channels": (32, 64, 128, 128), "layers_per_block": 2, "latent_channels": 4, "norm_num_groups": 32}
ROLLOUT_NET = {"kind": "edm2", "width": 32, "depth": 1, "channel_mult": [1, 2], "attention_resolutions": [8],
               "emb_dim": 64}
RES = 64


def write_vae(folder: Path) -> Path:
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    depth = len(VAE["block_out_channels"])
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * depth,
                  up_block_types=("UpDecoderBlock2D",) * depth, **VAE).save_pretrained(folder)
    return folder


def write_images(path: Path, num: int) -> Path:
    """``num`` random 64x64 RGB images with labels, as an ``.npz`` (``data.name=npz``)."""
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(path, images=rng.integers(0, 256, (num, RES, RES, 3), dtype=np.uint8), labels=np.arange(num) % 10)
    return path


def encoding(tmp: Path, num: int, workers: int) -> dict:
    import torch

    from cmt_core.config import ClusterConfig, EncodeConfig
    from cmt_core.data.encoded import PixelMoments, encode_dataset

    torch.set_num_threads(1)
    from cmt_core.data.images import load_image_dataset
    from cmt_core.encoders import StabilityVAE

    vae, npz = write_vae(tmp / "vae"), write_images(tmp / "images.npz", num)
    images = functools.partial(load_image_dataset, "npz", npz, None, 10)
    data, enc = images(), StabilityVAE(vae)
    enc.moments(data.read(slice(0, 8)))  # warm up
    t0 = time.perf_counter()
    for start in range(0, num, enc.batch_size):
        enc.moments(data.read(slice(start, start + enc.batch_size)))
    bare = num / (time.perf_counter() - t0)
    moments = PixelMoments(images, functools.partial(StabilityVAE, vae), enc.batch_size)
    shape = enc.model_shape((3, RES, RES))
    rates = {}
    for name, cluster, in_process in (("stage_in_process", ClusterConfig(workers=1), True),
                                      (f"stage_dask_{workers}_workers", ClusterConfig(workers=workers), False)):
        cfg = EncodeConfig(chunk_images=16, shard_chunks=2, cluster=cluster)
        t0 = time.perf_counter()
        encode_dataset(moments, tmp / f"{name}.zarr", num, shape, True, cfg, {"benchmark": name},
                       in_process=in_process)
        rates[name] = num / (time.perf_counter() - t0)
    return {"images": num, "resolution": RES, "latent_shape": list(shape), "vae": {k: list(v) if isinstance(v, tuple)
                                                                                   else v for k, v in VAE.items()},
            "images_per_second": {"bare_forward_1_thread": bare, **rates},
            "ratio_to_bare": {name: rate / bare for name, rate in rates.items()},
            "dask_speedup_per_worker": rates[f"stage_dask_{workers}_workers"] / bare / workers}


def rollouts(tmp: Path, num: int) -> dict:
    import torch

    from cmt_core.config import ClusterConfig, RolloutConfig, SolverConfig, StoreConfig
    from cmt_core.models import build_model, save_model
    from cmt_core.stages import network_values
    from cmt_core.teachers import teacher_denoiser
    from cmt_core.trajectories.dask_rollouts import run_rollouts

    cfg = RolloutConfig(solver=SolverConfig(name="dpm3m_lu", lower_order_final=True, steps=16), batch_size=64,
                        store=StoreConfig(chunk_trajectories=16, shard_chunks=2), cluster=ClusterConfig(workers=1))
    rates = {}
    for name, shape in (("latent_4x16x16", (4, 16, 16)), ("pixels_4x16x16", (4, 16, 16)),
                        ("pixels_3x16x16", (3, 16, 16))):
        values = network_values(ROLLOUT_NET, 0)
        torch.manual_seed(0)
        save_model(tmp / f"{name}.pt", build_model("denoiser", values, shape), "denoiser", values, shape)
        factory = functools.partial(teacher_denoiser, "checkpoint", str(tmp / f"{name}.pt"), None, None,
                                    tmp / f"{name}.pt", "none", 1.0, None)
        t0 = time.perf_counter()
        run_rollouts(factory, tmp / f"{name}.zarr", num, shape, cfg, name, in_process=True)
        rates[name] = num / (time.perf_counter() - t0)
    return {"trajectories": num, "solver": "dpm3m_lu, 16 steps", "network": ROLLOUT_NET,
            "trajectories_per_second": rates,
            "latent_over_pixels_equal_cost": rates["latent_4x16x16"] / rates["pixels_4x16x16"],
            "latent_over_pixels_3_channels": rates["latent_4x16x16"] / rates["pixels_3x16x16"]}


def main(argv: list[str] | None = None) -> dict:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--trajectories", type=int, default=256)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"encoding": encoding(Path(tmp), args.images, args.workers),
                  "rollouts": rollouts(Path(tmp), args.trajectories),
                  "machine": {"platform": platform.platform(), "torch_threads": 1}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
