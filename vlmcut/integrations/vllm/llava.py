"""``FlowCutLlavaForConditionalGeneration``: vLLM's LLaVA-1.5 with vision-stage pruning (CLIP or SigLIP tower).

A subclass of vLLM's own LLaVA under a new architecture name (selected with ``hf_overrides``); the stock
``LlavaForConditionalGeneration`` stays as it is. What differs:

* the placeholder count: every image gets ``min(keep, unpruned count)`` placeholders, ``keep`` being the
  request's ``vlmcut_keep`` (``mm_processor_kwargs``) or the model-level one. The processor ships that
  budget as a per-image field, so vLLM's multimodal cache keys include it and the model reads it back;
* the tower runs one image at a time with that image's selector (:mod:`.tower`), then the projector;
* checkpoints saved by transformers 5 (``vision_tower.embeddings...``, no ``vision_model`` level) load.

Importing this module imports vLLM (and torch); ``vlmcut.integrations.vllm.register`` imports it lazily.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from . import ensure_pixtral_import
from .settings import ARCHITECTURE, REQUEST_KEEP, request_keep, settings_from_config
from .tower import TowerPruning, nest_tower_names

ensure_pixtral_import()  # vLLM's llava module imports its pixtral module (see ensure_pixtral_import)

from vllm.model_executor.models.clip import CLIPVisionModel  # noqa: E402
from vllm.model_executor.models.llava import (  # noqa: E402
    LlavaDummyInputsBuilder,
    LlavaForConditionalGeneration,
    LlavaMultiModalProcessor,
    LlavaProcessingInfo,
)
from vllm.model_executor.models.siglip import SiglipVisionModel  # noqa: E402
from vllm.multimodal import MULTIMODAL_REGISTRY  # noqa: E402
from vllm.multimodal.inputs import MultiModalFieldConfig  # noqa: E402
from vllm.multimodal.parse import ImageEmbeddingItems, ImageProcessorItems  # noqa: E402
from vllm.multimodal.processing import PromptReplacement  # noqa: E402


def _without_request_keep(kwargs: Mapping[str, object]) -> dict[str, object]:
    return {k: v for k, v in kwargs.items() if k != REQUEST_KEEP}


def _feature_offset(hf_config: Any) -> int:
    """Features per image minus kept patch tokens: ``+1`` for a CLS token that reaches the LLM, ``-1`` for
    the ``"default"`` strategy's dropped first token (CLIP ``"default"``: 0, ``"full"``: +1; SigLIP
    ``"full"``: 0), as in ``vlmcut.prune``'s LLaVA adapter."""
    has_cls = hf_config.vision_config.model_type == "clip_vision_model"
    return int(has_cls) - int(hf_config.vision_feature_select_strategy == "default")


def _check_keep(keep: int, offset: int) -> None:
    if keep - offset < 1:
        raise ValueError(
            f"keep={keep} leaves no patch token: {offset} of each image's features is the CLS token, so keep "
            f"must be >= {offset + 1}"
        )


class PrunedLlavaProcessingInfo(LlavaProcessingInfo):
    """LLaVA's processing info with pruned placeholder counts (the model-level ``keep`` by default)."""

    def get_hf_processor(self, **kwargs: object):
        return super().get_hf_processor(**_without_request_keep(kwargs))

    def model_keep(self) -> int:
        return settings_from_config(self.get_hf_config()).keep

    def get_num_image_tokens(self, *, image_width: int, image_height: int, keep: int | None = None) -> int:
        full = super().get_num_image_tokens(image_width=image_width, image_height=image_height)
        keep = self.model_keep() if keep is None else keep
        _check_keep(keep, _feature_offset(self.get_hf_config()))
        return min(keep, full)


