"""``vlmcut.prune``: attach a pruning method to one model instance, and the handle that takes it off."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from . import methods as _methods  # noqa: F401  (fills the method registry)
from . import models as _models  # noqa: F401  (fills the model-adapter registry)
from .methods.base import METHODS, MethodSpec, available_methods, get_method
from .models.registry import (
    ADAPTERS,
    Attachment,
    adapter_for,
    check_keep_kind,
    split_options,
    supported_models,
)
from .models.vit import EncoderPassRecord

# Which model instances carry a handle; kept off the model so that nothing is hung on its attributes.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, PruneHandle] = weakref.WeakKeyDictionary()


def _pruned_relative(model: nn.Module) -> str | None:
    """Why ``model`` cannot be pruned now: it, a module inside it, or a module holding it carries a handle."""
    for other, handle in list(_ATTACHED.items()):
        if other is model:
            return f"this model already has {handle!r}; call handle.remove() before pruning it again"
        if any(m is model for m in other.modules()):
            return (
                f"this {type(model).__name__} is part of a {type(other).__name__} that is already pruned "
                f"({handle!r}); prune one of them only, or call that handle's remove() first"
            )
        if any(m is other for m in model.modules()):
            return (
                f"this {type(model).__name__} contains a {type(other).__name__} that is already pruned "
                f"({handle!r}); prune one of them only, or call that handle's remove() first"
            )
    return None


def _guard_copies(model: nn.Module) -> Callable[[], None]:
    """Make ``copy.deepcopy``, ``copy.copy`` and pickling (``torch.save(model)``) of this pruned model, or of
    any module inside it, fail with a message that says what to do: a copy would carry hooks and wrappers
    bound to the original's state that no handle can remove (a copied tower would even run the original's
    weights). Python looks these names up on the instance, so nothing is set on a class. Returns the undo
    function."""
    kind = type(model).__name__
    names = ("__deepcopy__", "__reduce_ex__")  # copy.copy goes through __reduce_ex__

    def refuse_copy(*_: Any) -> Any:
        raise RuntimeError(
            f"copy of a pruned {kind} (or of a module inside it): the copy would share the pruning hooks of "
            f"the original. Call handle.remove(), copy the model, then vlmcut.prune() each copy"
        )

    def refuse_pickle(*_: Any) -> Any:
        raise TypeError(
            f"a pruned {kind} (or a module inside it) cannot be pickled or copied (torch.save(model), pickle, "
            f"copy.copy): save its weights with model.state_dict() or model.save_pretrained(dir) (pruning is "
            f"not part of the weights; call vlmcut.prune() again after loading), or call handle.remove() first"
        )

    saved: list[tuple[nn.Module, dict[str, Any]]] = []
    for module in model.modules():
        saved.append((module, {n: module.__dict__[n] for n in names if n in module.__dict__}))
        module.__dict__["__deepcopy__"] = refuse_copy
        module.__dict__["__reduce_ex__"] = refuse_pickle

    def undo() -> None:
        for module, before in saved:
            for n in names:
                module.__dict__.pop(n, None)
            module.__dict__.update(before)

    return undo


class PruneHandle:
    """What :func:`prune` returns. Side results of the last forward live here, never on the model.

    Use ``handle.remove()`` (or ``with vlmcut.prune(...) as handle:``) to restore the model exactly.
    """

    def __init__(self, model: nn.Module, method: str, config: Any, attachment: Attachment) -> None:
        self.model = model
        self.method = method
        self.config = config
        self._attachment: Attachment | None = attachment
        self._unguard = _guard_copies(model)
        self._final: EncoderPassRecord | None = None  # the last record, kept after remove()
        self._final_llm: Any = None
        self._counts: list[int] = []

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
        from the last forward; ``None`` before the first forward. Video-LLaVA: the image rows, then one row
        per video frame, ``-1``-padded where frames keep different counts (``video_budget="shared"``)."""
        return self._record().kept_indices

    @property
    def tokens_per_layer(self) -> list[int]:
        """Patch tokens (global token excluded) after every encoder layer of the last forward."""
        return list(self._record().tokens_per_layer)

    @property
    def llm_record(self) -> Any:
        """For methods that prune inside the language model: ``LLMPassRecord`` of the last prefill, whose
        ``kept_positions[s]`` (B, T_s) are the original sequence positions alive after the ``s``-th prune
        layer (-1: a filler column); ``None`` for vision-only methods. Only visual tokens are ever dropped, so
        a left-padded row's padding columns stay in ``kept_positions``: mask them with the prompt's
        ``attention_mask`` (gathered at those positions) to count real tokens."""
        if self._attachment is None:
            return self._final_llm
        return self._attachment.llm_record

    @property
    def num_patches(self) -> int:
        """Patch tokens per image before pruning, in the last forward."""
        return self._record().num_patches

    @property
    def image_token_counts(self) -> list[int]:
        """With ``keep="auto"``: the visual tokens every image kept (what reached the language model), one
        entry per image in the order the model saw them, since :func:`prune` (Qwen2-VL: a call's images,
        then its videos); empty for fixed budgets, where every image keeps ``keep``."""
        counts = self._counts if self._attachment is None else getattr(self._attachment, "image_counts", [])
        return list(counts)

    def remove(self) -> None:
        """Take every hook and wrapper off; the model is exactly as before :func:`prune`. Idempotent."""
        if self._attachment is None:
            return
        self._final = self._attachment.record
        self._final_llm = self._attachment.llm_record
        self._counts = list(getattr(self._attachment, "image_counts", []))
        try:
            self._attachment.remove()
        finally:
            self._unguard()
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


