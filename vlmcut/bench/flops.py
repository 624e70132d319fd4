"""Analytic FLOPs of a vision-language model's prefill and decode, with per-layer token counts.

Pruning changes the sequence length layer by layer (FlowCut shrinks it inside the vision encoder, FastV
and PDrop inside the LLM), so every function takes *a list of token counts, one per layer*; an ``int``
means "the same count at every layer". All results are in FLOPs (or bytes); divide by ``1e12`` for TFLOPs.

What is counted (per layer, ``n`` tokens, hidden ``d``, MLP width ``m``, ``H`` query heads and ``Hkv``
key/value heads of size ``dh``; one multiply-accumulate (MAC) = ``flops_per_mac`` FLOPs, default 2):

* **Vision encoder** (CLIP / Qwen2-VL ViT): ``n * (4 d^2 + 2 d m)`` MACs for q, k, v, o and the 2-matrix
  MLP, plus ``2 n^2 d`` for ``QK^T`` and ``AV`` (bidirectional) when ``vision_attention`` is on; plus the
  patch embedding (``patches * C * [T] * p^2 * d``). Only the layers that run are counted: Hugging Face
  and the original LLaVA run all 24 CLIP layers although the model reads layer 22's output (``hidden_states[-2]``).
* **Projector**: every token through every linear (LLaVA: ``1024*4096 + 4096*4096`` per visual token;
  Qwen2-VL merger: ``5120*5120 + 5120*3584`` per merged token).
* **LLM decoder layer**: ``n * (d*H*dh + 2*d*Hkv*dh + H*dh*d + 3*d*m)`` MACs (SwiGLU: gate, up, down),
  plus attention ``QK^T`` + ``AV``: ``2 n^2 H dh`` MACs (``"full"``: the dense rectangle a math/SDPA kernel
  computes), ``n (n+1) H dh`` (``"causal"``: only the lower triangle, what a FlashAttention kernel does),
  or nothing (``"none"``).
* **lm_head**: ``d * V`` per position it is applied to: every position (``"all"``: LLaVA's release and
  ``transformers`` < 4.45 computed logits for the whole prompt), only the last (``"last"``:
  ``generate`` with ``logits_to_keep=1``), or none.

Norms, activations, softmax, RoPE, biases and embeddings lookups are ignored (< 0.5 %).

The paper's accounting (Table 5, Table 9; FlowCut, NeurIPS 2025)
------------------------------------------------------------------
The paper does not state its formula. The convention that reproduces its numbers is
:data:`PAPER_CONVENTION`: **2 FLOPs per MAC over every weight matrix that every token passes through**
(vision tower incl. patch embedding, projector, LLM, and ``lm_head`` on every prompt position) and **no
attention ``QK^T``/``AV`` term** -- the "2 x weights x tokens" rule that a module-hook profiler (thop,
ptflops, fvcore on SDPA models) measures. Inputs: a POPE prompt of **65 text tokens** (LLaVA's
``vicuna_v1`` template: system prompt + ``USER: <image>\n{question}\nAnswer the question using a single
word or phrase. ASSISTANT:``) and, for LLaVA-NeXT, one **640x427** COCO image (2x2 grid + base = 5 CLIP
crops; 2144 visual tokens after unpadding, newline tokens included). TFLOPs, ours vs the paper:

==============  =========  ====================================================  =====  =====  =======
model           method     visual tokens per layer                               ours   paper  error
==============  =========  ====================================================  =====  =====  =======
LLaVA-1.5-7B    --         577 in all 24 CLIP layers; 576 in all 32 LLM layers   8.84   8.82   +0.3 %
LLaVA-1.5-7B    FlowCut    CLIP 577 -> 65 (nominal schedule); 64 in the LLM      1.92   1.95   -1.3 %
LLaVA-1.5-7B    VisionZip  full CLIP; 64 in the LLM                              2.06   2.03   +1.3 %
LLaVA-1.5-7B    FastV      full CLIP; 576 in LLM layers 0-1, 64 after (K=2)      2.49   2.26   +10 %
LLaVA-NeXT-7B   --         5 full crops; 2144 in the LLM                         31.06  31.03  +0.1 %
LLaVA-NeXT-7B   FlowCut    5 crops -> 80 each (release: K/2 per crop); 400 in    4.29   4.29   -0.1 %
                           LLM layers 0-1, 160 from layer 2
LLaVA-NeXT-7B   VisionZip  5 full crops; 160 in the LLM                          4.73   4.72   +0.1 %
LLaVA-NeXT-7B   FastV      5 full crops; 2144 in LLM layers 0-1, 160 after       6.45   7.35   -12 %
==============  =========  ====================================================  =====  =====  =======

(``python -c "from vlmcut.bench.flops import paper_table5; print(*paper_table5(), sep=chr(10))"``.)
Table 9 repeats 8.82 (unpruned) and 1.95 (FlowCut, 64 tokens); its other rows come from other papers.

Why these choices:

* The nominal 2880 LLaVA-NeXT tokens cannot be what was measured: with 2880 tokens in the LLM the
  prefill is 40.8 TFLOPs. POPE's COCO images are mostly 640 px wide and 427-480 px high; unpadded, a
  640x427 image gives 2144 visual tokens (31.06), a 640x480 one 2340 (33.6, +8 %). So the table was
  measured on real inputs; its token column is nominal.
* The vision tower must be counted: VisionZip and FlowCut feed the LLM the same 64 (160) tokens and the
  paper's totals differ by 0.08 (0.43) TFLOPs -- what FlowCut saves by pruning inside CLIP.
* Counting attention's quadratic term overshoots LLaVA-NeXT: :data:`DENSE_CONVENTION` (full ``QK^T`` and
  ``AV`` in CLIP and LLM, last-position ``lm_head``) gives 8.92 / 1.91 / 33.20 / 4.34 for the four key
  rows (+7 % on NeXT); causal LLM attention gives 8.82 / 1.91 / 31.92 / 4.32 (+2.9 %). The linear-only
  count matches both models with one text length. ``lm_head`` on every position adds 0.17 TFLOPs on
  LLaVA-1.5 (8.68 with ``lm_head="last"``).
* The FastV-paper formula ``L (4 n d^2 + 2 n^2 d + 2 n d m)`` (FastV, SparseVLM, PDrop, VisionZip) is a
  MAC count of the LLM with a 2-matrix MLP; for ``n = 641`` it gives 3.33 TFLOPs, not 8.82
  (:data:`FASTV_FORMULA_CONVENTION` reproduces it for comparison).
* FlowCut's vision schedule depends on each image's attention entropy; :func:`flowcut_vision_schedule`
  uses a fixed normalised entropy ``h = 0.8`` (:data:`NOMINAL_FLOWCUT_ENTROPY`), which matches both
  FlowCut rows (h = 0.9: 1.97 / 4.49; h = 0.7: 1.90 / 4.16).
* FastV does not fit (+10 % / -12 %) whatever ``K`` is assumed for both models at once, and SparseVLM /
  PDrop (2.31 / 2.16, 7.62 / 6.78) prune adaptively or with per-layer ratios the paper does not give:
  their "64 / 160 tokens" are equivalents, not per-layer counts, so they are not modelled here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from transformers import PretrainedConfig

AttentionCount = Literal["none", "causal", "full"]
LmHeadCount = Literal["none", "last", "all"]
Tokens = int | Sequence[int]

# ---------------------------------------------------------------------------------------------------------
# Conventions and paper constants
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlopsConvention:
    """How to count FLOPs.

    Attributes:
        flops_per_mac: FLOPs per multiply-accumulate (2: one multiply + one add; 1 counts MACs).
        attention: the LLM's ``QK^T`` and ``AV`` products: ``"none"``, ``"causal"`` (lower triangle incl.
            diagonal) or ``"full"`` (the whole ``n x n`` rectangle).
        vision_attention: count the vision encoder's (bidirectional) ``QK^T`` and ``AV``.
        lm_head: positions the ``lm_head`` is applied to in the prefill: ``"none"``, ``"last"``, ``"all"``.
        include_vision: count the vision encoder (incl. patch embedding).
        include_projector: count the projector / merger.
        gated_llm_mlp: the LLM's MLP has 3 matrices (SwiGLU: Llama, Mistral, Qwen2); ``False`` counts 2.
    """

    flops_per_mac: int = 2
    attention: AttentionCount = "none"
    vision_attention: bool = False
    lm_head: LmHeadCount = "all"
    include_vision: bool = True
    include_projector: bool = True
    gated_llm_mlp: bool = True

    def __post_init__(self) -> None:
        if self.attention not in ("none", "causal", "full"):
            raise ValueError(f"attention must be 'none', 'causal' or 'full', got {self.attention!r}")
        if self.lm_head not in ("none", "last", "all"):
            raise ValueError(f"lm_head must be 'none', 'last' or 'all', got {self.lm_head!r}")
        if self.flops_per_mac not in (1, 2):
            raise ValueError(f"flops_per_mac must be 1 or 2, got {self.flops_per_mac!r}")


# Reproduces Table 5 / Table 9 (see the module docstring): 2 x weights x tokens, no attention products.
PAPER_CONVENTION = FlopsConvention()
# What the hardware actually executes with a dense (SDPA math) kernel and HF generate (last-position logits).
DENSE_CONVENTION = FlopsConvention(attention="full", vision_attention=True, lm_head="last")
# FastV's formula L * (4 n d^2 + 2 n^2 d + 2 n d m) (MACs, 2-matrix MLP), LLM only.
FASTV_FORMULA_CONVENTION = FlopsConvention(
    flops_per_mac=1,
    attention="full",
    vision_attention=False,
    lm_head="none",
    include_vision=False,
    include_projector=False,
    gated_llm_mlp=False,
)

# Text tokens of a POPE prompt in LLaVA's vicuna_v1 template (Table 5 is measured on POPE).
PAPER_TEXT_TOKENS = 65
# A typical POPE / COCO val2014 image, (height, width): 640x427 -> 2144 LLaVA-NeXT tokens (Table 5).
PAPER_NEXT_IMAGE_SIZE = (427, 640)
# Normalised entropy of the CLS attention used for the nominal FlowCut vision schedule.
NOMINAL_FLOWCUT_ENTROPY = 0.8

# Table 5 (TFLOPs), "model/method/tokens" -> value; Table 9 repeats 8.82 and 1.95.
PAPER_TFLOPS: dict[str, float] = {
    "llava-1.5-7b/none/576": 8.82,
    "llava-1.5-7b/fastv/64": 2.26,
    "llava-1.5-7b/sparsevlm/64": 2.31,
    "llava-1.5-7b/pdrop/64": 2.16,
    "llava-1.5-7b/visionzip/64": 2.03,
    "llava-1.5-7b/flowcut/64": 1.95,
    "llava-next-7b/none/2880": 31.03,
    "llava-next-7b/fastv/160": 7.35,
    "llava-next-7b/sparsevlm/160": 7.62,
    "llava-next-7b/pdrop/160": 6.78,
    "llava-next-7b/visionzip/160": 4.72,
    "llava-next-7b/flowcut/160": 4.29,
}

# ---------------------------------------------------------------------------------------------------------
# Shapes
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionShape:
    """Vision encoder dimensions.

    Attributes:
        num_layers: encoder layers that run.
        hidden: model width ``d``.
        mlp: MLP width ``m`` (2 matrices).
        heads: attention heads.
        patch_dim: inputs per patch of the patch embedding (``C * p^2``, ``* T`` for Qwen2-VL's 3-D patches).
        has_cls: a CLS token precedes the patches (CLIP) or not (Qwen2-VL).
        feature_layer: 0-based index of the layer whose output the model consumes (LLaVA ``-2`` -> 22).
        patches_per_image: patch tokens of one full crop (576 for CLIP-L/336), ``None`` for native resolution.
    """

    num_layers: int
    hidden: int
    mlp: int
    heads: int
    patch_dim: int
    has_cls: bool
    feature_layer: int
    patches_per_image: int | None


@dataclass(frozen=True)
class ProjectorShape:
    """Projector: ``linears`` ``(in, out)`` applied to each of its tokens; ``merge`` patches per token."""

    linears: tuple[tuple[int, int], ...]
    merge: int = 1


@dataclass(frozen=True)
class LMShape:
    """Decoder-only LLM dimensions (``head_dim`` may differ from ``hidden / heads``)."""

    num_layers: int
    hidden: int
    mlp: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int


@dataclass(frozen=True)
class ModelShape:
    """All dimensions the FLOPs model needs; build one with :func:`model_shape`.

    ``config`` (optional) is the ``transformers`` config it came from; the image-geometry helpers
    (LLaVA-NeXT crops, Qwen2-VL patch grid) need it when ``image_size`` is given.
    """

    family: str
    vision: VisionShape
    projector: ProjectorShape
    lm: LMShape
    config: PretrainedConfig | None = field(default=None, compare=False, repr=False)


def _config(preset_or_config: str | PretrainedConfig | ModelShape) -> PretrainedConfig:
    from vlmcut.bench.presets import resolve_config

    if isinstance(preset_or_config, ModelShape):
        if preset_or_config.config is None:
            raise ValueError("this ModelShape has no config; image_size needs one (use model_shape(config))")
        return preset_or_config.config
    return resolve_config(preset_or_config)


def model_shape(preset_or_config: str | PretrainedConfig | ModelShape) -> ModelShape:
    """The :class:`ModelShape` of a preset name, a LLaVA / LLaVA-NeXT / Qwen2-VL config, or a shape (as is)."""
    if isinstance(preset_or_config, ModelShape):
        return preset_or_config
    config = _config(preset_or_config)
    text = config.text_config
    heads = int(text.num_attention_heads)
    head_dim = getattr(text, "head_dim", None) or int(text.hidden_size) // heads
    lm = LMShape(
        num_layers=int(text.num_hidden_layers),
        hidden=int(text.hidden_size),
        mlp=int(text.intermediate_size),
        heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads),
        head_dim=int(head_dim),
        vocab=int(text.vocab_size),
    )
    v = config.vision_config
    if config.model_type in ("llava", "llava_next"):
        layers = int(v.num_hidden_layers)
        feature = config.vision_feature_layer
        if not isinstance(feature, int):
            feature = max(f % (layers + 1) for f in feature)
        # hidden_states[i] is the output of layer i - 1 (hidden_states[0] = embeddings)
        feature_layer = (feature % (layers + 1)) - 1
        n_feature_layers = (
            1 if isinstance(config.vision_feature_layer, int) else len(config.vision_feature_layer)
        )
        vision = VisionShape(
            num_layers=layers,
            hidden=int(v.hidden_size),
            mlp=int(v.intermediate_size),
            heads=int(v.num_attention_heads),
            patch_dim=int(v.num_channels) * int(v.patch_size) ** 2,
            has_cls=True,
            feature_layer=feature_layer,
            patches_per_image=(int(v.image_size) // int(v.patch_size)) ** 2,
        )
        d_in = int(v.hidden_size) * n_feature_layers
        projector = ProjectorShape(((d_in, lm.hidden), (lm.hidden, lm.hidden)), merge=1)
    elif config.model_type == "qwen2_vl":
        d = int(v.embed_dim)
        merge = int(v.spatial_merge_size) ** 2
        vision = VisionShape(
            num_layers=int(v.depth),
            hidden=d,
            mlp=int(d * v.mlp_ratio),
            heads=int(v.num_heads),
            patch_dim=int(v.in_channels) * int(v.temporal_patch_size) * int(v.patch_size) ** 2,
            has_cls=False,
            feature_layer=int(v.depth) - 1,
            patches_per_image=None,
        )
        projector = ProjectorShape(((d * merge, d * merge), (d * merge, int(v.hidden_size))), merge=merge)
    else:
        raise ValueError(f"unsupported model_type {config.model_type!r} (llava, llava_next, qwen2_vl)")
    return ModelShape(family=config.model_type, vision=vision, projector=projector, lm=lm, config=config)


# ---------------------------------------------------------------------------------------------------------
# Per-part FLOPs
# ---------------------------------------------------------------------------------------------------------


def _per_layer(tokens: Tokens, num_layers: int, what: str, allow_shorter: bool = False) -> list[int]:
    if isinstance(tokens, bool):
        raise TypeError(f"{what}: expected an int or a sequence of ints, got a bool")
    if isinstance(tokens, int):
        counts = [tokens] * num_layers
    else:
        counts = [int(t) for t in tokens]
        if not counts:
            raise ValueError(f"{what}: empty token list")
        if len(counts) > num_layers or (len(counts) < num_layers and not allow_shorter):
            raise ValueError(f"{what}: got {len(counts)} per-layer counts for {num_layers} layers")
    if any(t < 0 for t in counts):
        raise ValueError(f"{what}: token counts must be >= 0, got {counts}")
    return counts


def vision_layer_macs(shape: VisionShape, n: int, attention: bool) -> int:
    """MACs of one encoder layer on ``n`` tokens: projections + MLP (+ ``QK^T``, ``AV`` if ``attention``)."""
    d = shape.hidden
    macs = n * (4 * d * d + 2 * d * shape.mlp)
    if attention:
        macs += 2 * n * n * d
    return macs


def vision_flops(
    shape: ModelShape | VisionShape,
    tokens_per_layer: Tokens,
    convention: FlopsConvention = PAPER_CONVENTION,
    num_patches: int | None = None,
) -> int:
    """FLOPs of one vision-encoder pass (one image or crop).

    Args:
        shape: the model's (or just the encoder's) shape.
        tokens_per_layer: sequence length entering each encoder layer that runs (CLS included), e.g.
            ``[577] * 24`` for unpruned CLIP-L/336; an ``int`` repeats over all layers. A list may be
            shorter than the encoder when an implementation stops early.
        convention: counting rules (``vision_attention`` adds the ``QK^T``/``AV`` products).
        num_patches: patches embedded by the patch embedding; default ``tokens_per_layer[0]`` minus CLS.

    Returns:
        FLOPs (int).
    """
    v = shape.vision if isinstance(shape, ModelShape) else shape
    counts = _per_layer(tokens_per_layer, v.num_layers, "vision tokens_per_layer", allow_shorter=True)
    if num_patches is None:
        num_patches = counts[0] - (1 if v.has_cls else 0)
    macs = num_patches * v.patch_dim * v.hidden
    macs += sum(vision_layer_macs(v, n, convention.vision_attention) for n in counts)
    return convention.flops_per_mac * macs


def projector_flops(
    shape: ModelShape | ProjectorShape, num_tokens: int, convention: FlopsConvention = PAPER_CONVENTION
) -> int:
    """FLOPs of the projector on ``num_tokens`` output tokens (LLaVA: visual tokens; Qwen2-VL: merged)."""
    p = shape.projector if isinstance(shape, ModelShape) else shape
    return convention.flops_per_mac * num_tokens * sum(i * o for i, o in p.linears)


def llm_layer_macs(lm: LMShape, n: int, attention: AttentionCount = "none", gated_mlp: bool = True) -> int:
    """MACs of one decoder layer on ``n`` tokens (prefill): projections, MLP, attention products."""
    q_dim = lm.heads * lm.head_dim
    kv_dim = lm.kv_heads * lm.head_dim
    macs = n * (lm.hidden * q_dim + 2 * lm.hidden * kv_dim + q_dim * lm.hidden)
    macs += n * (3 if gated_mlp else 2) * lm.hidden * lm.mlp
    if attention == "full":
        macs += 2 * n * n * q_dim
    elif attention == "causal":
        macs += n * (n + 1) * q_dim
    return macs


def llm_prefill_flops(
    shape: ModelShape | LMShape,
    tokens_per_layer: Tokens,
    convention: FlopsConvention = PAPER_CONVENTION,
    include_lm_head: bool = True,
) -> int:
    """FLOPs of the LLM prefill.

    Args:
        shape: the model's (or just the LLM's) shape.
        tokens_per_layer: total sequence length (visual + text) entering each decoder layer; one entry per
            layer (``len == num_layers``) or an ``int`` for all layers.
        convention: counting rules (``attention``, ``lm_head``, ``gated_llm_mlp``).
        include_lm_head: add the ``lm_head`` per ``convention.lm_head`` (on the last layer's tokens).

    Returns:
        FLOPs (int).
    """
    lm = shape.lm if isinstance(shape, ModelShape) else shape
    counts = _per_layer(tokens_per_layer, lm.num_layers, "llm tokens_per_layer")
    macs = sum(llm_layer_macs(lm, n, convention.attention, convention.gated_llm_mlp) for n in counts)
    if include_lm_head:
        macs += lm_head_positions(counts[-1], convention) * lm.hidden * lm.vocab
    return convention.flops_per_mac * macs


def lm_head_positions(num_tokens: int, convention: FlopsConvention) -> int:
    """Positions the ``lm_head`` runs on in a prefill of ``num_tokens`` under ``convention``."""
    if convention.lm_head == "all":
        return num_tokens
    if convention.lm_head == "last":
        return min(1, num_tokens)
    return 0


def decode_flops(
    shape: ModelShape | LMShape,
    context_per_layer: Tokens,
    convention: FlopsConvention = PAPER_CONVENTION,
) -> int:
    """FLOPs to generate one token with a KV cache.

    Args:
        shape: the model's (or the LLM's) shape.
        context_per_layer: cached tokens in each layer's KV cache before this step (pruning makes them
            differ per layer); an ``int`` for all layers. The new token attends to ``context + 1``.
        convention: ``attention="none"`` (the default :data:`PAPER_CONVENTION`: "2 x weights" per token)
            drops the ``q . K`` and ``p . V`` products, any other value counts ``2 (context + 1) H dh`` MACs
            per layer (:data:`DENSE_CONVENTION`); ``lm_head="none"`` drops the logits, any other value
            counts one position.

    Returns:
        FLOPs (int) of one decode step.
    """
    lm = shape.lm if isinstance(shape, ModelShape) else shape
    counts = _per_layer(context_per_layer, lm.num_layers, "context_per_layer")
    q_dim = lm.heads * lm.head_dim
    macs = lm.num_layers * llm_layer_macs(lm, 1, "none", convention.gated_llm_mlp)
    if convention.attention != "none":
        macs += sum(2 * (c + 1) * q_dim for c in counts)
    if convention.lm_head != "none":
        macs += lm.hidden * lm.vocab
    return convention.flops_per_mac * macs


def kv_cache_bytes(
    shape: ModelShape | LMShape,
    tokens_per_layer: Tokens,
    bytes_per_value: int = 2,
    batch_size: int = 1,
) -> int:
    """Bytes of the KV cache: ``sum_l 2 * n_l * Hkv * dh * bytes`` (K and V), e.g. 2 for fp16/bf16."""
    lm = shape.lm if isinstance(shape, ModelShape) else shape
    counts = _per_layer(tokens_per_layer, lm.num_layers, "tokens_per_layer")
    return batch_size * bytes_per_value * 2 * lm.kv_heads * lm.head_dim * sum(counts)


# ---------------------------------------------------------------------------------------------------------
# Whole prefill
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrefillFlops:
    """FLOPs of one prefill, by part (all in FLOPs)."""

    vision: int
    projector: int
    llm: int
    lm_head: int

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm + self.lm_head

    @property
    def tflops(self) -> float:
        return self.total / 1e12


def _vision_lists(
    vision_tokens: Tokens | Sequence[Sequence[int]] | None, v: VisionShape, crops: int, full: int
) -> list[list[int]]:
    if vision_tokens is None:
        return [[full] * v.num_layers for _ in range(crops)]
    if isinstance(vision_tokens, int) and not isinstance(vision_tokens, bool):
        return [[vision_tokens] * v.num_layers for _ in range(crops)]
    items = list(vision_tokens)  # type: ignore[arg-type]
    if items and all(isinstance(x, Sequence) for x in items):
        if len(items) != crops:
            raise ValueError(f"vision_tokens: got {len(items)} per-crop lists for {crops} crops")
        return [_per_layer(x, v.num_layers, "vision_tokens", allow_shorter=True) for x in items]
    one = _per_layer(items, v.num_layers, "vision_tokens", allow_shorter=True)
    return [list(one) for _ in range(crops)]


def _consumed(counts: list[int], v: VisionShape) -> int:
    """Tokens the model reads from the encoder (after pruning at the feature layer), without CLS."""
    idx = v.feature_layer + 1  # the output of layer F = the input of layer F + 1
    n = counts[idx] if idx < len(counts) else counts[-1]
    return n - (1 if v.has_cls else 0)


def prefill_breakdown(
    model: str | PretrainedConfig | ModelShape,
    vision_tokens: Tokens | Sequence[Sequence[int]] | None = None,
    llm_visual_tokens: Tokens | None = None,
    *,
    text_tokens: int = PAPER_TEXT_TOKENS,
    num_crops: int | None = None,
    image_size: tuple[int, int] | None = None,
    projector_tokens: int | None = None,
    convention: FlopsConvention = PAPER_CONVENTION,
) -> PrefillFlops:
    """FLOPs of one prefill (one image + text), by part. See :func:`prefill_tflops` for the arguments."""
    shape = model_shape(model)
    v, lm = shape.vision, shape.lm
    if text_tokens < 0:
        raise ValueError(f"text_tokens must be >= 0, got {text_tokens}")

    # Geometry of the unpruned model: crops, full encoder length, visual tokens reaching the LLM.
    full_llm: int | None = None
    num_patches: int | None = v.patches_per_image
    if shape.family == "qwen2_vl":
        if image_size is None and vision_tokens is None:
            raise ValueError("qwen2_vl: give image_size (or explicit vision_tokens) to size the ViT sequence")
        if image_size is not None:
            from vlmcut.bench.presets import qwen2_vl_patch_grid

            t, h, w = qwen2_vl_patch_grid(_config(model), image_size)
            num_patches = t * h * w
        crops = 1 if num_crops is None else num_crops
    elif shape.family == "llava_next":
        if image_size is not None:
            from vlmcut.bench.presets import llava_next_num_crops, llava_next_num_image_tokens

            config = _config(model)
            crops = llava_next_num_crops(config, image_size) if num_crops is None else num_crops
            full_llm = llava_next_num_image_tokens(config, image_size)
        else:
            # Nominal maximum: 2x2 grid + base = 5 crops, no unpadding or newline tokens (the "2880").
            crops = 5 if num_crops is None else num_crops
    else:
        crops = 1 if num_crops is None else num_crops
    full_seq = (num_patches or 0) + (1 if v.has_cls else 0)
    vis_lists = _vision_lists(vision_tokens, v, crops, full_seq)

    if projector_tokens is None:
        projector_tokens = sum(_consumed(c, v) for c in vis_lists) // shape.projector.merge
    if llm_visual_tokens is None:
        pruned_in_vision = vision_tokens is not None
        llm_visual_tokens = full_llm if (full_llm is not None and not pruned_in_vision) else projector_tokens
    visual = _per_layer(llm_visual_tokens, lm.num_layers, "llm_visual_tokens")
    seq = [n + text_tokens for n in visual]

    vis = sum(vision_flops(v, c, convention) for c in vis_lists)
    return PrefillFlops(
        vision=vis if convention.include_vision else 0,
        projector=projector_flops(shape, projector_tokens, convention) if convention.include_projector else 0,
        llm=llm_prefill_flops(lm, seq, convention, include_lm_head=False),
        lm_head=convention.flops_per_mac * lm_head_positions(seq[-1], convention) * lm.hidden * lm.vocab,
    )


def prefill_tflops(
    model: str | PretrainedConfig | ModelShape,
    vision_tokens: Tokens | Sequence[Sequence[int]] | None = None,
    llm_visual_tokens: Tokens | None = None,
    *,
    text_tokens: int = PAPER_TEXT_TOKENS,
    num_crops: int | None = None,
    image_size: tuple[int, int] | None = None,
    projector_tokens: int | None = None,
    convention: FlopsConvention = PAPER_CONVENTION,
) -> float:
    """TFLOPs of one prefill (one image + ``text_tokens`` text tokens), vision encoder to ``lm_head``.

    Args:
        model: a preset name (``"llava-1.5-7b"``...), a ``transformers`` config, or a :class:`ModelShape`.
        vision_tokens: sequence length entering each vision-encoder layer, CLS included: ``None`` =
            unpruned; an ``int`` = the same at every layer; a list = per layer (shared by every crop); a
            list of lists = per crop. E.g. :func:`flowcut_vision_schedule` for FlowCut.
        llm_visual_tokens: visual tokens entering each decoder layer (an ``int`` or one per layer);
            ``None`` = what the encoder hands over (for an unpruned LLaVA-NeXT with ``image_size``: the
            unpadded count with newline tokens). ``text_tokens`` are added at every layer.
        text_tokens: prompt tokens besides the image (default 65: POPE prompt, Table 5).
        num_crops: encoder passes per image; default 1, LLaVA-NeXT: 5 (nominal) or from ``image_size``.
        image_size: ``(height, width)``; LLaVA-NeXT: sets crops and unpruned token count; Qwen2-VL: sets the
            ViT sequence (required unless ``vision_tokens`` is given).
        projector_tokens: tokens through the projector (all crops); default: those the encoder outputs at
            the feature layer, CLS removed (divided by 4 for Qwen2-VL's merger).
        convention: counting rules; :data:`PAPER_CONVENTION` reproduces the paper.

    Returns:
        TFLOPs (float). :func:`prefill_breakdown` gives the parts.

    Example:
        >>> round(prefill_tflops("llava-1.5-7b"), 2)  # Table 5: 8.82
        8.84
        >>> round(prefill_tflops("llava-1.5-7b", llm_visual_tokens=64, projector_tokens=64), 2)  # VisionZip: 2.03
        2.06
    """
    return prefill_breakdown(
        model,
        vision_tokens,
        llm_visual_tokens,
        text_tokens=text_tokens,
        num_crops=num_crops,
        image_size=image_size,
        projector_tokens=projector_tokens,
        convention=convention,
    ).tflops


# ---------------------------------------------------------------------------------------------------------
# Token schedules
# ---------------------------------------------------------------------------------------------------------


def drop_schedule(num_layers: int, initial: int, drops: dict[int, int]) -> list[int]:
    """Tokens entering each of ``num_layers`` layers when the count becomes ``drops[i]`` after layer ``i``.

    FastV with ``K=2``, ``R`` -> 64: ``drop_schedule(32, 576, {1: 64})`` (layers 0-1 see 576, 2-31 see 64).
    PDrop's default: ``drop_schedule(32, 576, {7: 288, 15: 144, 23: 72})``.
    """
    counts, n = [], initial
    for i in range(num_layers):
        counts.append(n)
        if i in drops:
            n = drops[i]
    return counts


def flowcut_vision_schedule(
    num_patches: int,
    keep: int,
    num_layers: int,
    feature_layer: int,
    *,
    entropy: float = NOMINAL_FLOWCUT_ENTROPY,
    interval: int = 2,
    has_cls: bool = True,
    merge: int = 1,
) -> list[int]:
    """Nominal FlowCut sequence length entering each encoder layer (SPEC "Schedule"), CLS included.

    After layer ``i`` with ``r = feature_layer - 1 - i`` a multiple of ``interval`` (``r >= 0``), FlowCut
    drops ``round((N - K) / sqrt(r) * (1 - h^2))`` of the ``N`` current units (all the rest down to ``K`` at
    ``r = 0``), ``h`` the normalised entropy of the global token's attention. ``h`` depends on the image;
    this uses a fixed ``entropy``. Layers after the feature layer run on the kept tokens.

    Args:
        num_patches: patch tokens of the unpruned encoder (576).
        keep: patch tokens to keep (``K``; Qwen2-VL: merged tokens, see ``merge``).
        num_layers: encoder layers that run (24).
        feature_layer: 0-based layer whose output is consumed (LLaVA: 22).
        entropy: normalised entropy ``h`` in ``[0, 1]``.
        interval: prune every ``interval`` layers (2).
        has_cls: add a CLS token to every count.
        merge: patches per pruning unit (Qwen2-VL: 4, whole 2x2 merge units; ``keep`` counts units).

    Returns:
        ``num_layers`` counts (CLS included).
    """
    if not 0.0 <= entropy <= 1.0:
        raise ValueError(f"entropy must be in [0, 1], got {entropy}")
    if num_patches % merge:
        raise ValueError(f"num_patches={num_patches} is not a multiple of merge={merge}")
    n, k = num_patches // merge, min(keep, num_patches // merge)
    counts = []
    for i in range(num_layers):
        counts.append(n * merge + (1 if has_cls else 0))
        r = feature_layer - 1 - i
        if r < 0 or r % interval or n <= k:
            continue
        n = k if r == 0 else max(n - round((n - k) / math.sqrt(r) * (1.0 - entropy**2)), k)
    return counts


# ---------------------------------------------------------------------------------------------------------
# Table 5 reproduction
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRow:
    """One row of the reproduction: our TFLOPs next to the paper's."""

    model: str
    method: str
    tokens: int
    ours: float
    paper: float

    @property
    def rel_error(self) -> float:
        return self.ours / self.paper - 1.0

    def __str__(self) -> str:
        return (
            f"{self.model:14s} {self.method:10s} {self.tokens:5d}  ours {self.ours:6.2f}  "
            f"paper {self.paper:6.2f}  {100 * self.rel_error:+6.1f} %"
        )


def paper_table5(
    convention: FlopsConvention = PAPER_CONVENTION,
    text_tokens: int = PAPER_TEXT_TOKENS,
    next_image_size: tuple[int, int] = PAPER_NEXT_IMAGE_SIZE,
    entropy: float = NOMINAL_FLOWCUT_ENTROPY,
) -> list[TableRow]:
    """Recompute the Table 5 rows whose per-layer token counts follow from the methods' definitions.

    LLaVA-1.5-7B: unpruned, FlowCut 64 (vision pruning), VisionZip 64 (64 tokens to the LLM after the full
    encoder), FastV 64 (K=2). LLaVA-NeXT-7B (one ``next_image_size`` image: 5 crops, 2144 tokens at
    640x427): unpruned, FlowCut 160 (the release prunes each crop to K/2 = 80 in CLIP, 400 tokens enter
    the LLM, K = 160 from decoder layer 2 on), VisionZip 160, FastV 160 (K=2).
    """
    rows: list[TableRow] = []
    l15, nxt = model_shape("llava-1.5-7b"), model_shape("llava-next-7b")
    v = l15.vision
    kw = {"text_tokens": text_tokens, "convention": convention}

    def fc_sched(keep: int) -> list[int]:
        return flowcut_vision_schedule(
            v.patches_per_image or 0, keep, v.num_layers, v.feature_layer, entropy=entropy
        )

    L = l15.lm.num_layers
    rows.append(
        TableRow(
            "llava-1.5-7b", "none", 576, prefill_tflops(l15, **kw), PAPER_TFLOPS["llava-1.5-7b/none/576"]
        )
    )
    rows.append(
        TableRow(
            "llava-1.5-7b",
            "fastv",
            64,
            prefill_tflops(l15, None, drop_schedule(L, 576, {1: 64}), **kw),
            PAPER_TFLOPS["llava-1.5-7b/fastv/64"],
        )
    )
    rows.append(
        TableRow(
            "llava-1.5-7b",
            "visionzip",
            64,
            prefill_tflops(l15, None, 64, projector_tokens=64, **kw),
            PAPER_TFLOPS["llava-1.5-7b/visionzip/64"],
        )
    )
    rows.append(
        TableRow(
            "llava-1.5-7b",
            "flowcut",
            64,
            prefill_tflops(l15, fc_sched(64), **kw),
            PAPER_TFLOPS["llava-1.5-7b/flowcut/64"],
        )
    )
    next_cfg = _config("llava-next-7b")
    from vlmcut.bench.presets import llava_next_num_crops, llava_next_num_image_tokens

    crops = llava_next_num_crops(next_cfg, next_image_size)
    full = llava_next_num_image_tokens(next_cfg, next_image_size)
    nkw = {**kw, "image_size": next_image_size}
    rows.append(
        TableRow(
            "llava-next-7b", "none", 2880, prefill_tflops(nxt, **nkw), PAPER_TFLOPS["llava-next-7b/none/2880"]
        )
    )
    rows.append(
        TableRow(
            "llava-next-7b",
            "fastv",
            160,
            prefill_tflops(nxt, None, drop_schedule(L, full, {1: 160}), **nkw),
            PAPER_TFLOPS["llava-next-7b/fastv/160"],
        )
    )
    rows.append(
        TableRow(
            "llava-next-7b",
            "visionzip",
            160,
            prefill_tflops(nxt, None, 160, projector_tokens=160, **nkw),
            PAPER_TFLOPS["llava-next-7b/visionzip/160"],
        )
    )
    per_crop = 160 // 2  # the release: K/2 per crop, then K inside the LLM after decoder layer 1
    rows.append(
        TableRow(
            "llava-next-7b",
            "flowcut",
            160,
            prefill_tflops(nxt, fc_sched(per_crop), drop_schedule(L, crops * per_crop, {1: 160}), **nkw),
            PAPER_TFLOPS["llava-next-7b/flowcut/160"],
        )
    )
    return rows


__all__ = [
    "DENSE_CONVENTION",
    "FASTV_FORMULA_CONVENTION",
    "NOMINAL_FLOWCUT_ENTROPY",
    "PAPER_CONVENTION",
    "PAPER_NEXT_IMAGE_SIZE",
    "PAPER_TEXT_TOKENS",
    "PAPER_TFLOPS",
    "FlopsConvention",
    "LMShape",
    "ModelShape",
    "PrefillFlops",
    "ProjectorShape",
    "TableRow",
    "VisionShape",
    "decode_flops",
    "drop_schedule",
    "flowcut_vision_schedule",
    "kv_cache_bytes",
    "llm_layer_macs",
    "llm_prefill_flops",
    "lm_head_positions",
    "model_shape",
    "paper_table5",
    "prefill_breakdown",
    "prefill_tflops",
    "projector_flops",
    "vision_flops",
    "vision_layer_macs",
]
