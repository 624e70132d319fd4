"""Which pruning the vLLM plugin runs: the method, its model-level ``keep`` and options (no vLLM import here).

The engine carries them in the model's config, set through ``hf_overrides``::

    {"architectures": ["FlowCutLlavaForConditionalGeneration"],
     "vlmcut": {"method": "flowcut", "keep": 64, "options": {"history_weight": 0.5}}}

:func:`engine_overrides` builds that dict. A request may ask for fewer tokens per image with
``mm_processor_kwargs={"vlmcut_keep": K}`` (at most the model-level ``keep``: vLLM sizes the encoder
budget and profiles memory with the model-level count).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ...methods.fastervlm import FasterVLMConfig, FasterVLMSelector
from ...methods.flowcut import FlowCutConfig, FlowCutSelector
from ...methods.reference import GridConfig, GridSelector, RandomConfig, RandomSelector
from ...methods.visionzip import VisionZipConfig, VisionZipSelector

ARCHITECTURE = "FlowCutLlavaForConditionalGeneration"
CONFIG_KEY = "vlmcut"  # the attribute hf_overrides sets on the model config
REQUEST_KEEP = "vlmcut_keep"  # the per-request mm_processor_kwargs key

# Vision-stage methods: (config class, selector for a patch budget). The plugin prunes inside the vision
# tower only, so the placeholder count is known before the encoder runs (vLLM reserves it in the prompt).
VISION_METHODS: dict[str, tuple[type, Callable[[Any, int], Any]]] = {
    "flowcut": (FlowCutConfig, lambda cfg, keep: FlowCutSelector(cfg, keep=keep)),
    "visionzip": (VisionZipConfig, lambda cfg, keep: VisionZipSelector(cfg, keep)),
    "fastervlm": (FasterVLMConfig, lambda cfg, keep: FasterVLMSelector(cfg, keep)),
    "random": (RandomConfig, lambda cfg, keep: RandomSelector(cfg, keep)),
    "grid": (GridConfig, lambda cfg, keep: GridSelector(cfg, keep)),
}

# Methods that prune inside the language model: why the plugin refuses them.
DECODER_METHODS = ("fastv", "pdrop", "sparsevlm")
DECODER_REFUSAL = (
    "{method!r} prunes inside the language model (it drops KV entries of visual tokens after decoder layer "
    "K); vLLM's paged KV cache and its scheduler fix a request's token count when the prompt is placed, so "
    "the vLLM plugin supports only vision-stage methods: " + ", ".join(VISION_METHODS)
)


@dataclass(frozen=True)
class PruneSettings:
    """The model-level pruning of one engine.

    Args:
        method: a vision-stage method (see ``VISION_METHODS``).
        config: that method's frozen config, validated by its own ``__post_init__``; ``config.keep`` is the
            model-level number of visual tokens per image that reach the language model.
    """

    method: str
    config: Any

    @property
    def keep(self) -> int:
        return int(self.config.keep)

    def selector(self, keep_patches: int) -> Any:
        """A fresh selector for one image that keeps ``keep_patches`` patch tokens."""
        return VISION_METHODS[self.method][1](self.config, keep_patches)


def check_method(method: object) -> str:
    if method in DECODER_METHODS:
        raise ValueError(DECODER_REFUSAL.format(method=method))
    if not isinstance(method, str) or method not in VISION_METHODS:
        raise ValueError(
            f"unknown method {method!r} for the vLLM plugin; available: {sorted(VISION_METHODS)}"
        )
    return method


def build_settings(method: object, keep: object, options: Mapping[str, Any] | None = None) -> PruneSettings:
    """Validate a method name, ``keep`` and options the way ``vlmcut.prune`` does (the config class checks
    every value). ``feature_layer`` is refused: LLaVA reads it from its config."""
    name = check_method(method)
    config_cls = VISION_METHODS[name][0]
    options = dict(options or {})
    if "feature_layer" in options:
        raise ValueError("feature_layer is read from the LLaVA config (vision_feature_layer); do not pass it")
    fields = {f.name for f in dataclasses.fields(config_cls)} - {"keep", "feature_layer"}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise TypeError(f"unknown option(s) {unknown} for method {name!r}; valid options: {sorted(fields)}")
    if isinstance(keep, float):
        raise ValueError(f"keep={keep!r}: the vLLM plugin takes an int count of visual tokens per image")
    return PruneSettings(name, config_cls(keep=keep, **options))


def settings_from_config(hf_config: Any) -> PruneSettings:
    """The settings stored on the model config by :func:`engine_overrides`."""
    raw = getattr(hf_config, CONFIG_KEY, None)
    if not isinstance(raw, Mapping) or "keep" not in raw:
        raise ValueError(
            f"{ARCHITECTURE} needs its pruning settings in the model config: pass "
            f"hf_overrides=vlmcut.integrations.vllm.engine_overrides(method, keep) (got {CONFIG_KEY}={raw!r})"
        )
    return build_settings(raw.get("method", "flowcut"), raw["keep"], raw.get("options"))


def engine_overrides(method: str = "flowcut", keep: int = 64, **options: Any) -> dict[str, Any]:
    """``hf_overrides`` for ``vllm.LLM`` / ``vllm serve`` that select the pruned LLaVA with this pruning.

    The values are validated here, so a bad option fails before an engine starts.
    """
    build_settings(method, keep, options)
    return {"architectures": [ARCHITECTURE], CONFIG_KEY: {"method": method, "keep": keep, "options": options}}


def request_keep(mm_kwargs: Mapping[str, object], model_keep: int) -> int:
    """A request's ``vlmcut_keep`` (default: the model-level ``keep``); must not exceed the model level."""
    value = mm_kwargs.get(REQUEST_KEEP)
    if value is None:
        return model_keep
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{REQUEST_KEEP} must be an int >= 1, got {value!r}")
    if value > model_keep:
        raise ValueError(
            f"{REQUEST_KEEP}={value} exceeds the engine's keep={model_keep}: vLLM sized its encoder budget "
            f"for {model_keep} tokens per image; start the engine with a larger keep"
        )
    return value
