"""Bare vision towers (``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model``): the vision stage alone.

The tower's output then holds ``keep`` patch tokens per image (plus the CLS token where the tower has one);
whoever reads ``hidden_states[feature_layer]`` gets the kept tokens. Methods that prune inside a language
model have nothing to act on here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..methods.base import MethodSpec
from .registry import AdapterOption, ModelAdapter, register_adapter
from .vit import SUPPORTED_TOWERS, EncoderPassRecord, EncoderPruner, consumed_layer, tower_spec

FEATURE_LAYER = AdapterOption(
    "feature_layer",
    "the hidden_states index the caller reads (default -1: the last layer's output); nothing after the "
    "layer that produces it needs pruning",
    elsewhere="reads its feature layer from its config (vision_feature_layer); do not pass it",
    elsewhere_error=ValueError,
)


def check_feature_layer(value: object) -> int:
    """``feature_layer``: an int ``hidden_states`` index (its range is checked against the tower)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"feature_layer must be an int hidden_states index (e.g. -1: the last layer, -2: the one before), "
            f"got {type(value).__name__} ({value!r:.80})"
        )
    return value


class TowerAttachment:
    """An :class:`EncoderPruner` on a bare tower, as the handle sees it."""

    def __init__(self, pruner: EncoderPruner) -> None:
        self.pruner = pruner

    @property
    def record(self) -> EncoderPassRecord:
        return self.pruner.record

    @property
    def llm_record(self) -> None:
        return None

    def remove(self) -> None:
        self.pruner.remove()


class TowerAdapter(ModelAdapter):
    name = "tower"
    title = "bare vision towers"
    classes = SUPPORTED_TOWERS
    options = (FEATURE_LAYER,)

    def why_not(self, spec: MethodSpec) -> tuple[type[Exception], str] | None:
        if spec.make_selector is None:
            return TypeError, (
                "prunes inside the language model; pass the whole vision-language model (e.g. "
                "LlavaForConditionalGeneration), not a bare vision tower"
            )
        return None

    def check_options(self, spec: MethodSpec, options: dict[str, Any]) -> None:
        if options.get("feature_layer") is not None:
            check_feature_layer(options["feature_layer"])

    def attach(
        self, model: nn.Module, spec: MethodSpec, config: Any, options: dict[str, Any]
    ) -> TowerAttachment:
        tower = tower_spec(model)
        feature_layer = options.get("feature_layer")
        consume = consumed_layer(-1 if feature_layer is None else feature_layer, tower.num_layers)
        return TowerAttachment(EncoderPruner(tower, spec.make_selector(config, config.keep), consume))


register_adapter(TowerAdapter())
