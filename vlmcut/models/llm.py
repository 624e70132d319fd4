"""Dropping visual tokens inside a Hugging Face decoder (Llama / Qwen2 family) during prefill.

A selector (a method, see :class:`LLMSelector`) names the decoder layers at whose *output* it prunes and,
at each of them, which visual tokens stay. :class:`DecoderPruner` does the plumbing on one
``language_model`` instance (hooks only; nothing is assigned to a transformers class):

* prefill: at a prune layer, ``q``/``k``/``v`` are captured from the projections (RoPE applied with the
  layer's own ``position_embeddings``), the selector returns a keep mask (optionally with new hidden states
  for the visual tokens it keeps, :class:`LLMSelection`), and the layer's output is gathered. Rows that
  keep fewer tokens than the longest row are filled on the left with inert tokens (zeros, masked as
  keys), so a batch stays one tensor. Every later layer gets, through a forward
  pre-hook, the gathered ``position_embeddings`` / ``position_ids`` (kept tokens keep their *original*
  positions) and a 4-D mask built from the original positions (causal, padding and fillers masked);
* the model output: ``last_hidden_state`` is scattered back to the caller's length (zeros at dropped
  positions), so ``logits``/``labels`` keep their shapes and the last position is still the last token;
* decoding (same cache object as the prefill, ``cache`` / ``past_key_values`` by release): layers after a prune layer hold fewer cached
  keys than layer 0; their mask is rebuilt from the prefill's kept-key validity plus the new tokens' part
  of the mask transformers made. Positions of new tokens continue the full numbering (``cache_position``
  comes from layer 0's cache length), so RoPE is what the unpruned model would use.

Supported: eager and SDPA attention, ``DynamicCache`` (generate's default), fp32/bf16/fp16.

M-RoPE (Qwen2-VL / Qwen2.5-VL): in transformers 5.x the decoder layers receive ``position_embeddings``
already composed from the 3-D ids (``(B, T, d)`` cos / sin, like 1-D RoPE) and ``position_ids`` as the
``(B, T)`` text positions (or ``None``); both are gathered per kept column like any other model's, and a
``(R, B, T)`` ``position_ids`` is gathered row by row. New tokens' positions come from the caller
(generate continues the 3-D ids), so nothing else changes.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..compat import cache_from_kwargs, cache_from_output
from ..methods.base import LLMContext, LLMSelection, LLMSelector

SUPPORTED_ATTENTION = ("eager", "sdpa")


@dataclass
class _Stage:
    """The sequence from the layer after ``layer`` on: original positions of the kept columns."""

    layer: int
    orig: torch.Tensor  # (B, T') long, -1 for fillers
    key_valid: torch.Tensor  # (B, T') bool
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None
    position_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # prefill mask in the model's format


@dataclass
class LLMPassRecord:
    """What the last prefill did in the language model."""

    # per stage: (B, T') original positions of the surviving columns, -1 for fillers; padding columns of the
    # prompt survive (only visual tokens are dropped), so count real tokens with the attention mask
    kept_positions: list[torch.Tensor] = field(default_factory=list)


def _per_image_counts(visual: torch.Tensor, image_index: torch.Tensor) -> int:
    """The most visual tokens any single image has. visual, image_index: (B, T)."""
    n_img = int(image_index.max()) + 1
    counts = torch.zeros(visual.shape[0], max(1, n_img), dtype=torch.long, device=visual.device)
    counts.scatter_add_(1, image_index.clamp(min=0), visual.long())
    return int(counts.max())


def _model_format_mask(allowed: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """bool ``allowed`` (B, 1, Q, K) -> the mask format of the attention implementation."""
    if impl == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min
    )


def _gather_seq(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x: (B|1, T, ...) gathered along dim 1 with index (B, T') -> (B, T', ...)."""
    x = x.expand(index.shape[0], *x.shape[1:])
    idx = index.view(*index.shape, *([1] * (x.dim() - 2))).expand(*index.shape, *x.shape[2:])
    return torch.gather(x, 1, idx)