class PrunedLlavaMultiModalProcessor(LlavaMultiModalProcessor):
    """Strips ``vlmcut_keep`` before the HF processor, ships it per image, and sizes the placeholders."""

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
        return super()._call_hf_processor(hf_data, _without_request_keep(hf_kwargs))

    def _postprocess_hf_mm_data(self, mm_inputs, hf_processor_mm_kwargs, processed_data):
        processed_data = super()._postprocess_hf_mm_data(mm_inputs, hf_processor_mm_kwargs, processed_data)
        pixel_values = processed_data.get("pixel_values")
        if pixel_values is not None:
            keep = request_keep(hf_processor_mm_kwargs, self.info.model_keep())
            processed_data[REQUEST_KEEP] = torch.full((len(pixel_values),), keep, dtype=torch.long)
        return processed_data

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields[REQUEST_KEEP] = MultiModalFieldConfig.batched("image")
        return fields

    def _get_prompt_updates(
        self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs
    ) -> Sequence[PromptReplacement]:
        image_token_id = self.info.get_hf_config().image_token_index
        keep = request_keep(hf_processor_mm_kwargs, self.info.model_keep())

        def placeholders(item_idx: int) -> list[int]:
            images = mm_items.get_items("image", (ImageEmbeddingItems, ImageProcessorItems))
            if isinstance(images, ImageEmbeddingItems):  # precomputed features: as many as given
                return [image_token_id] * images.get_feature_size(item_idx)
            size = images.get_image_size(item_idx)
            count = self.info.get_num_image_tokens(
                image_width=size.width, image_height=size.height, keep=keep
            )
            return [image_token_id] * count

        return [PromptReplacement(modality="image", target=[image_token_id], replacement=placeholders)]


def _tp_gather() -> Any:
    """All heads from this rank's shard (tensor parallelism), or ``None`` with one rank."""
    from vllm.distributed import get_tensor_model_parallel_world_size, tensor_model_parallel_all_gather

    if get_tensor_model_parallel_world_size() == 1:
        return None
    return lambda x: tensor_model_parallel_all_gather(x.contiguous(), dim=-1)


@MULTIMODAL_REGISTRY.register_processor(
    PrunedLlavaMultiModalProcessor, info=PrunedLlavaProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class FlowCutLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    """vLLM's LLaVA-1.5 with a vlmcut vision-stage method in its tower (see the module docstring).

    Modifications: ``embed_multimodal`` encodes one image at a time with that image's budget and pruning;
    ``load_weights`` nests transformers-5 tower names. Everything else is vLLM's LLaVA.
    """

    def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        cfg = self.config
        self.pruning = settings_from_config(cfg)
        if isinstance(cfg.vision_feature_layer, (list, tuple)):
            raise NotImplementedError(
                f"{ARCHITECTURE}: a list vision_feature_layer (features of several layers) is not supported"
            )
        if not isinstance(self.vision_tower, (CLIPVisionModel, SiglipVisionModel)):
            raise NotImplementedError(
                f"{ARCHITECTURE} prunes CLIP and SigLIP towers; this model has {type(self.vision_tower).__name__}"
            )
        self._offset = _feature_offset(cfg)
        _check_keep(self.pruning.keep, self._offset)
        has_cls = isinstance(self.vision_tower, CLIPVisionModel)
        self._tower = TowerPruning(self.vision_tower, has_cls=has_cls, gather_heads=_tp_gather())

    def embed_multimodal(self, **kwargs: object):
        keeps = kwargs.pop(REQUEST_KEEP, None)
        image_input = self._parse_and_validate_image_input(**kwargs)
        if image_input is None:
            return []
        if image_input["type"] != "pixel_values":  # image_embeds: features given, nothing to prune
            return self._process_image_input(image_input)
        pixel_values = image_input["pixel_values"]
        n = len(pixel_values)
        keeps = (
            [self.pruning.keep] * n if keeps is None else [int(k) for k in torch.as_tensor(keeps).flatten()]
        )
        if len(keeps) != n:
            raise ValueError(f"{REQUEST_KEEP}: {len(keeps)} budgets for {n} images")

        def tower(x: torch.Tensor) -> torch.Tensor:
            return self._image_pixels_to_features(self.vision_tower, x)

        features = []
        for image, keep in zip(pixel_values, keeps, strict=True):
            selector = self.pruning.selector(keep - self._offset)
            features.append(self._tower.run(tower, image.unsqueeze(0), selector)[0])
        sizes = [f.shape[0] for f in features]
        return torch.split(self.multi_modal_projector(torch.cat(features)), sizes)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(nest_tower_names(weights))
