"""A small latent autoencoder trained here: the ``trained`` encoder kind (``data.encoder.kind='trained'``), the
embedded stand-in for Stable Diffusion's VAE.

It is the same kind of network as SD's (a ``diffusers.AutoencoderKL``, only narrower and shallower: ``widths``,
``layers_per_block``, ``latent_channels`` of ``AutoencoderTrainConfig``), trained as a KL autoencoder: Adam on
``mse(decode(z), x) + kl_weight * KL(q(z|x) || N(0, I)) / dim(z)`` with ``z`` one draw of the posterior, on
images mapped to [0, 1] as EDM2 feeds SD's VAE. Every random number comes from the named streams (the batch order
from ``EPOCH_ORDER``, the posterior draw from ``LATENT_DRAW``, keyed by the step), so a run is a function of its
config. The measured whitening follows EDM2's: the raw latents' per-channel mean and std over the training split
(posterior means), mapped to ``final_mean`` / ``final_std``.

``train_autoencoder`` writes the network in diffusers' own format (``save_pretrained``: ``config.json`` and
``diffusion_pytorch_model.safetensors``), so ``cmt_core.encoders.StabilityVAE`` reads it exactly as it reads SD's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from cmt_core.data.datasets import Dataset
from cmt_core.data.sources import EpochSampler
from cmt_core.rng import Stream, generator


def build_autoencoder(cfg, channels: int):
    """An untrained ``AutoencoderKL`` for images of ``channels`` channels (``cfg``: ``AutoencoderTrainConfig``)."""
    from diffusers import AutoencoderKL

    depth = len(cfg.widths)
    return AutoencoderKL(in_channels=channels, out_channels=channels, down_block_types=("DownEncoderBlock2D",) * depth,
                         up_block_types=("UpDecoderBlock2D",) * depth, block_out_channels=tuple(cfg.widths),
                         layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                         norm_num_groups=cfg.norm_groups)


def train_autoencoder(cfg, images: Dataset, folder: Path, progress=None) -> dict:
    """Train the autoencoder of ``cfg`` on ``images`` (a ``Dataset`` of ``(C, H, W)`` in [-1, 1]) and save it in
    ``folder`` (diffusers format); returns ``{"raw_mean", "raw_std", "final_loss", "reconstruction_mse"}``: the
    posterior means' per-channel mean and std over ``images``, the last step's loss, and the mean squared
    reconstruction error of the posterior means over ``images`` (in [0, 1] units)."""
    torch.manual_seed(cfg.seed)  # the initial weights
    vae = build_autoencoder(cfg, images.sample_shape[0]).train()
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.lr)
    sampler = EpochSampler(len(images), cfg.seed)
    loss = torch.zeros(())
    for step in tqdm(range(cfg.steps), desc="autoencoder", dynamic_ncols=True):
        x = (images.read(sampler.indices(step, cfg.batch_size)) + 1) / 2
        posterior = vae.encode(x).latent_dist
        noise = torch.randn(posterior.mean.shape, generator=generator(Stream.LATENT_DRAW, cfg.seed, step))
        z = posterior.mean + posterior.std * noise
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, x) + cfg.kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None and (step + 1) % 100 == 0:
            progress(step + 1, cfg.steps, {"loss": float(loss)})
    vae.eval().requires_grad_(False)
    means, errors = [], []
    with torch.no_grad():
        for batch in images.batches(256):
            x = (batch + 1) / 2
            mean = vae.encode(x).latent_dist.mean
            means.append(mean.transpose(0, 1).flatten(1))
            errors.append(((vae.decode(mean).sample.clamp(0, 1) - x) ** 2).flatten(1).mean(1))
    per_channel = torch.cat(means, dim=1)
    folder.mkdir(parents=True, exist_ok=True)
    vae.save_pretrained(folder, safe_serialization=True)
    return {"raw_mean": per_channel.mean(1).tolist(), "raw_std": per_channel.std(1).tolist(),
            "final_loss": float(loss.detach()), "reconstruction_mse": float(torch.cat(errors).mean())}
