"""Train the small zoo LLaVA's projector (and, when the projector alone stays under the floor, a LoRA).

Recipe (LLaVA-1.5 style, sized for a 2-core CPU):

* vision tower frozen; its ``hidden_states[-2]`` patch features are computed once per image and cached;
* each training sequence is one image followed by a multi-turn conversation of up to ``turns`` of that
  image's questions (the LLaVA-Instruct format). The first turn is token for token the single-question prompt
  that evaluation uses (:func:`vlmcut.inference.build_prompt`); the image's 256 tokens, which dominate the
  cost, are paid once for several supervised answers;
* loss: cross-entropy on the answer tokens and their ``<|im_end|>`` only; logits are computed at those
  positions only (the tied 49k-row head over every position would cost more than a decoder layer);
* grounding (LLaVA's feature-alignment idea, made cheap): the projected token of every patch that an object
  covers is pulled, by cosine similarity in the tied word-embedding space, towards the embeddings of that
  object's colour word and shape word (two softmaxes over the datasets' colour and shape words). Labels come
  from the data: scene layouts for ``scenes``, the foreground and the questions' answers for easy-VQA.
  Stage 0 trains the projector on this alone (no language-model pass: seconds per step); stages 1-2 keep it
  as an auxiliary term. DINOv2 patch features carry colour linearly (a linear probe reads an object's colour
  from its centre patch at ~96%), but the answer loss alone collapsed to one colour within the first
  run's 120 steps;
* stage 1 trains the projector alone; after it the script measures validation accuracy (the same
  :func:`vlmcut.eval.runner.evaluate` the benchmark uses) and, only if a dataset is under ``lora_if_below``,
  stage 2 adds a rank-``lora_rank`` LoRA on the language model's attention and MLP projections;
* data: the scenes ``train`` split and easy-VQA's ``train`` split. ``validation`` picks nothing but the
  stage-2 decision; ``test`` splits are never read.

The result is one safetensors file: ``linear_1/linear_2`` (projector) plus ``lora.<module>.A/B`` tensors and
a ``lora_scale`` entry in its metadata when a LoRA was trained. :func:`vlmcut.zoo.load_projector_weights`
merges the LoRA into the language model's weights at load time, so the served model is a plain
``LlavaForConditionalGeneration``.

Run: ``python -m vlmcut.zoo.train --out vlmcut/zoo/projector.safetensors`` (see ``--help``).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class TrainConfig:
    """Hyper-parameters of :func:`train`; the defaults produced the shipped weights."""

    stage0_steps: int = 150  # grounding-only projector steps (no language-model pass)
    stage0_batch: int = 32
    stage0_images: int = 640  # images the grounding-only stage cycles over (their features are cached)
    grounding_weight: float = 0.5  # weight of the grounding term in stages 1-2
    grounding_temperature: float = 10.0  # cosine similarities are multiplied by this before the softmax
    grounding_min_cover: float = 0.4  # a patch is labelled when an object covers at least this fraction
    stage1_steps: int = 120
    stage2_steps: int = 400  # at most; fewer when the time budget would not fit them (schedule is kept whole)
    batch_size: int = 4  # conversations (images) per step
    turns: int = 8  # questions per conversation
    lr: float = 1e-3  # projector
    lora_lr: float = 1e-3
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_if_below: float = 0.85  # validation accuracy under which stage 2 adds the LoRA
    weight_decay: float = 0.0
    warmup: int = 20
    seed: int = 0
    scenes_images: int = 2000  # scenes train split: images used
    easy_vqa_images: int = 3600  # easy-VQA train split: images used
    val_n: int = 150  # validation questions per dataset for the stage-2 decision and the final report
    time_budget_s: float = 80 * 60  # whole run; stage 2 is shortened to fit, a hard stop at a step boundary
    log_every: int = 10
    datasets: tuple[str, ...] = ("scenes", "easy-vqa")
    init: str | None = None  # start from these weights (projector, and the LoRA when the file has one)
    extra: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------
# Data: images with their questions, as multi-turn conversations
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    image_key: str  # "<dataset>/<scene_id>": the feature-cache key
    load_image: Callable[[], Any]  # -> PIL image
    qa: list[tuple[str, str]]  # (prompt with the answer hint, canonical answer)
    # -> [(coverage mask (H, W) bool at the image's resolution, colour word or None, shape word or None)]
    load_objects: Callable[[], list[tuple[Any, str | None, str | None]]] | None = None


def conversations(dataset: Any, turns: int, rng: random.Random, max_images: int | None) -> list[Conversation]:
    """One conversation per image (the first ``max_images`` images): its non-existence questions first (they
    are rarer), then existence ones, up to ``turns``, shuffled within the conversation. Prompts are built as
    :meth:`vlmcut.eval.scenes.VQASample.prompt` builds them."""
    from vlmcut.eval.scenes import SHORT_ANSWER_HINT

    by_image: dict[str, list[Any]] = {}
    for record in dataset.records:
        by_image.setdefault(record.scene_id, []).append(record)
    out = []
    for key in list(by_image)[:max_images]:
        records = by_image[key]
        rare = [r for r in records if r.family != "existence"]
        common = [r for r in records if r.family == "existence"]
        rng.shuffle(rare)
        rng.shuffle(common)
        chosen = (rare + common)[:turns]
        rng.shuffle(chosen)
        qa = [(f"{r.question} {SHORT_ANSWER_HINT}", r.answer) for r in chosen]
        objects = (
            partial(_OBJECT_READERS[dataset.name], dataset, key, records)
            if dataset.name in _OBJECT_READERS
            else None
        )
        out.append(Conversation(f"{dataset.name}/{key}", partial(dataset.image_loader, key), qa, objects))
    return out


def _scene_objects(
    dataset: Any, key: str, records: Sequence[Any]
) -> list[tuple[Any, str | None, str | None]]:
    """Visible pixels of every object of a generated scene (later objects occlude earlier ones)."""
    import numpy as np
    from PIL import Image, ImageDraw

    from vlmcut.eval.scenes import draw_object, generate_scene

    match = re.fullmatch(r"scenes-(\w+)-(\d+)-(\d+)", key)
    if match is None:
        raise ValueError(f"not a scenes id: {key!r}")
    size = dataset.image(key).size[0]
    scene = generate_scene(int(match[2]), int(match[3]), image_size=size, split=match[1])
    if scene.scene_id != key:
        raise RuntimeError(f"regenerated {scene.scene_id}, expected {key}")
    owner = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(owner)
    for k, obj in enumerate(scene.objects):
        draw_object(draw, obj, k + 1, 1.0)
    owner_array = np.asarray(owner)
    return [(owner_array == k + 1, obj.color, obj.shape) for k, obj in enumerate(scene.objects)]


def _easy_vqa_objects(
    dataset: Any, key: str, records: Sequence[Any]
) -> list[tuple[Any, str | None, str | None]]:
    """easy-VQA images hold one flat-coloured shape on a light background: the foreground is every pixel far
    from the corner colour; its colour and shape words are read off the image's questions and answers."""
    import numpy as np

    from vlmcut.eval.easyvqa import COLOR_RE, SHAPE_RE

    color = shape = None
    for r in records:
        if r.family == "color":
            color = r.answer
            found = SHAPE_RE.search(r.question)
            shape = shape or (found[1] if found else None)
        elif r.family == "shape":
            shape = r.answer
            found = COLOR_RE.search(r.question)
            color = color or (found[1] if found else None)
    pixels = np.asarray(dataset.image(key).convert("RGB"), dtype=np.int32)
    distance = np.abs(pixels - pixels[0, 0]).sum(-1)
    return [(distance > 96, color, shape)]


