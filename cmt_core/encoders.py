"""The seam between the sample space and the model space (edm2's ``Encoder``).

Training, rollouts and the trajectory store work in the model's space; whatever looks at samples as samples
(evaluation features, sample grids, image distances such as LPIPS) decodes first. An ``Encoder`` maps

* ``encode(x)``: samples ``(B, *sample_shape)`` -> model-space tensors ``(B, *model_shape)``;
* ``decode(z)``: model-space tensors -> samples, in the sample space's range (images in [-1, 1]).

``IDENTITY`` is the encoder of pixel and 2-D data, where the two spaces are one: its ``decode`` returns its input
unchanged, so pixel runs compute exactly what they computed before the seam existed.
"""

from __future__ import annotations

from typing import Protocol

import torch


class Encoder(Protocol):
    name: str

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...

    def decode(self, z: torch.Tensor) -> torch.Tensor: ...

    def describe(self) -> dict: ...


class IdentityEncoder:
    """Pixels and 2-D points: the model space is the sample space."""

    name = "identity"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def describe(self) -> dict:
        return {"encoder": self.name}


IDENTITY = IdentityEncoder()


def decoded(distance, encoder: Encoder):
    """A distance ``d(a, b)`` of samples applied to model-space tensors: ``d(decode(a), decode(b))`` (the distance
    itself for the identity encoder)."""
    if encoder.name == IDENTITY.name:
        return distance
    return lambda a, b: distance(encoder.decode(a), encoder.decode(b))
