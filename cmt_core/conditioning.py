"""The conditioning channel: one ``cond`` mapping that travels with every batch, to every network call.

``cond`` maps names to tensors whose first dimension is the batch (``(B, ...)``). An unconditional run passes
an empty mapping, and every function that takes ``cond`` computes exactly what it computed without it. Names:

* ``class_labels``: ``(B, num_classes)`` float32 one-hot rows, as EDM and EDM2 feed them; an all-zero row is
  the "unconditional" class (what label dropout and classifier-free guidance use).

Room is left for more (a text embedding, say): a network reads the names it knows and refuses the ones it does
not (``check_known``), so a conditioned batch never reaches a network that would ignore it.

Where ``cond`` goes: data sets and batch sources (``cmt_core.data``), networks and preconditioning wrappers,
teachers and ODE solvers (``denoiser(x, t, cond)``), rollouts and the trajectory store (per-trajectory
conditioning stored beside the states), training pairs, every objective, the samplers and the evaluation.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

Cond = Mapping[str, torch.Tensor]
CLASS_LABELS = "class_labels"
EMPTY: Cond = {}


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Integer labels ``(B,)`` -> float32 one-hot rows ``(B, num_classes)``; refuses labels out of range."""
    labels = torch.as_tensor(labels, dtype=torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"class labels must lie in [0, {num_classes}), got {int(labels.min())}..{int(labels.max())}")
    return torch.nn.functional.one_hot(labels, num_classes).float()


def class_cond(labels: torch.Tensor | None, num_classes: int) -> Cond:
    """``{"class_labels": one-hot}`` for integer ``labels`` ``(B,)``; ``{}`` for None (unconditional)."""
    return {} if labels is None else {CLASS_LABELS: one_hot(labels, num_classes)}


def select(cond: Cond | None, rows) -> dict:
    """The rows ``rows`` (an index tensor or a slice) of every entry."""
    return {k: v[rows] for k, v in (cond or {}).items()}


def to_device(cond: Cond | None, device, dtype: torch.dtype | None = None) -> dict:
    """Every entry on ``device`` (floating entries cast to ``dtype`` when given)."""
    return {k: v.to(device, dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in (cond or {}).items()}


def concat(parts: list[Cond]) -> dict:
    """Row-wise concatenation of conditionings that share their names."""
    if not parts or not parts[0]:
        return {}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def check_known(cond: Cond | None, known: tuple[str, ...], who: str) -> None:
    """Raise unless every name of ``cond`` is one ``who`` (a network, a teacher) uses."""
    unknown = sorted(set(cond or {}) - set(known))
    if unknown:
        raise ValueError(f"{who} takes no conditioning {unknown} (it takes {list(known) or 'none'}): a conditioned "
                         "batch must not reach a model that would ignore it")