_OBJECT_READERS: dict[str, Callable[..., list[tuple[Any, str | None, str | None]]]] = {
    "scenes": _scene_objects,
    "easy-vqa": _easy_vqa_objects,
}


def _segments(processor: Any, qa: Sequence[tuple[str, str]]) -> list[tuple[str, bool]]:
    """The chat-template text of a conversation cut into (text, supervised) pieces.

    Checked against ``processor.apply_chat_template`` so training sees exactly the evaluation format.
    """
    from vlmcut.inference import build_prompt

    image = processor.image_token
    first = build_prompt(processor, qa[0][0])
    pieces: list[tuple[str, bool]] = [(first, False)]
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": qa[0][0]}]}
    ]
    for k, (question, answer) in enumerate(qa):
        if k:
            pieces.append((f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n", False))
            messages.append({"role": "user", "content": question})
        pieces.append((f"{answer}<|im_end|>", True))
        pieces.append(("\n", False))
        messages.append({"role": "assistant", "content": answer})
    rendered = processor.apply_chat_template(messages, add_generation_prompt=False)
    if "".join(p for p, _ in pieces) != rendered:
        raise RuntimeError("training segments do not reproduce the chat template; update _segments")
    assert image in first
    return pieces


def encode(processor: Any, qa: Sequence[tuple[str, str]], image_tokens: int) -> tuple[list[int], list[bool]]:
    """Token ids (the image placeholder expanded to ``image_tokens``) and the supervised-token mask."""
    tok = processor.tokenizer
    image = processor.image_token
    ids: list[int] = []
    mask: list[bool] = []
    for text, supervised in _segments(processor, qa):
        if image in text:
            before, after = text.split(image, 1)
            parts = [tok(before, add_special_tokens=False).input_ids]
            parts.append([tok.convert_tokens_to_ids(image)] * image_tokens)
            parts.append(tok(after, add_special_tokens=False).input_ids)
            piece = [i for p in parts for i in p]
        else:
            piece = tok(text, add_special_tokens=False).input_ids
        ids += piece
        mask += [supervised] * len(piece)
    return ids, mask


# ----------------------------------------------------------------------------------------------------------
# LoRA on the instance being trained (forward hooks; merged into the weights when saved/loaded)
# ----------------------------------------------------------------------------------------------------------


class LoRA(nn.Module):
    """Rank-``r`` update ``scale * B @ A`` for every target ``nn.Linear`` of ``language_model``."""

    def __init__(
        self, language_model: nn.Module, rank: int, alpha: float, targets: Sequence[str] = LORA_TARGETS
    ):
        super().__init__()
        self.scale = alpha / rank
        self.names: list[str] = []
        self.A = nn.ParameterList()
        self.B = nn.ParameterList()
        self._handles = []
        for name, module in language_model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                a = nn.Parameter(torch.empty(rank, module.in_features))
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                b = nn.Parameter(torch.zeros(module.out_features, rank))
                self.names.append(name)
                self.A.append(a)
                self.B.append(b)
                self._handles.append(module.register_forward_hook(self._hook(a, b)))
        if not self.names:
            raise ValueError(f"no nn.Linear named {targets} in the language model")

    def _hook(self, a: nn.Parameter, b: nn.Parameter):
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
            return output + self.scale * F.linear(F.linear(args[0], a), b)

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def load(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``lora.<module>.A/B`` tensors (as :meth:`state` writes them) into this LoRA."""
        with torch.no_grad():
            for name, a, b in zip(self.names, self.A, self.B, strict=True):
                for key, param in ((f"lora.{name}.A", a), (f"lora.{name}.B", b)):
                    if key not in state:
                        raise ValueError(
                            f"the LoRA to resume from has no {key}; was it trained on other targets?"
                        )
                    if state[key].shape != param.shape:
                        raise ValueError(
                            f"{key} has shape {tuple(state[key].shape)}, expected {tuple(param.shape)}: "
                            f"pass the --lora-rank it was trained with"
                        )
                    param.copy_(state[key])

    def state(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, a, b in zip(self.names, self.A, self.B, strict=True):
            out[f"lora.{name}.A"] = a.detach().float().contiguous()
            out[f"lora.{name}.B"] = b.detach().float().contiguous()
        return out


def save_weights(model: Any, path: str | Path, lora: LoRA | None, card: dict[str, Any]) -> Path:
    """Projector (+ LoRA) tensors as float32 safetensors, with the training record in the metadata."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().float().cpu().contiguous()
        for k, v in model.model.multi_modal_projector.state_dict().items()
    }
    metadata = {"format": "vlmcut-small-llava-adapter-1", "card": json.dumps(card)}
    if lora is not None:
        state.update(lora.state())
        metadata["lora_scale"] = repr(lora.scale)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------------------


class FeatureCache:
    """Frozen vision features per image key: ``hidden_states[-2]`` patch tokens, computed once.

    With ``handle`` (a :func:`vlmcut.prune` handle of a vision-stage method on ``model``) the tower prunes as
    it runs, so every cached image holds only the tokens the language model would get, and
    :meth:`kept_indices` gives their positions on the patch grid (to gather per-patch targets). The tower is
    frozen, so its choice for an image never changes and caching it is the same as pruning in every step.
    """

    def __init__(self, model: Any, processor: Any, handle: Any = None):
        self.model = model
        self.processor = processor
        self.handle = handle
        self.cache: dict[str, torch.Tensor] = {}
        self.kept: dict[str, torch.Tensor] = {}
        self.tower_seconds = 0.0  # time spent filling the cache
        self.images = 0

    @torch.no_grad()
    def get(self, conversations_: Sequence[Conversation]) -> torch.Tensor:
        missing = list({c.image_key: c for c in conversations_ if c.image_key not in self.cache}.values())
        if missing:
            start = time.perf_counter()
            images = [c.load_image() for c in missing]
            pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
            inner = self.model.model
            out = inner.vision_tower(pixel_values=pixels, output_hidden_states=True)
            feats = out.hidden_states[self.model.config.vision_feature_layer]
            if self.model.config.vision_feature_select_strategy == "default":
                feats = feats[:, 1:]
            kept = self.handle.kept_indices if self.handle is not None else None
            if self.handle is not None and (kept is None or kept.shape != feats.shape[:2]):
                raise RuntimeError(
                    "the pruned tower's record does not match its output; training with pruning needs a "
                    "method that prunes in the vision tower and keeps a fixed count (flowcut, visionzip, ...)"
                )
            for k, (c, f) in enumerate(zip(missing, feats, strict=True)):
                self.cache[c.image_key] = f.to(torch.bfloat16)  # halves the cache; upcast when used
                if kept is not None:
                    self.kept[c.image_key] = kept[k].clone()
            self.tower_seconds += time.perf_counter() - start
            self.images += len(missing)
        return torch.stack([self.cache[c.image_key].float() for c in conversations_])

    def kept_indices(self, conversations_: Sequence[Conversation]) -> torch.Tensor | None:
        """(B, K) patch positions of the cached tokens, or None when the tower does not prune."""
        if self.handle is None:
            return None
        self.get(conversations_)
        return torch.stack([self.kept[c.image_key] for c in conversations_])


class Grounding:
    """Per-patch colour/shape word targets and the grounding loss on projected image tokens.

    Targets are the index of the covering object's colour in :attr:`colors` and of its shape in
    :attr:`shapes` (``-1``: no object covers ``min_cover`` of the patch, or the word is unknown).
    """

    def __init__(self, model: Any, processor: Any, temperature: float = 10.0, min_cover: float = 0.4):
        from vlmcut.eval.easyvqa import EASY_COLORS, EASY_SHAPES
        from vlmcut.eval.scenes import COLORS, SHAPES

        self.colors = tuple(dict.fromkeys([*COLORS, *EASY_COLORS]))
        self.shapes = tuple(dict.fromkeys([*SHAPES, *EASY_SHAPES]))
        tok = processor.tokenizer
        # an answer is tokenised on its own at the start of the assistant turn: its first token is the word
        ids = [tok(w, add_special_tokens=False).input_ids[0] for w in (*self.colors, *self.shapes)]
        if len(set(ids)) != len(ids):
            raise ValueError("two colour/shape words share their first token; grounding would be ambiguous")
        self.word_ids = torch.tensor(ids)
        self.embeddings = model.get_input_embeddings()
        self.grid = int(round(math.sqrt(model.config.image_seq_length)))
        self.temperature = temperature
        self.min_cover = min_cover
        self.cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def targets(self, conversation: Conversation) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self.cache.get(conversation.image_key)
        if hit is not None:
            return hit
        cells = self.grid * self.grid
        color = torch.full((cells,), -1, dtype=torch.long)
        shape = torch.full((cells,), -1, dtype=torch.long)
        if conversation.load_objects is not None:
            objects = conversation.load_objects()
            if objects:
                masks = torch.stack([torch.as_tensor(m, dtype=torch.float32) for m, _, _ in objects])
                cover = F.adaptive_avg_pool2d(masks[None], self.grid)[0].flatten(1)  # (objects, cells)
                best, owner = cover.max(0)
                for k, (_, c, s) in enumerate(objects):
                    cells_k = (owner == k) & (best >= self.min_cover)
                    if (
                        not cells_k.any()
                    ):  # a small or mostly hidden object: its best-covered patch, if it leads
                        j = int(cover[k].argmax())
                        if owner[j] == k and cover[k, j] > 0:
                            cells_k[j] = True
                    if c in self.colors:
                        color[cells_k] = self.colors.index(c)
                    if s in self.shapes:
                        shape[cells_k] = self.shapes.index(s)
        self.cache[conversation.image_key] = (color, shape)
        return color, shape

    def loss(
        self, image_embeds: torch.Tensor, batch: Sequence[Conversation], kept: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean of the colour and shape cross-entropies over labelled patches (0 when none is labelled).

        ``kept``: (B, K) grid positions of ``image_embeds``' tokens when the tower pruned (targets are
        gathered there); None when every patch is present.
        """
        color, shape = (torch.stack(t) for t in zip(*(self.targets(c) for c in batch), strict=True))
        if kept is not None:
            color, shape = color.gather(1, kept), shape.gather(1, kept)
        if color.shape != image_embeds.shape[:2]:
            raise ValueError(
                f"{image_embeds.shape[1]} image tokens per image but {color.shape[1]} patch targets; pass the "
                f"kept patch positions of a pruned tower"
            )
        words = F.normalize(self.embeddings.weight[self.word_ids].float(), dim=-1)
        logits = self.temperature * F.normalize(image_embeds.float(), dim=-1) @ words.T  # (B, P, words)
        n_colors = len(self.colors)
        terms = []
        for part, target in ((logits[..., :n_colors], color), (logits[..., n_colors:], shape)):
            if (target >= 0).any():
                terms.append(F.cross_entropy(part.flatten(0, 1), target.flatten(), ignore_index=-1))
        return torch.stack(terms).mean() if terms else image_embeds.sum() * 0.0


def batch_loss(
    model: Any,
    processor: Any,
    features: FeatureCache,
    batch: Sequence[Conversation],
    grounding: Grounding | None = None,
    grounding_weight: float = 0.0,
) -> torch.Tensor:
    inner = model.model
    image_id = model.config.image_token_id
    image_features = features.get(batch)  # (B, tokens the tower kept, D)
    encoded = [encode(processor, c.qa, image_features.shape[1]) for c in batch]
    length = max(len(ids) for ids, _ in encoded)
    pad = processor.tokenizer.pad_token_id or 0
    input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
    attention = torch.zeros((len(batch), length), dtype=torch.long)
    supervised = torch.zeros((len(batch), length), dtype=torch.bool)
    for row, (ids, mask) in enumerate(encoded):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention[row, : len(ids)] = 1
        supervised[row, : len(ids)] = torch.tensor(mask)
    embeds = inner.language_model.get_input_embeddings()(input_ids)
    image_embeds = inner.multi_modal_projector(image_features)
    image_mask = (input_ids == image_id).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_mask, image_embeds.to(embeds.dtype))
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=attention).last_hidden_state
    # position t predicts token t+1: keep the positions whose next token is supervised
    where = supervised[:, 1:]
    logits = model.lm_head(hidden[:, :-1][where])
    loss = F.cross_entropy(logits.float(), input_ids[:, 1:][where])
    if grounding is not None and grounding_weight > 0:
        loss = loss + grounding_weight * grounding.loss(image_embeds, batch, features.kept_indices(batch))
    return loss


def grounding_only_loss(
    model: Any, features: FeatureCache, batch: Sequence[Conversation], grounding: Grounding
) -> torch.Tensor:
    """Stage 0: the grounding loss alone (projector forward only)."""
    embeds = model.model.multi_modal_projector(features.get(batch))
    return grounding.loss(embeds, batch, features.kept_indices(batch))


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


def _stream(
    items: Sequence[Conversation], batch_size: int, rng: random.Random
) -> Iterator[list[Conversation]]:
    order = list(range(len(items)))
    while True:
        rng.shuffle(order)
        for k in range(0, len(order) - batch_size + 1, batch_size):
            yield [items[i] for i in order[k : k + batch_size]]


def validate(model: Any, processor: Any, cfg: TrainConfig) -> dict[str, Any]:
    from vlmcut.eval.datasets import load_dataset
    from vlmcut.eval.runner import evaluate

    model.eval()
    out = {}
    for name in cfg.datasets:
        samples = list(load_dataset(name, "validation", n=cfg.val_n, seed=cfg.seed))
        result = evaluate(model, processor, samples, name, progress=False)
        out[name] = {"accuracy": result.accuracy, "per_family": result.per_family, "n": result.n}
    model.train()
    return out


def _run_stage(
    name: str,
    model: Any,
    loss_fn: Callable[[list[Conversation]], torch.Tensor],
    params: list[dict[str, Any]],
    steps: int,
    stream: Iterator[list[Conversation]],
    cfg: TrainConfig,
    deadline: float,
    log: list[dict[str, Any]],
    checkpoint: Callable[[], None] | None = None,
) -> tuple[int, float]:
    """Run up to ``steps`` optimiser steps; returns (steps done, mean seconds per step)."""
    optimizer = torch.optim.AdamW(params, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg.warmup, steps))
    model.train()
    done = 0
    window: list[float] = []
    t0 = time.perf_counter()
    for step in range(steps):
        if time.perf_counter() > deadline:
            print(f"[{name}] time budget reached after {step} steps", flush=True)
            break
        loss = loss_fn(next(stream))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in params for p in g["params"]], 1.0)
        optimizer.step()
        scheduler.step()
        done += 1
        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            rate = (time.perf_counter() - t0) / (step + 1)
            entry = {"stage": name, "step": step + 1, "loss": sum(window) / len(window), "s_per_step": rate}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            window.clear()
            if checkpoint is not None and (step + 1) % (cfg.log_every * 5) == 0:
                checkpoint()
    return done, (time.perf_counter() - t0) / max(1, done)


def _resume_lora(model: Any, cfg: TrainConfig) -> LoRA | None:
    """The LoRA stored in ``cfg.init`` (hooked onto ``model``), or None when that file has none."""
    if Path(cfg.init).suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(cfg.init), framework="pt") as handle:
        state = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith("lora.")}
        metadata = handle.metadata() or {}
    if not state:
        return None
    lora = LoRA(model.model.language_model, cfg.lora_rank, cfg.lora_alpha)
    if abs(float(metadata.get("lora_scale", "nan")) - lora.scale) > 1e-9:
        lora.remove()
        raise ValueError(
            f"{cfg.init} has lora_scale {metadata.get('lora_scale')}, this run alpha/rank = {lora.scale}: "
            f"pass the --lora-rank and --lora-alpha it was trained with"
        )
    lora.load(state)
    for p in lora.parameters():
        p.requires_grad_(False)  # trained again only in stage 2
    return lora


def train(cfg: TrainConfig, out: str | Path, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """Train and save to ``out``; returns the model card (also stored in the file's metadata)."""
    from vlmcut.eval.datasets import load_dataset
    from vlmcut.zoo import load_small_llava

    start = time.perf_counter()
    deadline = start + cfg.time_budget_s
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    model, processor = load_small_llava(cache_dir)
    # a fresh projector from the training seed (the cache may hold an older trained one)
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model.model.multi_modal_projector.load_state_dict(LlavaMultiModalProjector(model.config).state_dict())
    if cfg.init is not None:
        from vlmcut.zoo.small_llava import _projector_state

        model.model.multi_modal_projector.load_state_dict(_projector_state(cfg.init))
    for p in model.parameters():
        p.requires_grad_(False)
    lora = _resume_lora(model, cfg) if cfg.init is not None else None
    projector = list(model.model.multi_modal_projector.parameters())
    for p in projector:
        p.requires_grad_(True)

    limits = {"scenes": cfg.scenes_images, "easy-vqa": cfg.easy_vqa_images}
    items: list[Conversation] = []
    for name in cfg.datasets:
        items += conversations(load_dataset(name, "train"), cfg.turns, rng, limits.get(name))
    print(f"{len(items)} training conversations ({cfg.turns} questions max each)", flush=True)
    stream = _stream(items, cfg.batch_size, rng)
    features = FeatureCache(model, processor)
    log: list[dict[str, Any]] = []

    grounding = Grounding(model, processor, cfg.grounding_temperature, cfg.grounding_min_cover)
    answer_loss = partial(
        batch_loss,
        model,
        processor,
        features,
        grounding=grounding,
        grounding_weight=cfg.grounding_weight,
    )
    s0 = 0
    if cfg.stage0_steps > 0:
        pool = random.Random(cfg.seed + 1).sample(items, min(cfg.stage0_images, len(items)))
        s0, _ = _run_stage(
            "grounding",
            model,
            partial(grounding_only_loss, model, features, grounding=grounding),
            [{"params": projector, "lr": cfg.lr}],
            cfg.stage0_steps,
            _stream(pool, min(cfg.stage0_batch, len(pool)), rng),
            cfg,
            deadline,
            log,
        )
    s1, s1_rate = _run_stage(
        "projector",
        model,
        answer_loss,
        [{"params": projector, "lr": cfg.lr}],
        cfg.stage1_steps,
        stream,
        cfg,
        deadline,
        log,
    )
    if s1 == 0:  # resumed from `init`: the LoRA steps cost about 12.5 s on an idle 2-core CPU
        s1_rate = 12.5 / 1.3
    save_weights(model, out, None, {"stage": "projector", "steps": s1})
    val1 = validate(model, processor, cfg)
    print("validation after stage 1:", json.dumps(val1), flush=True)
    s2 = 0
    below = [n for n, v in val1.items() if v["accuracy"] < cfg.lora_if_below]
    # LoRA steps cost ~1.3x projector steps (measured); keep ~4 minutes for the final validation.
    fit = int((deadline - time.perf_counter() - 240) / (1.3 * s1_rate))
    stage2_steps = min(cfg.stage2_steps, fit)
    if below and stage2_steps > cfg.warmup:
        print(
            f"stage 2: LoRA rank {cfg.lora_rank}, {stage2_steps} steps, because {below} < {cfg.lora_if_below}",
            flush=True,
        )
        if lora is None:
            lora = LoRA(model.model.language_model, cfg.lora_rank, cfg.lora_alpha)
        for p in lora.parameters():
            p.requires_grad_(True)
        s2, _ = _run_stage(
            "lora",
            model,
            answer_loss,
            [
                {"params": projector, "lr": cfg.lr * 0.3},
                {"params": list(lora.parameters()), "lr": cfg.lora_lr},
            ],
            stage2_steps,
            stream,
            cfg,
            deadline,
            log,
            checkpoint=lambda: save_weights(model, out, lora, {"stage": "lora", "partial": True}),
        )
        val2 = validate(model, processor, cfg)
        print("validation after stage 2:", json.dumps(val2), flush=True)
    else:
        val2 = None
    card = {
        "config": asdict(cfg),
        "steps": {"grounding": s0, "projector": s1, "lora": s2},
        "conversations": len(items),
        "train_seconds": round(time.perf_counter() - start, 1),
        "validation_stage1": val1,
        "validation_final": val2 or val1,
        "lora": None
        if lora is None
        else {"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "targets": LORA_TARGETS},
        "log": log,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    save_weights(model, out, lora, card)
    Path(out).with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    return card


# ----------------------------------------------------------------------------------------------------------
# Training with pruning: two arms from the same weights on the same batches, stepped side by side
# ----------------------------------------------------------------------------------------------------------


class TrainArm:
    """One model of a side-by-side comparison: projector + LoRA steps (the recipe's stage 2), optionally with a
    vision-stage pruning method active in the tower (``prune=(method, keep)``)."""

    def __init__(
        self, name: str, cfg: TrainConfig, steps: int, cache_dir: Any, prune: tuple[str, int] | None
    ):
        import vlmcut
        from vlmcut.zoo import load_small_llava
        from vlmcut.zoo.small_llava import _projector_state

        self.name = name
        model, processor = load_small_llava(cache_dir)
        model.model.multi_modal_projector.load_state_dict(_projector_state(cfg.init))
        for p in model.parameters():
            p.requires_grad_(False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)  # the same LoRA initialisation in every arm
            self.lora = _resume_lora(model, cfg) or LoRA(
                model.model.language_model, cfg.lora_rank, cfg.lora_alpha
            )
        projector = list(model.model.multi_modal_projector.parameters())
        for p in [*projector, *self.lora.parameters()]:
            p.requires_grad_(True)
        self.params = [
            {"params": projector, "lr": cfg.lr * 0.3},
            {"params": list(self.lora.parameters()), "lr": cfg.lora_lr},
        ]
        self.handle = vlmcut.prune(model, prune[0], keep=prune[1]) if prune is not None else None
        self.model, self.processor = model, processor
        self.features = FeatureCache(model, processor, self.handle)
        self.grounding = Grounding(model, processor, cfg.grounding_temperature, cfg.grounding_min_cover)
        self.cfg = cfg
        self.optimizer = torch.optim.AdamW(self.params, weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(cfg.warmup, steps))
        self.seconds: list[float] = []
        self.losses: list[float] = []
        self.image_tokens = 0
        model.train()

    def step(self, batch: Sequence[Conversation]) -> None:
        """One optimiser step; its time excludes the frozen tower (cached before the clock starts)."""
        self.image_tokens = int(self.features.get(batch).shape[1])
        start = time.perf_counter()
        loss = batch_loss(
            self.model, self.processor, self.features, batch, self.grounding, self.cfg.grounding_weight
        )
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in self.params for p in g["params"]], 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.seconds.append(time.perf_counter() - start)
        self.losses.append(loss.item())

    def save(self, path: Path, card: dict[str, Any]) -> Path:
        return save_weights(self.model, path, self.lora, card)


def parse_prune(text: str) -> tuple[str, int]:
    """``"flowcut@64"`` -> ``("flowcut", 64)``."""
    from vlmcut.methods import available_methods

    method, at, keep = text.partition("@")
    if not at or method not in available_methods() or not keep.isdigit() or int(keep) < 1:
        raise ValueError(
            f"--compare must be METHOD@KEEP with METHOD one of {', '.join(available_methods())} and KEEP an "
            f"integer >= 1, got {text!r}"
        )
    return method, int(keep)


def compare_training(
    cfg: TrainConfig, prune: str, out_dir: str | Path, cache_dir: str | Path | None = None
) -> dict[str, Any]:
    """Train two arms from ``cfg.init`` for ``cfg.stage2_steps`` projector + LoRA steps on the same batches:
    ``unpruned`` and ``<method><keep>`` (the method active in the tower). Steps alternate between the arms
    (which one goes first alternates too), so both see the same machine load; the step time excludes the
    frozen tower in both (its features are cached per image). Writes ``<arm>.safetensors`` and
    ``training.json`` (per-step seconds and losses, the ratio, the tower's cost per image) to ``out_dir``."""
    if cfg.init is None:
        raise ValueError("a training comparison needs --init: both arms must start from the same weights")
    method, keep = parse_prune(prune)
    from vlmcut.eval.datasets import load_dataset

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    limits = {"scenes": cfg.scenes_images, "easy-vqa": cfg.easy_vqa_images}
    items: list[Conversation] = []
    for name in cfg.datasets:
        items += conversations(load_dataset(name, "train"), cfg.turns, rng, limits.get(name))
    stream = _stream(items, cfg.batch_size, rng)
    steps = cfg.stage2_steps
    arms = [
        TrainArm("unpruned", cfg, steps, cache_dir, None),
        TrainArm(f"{method}{keep}", cfg, steps, cache_dir, (method, keep)),
    ]
    print(f"{len(items)} conversations; {steps} steps per arm: {', '.join(a.name for a in arms)}", flush=True)
    for step in range(steps):
        batch = next(stream)
        for arm in arms if step % 2 == 0 else arms[::-1]:
            arm.step(batch)
        if (step + 1) % cfg.log_every == 0 or step + 1 == steps:
            window = slice(max(0, step + 1 - cfg.log_every), step + 1)
            print(
                json.dumps(
                    {
                        "step": step + 1,
                        **{
                            a.name: {
                                "loss": round(sum(a.losses[window]) / len(a.losses[window]), 4),
                                "s_per_step": round(sum(a.seconds[window]) / len(a.seconds[window]), 3),
                            }
                            for a in arms
                        },
                    }
                ),
                flush=True,
            )
        if time.perf_counter() - start > cfg.time_budget_s:
            raise RuntimeError(
                f"time budget of {cfg.time_budget_s:.0f} s reached after {step + 1} of {steps} steps; the two arms "
                f"must train the same schedule: give a larger --time-budget-s or fewer --stage2-steps"
            )
    warm = slice(min(cfg.warmup, steps // 2), None)  # the first steps also fill caches and allocators
    record: dict[str, Any] = {
        "config": asdict(cfg),
        "compare": prune,
        "steps": steps,
        "conversations": len(items),
        "wall_seconds": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "arms": {},
    }
    for arm in arms:
        timed = arm.seconds[warm]
        record["arms"][arm.name] = {
            "image_tokens": arm.image_tokens,
            "s_per_step_mean": sum(timed) / len(timed),
            "s_per_step_median": sorted(timed)[len(timed) // 2],
            "tower_ms_per_image": 1000 * arm.features.tower_seconds / max(1, arm.features.images),
            "loss_first10": sum(arm.losses[:10]) / len(arm.losses[:10]),
            "loss_last10": sum(arm.losses[-10:]) / len(arm.losses[-10:]),
            "seconds": [round(x, 4) for x in arm.seconds],
            "losses": [round(x, 4) for x in arm.losses],
        }
    base, pruned = (record["arms"][a.name] for a in arms)
    record["step_time_ratio"] = base["s_per_step_mean"] / pruned["s_per_step_mean"]
    for arm in arms:
        card = {
            "stage": "compare",
            "arm": arm.name,
            "steps": {"lora": steps},
            "init": cfg.init,
            "config": asdict(cfg),
            "torch": torch.__version__,
        }
        arm.save(out / f"{arm.name}.safetensors", card)
        if arm.handle is not None:
            arm.handle.remove()
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return record


def compare_report(out_dir: str | Path, arms: Sequence[str]) -> str:
    """Markdown: each arm's test accuracy (from ``vlmcut eval --sweep --out <out_dir>/eval-<arm>`` cells) at
    every stored budget, and the later arms' paired 95 % interval against the first, with the step times."""
    from vlmcut.eval.runner import EvalResult
    from vlmcut.eval.stats import paired_bootstrap
    from vlmcut.eval.store import ResultStore

    out = Path(out_dir)
    record = json.loads((out / "training.json").read_text())
    cells: dict[str, dict[tuple[str, str], EvalResult]] = {}
    for arm in arms:
        directory = out / f"eval-{arm}"
        rows = list(ResultStore.read_all(directory))
        if not rows:
            raise ValueError(
                f"no evaluation cells in {directory}; run vlmcut eval --sweep --out {directory} first"
            )
        cells[arm] = {(r["dataset"], r["cell"]): EvalResult.from_row(r) for r in rows}
    lines = [
        f"Same start (`{record['config']['init']}`), same {record['steps']} batches of "
        f"{record['config']['batch_size']} conversations, projector + LoRA rank {record['config']['lora_rank']}.",
        "",
        "| arm | visual tokens in training | s / step (mean) | s / step (median) | tower ms / image | loss, first 10 -> last 10 steps |",
        "|---|---|---|---|---|---|",
    ]
    for arm in arms:
        a = record["arms"][arm]
        lines.append(
            f"| {arm} | {a['image_tokens']} | {a['s_per_step_mean']:.2f} | {a['s_per_step_median']:.2f} | "
            f"{a['tower_ms_per_image']:.0f} | {a['loss_first10']:.3f} -> {a['loss_last10']:.3f} |"
        )
    lines += [
        "",
        f"Step-time ratio (unpruned / pruned, means after warm-up): **{record['step_time_ratio']:.2f}x**.",
        "",
        "| dataset | tested at | "
        + " | ".join(f"trained {a}" for a in arms)
        + " | "
        + " | ".join(f"{a} - {arms[0]} (95 % paired)" for a in arms[1:])
        + " |",
        "|---|---|" + "---|" * (2 * len(arms) - 1),
    ]
    keys = sorted({k for arm in arms for k in cells[arm]}, key=lambda k: (k[0], k[1] != "unpruned", k[1]))
    for dataset, cell in keys:
        results = [cells[arm].get((dataset, cell)) for arm in arms]
        if any(r is None for r in results):
            continue
        row = f"| {dataset} | {cell} (n={results[0].n}) | " + " | ".join(
            f"{100 * r.accuracy:.1f}" for r in results
        )
        for r in results[1:]:
            if len(r.correct) != len(results[0].correct):
                raise ValueError(f"{dataset} {cell}: the arms answered different numbers of questions")
            row += f" | {paired_bootstrap(r.correct, results[0].correct).text()}"
        lines.append(row + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmcut.zoo.train", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="vlmcut/zoo/projector.safetensors")
    parser.add_argument("--cache-dir", default=None)
    parser.add_argument(
        "--init", default=None, help="start from these projector weights (skip stage 1 with --stage1-steps 0)"
    )
    parser.add_argument(
        "--compare",
        default=None,
        metavar="METHOD@KEEP",
        help="train two arms from --init side by side for --stage2-steps projector + LoRA steps, unpruned and "
        "with METHOD@KEEP active in the tower; --out is then a directory",
    )
    parser.add_argument(
        "--compare-report",
        nargs="+",
        default=None,
        metavar="ARM",
        help="write --out/report.md from --out/training.json and --out/eval-<ARM> (first ARM = reference)",
    )
    defaults = TrainConfig()
    for key, value in asdict(defaults).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            parser.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults) if hasattr(args, k)})
    if args.compare_report is not None:
        try:
            text = compare_report(args.out, args.compare_report)
        except (OSError, ValueError, KeyError) as err:
            parser.error(f"--compare-report: {err}")
        (Path(args.out) / "report.md").write_text(text)
        print(text)
        return 0
    if args.compare is not None:
        if cfg.init is None:
            parser.error("--compare needs --init: both arms must start from the same weights")
        try:
            parse_prune(args.compare)
        except ValueError as err:
            parser.error(str(err))
        record = compare_training(cfg, args.compare, args.out, args.cache_dir)
        print(json.dumps({k: record[k] for k in ("steps", "wall_seconds", "step_time_ratio")}, indent=2))
        return 0
    card = train(cfg, args.out, args.cache_dir)
    print(json.dumps({k: card[k] for k in ("steps", "train_seconds", "validation_final")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
