"""Tiny configs of the real transformers classes, built in the tests (nothing is downloaded)."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    SiglipVisionConfig,
    SiglipVisionModel,
)

IMAGE = 56
PATCH = 7
GRID = IMAGE // PATCH  # 8 x 8 = 64 patches
WORDS = "what is in the image describe a red blue green circle square left right yes no how many".split()


def sharpen(model: torch.nn.Module, factor: float = 40.0) -> torch.nn.Module:
    """Scale query/key weights so random-init attention is peaked (entropy well below log N)."""
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.endswith(("q_proj", "k_proj")) and isinstance(mod, torch.nn.Linear):
                mod.weight.mul_(factor**0.5)
    return model


def clip_config(layers: int = 6, attn: str = "sdpa") -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
        attn_implementation=attn,
    )


def clip_tower(layers: int = 6, attn: str = "sdpa", seed: int = 0, dtype=torch.float64) -> CLIPVisionModel:
    torch.manual_seed(seed)
    return sharpen(CLIPVisionModel(clip_config(layers, attn))).to(dtype).eval()


def siglip_tower(
    layers: int = 6, attn: str = "sdpa", seed: int = 0, dtype=torch.float64
) -> SiglipVisionModel:
    torch.manual_seed(seed)
    cfg = SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
        attn_implementation=attn,
    )
    return sharpen(SiglipVisionModel(cfg)).to(dtype).eval()


def dinov2_tower(layers: int = 6, attn: str = "sdpa", seed: int = 0, dtype=torch.float64) -> Dinov2Model:
    torch.manual_seed(seed)
    cfg = Dinov2Config(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
        attn_implementation=attn,
    )
    return sharpen(Dinov2Model(cfg)).to(dtype).eval()


def pixels(batch: int = 2, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, IMAGE, IMAGE, generator=g).to(dtype)


# ---------------------------------------------------------------------------------------------------
# LLaVA
# ---------------------------------------------------------------------------------------------------


def tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + ["USER:", "ASSISTANT:", "?", "\n"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    fast.padding_side = "left"
    return fast


def processor() -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}, do_convert_rgb=True
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer(),
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
    )


def llama_config(tok, layers: int, max_position_embeddings: int = 512) -> LlamaConfig:
    """The tiny Llama language model of the tiny LLaVA / LLaVA-NeXT (GQA: 4 query heads, 2 key heads)."""
    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )


def llava(
    seed: int = 0,
    attn: str = "sdpa",
    dtype=torch.float32,
    strategy: str = "default",
    layers: int = 4,
    text_layers: int = 2,
):
    tok = tokenizer()
    torch.manual_seed(seed)
    text = llama_config(tok, text_layers)
    cfg = LlavaConfig(
        vision_config=clip_config(layers, attn).to_dict(),
        text_config=text.to_dict(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    cfg.vision_config.model_type = "clip_vision_model"
    cfg._attn_implementation = attn
    model = LlavaForConditionalGeneration(cfg)
    sharpen(model.model.vision_tower)
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.to(dtype).eval()


def images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)) for _ in range(n)]


def greedy_without_cache(model, inputs, steps: int) -> torch.Tensor:
    """Reference decoding: the whole sequence through the (pruned) forward at every step, no KV cache.
    Every input other than ``input_ids`` / ``attention_mask`` (pixel_values, image_sizes) goes in as is."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    for _ in range(steps):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **extra).logits
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
    return ids


def mask_keys_hook(dropped: torch.Tensor):
    """A decoder-layer forward pre-hook (``with_kwargs=True``) that hides the ``dropped`` columns (T,) as
    keys: the oracle for pruning inside the language model (a one-row batch; builds the causal mask when
    transformers passes none)."""

    def hook(module, args, kwargs):
        mask = kwargs["attention_mask"]
        t = dropped.shape[0]
        if mask is None:
            mask = torch.full((1, 1, t, t), torch.finfo(torch.float32).min).triu(1)
        mask = mask.clone()
        mask[..., dropped] = torch.finfo(mask.dtype).min
        kwargs["attention_mask"] = mask
        return args, kwargs

    return hook
