"""Everything vlmcut knows about differences between ``transformers`` releases, in one place.

The declared range is ``TESTED_TRANSFORMERS`` (also in ``pyproject.toml``); CI runs the whole suite on the
locked newest release and a fast subset on the oldest one. What changed inside that range and matters to us:

* 5.24 renamed the cache argument and output field ``past_key_values`` -> ``cache`` (the old keyword is
  deprecated, and models hand the new one to their decoder). The decoder-stage engine must read either.
* 5.24 made multimodal outputs carry ``image_outputs`` (a ``BaseModelOutputWithPooling`` whose
  ``pooler_output`` holds one tensor per image); ``image_hidden_states`` became a deprecated alias of that
  list. Before, ``image_hidden_states`` was one tensor.
* 5.23 renamed Video-LLaVA's image input ``pixel_values_images`` -> ``pixel_values`` (processor and model).
* 5.20 added ``activation_checkpointing_enable``; before, only ``gradient_checkpointing_enable``.
"""

from __future__ import annotations

from typing import Any

import torch
import transformers
from torch import nn

TESTED_TRANSFORMERS = (">=5.19", "<5.25")  # keep in step with pyproject.toml and constraints/


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


TRANSFORMERS_VERSION = _version(transformers.__version__)


def outside_tested_range() -> str | None:
    """A message when the installed ``transformers`` is outside ``TESTED_TRANSFORMERS``, else ``None``."""
    checks = {">=": lambda v: TRANSFORMERS_VERSION >= v, "<": lambda v: TRANSFORMERS_VERSION < v}
    for bound in TESTED_TRANSFORMERS:
        op = ">=" if bound.startswith(">=") else "<"
        if not checks[op](_version(bound[len(op) :])):
            return (
                f"transformers {transformers.__version__} is outside the tested range "
                f"{','.join(TESTED_TRANSFORMERS)}"
            )
    return None


# the keyword a model forward takes for its KV cache in this release
CACHE_KWARG = "cache" if TRANSFORMERS_VERSION >= (5, 24) else "past_key_values"
_CACHE_NAMES = ("cache", "past_key_values")
# the keyword Video-LLaVA's forward / generate take for still images in this release
VIDEO_LLAVA_IMAGES_KWARG = "pixel_values" if TRANSFORMERS_VERSION >= (5, 23) else "pixel_values_images"


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The KV cache a forward was called with, whatever the release calls the keyword (or None)."""
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def cache_from_output(output: Any) -> Any:
    """The KV cache a model output carries (``cache`` from 5.24, ``past_key_values`` before), or None."""
    for name in _CACHE_NAMES:
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


def image_features(output: Any) -> torch.Tensor | None:
    """The projected image features a VLM forward fed its language model, as one ``(N, D)`` tensor.

    N is every image token of the batch in order (images, then crops / frames within an image). 5.24 keeps
    them per image in ``output.image_outputs.pooler_output``; earlier releases in ``image_hidden_states``.
    """
    image_outputs = getattr(output, "image_outputs", None)
    if image_outputs is not None:
        feats = image_outputs.pooler_output
    else:
        feats = output.get("image_hidden_states") if hasattr(output, "get") else None
    if feats is None:
        return None
    if isinstance(feats, torch.Tensor):
        return feats.reshape(-1, feats.shape[-1])
    return torch.cat([f.reshape(-1, f.shape[-1]) for f in feats])


def enable_checkpointing(model: nn.Module, use_reentrant: bool) -> None:
    """Activation (gradient) checkpointing on, by the name this release gives it."""
    kwargs = {"use_reentrant": use_reentrant}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def disable_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "activation_checkpointing_disable"):
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()
