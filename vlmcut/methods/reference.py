"""Reference methods that need no attention: random patches and a uniform spatial grid.

Both prune once, at the output of the layer before the consumed one (where FlowCut finishes), so that a
comparison with FlowCut is about *which* tokens survive, not *where* the pruning happens or how much
compute it saves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .base import MethodSpec, check_int, register_method


@dataclass(frozen=True)
class RandomConfig:
    """Keep ``keep`` patches drawn uniformly at random (each image its own draw).

    Args:
        keep: visual tokens per image for the consumer.
        seed: each image's draw is seeded by ``seed`` and a checksum of the image's pixels, so an image
            keeps the same patches alone, in any batch and in any call order (another seed, another draw).
    """

    keep: int
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("keep", self.keep, 1)
        check_int("seed", self.seed, 0, 2**64 - 1)  # torch.Generator.manual_seed's range


@dataclass(frozen=True)
class GridConfig:
    """Keep ``keep`` patches on a uniform lattice over the (square) patch grid.

    Args:
        keep: visual tokens per image for the consumer.
    """

    keep: int

    def __post_init__(self) -> None:
        check_int("keep", self.keep, 1)


def grid_indices(num_patches: int, keep: int) -> torch.Tensor:
    """``keep`` raster indices spread evenly over a square ``sqrt(N) x sqrt(N)`` grid, ascending.

    A lattice of ``rows x cols >= keep`` cell centres is laid over the grid; when it has more cells than
    ``keep``, evenly spaced ones among them are taken.
    """
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"the grid method needs a square patch grid; got {num_patches} patches")
    if keep >= num_patches:
        return torch.arange(num_patches)
    rows = max(1, min(side, round(math.sqrt(keep))))
    cols = min(side, math.ceil(keep / rows))
    while rows * cols < keep:  # only when a side hit the grid size
        rows = min(side, rows + 1)
        cols = min(side, math.ceil(keep / rows))
    ys = [min(side - 1, int((i + 0.5) * side / rows)) for i in range(rows)]
    xs = [min(side - 1, int((j + 0.5) * side / cols)) for j in range(cols)]
    cells = torch.tensor([y * side + x for y in ys for x in xs])
    pick = torch.linspace(0, len(cells) - 1, keep).round().long()
    return cells[pick].sort().values


class OneShotSelector:
    """Prunes once, at the output of layer ``F + layer_offset`` (``F``: the consumed layer), with that
    layer's own ``q, k, v``. Subclasses implement :meth:`select` (indices, or a merge plan).

    ``layer_offset = -1`` (random, grid): where FlowCut finishes; ``0`` (FasterVLM, VisionZip): the layer
    whose output the model reads.
    """

    layer_offset = -1

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.consume_layer = 0

    def start(self, consume_layer: int) -> None:
        self.consume_layer = consume_layer

    def needs_scores(self, num_patches: int) -> bool:
        return num_patches > self.keep

    def step(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, has_cls: bool
    ):
        if layer != self.consume_layer + self.layer_offset:
            return None
        with torch.no_grad():
            return self.select(q.detach(), k.detach(), v.detach(), scale, has_cls)

    def select(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, has_cls: bool):
        raise NotImplementedError


class _AttentionFreeSelector(OneShotSelector):
    """Random and grid: the indices depend only on the batch size and patch count (:meth:`choose`)."""

    def select(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, has_cls: bool):
        n = k.shape[2] - int(has_cls)
        return self.choose(k.shape[0], n, k.device)

    def choose(self, batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
        raise NotImplementedError


class RandomSelector(_AttentionFreeSelector):
    """One draw per image, from a generator seeded by the config's seed and the image's key."""

    def __init__(self, config: RandomConfig, keep: int) -> None:
        super().__init__(keep)
        self.seed = config.seed
        # per-image keys of the current call (the model adapter sets a checksum of each image's pixels);
        # without keys an image's key is its position in the batch
        self.image_keys: list[int] | None = None

    def set_image_keys(self, keys: list[int]) -> None:
        """Per-image keys of the next call (the model adapter passes a checksum of each image's pixels)."""
        self.image_keys = list(keys)

    def choose(self, batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
        keys = (
            self.image_keys if self.image_keys is not None and len(self.image_keys) == batch else range(batch)
        )
        rows = []
        for key in keys:
            generator = torch.Generator().manual_seed((self.seed * 0x9E3779B1 + int(key)) % (1 << 62))
            rows.append(torch.rand(num_patches, generator=generator))
        scores = torch.stack(rows)
        return scores.topk(self.keep, dim=-1).indices.sort(dim=-1).values.to(device)


class GridSelector(_AttentionFreeSelector):
    def __init__(self, config: GridConfig, keep: int) -> None:
        super().__init__(keep)

    def choose(self, batch: int, num_patches: int, device: torch.device) -> torch.Tensor:
        return grid_indices(num_patches, self.keep).to(device).expand(batch, -1)


register_method(MethodSpec("random", RandomConfig, make_selector=lambda cfg, keep: RandomSelector(cfg, keep)))
register_method(MethodSpec("grid", GridConfig, make_selector=lambda cfg, keep: GridSelector(cfg, keep)))
