"""What every pruning method is to the rest of vlmcut: the selector protocols, the method registry, and the
shared validation of options.

A method is one file in this package: a frozen config dataclass (its options, validated in ``__post_init__``
with the ``check_*`` helpers below), pure tensor functions, and selector classes that follow one of the
protocols here. The file registers itself with :func:`register_method`; :mod:`vlmcut.api` and the model
adapters (:mod:`vlmcut.models`) only ever see a :class:`MethodSpec`.

Three protocols, by where a method acts:

* :class:`VisionSelector`: inside a vision encoder, called after every layer with that layer's own projected
  ``q, k, v`` (FlowCut, VisionZip, FasterVLM, random, grid). It answers kept indices, a :class:`TokenMerge`,
  or nothing.
* :class:`LLMSelector`: inside the language model, at the layers it names, with an :class:`LLMContext`
  (FastV, PDrop, SparseVLM, FlowCut's second stage). It answers a keep mask or an :class:`LLMSelection`.
* :class:`TokenMerge`: the answer of a vision selector that merges tokens (VisionZip's contextual tokens).

Pure code: no model plumbing, no transformers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = [
    "LLMContext",
    "LLMSelection",
    "LLMSelector",
    "METHODS",
    "MethodSpec",
    "TokenMerge",
    "VisionSelector",
    "available_methods",
    "check_bool",
    "check_choice",
    "check_int",
    "check_keep",
    "check_layers",
    "check_ratio",
    "get_method",
    "register_method",
]

# ------------------------------------------------------------------------------------------------------
# Selector protocols
# ------------------------------------------------------------------------------------------------------


class TokenMerge(Protocol):
    """A vision selector's answer that merges tokens instead of only keeping them.

    The layer's patch tokens become ``[kept..., merged...]``: first ``kept`` (B, n), indices into the
    current patch tokens taken as they are, in the given order; then ``C`` new tokens ``weights @ patches``
    with ``weights`` (B, C, N) over the current ``N`` patch tokens (each row: averaging weights of one
    group). ``sources`` (B, C) is the current patch index each merged token is recorded as in
    ``kept_indices``, so that the record stays ``(B, n + C)``.
    """

    kept: torch.Tensor  # (B, n) long
    weights: torch.Tensor  # (B, C, N) float
    sources: torch.Tensor  # (B, C) long


class VisionSelector(Protocol):
    """What a method implements to prune inside a vision encoder (e.g. ``FlowCutSelector``).

    * ``keep``: the patch tokens (or merge units) it leaves for the consumer.
    * ``start(consume_layer)``: a new encoder pass begins; the consumer reads the output of layer
      ``consume_layer`` (0-based), so nothing after it needs pruning.
    * ``needs_scores(num_patches)``: whether this pass can prune at all (``False``: the model skips the
      per-layer ``q, k, v`` capture).
    * ``step(layer, q, k, v, scale, has_cls, group=1)``: after encoder layer ``layer``, with that layer's
      projected ``q, k, v`` (B, H, T, d) over the current tokens (the global token first when ``has_cls``)
      and the attention ``scale``. Returns ``None`` (keep everything), kept patch indices (B, n) into the
      current patch tokens, or a :class:`TokenMerge`. ``group`` > 1 (Qwen2-VL's 2x2 merger): tokens come
      in runs of ``group`` that must be kept or dropped together, and the answer indexes those runs; only
      selectors whose :class:`MethodSpec` says ``merge_units=True`` are ever called with it.

    Optional attributes a model adapter honours: ``per_image_passes = True`` (the selector's counts depend
    on the batch, e.g. FlowCut's batch-maximum prune counts, so the tower runs one image at a time and a
    result never depends on its neighbours) and ``set_image_keys(keys)`` (one int per image of the next
    pass, e.g. to seed ``random`` by the image's content).
    """

    keep: int

    def start(self, consume_layer: int) -> None: ...

    def needs_scores(self, num_patches: int) -> bool: ...

    def step(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        has_cls: bool,
        group: int = 1,
    ) -> torch.Tensor | TokenMerge | None: ...


# ------------------------------------------------------------------------------------------------------
# What a language-model selector sees
# ------------------------------------------------------------------------------------------------------


@dataclass
class LLMContext:
    """What a selector sees at a prune layer (current, possibly already pruned, sequence of length T)."""

    layer: int
    q: torch.Tensor  # (B, H, T, d), RoPE applied
    k: torch.Tensor  # (B, Hkv, T, d), RoPE applied
    v: torch.Tensor  # (B, Hkv, T, d)
    scale: float
    visual: torch.Tensor  # (B, T) bool: visual tokens the selector may drop
    valid: torch.Tensor  # (B, T) bool: real tokens (not padding / fillers)
    query_index: torch.Tensor  # (B,) long: index (in this sequence) of the last prompt token
    image_index: torch.Tensor  # (B, T) long: which image of its row a visual token belongs to, -1 elsewhere
    hidden: torch.Tensor  # (B, T, D): the layer's output

    def visual_counts(self) -> torch.Tensor:
        """(B, I) visual tokens per image of each row (I = most images in a row)."""
        n_img = int(self.image_index.max()) + 1 if self.visual.any() else 0
        idx = self.image_index.clamp(min=0)
        counts = torch.zeros(self.visual.shape[0], max(1, n_img), dtype=torch.long, device=idx.device)
        return counts.scatter_add_(1, idx, self.visual.long())


@dataclass
class LLMSelection:
    """A selector's answer that also rewrites hidden states (e.g. SparseVLM's recycled tokens).

    ``keep``: (B, T) bool keep mask, as a plain mask answer. ``hidden``: (B, T, D) replacement for the
    layer's output (``None``: unchanged); only visual columns may differ from ``ctx.hidden``. A kept column
    keeps its original position whatever its new hidden state.
    """

    keep: torch.Tensor  # (B, T) bool
    hidden: torch.Tensor | None = None  # (B, T, D)


class LLMSelector(Protocol):
    """What a method implements to prune inside the language model.

    ``prune_layers(num_layers, num_visual)``: the decoder layers (0-based) at whose output it prunes, given
    the most visual tokens any image of the batch has; asked at the start of every prefill.
    ``select(ctx)``: at each of those layers, a (B, T) bool keep mask (visual columns only may be False),
    an :class:`LLMSelection` (a mask plus new hidden states for visual columns), or ``None`` to keep
    everything.
    """

    def prune_layers(self, num_layers: int, num_visual: int) -> Sequence[int]: ...

    def select(self, ctx: LLMContext) -> torch.Tensor | LLMSelection | None: ...


# ------------------------------------------------------------------------------------------------------
# The method registry
# ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its config class and how to build its selectors for a budget.

    * ``make_selector(cfg, keep)``: the :class:`VisionSelector` for ``keep`` patch tokens (merge units on
      Qwen2-VL), or ``None`` for methods that prune only inside the language model.
    * ``make_llm_selector(cfg, keep)``: the :class:`LLMSelector` of a method that prunes in the language
      model only (``None``: the method has no such stage).
    * ``make_second_stage(cfg, keep)``: for two-stage methods (FlowCut), the language-model stage that
      brings each image to ``keep`` after the vision stage kept more (SPEC "Two-stage"); the model adapters
      use it where their layout needs it (LLaVA-NeXT's crops, Qwen2-VL's merge units, Video-LLaVA's shared
      video budget).
    * ``merge_units``: the vision selector can keep whole runs of tokens (``step(..., group=)``), which
      Qwen2-VL's 2x2 patch merger needs.
    """

    name: str
    config_cls: type
    make_selector: Callable[[Any, int], VisionSelector | None] | None
    make_llm_selector: Callable[[Any, int], LLMSelector | None] | None = None
    make_second_stage: Callable[[Any, int], LLMSelector | None] | None = None
    merge_units: bool = False

    @property
    def prunes_in_llm_only(self) -> bool:
        return self.make_selector is None

    def config(self, keep: Any, options: dict[str, Any]) -> Any:
        """The method's config from ``keep`` and its options; an unknown option is a ``TypeError`` that lists
        the valid ones, a bad value the config's own error."""
        import dataclasses

        names = {f.name for f in dataclasses.fields(self.config_cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            valid = sorted(names - {"keep"})
            raise TypeError(f"unknown option(s) {unknown} for method {self.name!r}; valid options: {valid}")
        if isinstance(keep, str) and keep == "auto" and "mass" not in names:
            auto = [
                m.name
                for m in METHODS.values()
                if "mass" in {f.name for f in dataclasses.fields(m.config_cls)}
            ]
            raise ValueError(
                f"keep='auto' (a budget per image from FlowCut's importance mass) is an option of "
                f"{', '.join(repr(m) for m in auto)} only; pass an int count of visual tokens per image for "
                f"{self.name!r}"
            )
        return self.config_cls(keep=keep, **options)


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to :data:`METHODS` under ``spec.name`` (each method file calls this once at import)."""
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register_method takes a MethodSpec, got {type(spec).__name__}")
    if spec.name in METHODS and METHODS[spec.name] != spec:
        raise ValueError(f"a method named {spec.name!r} is already registered")
    METHODS[spec.name] = spec
    return spec


def available_methods() -> list[str]:
    """The registered method names, sorted."""
    return sorted(METHODS)


def get_method(method: str) -> MethodSpec:
    """The :class:`MethodSpec` registered as ``method``; a ``ValueError`` listing the names otherwise."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; available: {available_methods()}")
    return METHODS[method]


# ------------------------------------------------------------------------------------------------------
# Validation of options: every bad value is a ``TypeError`` (wrong kind) or ``ValueError`` (out of range)
# whose message names the option, the accepted values and what was given. The config classes call these in
# ``__post_init__``; each returns the value unchanged (sequences as a tuple) so a frozen dataclass can
# store it.
# ------------------------------------------------------------------------------------------------------


def given(value: object) -> str:
    """``value`` for a message; a long repr is cut (a huge list must not make an unreadable error)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """An int (not a bool) in ``[minimum, maximum]``."""
    rule = f"an int >= {minimum}" if maximum is None else f"an int in [{minimum}, {maximum}]"
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be {rule}, got {type(value).__name__} ({given(value)})")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {value}")
    return value


def check_keep(value: object, name: str = "keep") -> int | float:
    """``keep``: an int >= 1 (visual tokens per image) or a float ratio in (0, 1] of each image's tokens.

    Ratios are resolved per image by the model adapters that support them (Qwen2-VL / Qwen2.5-VL:
    ``max(1, round(ratio * merged tokens))``); the others reject them.
    """
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(
                f"{name} must be an int >= 1 (visual tokens per image) or a float ratio in (0, 1], "
                f"got {name}={value!r}"
            )
        if value > 1.0:  # most likely a count given as a float
            count = f"{name}={int(value)}" if value < 1e9 else f"{name}=64"
            raise TypeError(
                f"{name} must be an int count or a float ratio in (0, 1] of each image's visual tokens, got "
                f"{name}={value!r}; pass the count as an int ({count}) or a ratio such as {name}=0.25"
            )
        if not value > 0.0:
            raise ValueError(
                f"{name}={value!r}: a float {name} is a ratio of each image's visual tokens and must be in "
                f"(0, 1]; pass e.g. {name}=0.25, or an int count such as {name}=64"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{name} must be an int >= 1 (visual tokens per image) or a float ratio in (0, 1], "
            f"got {type(value).__name__} ({given(value)})"
        )
    if value < 1:
        raise ValueError(
            f"{name} must be >= 1 (visual tokens per image) or a float ratio in (0, 1], got {value}"
        )
    return value


def check_ratio(
    name: str, value: object, low: float, high: float, *, low_open: bool = True, high_open: bool = True
) -> float:
    """A finite real number (not a bool) in the interval from ``low`` to ``high`` (open or closed ends)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number in {interval}, got {type(value).__name__} ({given(value)})")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (math.isfinite(value) and above and below):
        raise ValueError(f"{name} must be in {interval}, got {value!r}")
    return float(value)


def check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} ({given(value)})")
    return value


def check_choice(name: str, value: object, choices: Iterable[str], meaning: str = "") -> str:
    """One of ``choices`` (strings); ``meaning`` explains them in the message."""
    options = tuple(choices)
    if not isinstance(value, str) or value not in options:
        listed = " or ".join(repr(c) for c in options)
        raise ValueError(f"{name} must be {listed}{f' ({meaning})' if meaning else ''}, got {given(value)}")
    return value


def check_layers(name: str, value: Any, minimum: int) -> tuple[int, ...]:
    """A non-empty, strictly increasing sequence of ints >= ``minimum`` (decoder layer indices), as a tuple."""
    rule = f"a non-empty, strictly increasing list of ints >= {minimum}, e.g. {name}=({minimum + 2}, {minimum + 6})"
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(f"{name} must be {rule}, got {type(value).__name__} ({given(value)})")
    layers = tuple(value)
    if not layers:
        raise ValueError(f"{name} must be {rule}, got an empty {type(value).__name__}")
    bad = [x for x in layers if isinstance(x, bool) or not isinstance(x, int)]
    if bad:
        raise TypeError(f"{name} must be {rule}; {given(bad[0])} is not an int (got {given(value)})")
    if min(layers) < minimum:
        raise ValueError(f"{name} must be {rule}, got {given(value)}")
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"{name} must be strictly increasing ({rule}), got {given(value)}")
    return layers
