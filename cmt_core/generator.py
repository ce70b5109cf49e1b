"""A trained few-step generator as one object, ``Generator.sample(n, steps, labels)``, and its exported form.

A generator is a few-step model (a consistency model or a flow map, ``cmt_core.models``) with what drawing samples
from it needs: its sampler (``cmt_core.samplers``; a flow map: ``flow_map``, a consistency model: ``consistency``),
``sigma_max`` (where ``x_T = sigma_max * z`` starts), its boundary ``sigma_min``, the 2-step intermediate sigma
its training stage chose (``mid_sigma``; more steps descend a Karras grid from it), its number of classes
(0: unconditional) and its encoder: samples are decoded to the sample space (``cmt_core.encoders``), so a latent
model gives images. ``steps`` is the number of network calls, 1 to ``MAX_STEPS``.

Noise is a function of each image's index alone. Image i's class label (a class-conditional model given no labels:
uniform over the classes), its ``z`` and its re-noising noises (samplers in ``RENOISING``) are row ``i % BLOCK``
of the draws of block ``i // BLOCK``, made from the stream ``SAMPLE_BLOCK`` keyed by (seed, block) in this order:
labels ``(BLOCK,)`` (conditional models), then ``z: (BLOCK, *model_shape)``, then one ``(BLOCK, *model_shape)``
per re-noising step. An image is therefore the same whatever the batch size, the number of processes or the
images drawn before it. To keep it the same to the last bit, every network call is made on a multiple of
``ROW_UNIT`` rows (zero rows appended, their outputs dropped): matrix kernels tile by the number of rows, and on
CPU a batch of 1 to 7 rows gave the same images as a batch of 1,000 only to about 2e-6, while every multiple of 64
rows (at any offset) agreed exactly, for the MLP and the U-Net. GPU kernels chosen per batch size may still differ
in the last bit between batch sizes, which rarely changes a pixel of a uint8 image.

Two sources:

* ``Generator.from_stage(folder)``: a complete mid-training or post-training artifact (``model.pt`` and the
  manifest that records its stage's config and chosen ``mid_sigma``);
* ``load_generator(folder)``: an exported generator, written by ``export_generator``: ``generator.json`` (the
  ``GeneratorSpec`` fields: format and version, model kind, network values, sample shape, preconditioning,
  sampler and sigmas, class count, encoder, where it came from, the weights' sha256) and ``model.safetensors``
  (the model's state dict). No pickle is read or written; the JSON is checked field by field and the weights
  against the network it describes (``cmt_core.models.model_from_fields``), so a damaged or foreign folder is one
  ``GeneratorError`` naming the file and the field. Loading needs this package and its core dependencies only.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import nn

from cmt_core import conditioning
from cmt_core.artifacts import MODEL_FILE, ManifestError, publish, read_manifest
from cmt_core.checkpoint import CheckpointError, load_file
from cmt_core.encoders import IDENTITY, VAE_WEIGHTS, Encoder, encoder_from, load_encoder
from cmt_core.errors import InputFileError, describe
from cmt_core.models import label_dim_of, model_from_fields
from cmt_core.rng import Stream, generator
from cmt_core.samplers import sample

BLOCK = 1000  # images per noise block (EDM's PNG layout groups images by 1000 too)
ROW_UNIT = 64  # network calls are made on a multiple of this many rows (module docstring)
MAX_STEPS = 64  # our choice: far beyond the few steps these models are trained for
RENOISING = frozenset({"consistency"})  # samplers that draw fresh noise at each intermediate step
SPEC_FILE, WEIGHTS_FILE = "generator.json", "model.safetensors"
FORMAT, VERSION = "cmt-generator", 1
SAMPLER_OF_KIND = {"consistency": "consistency", "flow_map": "flow_map"}
VAE_EXPORT = "vae"  # a latent generator's VAE, copied beside its weights (diffusers' format: safetensors, JSON)
GENERATOR_STAGES = ("midtrain", "posttrain")  # the stages whose artifacts are generators


class GeneratorError(InputFileError):
    """A folder that is not a usable generator (exported or a stage artifact), or a request it cannot serve
    (steps, labels, number of samples); the message names the file or the argument."""


class GeneratorSpec(BaseModel):
    """The fields of ``generator.json`` (module docstring)."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["cmt-generator"]
    version: Literal[1]
    kind: Literal["consistency", "flow_map"]
    network: dict
    sample_shape: list[int] = Field(min_length=1, max_length=4)
    preconditioning: Literal["ConsistencyModel", "FlowMap"]
    sampler: Literal["consistency", "flow_map"]
    sigma_max: float = Field(gt=0, allow_inf_nan=False)
    sigma_min: float = Field(gt=0, allow_inf_nan=False)
    mid_sigma: float = Field(gt=0, allow_inf_nan=False)
    num_classes: int = Field(ge=0)
    encoder: dict
    source: dict
    weights_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Generator:
    """A few-step model and its sampling settings (module docstring). ``model``: eval mode, on ``device``."""

    def __init__(self, model: nn.Module, kind: str, network: dict, sample_shape, sigma_max: float, mid_sigma: float,
                 encoder: Encoder = IDENTITY, source: dict | None = None):
        self.model, self.kind, self.network = model.eval(), kind, dict(network)
        self.sample_shape = tuple(sample_shape)  # the model's space (latents for a latent model)
        self.sampler = SAMPLER_OF_KIND[kind]
        self.sigma_max, self.sigma_min, self.mid_sigma = float(sigma_max), float(model.sigma_min), float(mid_sigma)
        self.num_classes = label_dim_of(model)
        self.encoder, self.source = encoder, dict(source or {})

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device) -> Generator:
        self.model.to(device)
        return self

    @classmethod
    def from_stage(cls, folder: str | Path) -> Generator:
        """The generator of a complete mid-training or post-training artifact folder."""
        folder = Path(folder)
        try:
            manifest = read_manifest(folder)
        except ManifestError as err:
            raise GeneratorError(str(err)) from None
        if manifest is None:
            raise GeneratorError(f"{folder} is not a complete stage artifact (no manifest.json): a training stage "
                                 "still running, or not an artifact folder")
        stage, config = manifest["stage"], manifest["config"]
        if stage not in GENERATOR_STAGES:
            raise GeneratorError(f"{folder} is a {stage!r} artifact; generators are the models of the "
                                 f"{' and '.join(GENERATOR_STAGES)} stages")
        try:
            blob = load_file(folder / MODEL_FILE)
            model = model_from_fields(blob, folder / MODEL_FILE)
            sigma_max, mid_sigma = float(config["rollout.solver.sigma_max"]), float(manifest["metrics"]["mid_sigma"])
        except (CheckpointError, OSError, KeyError, TypeError, ValueError) as err:
            raise GeneratorError(f"{folder}: not a usable {stage} artifact ({describe(err)})") from None
        source = {"stage": stage, "artifact_id": manifest["artifact_id"], "data": config.get("data", {}).get("name"),
                  "method": config.get(stage, {}).get("form" if stage == "midtrain" else "method"),
                  "scores": {k: manifest["metrics"].get(k) for k in ("score_names", "score_1step", "score_2step")}}
        encoder = IDENTITY
        if "encoder" in manifest["inputs"]:  # a latent model: its encoder stage's artifact beside its own
            where = folder.parent.parent / "encoder" / manifest["inputs"]["encoder"]
            try:
                encoder = load_encoder(where)
            except (OSError, ValueError) as err:
                raise GeneratorError(f"{folder} is a latent model whose encoder at {where} cannot be read "
                                     f"({describe(err)})") from None
        return cls(model, model_kind(model), blob["network"], blob["sample_shape"], sigma_max, mid_sigma, encoder,
                   source)

    def check_steps(self, steps: int) -> None:
        """Refuse a number of network calls outside 1..``MAX_STEPS``."""
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= MAX_STEPS:
            raise GeneratorError(f"steps={steps!r}: this {self.kind} generator draws with 1 to {MAX_STEPS} network "
                                 "calls")

    def check_labels(self, labels: torch.Tensor | None, n: int) -> torch.Tensor | None:
        """``labels`` as int64 ``(n,)`` (an int: every image that class), or None (conditional models: uniform);
        refuses labels for an unconditional model and labels out of ``[0, num_classes)``."""
        if labels is None:
            return None
        if not self.num_classes:
            raise GeneratorError("labels were given but this generator is unconditional (num_classes=0)")
        labels = torch.as_tensor(labels)
        if labels.ndim == 0:
            labels = labels.expand(n)
        if labels.shape != (n,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise GeneratorError(f"labels must be integers, one per image ({n}), got {labels.dtype} "
                                 f"{tuple(labels.shape)}")
        labels = labels.to(torch.int64)
        if n and not 0 <= int(labels.min()) <= int(labels.max()) < self.num_classes:
            raise GeneratorError(f"labels must lie in [0, {self.num_classes}), got "
                                 f"{int(labels.min())}..{int(labels.max())}")
        return labels

    def block_draws(self, seed: int, block: int, steps: int) -> tuple[torch.Tensor, torch.Tensor | None, list]:
        """The draws of noise block ``block`` (module docstring): ``z (BLOCK, *sample_shape)``, uniform labels
        ``(BLOCK,)`` or None, and the ``steps - 1`` re-noising noises (none for samplers that do not re-noise)."""
        g = generator(Stream.SAMPLE_BLOCK, seed, block)
        labels = torch.randint(self.num_classes, (BLOCK,), generator=g) if self.num_classes else None
        z = torch.randn(BLOCK, *self.sample_shape, generator=g)
        renoise = steps - 1 if self.sampler in RENOISING else 0
        return z, labels, [torch.randn(BLOCK, *self.sample_shape, generator=g) for _ in range(renoise)]

    def uniform_labels(self, seed: int, n: int) -> torch.Tensor | None:
        """The uniform labels ``(n,)`` of images ``0 .. n - 1`` (None for an unconditional model): each block's
        first draw, so no noise is drawn for them."""
        if not self.num_classes:
            return None
        blocks = [torch.randint(self.num_classes, (BLOCK,), generator=generator(Stream.SAMPLE_BLOCK, seed, b))
                  for b in range(-(-n // BLOCK))]
        return torch.cat(blocks)[:n]

    def draws(self, indices: torch.Tensor, seed: int, steps: int, cache: dict | None = None):
        """``z``, uniform labels (or None) and re-noising noises of the images ``indices`` (int64 ``(B,)``), from
        their blocks; ``cache``: a dict kept between calls that holds the last block drawn."""
        cache = {} if cache is None else cache
        blocks = []
        for block in torch.unique_consecutive(indices // BLOCK).tolist():
            if cache.get("key") != (seed, block, steps):
                cache.update(key=(seed, block, steps), draws=self.block_draws(seed, block, steps))
            rows = indices[indices // BLOCK == block] % BLOCK
            z, labels, noises = cache["draws"]
            blocks.append((z[rows], None if labels is None else labels[rows], [e[rows] for e in noises]))
        z = torch.cat([b[0] for b in blocks])
        labels = None if blocks[0][1] is None else torch.cat([b[1] for b in blocks])
        noises = [torch.cat([b[2][k] for b in blocks]) for k in range(len(blocks[0][2]))]
        return z, labels, noises

    @torch.no_grad()
    def draw(self, indices: torch.Tensor, steps: int, seed: int = 0, labels: torch.Tensor | None = None,
             cache: dict | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Samples ``(B, *sample space shape)`` (decoded, not clamped) of the images ``indices`` (int64 ``(B,)``,
        increasing) with ``steps`` network calls, and the labels they were drawn for (int64 ``(B,)``; None for an
        unconditional model). ``labels``: checked ones for these images (``check_labels``), or None."""
        z, uniform, noises = self.draws(indices, seed, steps, cache)
        labels = uniform if labels is None else labels
        n, device = len(indices), self.device
        pad = lambda t: torch.cat([t, t.new_zeros(-n % ROW_UNIT, *t.shape[1:])])
        cond = conditioning.class_cond(None if labels is None else pad(labels), self.num_classes)
        x = sample(self.sampler, self.model, pad(z).to(device) * self.sigma_max, steps, self.sigma_max,
                   self.sigma_min, self.mid_sigma, cond=conditioning.to_device(cond, device),
                   noises=[pad(e) for e in noises])
        return self.encoder.decode(x[:n]), labels

    def sample(self, n: int, steps: int = 1, labels=None, seed: int = 0, batch_size: int = 256) -> torch.Tensor:
        """``n`` samples ``(n, *sample space shape)`` (images in [-1, 1], not clamped) of images ``0 .. n - 1``
        with ``steps`` network calls; ``labels``: an int (every image that class), ``n`` ints, or None (uniform
        classes for a conditional model)."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise GeneratorError(f"n={n!r}: the number of samples must be a positive integer")
        self.check_steps(steps)
        labels = self.check_labels(labels, n)
        cache: dict = {}
        out = []
        for start in range(0, n, batch_size):
            rows = torch.arange(start, min(start + batch_size, n))
            out.append(self.draw(rows, steps, seed, None if labels is None else labels[rows], cache)[0].cpu())
        return torch.cat(out)

    def spec(self, weights_sha256: str, encoder: dict | None = None) -> GeneratorSpec:
        """The ``generator.json`` fields of this generator with weights of that digest (``encoder``: its encoder's
        settings as exported; default: ``describe()``)."""
        return GeneratorSpec(format=FORMAT, version=VERSION, kind=self.kind, network=self.network,
                             sample_shape=list(self.sample_shape), preconditioning=type(self.model).__name__,
                             sampler=self.sampler, sigma_max=self.sigma_max, sigma_min=self.sigma_min,
                             mid_sigma=self.mid_sigma, num_classes=self.num_classes,
                             encoder=self.encoder.describe() if encoder is None else encoder,
                             source=self.source, weights_sha256=weights_sha256)


def model_kind(model: nn.Module) -> str:
    """The model kind (``cmt_core.models.NUM_TIMES``) of a few-step model: its preconditioning wrapper's."""
    kinds = {"ConsistencyModel": "consistency", "FlowMap": "flow_map"}
    if type(model).__name__ not in kinds:
        raise GeneratorError(f"a {type(model).__name__} is not a few-step model (a consistency model or a flow map)")
    return kinds[type(model).__name__]


def open_generator(model: str | Path, artifact_root: str | Path | None = None) -> Generator:
    """The generator ``model`` names: an exported generator's folder (``generator.json``), a mid- or
    post-training artifact folder, or the artifact id of one under ``artifact_root``."""
    if not str(model):
        raise GeneratorError("model is empty: name an exported generator's folder, a mid-/post-training artifact "
                             "folder or its artifact id")
    path = Path(model)
    if (path / SPEC_FILE).is_file():
        return load_generator(path)
    if path.is_dir():
        return Generator.from_stage(path)
    if artifact_root is not None and path.name == str(model):
        found = [Path(artifact_root) / stage / str(model) for stage in GENERATOR_STAGES]
        found = [f for f in found if f.is_dir()]
        if found:
            return Generator.from_stage(found[0])
    where = f" or an artifact id under {artifact_root}" if artifact_root is not None else ""
    raise GeneratorError(f"model={str(model)!r} is not an exported generator (a folder with {SPEC_FILE}), a "
                         f"mid-/post-training artifact folder{where}")


def export_generator(gen: Generator, folder: str | Path) -> Path:
    """Write ``gen`` as an exported generator into ``folder`` (created; the weights first, the JSON last, each
    published atomically); returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise GeneratorError(f"out={str(folder)!r} is a file, not a folder")
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in gen.model.state_dict().items()}
    publish(folder / WEIGHTS_FILE, lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT}))
    encoder = gen.encoder.describe()
    if gen.encoder.name != IDENTITY.name:  # the VAE travels with the generator
        (folder / VAE_EXPORT).mkdir(exist_ok=True)
        for name in ("config.json", VAE_WEIGHTS):
            data = (gen.encoder.path / name).read_bytes()
            publish(folder / VAE_EXPORT / name, lambda tmp, data=data: tmp.write_bytes(data))
        encoder = gen.encoder.describe(VAE_EXPORT) | {"weights_sha256": _sha256(folder / VAE_EXPORT / VAE_WEIGHTS)}
    spec = gen.spec(_sha256(folder / WEIGHTS_FILE), encoder)
    text = json.dumps(spec.model_dump(mode="json"), indent=2) + "\n"
    publish(folder / SPEC_FILE, lambda tmp: tmp.write_text(text))
    return folder


def load_generator(folder: str | Path, device: str | torch.device = "cpu") -> Generator:
    """The generator exported into ``folder`` (``export_generator``), on ``device``; ``GeneratorError`` naming the
    file and the field when the folder is damaged or not one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    spec_file, weights_file = folder / SPEC_FILE, folder / WEIGHTS_FILE
    try:
        spec = GeneratorSpec.model_validate_json(spec_file.read_bytes())
    except FileNotFoundError:
        raise GeneratorError(f"{folder} is not an exported generator: {SPEC_FILE} is missing") from None
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(map(str, first["loc"])) or "(the document)"
        raise GeneratorError(f"{spec_file}: {field}: {first['msg']}") from None
    except OSError as err:
        raise GeneratorError(f"{spec_file} cannot be read: {describe(err)}") from None
    vae = folder / VAE_EXPORT / VAE_WEIGHTS
    if "weights_sha256" in spec.encoder and (not vae.is_file() or _sha256(vae) != spec.encoder["weights_sha256"]):
        raise GeneratorError(f"{vae}: missing, or its sha256 is not the one {SPEC_FILE} records")
    try:
        encoder = encoder_from(spec.encoder, folder, f"{SPEC_FILE}: encoder.path")
    except (KeyError, TypeError, ValueError) as err:
        raise GeneratorError(f"{spec_file}: encoder={json.dumps(spec.encoder)[:80]}: {describe(err)}") from None
    if spec.sampler != SAMPLER_OF_KIND[spec.kind]:
        raise GeneratorError(f"{spec_file}: sampler={spec.sampler!r} does not sample a {spec.kind} model")
    if not weights_file.is_file():
        raise GeneratorError(f"{folder} is not an exported generator: {WEIGHTS_FILE} is missing")
    if _sha256(weights_file) != spec.weights_sha256:
        raise GeneratorError(f"{weights_file}: its sha256 is not the one {SPEC_FILE} records (a damaged or "
                             "replaced file)")
    try:
        state = load_file(str(weights_file))
    except (SafetensorError, OSError, ValueError) as err:
        raise GeneratorError(f"{weights_file} is not a safetensors file: {describe(err)}") from None
    fields = {"kind": spec.kind, "network": spec.network, "sample_shape": spec.sample_shape,
              "sigma_min": spec.sigma_min, "preconditioning": None, "state_dict": state}
    try:
        model = model_from_fields(fields, spec_file)
    except CheckpointError as err:
        raise GeneratorError(str(err)) from None
    if type(model).__name__ != spec.preconditioning or label_dim_of(model) != spec.num_classes:
        raise GeneratorError(f"{spec_file}: preconditioning={spec.preconditioning!r} / num_classes="
                             f"{spec.num_classes} do not describe the {spec.kind} model its network builds")
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise GeneratorError(f"{weights_file}: weights hold inf or NaN")
    gen = Generator(model, spec.kind, spec.network, spec.sample_shape, spec.sigma_max, spec.mid_sigma, encoder,
                    spec.source)
    if not math.isclose(gen.sigma_min, spec.sigma_min):
        raise GeneratorError(f"{spec_file}: sigma_min={spec.sigma_min} is not the model's {gen.sigma_min}")
    return gen.to(device)
