"""Which pruning the vLLM plugin runs: the method, its model-level ``keep`` and options (no vLLM import here).

The engine carries them in the model's config, set through ``hf_overrides``::

    {"architectures": ["FlowCutLlavaForConditionalGeneration"],
     "vlmcut": {"method": "flowcut", "keep": 64, "options": {"history_weight": 0.5}}}

:func:`engine_overrides` builds that dict. A request may ask for fewer tokens per image with
``mm_processor_kwargs={"vlmcut_keep": K}`` (at most the model-level ``keep``: vLLM sizes the encoder
budget and profiles memory with the model-level count).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...methods import METHODS, MethodSpec

ARCHITECTURE = "FlowCutLlavaForConditionalGeneration"
CONFIG_KEY = "vlmcut"  # the attribute hf_overrides sets on the model config
REQUEST_KEEP = "vlmcut_keep"  # the per-request mm_processor_kwargs key


def vision_methods() -> dict[str, MethodSpec]:
    """The registered methods that prune in the vision tower only: the placeholder count is then known
    before the encoder runs (vLLM reserves it in the prompt). A two-stage method (FlowCut) runs its vision
    stage, as on LLaVA-1.5 in ``vlmcut.prune``."""
    return {
        name: spec
        for name, spec in sorted(METHODS.items())
        if spec.make_selector is not None and spec.make_llm_selector is None
    }


DECODER_REFUSAL = (
    "{method!r} prunes inside the language model (it drops KV entries of visual tokens after decoder layer "
    "K); vLLM's paged KV cache and its scheduler fix a request's token count when the prompt is placed, so "
    "the vLLM plugin supports only vision-stage methods: {supported}"
)


@dataclass(frozen=True)
class PruneSettings:
    """The model-level pruning of one engine.

    Args:
        method: a vision-stage method (see :func:`vision_methods`).
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
        return METHODS[self.method].make_selector(self.config, keep_patches)


def check_method(method: object) -> str:
    supported = vision_methods()
    if isinstance(method, str) and method in METHODS and method not in supported:
        raise ValueError(DECODER_REFUSAL.format(method=method, supported=", ".join(supported)))
    if not isinstance(method, str) or method not in supported:
        raise ValueError(f"unknown method {method!r} for the vLLM plugin; available: {sorted(supported)}")
    return method


def build_settings(method: object, keep: object, options: Mapping[str, Any] | None = None) -> PruneSettings:
    """Validate a method name, ``keep`` and options the way ``vlmcut.prune`` does (the method's config class
    checks every value). ``feature_layer`` is refused: LLaVA reads it from its config."""
    name = check_method(method)
    options = dict(options or {})
    if "feature_layer" in options:
        raise ValueError("feature_layer is read from the LLaVA config (vision_feature_layer); do not pass it")
    if isinstance(keep, float):
        raise ValueError(f"keep={keep!r}: the vLLM plugin takes an int count of visual tokens per image")
    if keep == "auto":
        raise ValueError(
            "keep='auto': vLLM reserves every image's placeholders before its encoder runs, so the plugin needs "
            "a fixed int count of visual tokens per image (use keep='auto' with vlmcut.prune in transformers)"
        )
    return PruneSettings(name, METHODS[name].config(keep, options))


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
