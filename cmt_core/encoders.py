"""The seam between the sample space and the model space (edm2's ``Encoder``).

Training, rollouts and the trajectory store work in the model's space; whatever looks at samples as samples
(evaluation features, sample grids, image distances such as LPIPS) decodes first. An ``Encoder`` maps

* ``encode(x)``: samples ``(B, *sample_shape)`` -> model-space tensors ``(B, *model_shape)``;
* ``decode(z)``: model-space tensors -> samples, in the sample space's range (images in [-1, 1]).

``IDENTITY`` is the encoder of pixel and 2-D data, where the two spaces are one: its ``decode`` returns its input
unchanged, so pixel runs compute exactly what they computed before the seam existed.

``StabilityVAE`` is EDM2's latent encoder (``training/encoders.py``, ``StabilityVAEEncoder``): a KL autoencoder
(``diffusers.AutoencoderKL``, Stable Diffusion's ``sd-vae-ft-mse`` for the paper's ImageNet-512 results) read from
a local folder, whose posterior gives "raw" latents that a fixed per-channel affine map whitens into the model's
"final" latents. It splits encoding in EDM2's two steps:

* ``moments(x)``: images ``(B, 3, H, W)`` in [-1, 1] -> ``(B, 2C, H/f, W/f)`` float32, the posterior mean and std
  concatenated along channels (what EDM2's ``dataset_tool.py encode`` stores per image, and our encoding stage
  stores; f: the VAE's downsampling factor, 8 for SD's);
* ``latents(moments, noise)``: one draw ``mean + noise * std`` of the posterior, whitened: ``* scale + bias`` with
  ``scale = final_std / raw_std`` and ``bias = final_mean - raw_mean * scale`` (EDM2's constants by default: raw mean
  [5.81, 3.25, 0.12, -2.15], raw std [4.17, 4.62, 3.71, 3.28], final mean 0, final std 0.5);
* ``decode(z)``: undo the whitening, run the VAE's decoder, images in [-1, 1].

EDM2 feeds the VAE pixels scaled to [0, 1] (``x / 255``) and reads its decoder's output clamped to [0, 1]; so do
we, from and to our [-1, 1] convention, so that a latent data set encoded by EDM2's tool and one encoded here agree.
We do not quantise decoded images to uint8 as EDM2's ``decode`` does (evaluation and LPIPS take floats).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

import torch

from cmt_core.artifacts import ENCODER_FILE
from cmt_core.errors import InputFileError


class Encoder(Protocol):
    name: str

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def describe(self, path: str | None = None) -> dict: ...


class IdentityEncoder:
    """Pixels and 2-D points: the model space is the sample space."""

    name = "identity"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def describe(self, path: str | None = None) -> dict:
        return {"encoder": self.name}


IDENTITY = IdentityEncoder()


def decoded(distance, encoder: Encoder):
    """A distance ``d(a, b)`` of samples applied to model-space tensors: ``d(decode(a), decode(b))`` (the distance
    itself for the identity encoder)."""
    if encoder.name == IDENTITY.name:
        return distance
    return lambda a, b: distance(encoder.decode(a), encoder.decode(b))


# EDM2's StabilityVAEEncoder defaults (NVlabs/edm2 training/encoders.py)
EDM2_RAW_MEAN = (5.81, 3.25, 0.12, -2.15)
EDM2_RAW_STD = (4.17, 4.62, 3.71, 3.28)
EDM2_FINAL_MEAN = 0.0
EDM2_FINAL_STD = 0.5
VAE_WEIGHTS = "diffusion_pytorch_model.safetensors"  # the only weights file read: safetensors runs no code


def whitening(raw_mean, raw_std, final_mean: float = EDM2_FINAL_MEAN, final_std: float = EDM2_FINAL_STD
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """EDM2's per-channel affine map from raw to final latents, ``(scale, bias)`` each ``(C,)`` float32, computed
    in float32 as EDM2 computes it (numpy float32)."""
    raw_mean = torch.tensor(raw_mean, dtype=torch.float32)
    scale = torch.tensor(final_std, dtype=torch.float32) / torch.tensor(raw_std, dtype=torch.float32)
    return scale, torch.tensor(final_mean, dtype=torch.float32) - raw_mean * scale


def vae_folder_problem(path: Path) -> str | None:
    """What keeps the folder ``path`` from being a diffusers ``AutoencoderKL`` that ``load_vae`` reads (a phrase
    following the path), or None."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return "is not a diffusers VAE folder: it has no config.json"
    if not (Path(path) / VAE_WEIGHTS).is_file():
        return f"has no weights: {VAE_WEIGHTS} is missing (a .bin file is never read: it is a pickle)"
    try:
        kind = json.loads(config.read_text()).get("_class_name")
    except (ValueError, OSError, AttributeError) as err:
        return f"has a config.json that is not a JSON object ({str(err)[:100]})"
    return None if kind == "AutoencoderKL" else f"holds a {kind!r}, not an AutoencoderKL"


