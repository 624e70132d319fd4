"""``vlmcut.prune``: attach a pruning method to one model instance, and the handle that takes it off."""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from .methods.fastervlm import FasterVLMConfig, FasterVLMSelector
from .methods.fastv import FastVConfig, FastVSelector
from .methods.flowcut import FlowCutConfig, FlowCutLLMSelector, FlowCutSelector
from .methods.pdrop import PDropConfig, PDropSelector
from .methods.reference import GridConfig, GridSelector, RandomConfig, RandomSelector
from .methods.sparsevlm import SparseVLMConfig, SparseVLMSelector
from .methods.visionzip import VisionZipConfig, VisionZipSelector
from .models.llava import LlavaAttachment, llava_parts
from .models.vit import SUPPORTED_TOWERS, EncoderPassRecord, EncoderPruner, consumed_layer, tower_spec


class _Attachment(Protocol):
    @property
    def record(self) -> EncoderPassRecord: ...

    def remove(self) -> None: ...


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config class and how to build its selectors.

    ``make_selector(cfg, keep)``: the vision-encoder selector for a patch budget, or ``None`` for methods
    that prune only inside the language model. ``make_llm_selector(cfg, keep)``: the language-model
    selector (``None``: vision stage only). ``make_second_stage(cfg, keep)``: for two-stage models
    (LLaVA-NeXT, Qwen2-VL), the language-model stage that follows the vision stage (SPEC "Two-stage").
    """

    name: str
    config_cls: type
    make_selector: Callable[[Any, int], Any] | None
    make_llm_selector: Callable[[Any, int], Any] | None = None
    make_second_stage: Callable[[Any, int], Any] | None = None

    @property
    def prunes_in_llm_only(self) -> bool:
        return self.make_selector is None


METHODS: dict[str, MethodSpec] = {
    "flowcut": MethodSpec(
        "flowcut",
        FlowCutConfig,
        lambda cfg, keep: FlowCutSelector(cfg, keep=keep),
        make_second_stage=lambda cfg, keep: FlowCutLLMSelector(keep, semantic_scaling=cfg.semantic_scaling),
    ),
    "fastv": MethodSpec("fastv", FastVConfig, None, lambda cfg, keep: FastVSelector(cfg, keep)),
    "pdrop": MethodSpec("pdrop", PDropConfig, None, lambda cfg, keep: PDropSelector(cfg, keep)),
    "sparsevlm": MethodSpec(
        "sparsevlm", SparseVLMConfig, None, lambda cfg, keep: SparseVLMSelector(cfg, keep)
    ),
    "random": MethodSpec("random", RandomConfig, lambda cfg, keep: RandomSelector(cfg, keep)),
    "grid": MethodSpec("grid", GridConfig, lambda cfg, keep: GridSelector(cfg, keep)),
    "fastervlm": MethodSpec("fastervlm", FasterVLMConfig, lambda cfg, keep: FasterVLMSelector(cfg, keep)),
    "visionzip": MethodSpec("visionzip", VisionZipConfig, lambda cfg, keep: VisionZipSelector(cfg, keep)),
}

SUPPORTED_MODELS = (
    *SUPPORTED_TOWERS,
    "LlavaForConditionalGeneration",
    "LlavaModel",
    "LlavaNextForConditionalGeneration",
    "LlavaNextModel",
    "Qwen2VLForConditionalGeneration",
    "Qwen2VLModel",
    "Qwen2_5_VLForConditionalGeneration",
    "Qwen2_5_VLModel",
    "VideoLlavaForConditionalGeneration",
    "VideoLlavaModel",
)

# Which model instances carry a handle; kept off the model so that nothing is hung on its attributes.
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, PruneHandle] = weakref.WeakKeyDictionary()


def available_methods() -> list[str]:
    return sorted(METHODS)


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

    def __init__(self, model: nn.Module, method: str, config: Any, attachment: _Attachment) -> None:
        self.model = model
        self.method = method
        self.config = config
        self._attachment: _Attachment | None = attachment
        self._unguard = _guard_copies(model)
        self._final: EncoderPassRecord | None = None  # the last record, kept after remove()
        self._final_llm: Any = None

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
        layer (-1: a filler column); ``None`` for vision-only methods."""
        if self._attachment is None:
            return self._final_llm
        return getattr(self._attachment, "llm_record", None)

    @property
    def num_patches(self) -> int:
        """Patch tokens per image before pruning, in the last forward."""
        return self._record().num_patches

    def remove(self) -> None:
        """Take every hook and wrapper off; the model is exactly as before :func:`prune`. Idempotent."""
        if self._attachment is None:
            return
        self._final = self._attachment.record
        self._final_llm = getattr(self._attachment, "llm_record", None)
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


