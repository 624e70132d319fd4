"""Video-LLaVA (``VideoLlavaForConditionalGeneration``): images and 8-frame videos, pruned per frame or with a
budget shared across frames. Being built: :func:`attach_video_llava` recognises no model yet."""

from __future__ import annotations

from typing import Any


def attach_video_llava(model: Any, spec: Any, config: Any) -> Any | None:
    """The attachment for a Video-LLaVA model, or ``None`` when ``model`` is not one."""
    return None