def model_shape_of(cfg, sample_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The model's sample shape for data of ``sample_shape`` in the space of the ``EncoderConfig`` ``cfg``, from the
    config alone (a trained autoencoder's settings; SD's VAE's ``config.json``), before any encoder exists."""
    if cfg.kind == "identity":
        return tuple(sample_shape)
    if cfg.kind == "trained":
        channels, factor = cfg.autoencoder.latent_channels, 2 ** (len(cfg.autoencoder.widths) - 1)
    else:
        problem = vae_folder_problem(cfg.path)
        if problem:
            raise InputFileError(f"data.encoder.path={str(cfg.path)!r} {problem}")
        vae = json.loads((Path(cfg.path) / "config.json").read_text())
        channels, factor = int(vae.get("latent_channels", 4)), 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    _, h, w = sample_shape
    if h % factor or w % factor:
        raise ValueError(f"images of {h}x{w} do not divide by the encoder's downsampling factor {factor}")
    return channels, h // factor, w // factor


def load_vae(path: Path, field: str = "data.encoder.path"):
    """A ``diffusers.AutoencoderKL`` from the local folder ``path`` (``config.json`` and ``VAE_WEIGHTS``), in eval
    mode without gradients; never downloads, never reads a pickle. ``field`` names the config field in errors
    (``InputFileError``, one line)."""
    path = Path(path)
    problem = vae_folder_problem(path)
    if problem:
        raise InputFileError(f"{field}={str(path)!r} {problem}")
    try:
        from diffusers import AutoencoderKL
    except ImportError as err:
        raise ImportError("a latent-space encoder needs diffusers: pip install 'cmt[latent]'") from err
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True, use_safetensors=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, TypeError) as err:
        raise InputFileError(f"{field}={str(path)!r} does not load as an AutoencoderKL: "
                             f"{str(err).splitlines()[0][:300]}") from err
    return vae.eval().requires_grad_(False)


class StabilityVAE:
    """EDM2's ``StabilityVAEEncoder`` on the diffusers VAE in the local folder ``path`` (module docstring).
    ``batch_size``: images per VAE call (EDM2's default 8); the VAE runs in float32 on the device of its input;
    ``name``: the encoder kind it is (``sd_vae``: SD's VAE; ``trained``: one trained here, ``cmt_core.autoencoder``)."""

    def __init__(self, path: Path, raw_mean=EDM2_RAW_MEAN, raw_std=EDM2_RAW_STD, final_mean: float = EDM2_FINAL_MEAN,
                 final_std: float = EDM2_FINAL_STD, batch_size: int = 8, field: str = "data.encoder.path",
                 name: str = "sd_vae"):
        self.path, self.batch_size, self.name = Path(path), int(batch_size), name
        self.vae = load_vae(self.path, field)
        self.channels = int(self.vae.config.latent_channels)
        self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        if not len(raw_mean) == len(raw_std) == self.channels:
            raise InputFileError(f"{field}={str(path)!r}: the VAE has {self.channels} latent channels, but the "
                                 f"whitening constants have {len(raw_mean)} means and {len(raw_std)} stds")
        self.raw_mean, self.raw_std = tuple(map(float, raw_mean)), tuple(map(float, raw_std))
        self.final_mean, self.final_std = float(final_mean), float(final_std)
        self.scale, self.bias = whitening(raw_mean, raw_std, final_mean, final_std)

    def model_shape(self, sample_shape: tuple[int, ...]) -> tuple[int, int, int]:
        """The latents' shape ``(C, H/f, W/f)`` for images of ``sample_shape`` ``(3, H, W)``."""
        _, h, w = sample_shape
        if h % self.factor or w % self.factor:
            raise ValueError(f"images of {h}x{w} do not divide by the VAE's downsampling factor {self.factor}")
        return self.channels, h // self.factor, w // self.factor

    def _vae_on(self, x: torch.Tensor):
        return self.vae.to(x.device)

    @torch.no_grad()
    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, 3, H, W)`` in [-1, 1] -> the posterior's mean and std ``(B, 2C, H/f, W/f)`` float32."""
        vae = self._vae_on(x)
        parts = []
        for batch in ((x.float() + 1) / 2).split(self.batch_size):  # EDM2: uint8 pixels / 255
            posterior = vae.encode(batch).latent_dist
            parts.append(torch.cat([posterior.mean, posterior.std], dim=1))
        return torch.cat(parts)

    def _affine(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return self.scale.to(z.device).reshape(shape), self.bias.to(z.device).reshape(shape)

    def latents(self, moments: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """One draw of the posterior, whitened: ``moments`` ``(B, 2C, h, w)``, ``noise`` ``(B, C, h, w)`` standard
        normal -> final latents ``(B, C, h, w)`` float32."""
        mean, std = moments.float().chunk(2, dim=1)
        scale, bias = self._affine(mean)
        return (mean + noise * std) * scale + bias

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images -> final latents, one posterior draw (noise from ``generator``)."""
        m = self.moments(x)
        noise = torch.randn(m.shape[0], self.channels, *m.shape[2:], generator=generator, device=m.device)
        return self.latents(m, noise)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Final latents ``(B, C, h, w)`` -> images ``(B, 3, h f, w f)`` in [-1, 1] float32."""
        scale, bias = self._affine(z)
        raw = (z.float() - bias) / scale
        vae = self._vae_on(z)
        images = torch.cat([vae.decode(batch).sample for batch in raw.split(self.batch_size)])
        return images.clamp(0, 1) * 2 - 1

    def describe(self, path: str | None = None) -> dict:
        """The settings that rebuild this encoder (``encoder_from``), its VAE folder as ``path`` (default: where it
        was read from)."""
        return {"encoder": self.name, "path": str(self.path) if path is None else path,
                "raw_mean": list(self.raw_mean), "raw_std": list(self.raw_std), "final_mean": self.final_mean,
                "final_std": self.final_std, "batch_size": self.batch_size}


def snapshot_encoder_problem(snapshot: dict | None, cfg) -> str | None:
    """What makes a network whose EDM2 snapshot recorded the encoder ``snapshot`` (``EDM2Network.encoder``: its
    class name and settings; None for an EDM pickle, which records none) unfit for the model space of the
    ``EncoderConfig`` ``cfg`` (a phrase), or None: a latent network in pixel space or the reverse, or SD-VAE
    latents whitened otherwise than ``cfg`` whitens them."""
    kind = (snapshot or {}).get("class_name")
    if kind == "StabilityVAEEncoder":
        if cfg.kind == "identity":
            return ("works in Stable Diffusion's VAE latents (its snapshot's encoder is StabilityVAEEncoder): set "
                    "data.encoder.kind='sd_vae' and data.encoder.path")
        if cfg.kind == "sd_vae":
            raw_mean, raw_std = (cfg.raw_mean, cfg.raw_std) if cfg.raw_mean is not None else (EDM2_RAW_MEAN,
                                                                                             EDM2_RAW_STD)
            scale, bias = whitening(raw_mean, raw_std, cfg.final_mean, cfg.final_std)
            theirs = [torch.tensor(snapshot.get(k, []), dtype=torch.float32).flatten() for k in ("scale", "bias")]
            if any(t.shape != ours.shape or not torch.allclose(t, ours, rtol=1e-5, atol=1e-6)
                   for t, ours in zip(theirs, (scale, bias))):
                return (f"whitens its latents with scale {theirs[0].tolist()} and bias {theirs[1].tolist()}, "
                        f"data.encoder's constants give {scale.tolist()} and {bias.tolist()} (data.encoder.raw_mean, "
                        "raw_std, final_mean, final_std)")
    if kind == "StandardRGBEncoder" and cfg.kind != "identity":
        return f"works in pixels (its snapshot's encoder is StandardRGBEncoder), data.encoder.kind={cfg.kind!r}"
    return None


def encoder_settings(cfg, vae_path: Path | None = None, measured: dict | None = None) -> dict:
    """What rebuilds the encoder of ``cfg`` (an ``EncoderConfig`` of kind ``sd_vae`` or ``trained``), as the
    encoder stage records it (``ENCODER_FILE``; ``encoder_from`` reads it): the VAE folder (``vae_path``, for a
    trained one the artifact's ``VAE_DIR``, relative), the whitening constants (given, EDM2's, or ``measured``
    ones) and the batch size."""
    raw_mean, raw_std = cfg.raw_mean, cfg.raw_std
    if raw_mean is None:
        raw_mean, raw_std = ((EDM2_RAW_MEAN, EDM2_RAW_STD) if cfg.kind == "sd_vae" else
                             (measured["raw_mean"], measured["raw_std"]))
    return {"encoder": cfg.kind, "path": str(vae_path if vae_path is not None else cfg.path),
            "raw_mean": list(raw_mean), "raw_std": list(raw_std), "final_mean": cfg.final_mean,
            "final_std": cfg.final_std, "batch_size": cfg.batch_size}


LATENT_KINDS = ("sd_vae", "trained")


def encoder_from(settings: dict, base: Path, field: str = "data.encoder.path") -> Encoder:
    """The encoder ``settings`` describe (``describe()`` / ``encoder_settings``): the identity, or a VAE whose
    relative ``path`` lies in the folder ``base``; ``ValueError`` for a kind this version does not read."""
    kind = settings.get("encoder")
    if kind == IDENTITY.name:
        return IDENTITY
    if kind not in LATENT_KINDS:
        raise ValueError(f"encoder {kind!r} is not one this version reads ({IDENTITY.name}, {', '.join(LATENT_KINDS)})")
    path = Path(settings["path"])
    return StabilityVAE(path if path.is_absolute() else Path(base) / path, settings["raw_mean"], settings["raw_std"],
                        settings["final_mean"], settings["final_std"], settings["batch_size"], field, name=kind)


def load_encoder(folder: Path) -> Encoder:
    """The encoder recorded in the encoder stage's artifact ``folder`` (its ``encoder.json``; a relative VAE path
    is inside the folder)."""
    return encoder_from(json.loads((Path(folder) / ENCODER_FILE).read_text()), folder)