class DecoderPruner:
    """Installs an :class:`LLMSelector` on one decoder (``LlamaModel``-like) instance."""

    def __init__(self, language_model: nn.Module, selector: LLMSelector) -> None:
        layers = getattr(language_model, "layers", None)
        if layers is None or not len(layers):
            raise TypeError(f"{type(language_model).__name__} has no decoder `layers`; not supported")
        self.lm = language_model
        self.layers = list(layers)
        self.attn = [layer.self_attn for layer in self.layers]
        for a in self.attn:
            if not all(isinstance(getattr(a, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj")):
                raise TypeError(f"attention {type(a).__name__} has no q_proj/k_proj/v_proj; not supported")
        impl = getattr(language_model.config, "_attn_implementation", None) or "eager"
        if impl not in SUPPORTED_ATTENTION:
            raise NotImplementedError(
                f"pruning inside the language model supports attn_implementation in {SUPPORTED_ATTENTION}, "
                f"this model uses {impl!r}; load it with attn_implementation='sdpa'"
            )
        self.impl = impl
        self._rope = sys.modules[type(self.attn[0]).__module__].apply_rotary_pos_emb
        self.selector = selector
        self.prune_layers: list[int] = []  # of the current pass
        self.record = LLMPassRecord()
        self._pending: dict[str, torch.Tensor] | None = None
        self._pass: dict[str, Any] | None = None  # prefill state
        self._stages: list[_Stage] = []
        self._prefill_len = 0
        self._cache_ref: Callable[[], Any] | None = None
        self._decoding = False
        self._qkv: dict[str, torch.Tensor] = {}
        self._armed: int | None = None
        self._handles: list[RemovableHandle] = []
        self._install()

    # -- called by the model attachment before a forward --------------------------------------------------
    def begin(
        self, visual: torch.Tensor, valid: torch.Tensor, query_index: torch.Tensor, image_index: torch.Tensor
    ) -> None:
        """Announce the next language-model prefill of length ``T``: masks (B, T) and (B,) query index."""
        self._pending = {
            "visual": visual,
            "valid": valid,
            "query_index": query_index,
            "image_index": image_index,
        }

    # -- hooks -----------------------------------------------------------------------------------------
    def _install(self) -> None:
        self._handles.append(self.lm.register_forward_pre_hook(self._on_start, with_kwargs=True))
        self._handles.append(self.lm.register_forward_hook(self._on_end, with_kwargs=True))
        for i, layer in enumerate(self.layers):
            self._handles.append(layer.register_forward_pre_hook(self._make_pre(i), with_kwargs=True))
            if i < len(self.layers) - 1:  # pruning at the last layer's output would save nothing
                self._handles.append(layer.register_forward_hook(self._make_post(i), prepend=True))
                for name in ("q_proj", "k_proj", "v_proj"):
                    proj = getattr(self.attn[i], name)
                    self._handles.append(proj.register_forward_hook(self._make_capture(i, name)))

    def _on_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        embeds = kwargs.get("inputs_embeds")
        if embeds is None:
            embeds = args[0] if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 3 else None
        ids = kwargs.get("input_ids", args[0] if args else None)
        length = embeds.shape[1] if embeds is not None else (ids.shape[1] if ids is not None else 0)
        pending, self._pending = self._pending, None
        cache = cache_from_kwargs(kwargs)
        self._pass = None
        self._decoding = False
        if pending is not None and pending["visual"].shape[1] == length and bool(pending["visual"].any()):
            n = len(self.layers)
            counts = _per_image_counts(pending["visual"], pending["image_index"])
            layers = sorted({int(i) for i in self.selector.prune_layers(n, counts)})
            bad = [i for i in layers if not 0 <= i <= n - 2]
            if bad:
                raise ValueError(
                    f"prune layers {bad} are out of range for a {n}-layer language model (valid: 0 .. {n - 2})"
                )
            self.prune_layers = layers
            self._pass = dict(pending)
            self._pass["T"] = length
            self._stages = []
            self._prefill_len = length
            self._cache_ref = weakref.ref(cache) if cache is not None else None
            self.record = LLMPassRecord()
            return
        # a continuation of the last pruned prefill: the same cache object, already filled
        if self._stages and cache is not None and self._cache_ref is not None and self._cache_ref() is cache:
            self._decoding = True
        else:
            self._stages = []

    def _stage_for(self, i: int) -> _Stage | None:
        current = None
        for stage in self._stages:
            if stage.layer < i:
                current = stage
        return current

    def _make_pre(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            if self._pass is not None and i in self.prune_layers:
                self._armed = i
                self._qkv = {}
                self._pass["position_embeddings"] = kwargs.get("position_embeddings")
                self._pass["position_ids"] = kwargs.get("position_ids")
            stage = self._stage_for(i)
            if stage is None or (self._pass is None and not self._decoding):
                return None
            kwargs = dict(kwargs)
            if self._pass is not None:
                kwargs["attention_mask"] = stage.mask
                kwargs["position_embeddings"] = stage.position_embeddings
                if kwargs.get("position_ids") is not None:
                    kwargs["position_ids"] = stage.position_ids
            else:
                kwargs["attention_mask"] = self._decode_mask(
                    stage, kwargs.get("attention_mask"), args, kwargs
                )
            return args, kwargs

        return hook

    def _decode_mask(
        self, stage: _Stage, given: torch.Tensor | None, args: tuple, kwargs: dict
    ) -> torch.Tensor | None:
        hidden = args[0] if args else kwargs["hidden_states"]
        b, q = hidden.shape[:2]
        prefix = stage.key_valid[:, None, None, :].expand(b, 1, q, stage.key_valid.shape[1])
        if given is None:
            if bool(stage.key_valid.all()) and q == 1:
                return None
            new = self._layer_cache_len(stage) - stage.key_valid.shape[1] + q
            tail = torch.ones(b, 1, q, new, dtype=torch.bool, device=hidden.device).tril(new - q)
            return _model_format_mask(torch.cat([prefix, tail], dim=-1), self.impl, hidden.dtype)
        tail = given[..., self._prefill_len :]
        if given.dtype == torch.bool:
            return torch.cat([prefix, tail], dim=-1)
        head = torch.zeros(prefix.shape, dtype=given.dtype, device=given.device).masked_fill(
            ~prefix, torch.finfo(given.dtype).min
        )
        return torch.cat([head, tail], dim=-1)

    def _layer_cache_len(self, stage: _Stage) -> int:
        cache = self._cache_ref() if self._cache_ref is not None else None
        if cache is None:
            return stage.key_valid.shape[1]
        return int(cache.get_seq_length(stage.layer + 1))

    def _make_capture(self, i: int, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._armed == i:
                self._qkv[name] = output

        return hook

    def _make_post(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            state = self._pass
            qkv, self._qkv, self._armed = self._qkv, {}, None
            if state is None or i not in self.prune_layers:
                return None
            hidden = output[0] if isinstance(output, tuple) else output
            if len(qkv) != 3:
                raise RuntimeError(f"decoder layer {i}: q/k/v projections did not run through their modules")
            attn = self.attn[i]
            b, t, _ = hidden.shape
            d = attn.head_dim
            q = qkv["q_proj"].view(b, t, -1, d).transpose(1, 2)
            k = qkv["k_proj"].view(b, t, -1, d).transpose(1, 2)
            v = qkv["v_proj"].view(b, t, -1, d).transpose(1, 2)
            stage = self._stage_for(i)
            pe = stage.position_embeddings if stage is not None else state["position_embeddings"]
            if pe is None:
                raise RuntimeError(
                    f"decoder layer {i} got no position_embeddings; this model is not supported"
                )
            q, k = self._rope(q, k, *pe)
            ctx = LLMContext(
                layer=i,
                q=q,
                k=k,
                v=v,
                scale=float(attn.scaling),
                visual=state["visual"],
                valid=state["valid"],
                query_index=state["query_index"],
                image_index=state["image_index"],
                hidden=hidden,
            )
            keep = self.selector.select(ctx)
            rewritten = None
            if isinstance(keep, LLMSelection):  # the selector also rewrites visual tokens it keeps
                keep, rewritten = keep.keep, keep.hidden
            if rewritten is not None:
                if rewritten.shape != hidden.shape:
                    raise RuntimeError(
                        f"the selector returned hidden states of shape {tuple(rewritten.shape)} at layer "
                        f"{i}; expected {tuple(hidden.shape)}"
                    )
                if bool((rewritten != hidden)[~state["visual"]].any()):
                    raise RuntimeError(f"the selector rewrote non-visual tokens at layer {i}")
                hidden = rewritten.to(hidden.dtype)
            if keep is None or bool(keep.all()):
                if rewritten is None:
                    return None
                return (hidden, *output[1:]) if isinstance(output, tuple) else hidden
            if bool((~keep & ~state["visual"]).any()):
                raise RuntimeError(f"the selector dropped non-visual tokens at layer {i}")
            new_hidden = self._shrink(i, keep, hidden, state, pe)
            if isinstance(output, tuple):
                return (new_hidden, *output[1:])
            return new_hidden

        return hook

    def _shrink(
        self,
        i: int,
        keep: torch.Tensor,
        hidden: torch.Tensor,
        state: dict[str, Any],
        pe: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        b, t, _ = hidden.shape
        n_keep = keep.sum(dim=1)  # (B,)
        width = int(n_keep.max())
        # destination column of each kept token: right-aligned, fillers on the left
        dest = keep.long().cumsum(dim=1) - 1 + (width - n_keep)[:, None]
        src = torch.zeros(b, width, dtype=torch.long, device=hidden.device)
        is_real = torch.zeros(b, width, dtype=torch.bool, device=hidden.device)
        rows = torch.arange(b, device=hidden.device)[:, None].expand_as(keep)
        cols = torch.arange(t, device=hidden.device).expand_as(keep)
        src[rows[keep], dest[keep]] = cols[keep]
        is_real[rows[keep], dest[keep]] = True

        prev = self._stage_for(i)
        prev_orig = prev.orig if prev is not None else torch.arange(t, device=hidden.device).expand(b, t)
        orig = torch.where(is_real, torch.gather(prev_orig, 1, src), torch.full_like(src, -1))
        new_hidden = torch.gather(hidden, 1, src[..., None].expand(b, width, hidden.shape[-1]))
        new_hidden = new_hidden * is_real[..., None].to(hidden.dtype)
        for key in ("visual", "valid", "image_index"):
            val = torch.gather(state[key], 1, src)
            state[key] = val & is_real if val.dtype == torch.bool else val.masked_fill(~is_real, -1)
        # the query token is the last prompt token, never dropped: find where it moved
        q_orig = torch.gather(prev_orig, 1, state["query_index"][:, None])  # (B, 1)
        state["query_index"] = (orig == q_orig).long().argmax(dim=1)

        prev_pos = prev.position_ids if prev is not None else state.get("position_ids")
        if prev_pos is None:
            prev_pos = prev_orig
        if prev_pos.dim() == 3:  # M-RoPE ids (R, B, T) (Qwen2-VL): every row gathered like the tokens
            pos = torch.stack([_gather_seq(p, src) for p in prev_pos])
        else:
            pos = _gather_seq(prev_pos, src)
        cos, sin = pe
        # `pe` is over the previous stage's columns: index it by column, not by original position
        pe_new = (_gather_seq(cos, src), _gather_seq(sin, src))
        allowed = (orig[:, None, :] <= orig[:, :, None]) & state["valid"][:, None, :]
        allowed = allowed | torch.eye(width, dtype=torch.bool, device=hidden.device)[None]  # no empty rows
        stage = _Stage(
            layer=i,
            orig=orig,
            key_valid=state["valid"].clone(),
            position_embeddings=pe_new,
            position_ids=pos,
            mask=_model_format_mask(allowed[:, None], self.impl, hidden.dtype),
        )
        self._stages.append(stage)
        self.record.kept_positions.append(orig)
        return new_hidden

    def _on_end(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
        state, self._pass = self._pass, None
        self._decoding = False
        if state is not None and self._cache_ref is None:
            # the decoder made its own cache (use_cache without one passed in): decoding continues with it
            cache = cache_from_output(output)
            self._cache_ref = weakref.ref(cache) if cache is not None else None
        if state is None or not self._stages:
            return None
        final = self._stages[-1]
        hidden = output.last_hidden_state  # (B, T', D)
        b, t = final.orig.shape[0], state["T"]
        full = hidden.new_zeros(b, t, hidden.shape[-1])
        real = final.orig >= 0
        rows = torch.arange(b, device=hidden.device)[:, None].expand_as(final.orig)
        full[rows[real], final.orig[real]] = hidden[real]
        output.last_hidden_state = full
        return output

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._stages = []
        self._pass = None
        self._pending = None
