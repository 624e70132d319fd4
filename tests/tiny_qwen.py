"""Tiny Qwen2-VL / Qwen2.5-VL models and prompts built in the tests (random weights, nothing downloaded).

Prompts are written token by token (no tokenizer): text ids, then per image ``<vision_start>``, one
placeholder per merged token, ``<vision_end>``; rows are left-padded. ``pixel_values`` are random flattened
patches of the processor's shape ``(sum t*h*w, C * temporal_patch * patch * patch)``.
"""

from __future__ import annotations

import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

PAD, BOS, EOS = 0, 1, 2
IMAGE, VIDEO, START, END = 10, 11, 12, 13
VOCAB = 64
SUPPRESS = [EOS, IMAGE, VIDEO, START, END]  # no early stop; no placeholders (re-fed prompts would break)
PATCH = 7
MERGE = 2
TEMPORAL = 2


def _text(layers: int) -> dict:
    return {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
        "pad_token_id": PAD,
        "bos_token_id": BOS,
        "eos_token_id": EOS,
    }


def _finish(model, attn: str, dtype, seed: int):
    with torch.no_grad():  # peaked vision attention, as in tests/tiny.py: entropy well below log N
        for blk in model.model.visual.blocks:
            d = blk.attn.qkv.out_features // 3
            blk.attn.qkv.weight[: 2 * d].mul_(40.0**0.5)
    model.generation_config.pad_token_id = PAD
    return model.to(dtype).eval()


def qwen2_vl(seed: int = 0, attn: str = "sdpa", dtype=torch.float32, depth: int = 4, text_layers: int = 3):
    torch.manual_seed(seed)
    vision = {
        "depth": depth,
        "embed_dim": 32,
        "hidden_size": 32,
        "num_heads": 4,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": TEMPORAL,
        "mlp_ratio": 2,
    }
    cfg = Qwen2VLConfig(
        text_config=_text(text_layers),
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    cfg._attn_implementation = attn
    return _finish(Qwen2VLForConditionalGeneration(cfg), attn, dtype, seed)


def qwen2_5_vl(seed: int = 0, attn: str = "sdpa", dtype=torch.float32, depth: int = 4, text_layers: int = 3):
    """Window attention over 2 x 2 merge units (28 px windows) in blocks 0 and 2; full attention in 1 and 3."""
    torch.manual_seed(seed)
    vision = {
        "depth": depth,
        "hidden_size": 32,
        "out_hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 4,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": TEMPORAL,
        "window_size": 2 * MERGE * PATCH,
        "fullatt_block_indexes": [1, 3],
    }
    cfg = Qwen2_5_VLConfig(
        text_config=_text(text_layers),
        vision_config=vision,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=START,
        vision_end_token_id=END,
    )
    cfg._attn_implementation = attn
    return _finish(Qwen2_5_VLForConditionalGeneration(cfg), attn, dtype, seed)


def units(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w // MERGE**2


def prompt_inputs(
    rows: list[list],
    image_grids: list[tuple[int, int, int]] = (),
    video_grids: list[tuple[int, int, int]] = (),
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """``rows``: per row a list of text ids (ints) and ``"image"`` / ``"video"`` markers, in order; the
    markers take the grids in order (row by row). Left-padded, as generation needs."""
    g = torch.Generator().manual_seed(seed)
    images, videos = iter(image_grids), iter(video_grids)
    seqs = []
    for row in rows:
        seq = [BOS]
        for x in row:
            if x == "image":
                seq += [START] + [IMAGE] * units(next(images)) + [END]
            elif x == "video":
                seq += [START] + [VIDEO] * units(next(videos)) + [END]
            else:
                seq.append(int(x))
        seqs.append(seq)
    length = max(map(len, seqs))
    ids = torch.tensor([[PAD] * (length - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in seqs])
    types = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    out = {"input_ids": ids, "attention_mask": mask, "mm_token_type_ids": types}
    flat = 3 * TEMPORAL * PATCH * PATCH
    if image_grids:
        n = sum(t * h * w for t, h, w in image_grids)
        out["pixel_values"] = torch.randn(n, flat, generator=g)
        out["image_grid_thw"] = torch.tensor(image_grids)
    if video_grids:
        n = sum(t * h * w for t, h, w in video_grids)
        out["pixel_values_videos"] = torch.randn(n, flat, generator=g)
        out["video_grid_thw"] = torch.tensor(video_grids)
    return out


def greedy_without_cache(model, inputs: dict, steps: int) -> torch.Tensor:
    """Reference decoding: prompt + new tokens through the (pruned) forward at every step, no KV cache."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    types = inputs["mm_token_type_ids"]
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    for _ in range(steps):
        logits = model(
            input_ids=ids, attention_mask=mask, mm_token_type_ids=types, use_cache=False, **extra
        ).logits
        last = logits[:, -1].clone()
        last[:, SUPPRESS] = float("-inf")  # as generate(suppress_tokens=SUPPRESS)
        nxt = last.argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        mask = torch.cat([mask, torch.ones_like(nxt)], dim=1)
        types = torch.cat([types, torch.zeros_like(nxt, dtype=types.dtype)], dim=1)
    return ids
