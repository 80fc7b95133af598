"""What the export needs of every model in the family (models.export.ServingGraph)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Backbone(nn.Module):
    """A classifier as stages, global average pooling and a head.

    Subclasses set ``stage_names`` (what ``--features`` accepts) and ``embedding_dim``, and
    define ``forward_stages`` and ``forward_head``; the rest follows from those two.
    """

    stage_names: tuple[str, ...]
    embedding_dim: int

    def forward_stages(self, x: Tensor, keep: tuple[str, ...] = ()) -> tuple[Tensor, list[Tensor]]:
        """Pooled features ``[N, embedding_dim]`` and the maps of the stages in ``keep``,
        in the backbone's order."""
        raise NotImplementedError

    def forward_head(self, features: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def pool(x: Tensor) -> Tensor:
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)

    def forward_features(self, x: Tensor) -> Tensor:
        """Globally pooled backbone features, ``[N, embedding_dim]``."""
        return self.forward_stages(x)[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
