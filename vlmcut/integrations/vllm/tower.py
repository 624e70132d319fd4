"""Vision-stage pruning inside one vLLM vision tower instance (CLIP or SigLIP), one image per pass.

vLLM's towers fuse ``q, k, v`` into one ``qkv_proj`` and run an attention kernel that returns no weights.
On this instance only (nothing is assigned to a vLLM class):

* a forward hook on each layer's ``self_attn.qkv_proj`` keeps that layer's projections while it runs;
* a forward hook on each encoder layer hands ``q, k, v`` (all heads: with tensor parallelism the shards
  are gathered first, so the choice does not depend on how heads are split) to a selector from
  ``vlmcut.methods`` and returns the kept tokens, or the merged ones (VisionZip), as the layer's output.
  vLLM's encoder loop feeds that to the next layer; the tower then applies the model's feature-select
  strategy (LLaVA-1.5 drops CLS) to what is left.

The hooks do nothing outside :meth:`TowerPruning.run`. Every image gets its own pass and its own selector:
its kept tokens depend neither on the other images of vLLM's batch nor on their requests' budgets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ...models.vit import content_key, gather_tokens, merge_tokens


class TowerPruning:
    """Hooks of a selector on one vLLM tower (``tower.vision_model.encoder.layers``).

    Args:
        tower: vLLM's ``CLIPVisionModel`` / ``SiglipVisionModel`` instance, built only up to the layer whose
            output the model consumes (vLLM drops the later layers), so that layer is the last one.
        has_cls: whether the tower's first token is a CLS token (CLIP) or not (SigLIP).
        gather_heads: joins a ``(B, T, local_heads * d)`` shard into all heads (tensor parallelism), or
            ``None`` when every rank holds all heads.
    """

    def __init__(
        self,
        tower: nn.Module,
        has_cls: bool,
        gather_heads: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        layers = tower.vision_model.encoder.layers
        attn = layers[0].self_attn
        self.num_heads = int(attn.num_heads)
        self.head_dim = int(attn.head_dim)
        self.scale = float(attn.scale)
        self.has_cls = has_cls
        self.num_layers = len(layers)
        self.consume_layer = self.num_layers - 1  # vLLM built the tower up to the consumed layer
        if self.consume_layer < 1:
            raise ValueError(
                f"the vision tower is read at the output of its layer {self.consume_layer} (0-based), which "
                f"leaves no layer to prune in; vision_feature_layer must select hidden_states[2] or later"
            )
        self._gather_heads = gather_heads
        self._selector: Any = None
        self._qkv: torch.Tensor | None = None
        self._handles = []
        for i, layer in enumerate(layers):
            self._handles.append(layer.self_attn.qkv_proj.register_forward_hook(self._capture))
            self._handles.append(layer.register_forward_hook(self._make_post(i)))

    def run(self, forward: Callable[[torch.Tensor], Any], image: torch.Tensor, selector: Any) -> Any:
        """``forward(image)`` for one image (1, C, H, W) with ``selector`` pruning inside the tower."""
        selector.start(self.consume_layer)
        set_keys = getattr(selector, "set_image_keys", None)
        if set_keys is not None:
            set_keys([content_key(image[0])])
        self._selector = selector
        try:
            return forward(image)
        finally:
            self._selector = None
            self._qkv = None

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- hooks ---------------------------------------------------------------------------------------
    def _capture(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self._selector is not None:
            self._qkv = output[0] if isinstance(output, tuple) else output

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        if self._gather_heads is not None and x.shape[-1] < self.num_heads * self.head_dim:
            x = self._gather_heads(x)
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)

    def _make_post(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            selector, qkv, self._qkv = self._selector, self._qkv, None
            if selector is None:
                return None
            # CLIP's layer returns the hidden states, SigLIP's a (hidden states, None) tuple
            hidden = output[0] if isinstance(output, tuple) else output
            if not selector.needs_scores(hidden.shape[1] - int(self.has_cls)):
                return None
            if qkv is None:
                raise RuntimeError(f"layer {i}: qkv_proj did not run through its module; cannot score tokens")
            q, k, v = (self._heads(t.contiguous()) for t in qkv.chunk(3, dim=-1))
            choice = selector.step(i, q, k, v, self.scale, self.has_cls)
            if choice is None:
                return None
            if isinstance(choice, torch.Tensor):
                hidden = gather_tokens(hidden, choice, self.has_cls)
            else:
                hidden = merge_tokens(hidden, choice, self.has_cls)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return hook


def nest_tower_names(weights: Iterable[tuple[str, torch.Tensor]]) -> Iterable[tuple[str, torch.Tensor]]:
    """transformers 5 saves LLaVA's tower as ``model.vision_tower.embeddings...``; vLLM's towers keep the
    ``vision_model`` level (``vision_tower.vision_model.embeddings...``). Older checkpoints pass unchanged."""
    for name, tensor in weights:
        for prefix in ("model.vision_tower.", "vision_tower."):
            if name.startswith(prefix) and not name.startswith(prefix + "vision_model."):
                name = prefix + "vision_model." + name[len(prefix) :]
                break
        yield name, tensor
