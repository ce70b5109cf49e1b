"""SiT checkpoints as teachers: a flow-matching velocity transformer read into our DiT and EDM time.

SiT (willisma/SiT, ``models.py``) is DiT's transformer trained on the linear path to predict the velocity
v = y - e at its time s in [0, 1] (data at s = 1; ``transport/path.py`` ``ICPlan``). Its released checkpoints
(``SiT-XL-2-256x256.pt``) are a plain state dict; its training checkpoints hold ``model``, ``ema``, ``opt`` and
``args``, and, as SiT's ``find_model`` does, the ``ema`` entry is the one used. Either is read with
``torch.load(weights_only=True)``: tensors and plain containers only, no code.

The state dict maps onto ``cmt_core.networks.dit.DiT`` as follows (everything else by name):

* ``t_embedder.mlp.{0,2}`` -> ``time.mlps.0.{0,2}`` (256 frequencies either way; SiT feeds its time s unscaled,
  our ``LinearVelocityDenoiser`` feeds ``c_noise = s / 250``, the same features);
* ``y_embedder.embedding_table.weight`` ``(K + 1, hidden)`` (row K: the null class of classifier-free guidance) ->
  ``label.weight = (table[:K] - table[K]).T / sqrt(K)``, ``label.bias = table[K]``: our one-hot row of class k
  (times sqrt(K)) embeds to table[k], the all-zero row to table[K], exactly;
* ``final_layer.linear`` of a ``learn_sigma`` model (2C output channels; SiT's forward keeps the first C) -> its
  rows of the first C channels (rows are (p, q, channel), channel fastest);
* ``pos_embed`` (a fixed sin-cos table) is not loaded: it is checked equal to ours.

The number of heads is not in a state dict: it is read from ``DIT_SIZES`` by (hidden width, depth). The teacher is
a ``LinearVelocityDenoiser(time='sit')`` (``cmt_core.preconditioning``), which the teacher stage stores once as our
model file. Guidance: ``cmt_core.guidance`` guides every channel; SiT's own ``forward_with_cfg`` guides only the
first three of the four latent channels by default ("for exact reproducibility", as DiT), a choice we do not copy.

``write_sit_checkpoint`` writes a DiT of ours in SiT's format (the inverse map; the extra sigma channels and the
null row as given), for tests and the tiny presets: SiT's released weights cannot be downloaded here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from cmt_core.checkpoint import atomic_save
from cmt_core.networks.dit import DIT_SIZES, DiT
from cmt_core.preconditioning import LinearVelocityDenoiser

PRECONDITIONING = {"name": "linear_velocity", "time": "sit"}


@dataclass
class SiTTeacher:
    """A SiT checkpoint read as our denoiser: ``model`` (``LinearVelocityDenoiser``, eval mode), ``network`` (the
    values ``build_model`` rebuilds it from), ``sample_shape`` (C, H, W)."""

    model: nn.Module
    network: dict
    sample_shape: tuple[int, int, int]


def read_sit_state(path) -> dict[str, torch.Tensor]:
    """The state dict of a SiT checkpoint: a plain state dict, or a training checkpoint's ``ema`` (else
    ``model``) entry; ``ValueError`` for anything else."""
    blob = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and "x_embedder.proj.weight" not in blob:
        blob = blob.get("ema", blob.get("model"))
    if not isinstance(blob, dict) or not all(isinstance(v, torch.Tensor) for v in blob.values()):
        raise ValueError("not a SiT checkpoint: neither a state dict nor a training checkpoint with 'ema' or 'model'")
    for key in ("x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "y_embedder.embedding_table.weight",
                "final_layer.linear.weight"):
        if key not in blob:
            raise ValueError(f"not a SiT checkpoint: no {key!r} (unconditional SiTs have no such file format)")
    return blob


def sit_teacher(path, sample_shape, num_classes: int) -> SiTTeacher:
    """The SiT checkpoint at ``path`` as our denoiser, checked to denoise samples of ``sample_shape`` and to take
    ``num_classes`` classes (its class table must have the null row, ``num_classes + 1`` rows)."""
    state = read_sit_state(path)
    hidden, channels, patch, _ = state["x_embedder.proj.weight"].shape
    tokens = state["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    shape = (channels, grid * patch, grid * patch)
    if shape != tuple(sample_shape):
        raise ValueError(f"the SiT at {path} denoises samples of shape {shape}, the model's are {tuple(sample_shape)}")
    size = next((name for name, (h, d, _) in DIT_SIZES.items() if (h, d) == (hidden, depth)), None)
    if size is None:
        raise ValueError(f"the SiT at {path} is {hidden} wide and {depth} deep, not one of the DiT sizes "
                         f"{ {k: v[:2] for k, v in DIT_SIZES.items()} } (its number of heads is unknown)")
    table = state["y_embedder.embedding_table.weight"]
    if table.shape[0] != num_classes + 1:
        raise ValueError(f"the SiT at {path} has {table.shape[0]} class embeddings; data.num_classes={num_classes} "
                         f"needs {num_classes + 1} (the classes and the null class of classifier-free guidance)")
    out_rows = state["final_layer.linear.weight"].shape[0]
    out_channels = out_rows // (patch * patch)
    if out_channels not in (channels, 2 * channels):
        raise ValueError(f"the SiT at {path} outputs {out_channels} channels for {channels} input channels")
    heads = DIT_SIZES[size][2]
    network = {"kind": "dit", "width": hidden, "depth": depth, "patch_size": patch, "heads": heads, "dropout": 0.0,
               "label_dim": num_classes}
    raw = DiT(shape[1:], channels, patch, hidden, depth, heads, num_times=1, label_dim=num_classes)
    if not torch.allclose(state["pos_embed"][0].float(), raw.pos_embed[0], atol=1e-5):
        raise ValueError(f"the SiT at {path} has a pos_embed that is not DiT's fixed 2-D sin-cos table")
    raw.load_state_dict(_to_ours(state, num_classes, channels, patch, out_channels), strict=True)
    return SiTTeacher(LinearVelocityDenoiser(raw, time="sit").eval(), network, shape)


def _to_ours(state: dict, num_classes: int, channels: int, patch: int, out_channels: int) -> dict:
    ours = {}
    for key, value in state.items():
        if key == "pos_embed":
            continue
        if key.startswith("t_embedder.mlp."):
            ours["time.mlps.0." + key.removeprefix("t_embedder.mlp.")] = value
        elif key == "y_embedder.embedding_table.weight":
            ours["label.weight"] = (value[:num_classes] - value[num_classes]).T / math.sqrt(num_classes)
            ours["label.bias"] = value[num_classes].clone()
        elif key.startswith("final_layer.linear.") and out_channels != channels:
            keep = (torch.arange(value.shape[0]) % out_channels) < channels
            ours[key] = value[keep]
        else:
            ours[key] = value
    return ours


def write_sit_checkpoint(raw: DiT, path, null_row: torch.Tensor | None = None, learn_sigma: bool = True) -> None:
    """Write the one-time class-conditional DiT ``raw`` as SiT's ``models.py`` would save it (a plain state dict):
    its class table with the null row ``null_row`` (None: ``label.bias``, the all-zero row's embedding), and with
    ``learn_sigma`` the extra C output channels SiT's XL models have (zero weights: SiT's forward drops them)."""
    if raw.num_times != 1 or not raw.label_dim:
        raise ValueError("a SiT is a one-time, class-conditional network")
    k, c, p = raw.label_dim, raw.in_channels, raw.patch_size
    state = {}
    for key, value in raw.state_dict().items():
        if key.startswith("time.mlps.0."):
            state["t_embedder.mlp." + key.removeprefix("time.mlps.0.")] = value.clone()
        elif key == "label.weight":
            bias = raw.label.bias.detach()
            table = value.T * math.sqrt(k) + bias
            state["y_embedder.embedding_table.weight"] = torch.cat([table, (bias if null_row is None
                                                                            else null_row)[None]])
        elif key == "label.bias":
            continue
        elif key.startswith("final_layer.linear.") and learn_sigma:
            rows = value.reshape(p * p, c, *value.shape[1:])
            state[key] = torch.cat([rows, torch.zeros_like(rows)], dim=1).reshape(p * p * 2 * c, *value.shape[1:])
        else:
            state[key] = value.clone()
    state["pos_embed"] = raw.pos_embed.clone()
    atomic_save(state, Path(path))
