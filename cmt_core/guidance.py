"""Guidance: a guided denoiser ``D_w(x, t, c) = g(x, t, c).lerp(D(x, t, c), w) = g + w (D - g)``.

One definition for every place a teacher is used (its rollouts, ECD's teacher step, the teacher's own samples in
the evaluation), as EDM2's ``generate_images.py`` and the CMT reference's ImageNet-512 ECD (``ECDGuidLoss``) write
it. The guide ``g`` is

* ``cfg`` (classifier-free guidance): the teacher itself given the unconditional class (every ``class_labels``
  row all zero), the branch a network learns when trained with label dropout;
* ``autoguidance``: a separate guide network given the same class: a weaker denoiser of the same data (EDM2's
  recipe: smaller and trained for less).

``w = 1`` is the teacher itself (the guide is not called); ``w = 0`` is the guide; ``w > 1`` extrapolates away
from the guide. Shapes: ``x: (B, *sample_shape)``, ``t: (B,)`` (or a float), ``cond`` the conditioning mapping
(``cmt_core.conditioning``).
"""

from __future__ import annotations

import torch
from torch import nn

from cmt_core.conditioning import CLASS_LABELS, Cond

KINDS = ("none", "cfg", "autoguidance")


def unconditional(cond: Cond | None) -> dict:
    """``cond`` with every ``class_labels`` row replaced by the all-zero row (the unconditional class)."""
    cond = dict(cond or {})
    if CLASS_LABELS in cond:
        cond[CLASS_LABELS] = torch.zeros_like(cond[CLASS_LABELS])
    return cond


class GuidedDenoiser(nn.Module):
    """``D_w`` (module docstring): ``denoiser`` guided by ``guide`` (None: classifier-free, ``denoiser`` given the
    unconditional class) with scale ``scale``."""

    def __init__(self, denoiser: nn.Module, scale: float, guide: nn.Module | None = None):
        super().__init__()
        self.denoiser, self.guide, self.scale = denoiser, guide, float(scale)

    def forward(self, x: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        d = self.denoiser(x, t, cond=cond)
        if self.scale == 1.0:
            return d
        if self.guide is None:
            g = self.denoiser(x, t, cond=unconditional(cond))
        else:
            g = self.guide(x, t, cond=cond)
        return g.lerp(d, self.scale)


def guided(denoiser: nn.Module, kind: str, scale: float, guide: nn.Module | None = None) -> nn.Module:
    """The denoiser the settings describe: ``denoiser`` itself when ``kind`` is 'none' or ``scale`` is 1, else
    ``GuidedDenoiser`` (``guide`` is required for 'autoguidance' and unused for 'cfg')."""
    if kind not in KINDS:
        raise ValueError(f"unknown guidance kind {kind!r}; expected one of {KINDS}")
    if kind == "none" or scale == 1.0:
        return denoiser
    if kind == "autoguidance" and guide is None:
        raise ValueError("autoguidance needs a guide network")
    return GuidedDenoiser(denoiser, scale, guide if kind == "autoguidance" else None)