def prune(model: nn.Module, method: str = "flowcut", *, keep: int | float, **options: Any) -> PruneHandle:
    """Prune visual tokens of ``model`` (this instance only) with ``method``, keeping ``keep`` per image.

    Args:
        model: a LLaVA / LLaVA-NeXT model (``Llava[Next]ForConditionalGeneration`` / ``Llava[Next]Model``),
            a Qwen2-VL / Qwen2.5-VL model (``Qwen2VLForConditionalGeneration``,
            ``Qwen2_5_VLForConditionalGeneration`` or their ``...Model``), Video-LLaVA
            (``VideoLlavaForConditionalGeneration`` / ``VideoLlavaModel``), or a bare vision tower
            (``CLIPVisionModel``, ``SiglipVisionModel``, ``Dinov2Model``).
        method: one of :func:`available_methods` (Qwen: ``flowcut``, ``fastv``, ``pdrop``, ``sparsevlm``).
        keep: visual tokens per image that reach the consumer (for LLaVA: placeholders per image).
            ``keep`` >= the number of patches is the exact identity. Qwen2-VL / Qwen2.5-VL: an int is the
            number of tokens per image *after the 2x2 merger* (capped at the image's count, so images smaller
            than ``keep`` stay whole), or a float ratio in (0, 1]: per image ``max(1, round(ratio * its
            merged tokens))``; a video gets ``keep`` in total (see ``video_budget``).
        **options: the method's settings (see its config class, e.g. :class:`FlowCutConfig`). Qwen2-VL /
            Qwen2.5-VL also take ``video_budget``: ``"per_frame"`` (default; each temporal slot of a video's
            grid keeps ``K // T``, the first ``K % T`` one more, at least 1, scored on its own) or
            ``"shared"`` (the video's frames compete for ``K`` with one global token). Video-LLaVA takes
            ``video_budget`` too: ``"per_frame"`` (default for vision-stage methods; ``keep`` per video must
            be a multiple of the frame count, each frame keeps ``keep // frames`` patches) or ``"shared"``
            (each frame keeps ``2 * keep // frames`` in the tower, then FlowCut's decoder-layer-1 stage keeps
            the video's best ``keep`` jointly; the default for the LLM-only methods).

    Returns:
        A :class:`PruneHandle`; ``handle.remove()`` restores the model exactly.
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {available_methods()}")
    return _prune(model, method, METHODS[method], keep=keep, **options)


def _prune(
    model: nn.Module, method: str, spec: MethodSpec, *, keep: int | float, **options: Any
) -> PruneHandle:
    """:func:`prune` with the method's :class:`MethodSpec` given (the benchmark passes one whose selectors
    time themselves); ``method`` names it in the handle."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    conflict = _pruned_relative(model)
    if conflict is not None:
        raise RuntimeError(conflict)
    from .models.qwen2_vl import attach_qwen, qwen_parts

    is_qwen = qwen_parts(model) is not None
    video_budget = options.pop("video_budget", None)  # Qwen2-VL / Qwen2.5-VL and Video-LLaVA only
    config = _build_config(spec, keep, options)
    if isinstance(config.keep, float) and not is_qwen:
        raise ValueError(
            f"keep={config.keep!r}: a ratio keep is supported on Qwen2-VL / Qwen2.5-VL only (images of varying "
            f"size); pass an int count of visual tokens per image for {type(model).__name__}"
        )

    from .models.llava_next import LlavaNextAttachment, llava_next_parts
    from .models.video_llava import attach_video_llava

    video_llava = attach_video_llava(model, spec, config, video_budget=None if is_qwen else video_budget)
    if video_llava is not None:
        attachment: _Attachment = video_llava
    elif is_qwen:
        attachment = attach_qwen(model, spec, config, video_budget)
    elif llava_next_parts(model) is not None:
        if getattr(config, "feature_layer", None) is not None:
            raise ValueError(
                "feature_layer is read from the LLaVA-NeXT config (vision_feature_layer); do not pass it"
            )
        from .models.llm import DecoderPruner

        if spec.make_selector is None:  # LLM-only methods: every crop whole, the decoder prunes to K
            make_encoder = lambda k: None  # noqa: E731
            second = spec.make_llm_selector
        else:
            make_encoder = lambda k: spec.make_selector(config, k)  # noqa: E731
            second = spec.make_second_stage  # FlowCut: K/2 per crop, then K in the LLM (SPEC)
        attachment = LlavaNextAttachment(
            model,
            make_encoder,
            config.keep,
            two_stage=spec.make_selector is not None and second is not None,
            make_llm_stage=(lambda lm: DecoderPruner(lm, second(config, config.keep))) if second else None,
        )
    elif llava_parts(model) is not None:
        if getattr(config, "feature_layer", None) is not None:
            raise ValueError(
                "feature_layer is read from the LLaVA config (vision_feature_layer); do not pass it for LLaVA"
            )
        make_encoder = (
            (lambda k: spec.make_selector(config, k)) if spec.make_selector is not None else (lambda k: None)
        )
        make_llm = (
            (lambda k: spec.make_llm_selector(config, k)) if spec.make_llm_selector is not None else None
        )
        attachment = LlavaAttachment(model, make_encoder, config.keep, make_llm)
    else:
        if spec.make_selector is None:
            raise TypeError(
                f"{method!r} prunes inside the language model; pass the whole vision-language model "
                f"(e.g. LlavaForConditionalGeneration), not {type(model).__name__}"
            )
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