def prune(
    model: nn.Module, method: str | MethodSpec = "flowcut", *, keep: int | float | str, **options: Any
) -> PruneHandle:
    """Prune visual tokens of ``model`` (this instance only) with ``method``, keeping ``keep`` per image.

    Args:
        model: an instance of a class some model family registers (:func:`supported` lists every class
            with the methods it runs; ``vlmcut --help`` prints the same).
        method: one of :func:`available_methods`, or a :class:`MethodSpec` (a method of your own, or the
            benchmark's timed and replaying variants).
        keep: visual tokens per image that reach the consumer (LLaVA: placeholders per image; Video-LLaVA:
            patch tokens per video; Qwen2-VL: tokens after the 2x2 merger). ``keep`` >= the number of
            tokens is the exact identity. Families that give images their own counts (Qwen2-VL) also take
            a float ratio in (0, 1]. LLaVA-1.5 and Qwen2-VL / Qwen2.5-VL with ``"flowcut"`` also take
            ``"auto"``: a count per image from FlowCut's importance mass (options ``mass``, ``min_keep``,
            ``max_keep``), reported in ``handle.image_token_counts``.
        **options: the method's settings (its config class, e.g. :class:`FlowCutConfig`), and the model
            family's own options (e.g. ``video_budget`` for video models, ``feature_layer`` for a bare
            vision tower; see the family's module in :mod:`vlmcut.models`).

    Returns:
        A :class:`PruneHandle`; ``handle.remove()`` restores the model exactly.
    """
    spec = method if isinstance(method, MethodSpec) else get_method(method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    conflict = _pruned_relative(model)
    if conflict is not None:
        raise RuntimeError(conflict)
    adapter = adapter_for(model)
    options = dict(options)
    family_options = split_options(adapter, model, options)
    config = spec.config(keep, options)
    check_keep_kind(adapter, model, config.keep)
    adapter.check(spec, family_options)
    attachment = adapter.attach(model, spec, config, family_options)
    handle = PruneHandle(model, spec.name, config, attachment)
    _ATTACHED[model] = handle
    return handle


def supported() -> dict[str, list[str]]:
    """Every supported model class and the methods it runs (with default options), from the registries."""
    return {cls: a.supported_methods() for a in ADAPTERS for cls in a.classes}


__all__ = [
    "METHODS",
    "MethodSpec",
    "PruneHandle",
    "available_methods",
    "prune",
    "supported",
    "supported_models",
]
