"""``flowcut.prune``: attach a pruning method to one model instance, and the handle that takes it off."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .methods.flowcut import FlowCutConfig, FlowCutSelector
from .methods.reference import GridConfig, GridSelector, RandomConfig, RandomSelector
from .models.llava import LlavaAttachment, llava_parts
from .models.vit import SUPPORTED_TOWERS, EncoderPassRecord, EncoderPruner, consumed_layer, tower_spec


class _Attachment(Protocol):
    @property
    def record(self) -> EncoderPassRecord: ...

    def remove(self) -> None: ...


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config class and how to build its encoder selector for a patch budget."""

    name: str
    config_cls: type
    make_selector: Callable[[Any, int], Any]


METHODS: dict[str, MethodSpec] = {
    "flowcut": MethodSpec("flowcut", FlowCutConfig, lambda cfg, keep: FlowCutSelector(cfg, keep=keep)),
    "random": MethodSpec("random", RandomConfig, lambda cfg, keep: RandomSelector(cfg, keep)),
    "grid": MethodSpec("grid", GridConfig, lambda cfg, keep: GridSelector(cfg, keep)),
}

SUPPORTED_MODELS = (*SUPPORTED_TOWERS, "LlavaForConditionalGeneration", "LlavaModel")

# Which model instances carry a handle; kept off the model so that nothing is hung on its attributes.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, PruneHandle] = weakref.WeakKeyDictionary()


def available_methods() -> list[str]:
    return sorted(METHODS)


class PruneHandle:
    """What :func:`prune` returns. Side results of the last forward live here, never on the model.

    Use ``handle.remove()`` (or ``with flowcut.prune(...) as handle:``) to restore the model exactly.
    """

    def __init__(self, model: nn.Module, method: str, config: Any, attachment: _Attachment) -> None:
        self.model = model
        self.method = method
        self.config = config
        self._attachment: _Attachment | None = attachment
        self._final: EncoderPassRecord | None = None  # the last record, kept after remove()

    @property
    def active(self) -> bool:
        return self._attachment is not None

    def _record(self) -> EncoderPassRecord:
        if self._attachment is None:
            assert self._final is not None
            return self._final
        return self._attachment.record

    @property
    def kept_indices(self) -> torch.Tensor | None:
        """``(num_images, K)`` LongTensor: kept patch positions on the original grid (0-based, ascending),
        from the last forward; ``None`` before the first forward."""
        return self._record().kept_indices

    @property
    def tokens_per_layer(self) -> list[int]:
        """Patch tokens (global token excluded) after every encoder layer of the last forward."""
        return list(self._record().tokens_per_layer)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image before pruning, in the last forward."""
        return self._record().num_patches

    def remove(self) -> None:
        """Take every hook and wrapper off; the model is exactly as before :func:`prune`. Idempotent."""
        if self._attachment is None:
            return
        self._final = self._attachment.record
        try:
            self._attachment.remove()
        finally:
            self._attachment = None
            if _ATTACHED.get(self.model) is self:
                del _ATTACHED[self.model]

    def __enter__(self) -> PruneHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"PruneHandle(method={self.method!r}, model={type(self.model).__name__}, {state}, config={self.config})"


class _TowerAttachment:
    def __init__(self, pruner: EncoderPruner) -> None:
        self.pruner = pruner

    @property
    def record(self) -> EncoderPassRecord:
        return self.pruner.record

    def remove(self) -> None:
        self.pruner.remove()


def _build_config(spec: MethodSpec, keep: Any, options: dict[str, Any]) -> Any:
    names = {f.name for f in dataclasses.fields(spec.config_cls)}
    unknown = sorted(set(options) - names)
    if unknown:
        valid = sorted(names - {"keep"})
        raise TypeError(f"unknown option(s) {unknown} for method {spec.name!r}; valid options: {valid}")
    return spec.config_cls(keep=keep, **options)


def prune(model: nn.Module, method: str = "flowcut", *, keep: int, **options: Any) -> PruneHandle:
    """Prune visual tokens of ``model`` (this instance only) with ``method``, keeping ``keep`` per image.

    Args:
        model: a LLaVA model (``LlavaForConditionalGeneration`` / ``LlavaModel``) or a bare vision tower
            (``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model``).
        method: one of :func:`available_methods`.
        keep: visual tokens per image that reach the consumer (for LLaVA: placeholders per image).
            ``keep`` >= the number of patches is the exact identity.
        **options: the method's settings (see its config class, e.g. :class:`FlowCutConfig`).

    Returns:
        A :class:`PruneHandle`; ``handle.remove()`` restores the model exactly.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {available_methods()}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model in _ATTACHED:
        raise RuntimeError(
            f"this model already has {_ATTACHED[model]!r}; call handle.remove() before pruning it again"
        )
    spec = METHODS[method]
    config = _build_config(spec, keep, options)

    if llava_parts(model) is not None:
        if getattr(config, "feature_layer", None) is not None:
            raise ValueError(
                "feature_layer is read from the LLaVA config (vision_feature_layer); do not pass it for LLaVA"
            )
        attachment: _Attachment = LlavaAttachment(model, lambda k: spec.make_selector(config, k), config.keep)
    else:
        try:
            tower = tower_spec(model)
        except TypeError:
            raise TypeError(
                f"{type(model).__name__} is not supported; supported models: {', '.join(SUPPORTED_MODELS)}"
            ) from None
        feature_layer = -1 if getattr(config, "feature_layer", None) is None else config.feature_layer
        consume = consumed_layer(feature_layer, tower.num_layers)
        attachment = _TowerAttachment(EncoderPruner(tower, spec.make_selector(config, config.keep), consume))

    handle = PruneHandle(model, method, config, attachment)
    _ATTACHED[model] = handle
    return handle
