"""Pruning inside a Hugging Face ViT vision tower (CLIP, SigLIP, DINOv2), on one model instance.

How it attaches (nothing is assigned to a transformers class):

* a forward pre-hook on the tower module starts a pass (resets the selector) and a forward hook ends it
  (publishes the kept indices on the original patch grid);
* forward hooks on each layer's ``q_proj`` / ``k_proj`` / ``v_proj`` keep a reference to the projections
  while that layer runs (armed by a pre-hook on the layer, so a gradient-checkpoint recompute, which
  reruns only the layer's ``forward``, records nothing);
* a forward hook on each encoder layer, registered with ``prepend=True`` so that transformers' own
  ``output_hidden_states`` recorder sees the pruned output, hands ``q, k, v`` to the selector and gathers
  the kept tokens from the layer's output. The global token (CLS) stays at position 0. A selector may
  instead return a :class:`TokenMerge`: some tokens kept as they are, then new tokens that are weighted
  averages of the layer's patch tokens (VisionZip's contextual tokens).

The attention itself is untouched: the layer keeps eager / SDPA / FlashAttention, and only the selector's
``O(T)`` global row is computed on the side.
"""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..methods.base import TokenMerge, VisionSelector
from .instance import replace_method


@dataclass
class TowerSpec:
    """Where a vision tower's pieces are. ``attentions[i]`` has ``q_proj``, ``k_proj``, ``v_proj``."""

    family: str
    root: nn.Module
    layers: list[nn.Module]
    attentions: list[nn.Module]
    num_heads: int
    head_dim: int
    scales: list[float]
    has_cls: bool

    @property
    def num_layers(self) -> int:
        return len(self.layers)


def _attn_scale(attn: nn.Module) -> float:
    for name in ("scale", "scaling"):
        value = getattr(attn, name, None)
        if isinstance(value, (int, float)):
            return float(value)
    return float(attn.head_dim) ** -0.5


def _spec_from_layers(
    family: str, root: nn.Module, layers: nn.ModuleList, attn_name: str, config: Any, has_cls: bool
) -> TowerSpec:
    attentions = [getattr(layer, attn_name) for layer in layers]
    for a in attentions:
        if not all(isinstance(getattr(a, p, None), nn.Linear) for p in ("q_proj", "k_proj", "v_proj")):
            raise TypeError(
                f"{family}: attention module {type(a).__name__} has no q_proj/k_proj/v_proj linears; this "
                f"transformers version is not supported (tested: transformers 5.x)"
            )
    num_heads = config.num_attention_heads
    head_dim = attentions[0].q_proj.out_features // num_heads
    return TowerSpec(
        family=family,
        root=root,
        layers=list(layers),
        attentions=attentions,
        num_heads=num_heads,
        head_dim=head_dim,
        scales=[_attn_scale(a) for a in attentions],
        has_cls=has_cls,
    )


SUPPORTED_TOWERS = ("CLIPVisionModel", "SiglipVisionModel", "Dinov2Model")


def _encoder(model: nn.Module) -> nn.Module:
    # transformers < 5.x nests the encoder under `vision_model`; later versions flatten it.
    inner = getattr(model, "vision_model", model)
    return inner.encoder


def tower_spec(model: nn.Module) -> TowerSpec:
    """Recognise a supported vision tower instance. Raises ``TypeError`` naming the supported classes."""
    from transformers import CLIPVisionModel, Dinov2Model, SiglipVisionModel

    if isinstance(model, CLIPVisionModel):
        layers = _encoder(model).layers
        return _spec_from_layers("clip", model, layers, "self_attn", model.config, has_cls=True)
    if isinstance(model, SiglipVisionModel):
        # SigLIP has no CLS token: FlowCut's global token is the mean token (SPEC "No CLS").
        layers = _encoder(model).layers
        return _spec_from_layers("siglip", model, layers, "self_attn", model.config, has_cls=False)
    if isinstance(model, Dinov2Model):
        return _spec_from_layers(
            "dinov2", model, model.encoder.layer, "attention", model.config, has_cls=True
        )
    raise TypeError(
        f"{type(model).__name__} is not a supported vision tower; supported: {', '.join(SUPPORTED_TOWERS)} "
        f"and LLaVA models that contain one"
    )


def consumed_layer(feature_layers: int | list[int], num_layers: int) -> int:
    """``F``: the first encoder layer (0-based) whose output is read, given ``hidden_states`` indices.

    ``hidden_states[h]`` is the output of layer ``h - 1`` (index 0 is the embeddings), so
    ``F = min(h) - 1`` after resolving negative indices against ``num_layers + 1`` states.
    """
    layers = [feature_layers] if isinstance(feature_layers, int) else list(feature_layers)
    if not layers:
        raise ValueError("feature layer list is empty")
    resolved = []
    for h in layers:
        if isinstance(h, bool) or not isinstance(h, int):
            raise TypeError(f"feature_layer must be an int hidden-state index, got {h!r}")
        r = h if h >= 0 else num_layers + 1 + h
        if not 0 <= r <= num_layers:
            raise ValueError(
                f"feature_layer={h} is out of range for an encoder with {num_layers} layers "
                f"(valid: {-(num_layers + 1)} .. {num_layers})"
            )
        resolved.append(r)
    return min(resolved) - 1


def _split_output(output: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    if isinstance(output, tuple):
        return output[0], lambda t: (t, *output[1:])
    raise TypeError(f"unexpected encoder layer output type {type(output).__name__}")


@dataclass
class EncoderPassRecord:
    """What one forward of the tower did; the handle exposes the last one."""

    # (B, K) positions on the original patch grid, ascending; a TokenMerge appends its merged tokens'
    # source positions after the kept ones.
    kept_indices: torch.Tensor | None = None
    tokens_per_layer: list[int] = field(default_factory=list)  # patch tokens after every layer
    num_patches: int = 0
    # (B, N) True where a patch is processor padding (see padding_patches); None when the pixels were not seen
    padding: torch.Tensor | None = None


class EncoderPruner:
    """Installs the hooks of one selector on one tower instance. ``remove()`` takes every hook off."""

    def __init__(self, spec: TowerSpec, selector: VisionSelector, consume_layer: int) -> None:
        if not 1 <= consume_layer <= spec.num_layers - 1:
            raise ValueError(
                f"FlowCut finishes pruning at the output of the layer before the consumed one; the consumed "
                f"layer is {consume_layer} of {spec.num_layers} (0-based), which leaves no layer to prune in. "
                f"Read hidden_states[2] or later (feature_layer >= 2 or a negative index)."
            )
        self.spec = spec
        self.selector = selector
        self.consume_layer = consume_layer
        self.record = EncoderPassRecord()
        self._handles: list[RemovableHandle] = []
        self._armed: int | None = None
        self._qkv: dict[str, torch.Tensor] = {}
        self._orig_idx: torch.Tensor | None = None
        self._tokens: list[int] = []
        self._num_patches0 = 0
        # Activation checkpointing re-runs a layer during backward, outside the tower's forward: it must
        # repeat the recorded choice (same input -> same output), not score again.
        self._in_pass = False
        # (layer, input storage) -> (output shape, choice); kept across tower calls while gradients are on
        # (a loss over several forwards recomputes all of them in one backward), bounded in size
        self._decisions: OrderedDict[tuple[int, int], tuple[tuple[int, ...], torch.Tensor | TokenMerge]] = (
            OrderedDict()
        )
        self._images: list[tuple[torch.Tensor | None, list[int]]] = []  # per-image passes of one call
        self._padding: torch.Tensor | None = None  # (B, N) processor padding of the current call
        self._split = False  # whether the current call runs one image at a time
        self._restore_forward: Callable[[], None] = lambda: None
        self._install()

    # -- hooks ---------------------------------------------------------------------------------------
    def _install(self) -> None:
        spec = self.spec
        self._handles.append(spec.root.register_forward_pre_hook(self._on_tower_start, with_kwargs=True))
        self._handles.append(spec.root.register_forward_hook(self._on_tower_end))
        self._restore_forward = _one_image_at_a_time(
            spec.root, self._splits, self._begin_image, self._end_image
        )
        for i, (layer, attn) in enumerate(zip(spec.layers, spec.attentions, strict=True)):
            self._handles.append(layer.register_forward_pre_hook(self._make_layer_pre(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._make_layer_post(i), prepend=True))
            for name in ("q_proj", "k_proj", "v_proj"):
                self._handles.append(getattr(attn, name).register_forward_hook(self._make_capture(i, name)))

    def _on_tower_start(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._in_pass = True
        if not torch.is_grad_enabled():  # no backward can recompute these layers
            self._decisions.clear()
        self._images = []
        pixels = args[0] if args else kwargs.get("pixel_values")
        set_keys = getattr(self.selector, "set_image_keys", None)
        if set_keys is not None and isinstance(pixels, torch.Tensor):
            # selectors that draw per image (random) draw from the image's own pixels, not its batch slot
            set_keys([content_key(x) for x in pixels])
        patch = getattr(getattr(self.spec.root, "config", None), "patch_size", None)
        self._padding = None
        if isinstance(pixels, torch.Tensor) and pixels.dim() == 4 and isinstance(patch, int):
            self._padding = padding_patches(pixels, patch)
        self._split = isinstance(pixels, torch.Tensor) and pixels.dim() >= 1 and pixels.shape[0] > 1
        self._split = self._split and self._splits(pixels)
        self._begin_image()

    def _splits(self, pixels: torch.Tensor) -> bool:
        """Whether this call runs one image at a time: the selector's counts are per image (FlowCut) and it
        will prune these images (``keep`` >= the patch count is the identity, batched as unpruned)."""
        if not getattr(self.selector, "per_image_passes", False):
            return False
        patch = getattr(getattr(self.spec.root, "config", None), "patch_size", None)
        if isinstance(patch, int) and pixels.dim() == 4:
            return self.selector.needs_scores((pixels.shape[-2] // patch) * (pixels.shape[-1] // patch))
        return True

    def _begin_image(self) -> None:
        self.selector.start(self.consume_layer)
        set_padding = getattr(self.selector, "set_padding", None)
        if set_padding is not None:
            pad = self._padding
            if pad is not None and self._split:  # this pass is image number len(self._images) alone
                b = len(self._images)
                pad = pad[b : b + 1]
            set_padding(pad)
        self._orig_idx = None
        self._tokens = []

    def _end_image(self) -> None:
        self._images.append((self._orig_idx, list(self._tokens)))

    def _on_tower_end(self, module: nn.Module, args: tuple, output: Any) -> None:
        self._in_pass = False
        if self._images:  # one pass per image: the batch's record, images in order
            kept = [k for k, _ in self._images]
            self._orig_idx = None if any(k is None for k in kept) else _pad_rows(kept)
            per_layer = zip(*(t for _, t in self._images), strict=True)
            self._tokens = [max(counts) for counts in per_layer]  # what the padded batch holds
            self._images = []
        self.record = EncoderPassRecord(
            kept_indices=self._orig_idx,
            tokens_per_layer=list(self._tokens),
            num_patches=self._num_patches0,
            padding=self._padding,
        )

    def _make_layer_pre(self, i: int) -> Callable:
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
            if mask is not None:
                raise NotImplementedError(
                    "token pruning inside a vision tower that receives an attention mask is not supported; "
                    "call the tower without attention_mask"
                )
            if not self._in_pass:  # a checkpointed layer recomputed in backward: see _make_layer_post
                return
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0 or self._orig_idx is None:
                n = hidden.shape[1] - int(self.spec.has_cls)
                self._num_patches0 = n
                self._orig_idx = torch.arange(n, device=hidden.device).expand(hidden.shape[0], n)
            self._armed = i
            self._qkv = {}

        return hook

    def _make_capture(self, i: int, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if self._armed == i:
                self._qkv[name] = output

        return hook

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.spec.num_heads, self.spec.head_dim).transpose(1, 2)  # (B, H, T, d)

    def _make_layer_post(self, i: int) -> Callable:
        spec = self.spec

        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            hidden, rebuild = _split_output(output)
            qkv, self._qkv, self._armed = self._qkv, {}, None
            key = (i, _input_key(args))
            if not self._in_pass:
                return self._replay(key, hidden, rebuild)
            n_patches = hidden.shape[1] - int(spec.has_cls)
            result = None
            if self.selector.needs_scores(n_patches):
                if len(qkv) != 3:
                    raise RuntimeError(
                        f"layer {i}: the q/k/v projections did not run through their modules; this attention "
                        f"implementation is not supported"
                    )
                q, k, v = (self._heads(qkv[n]) for n in ("q_proj", "k_proj", "v_proj"))
                idx = self.selector.step(i, q, k, v, spec.scales[i], spec.has_cls)
                if idx is not None:  # (reentrant checkpointing runs this forward under no_grad)
                    self._decisions[key] = (tuple(hidden.shape), idx)
                    self._decisions.move_to_end(key)
                    while len(self._decisions) > _MAX_DECISIONS:
                        self._decisions.popitem(last=False)
                if isinstance(idx, torch.Tensor):
                    hidden = gather_tokens(hidden, idx, spec.has_cls)
                    self._orig_idx = torch.gather(self._orig_idx, 1, idx)
                    result = rebuild(hidden)
                elif idx is not None:  # a TokenMerge
                    hidden = merge_tokens(hidden, idx, spec.has_cls)
                    recorded = torch.cat([idx.kept, idx.sources], dim=1)  # merged: the source's position
                    self._orig_idx = torch.gather(self._orig_idx, 1, recorded)
                    result = rebuild(hidden)
            self._tokens.append(hidden.shape[1] - int(spec.has_cls))
            return result

        return hook

    def _replay(
        self, key: tuple[int, int], hidden: torch.Tensor, rebuild: Callable[[torch.Tensor], Any]
    ) -> Any:
        """A layer run again outside a tower pass (checkpoint recompute) on the same input: apply the choice
        recorded for that layer and input (one per image when the tower runs one image at a time)."""
        shape, decision = self._decisions.get(key, (None, None))
        if decision is None or tuple(hidden.shape) != shape:
            return None
        if isinstance(decision, torch.Tensor):
            return rebuild(gather_tokens(hidden, decision, self.spec.has_cls))
        return rebuild(merge_tokens(hidden, decision, self.spec.has_cls))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._restore_forward()
        self._restore_forward = lambda: None
        self._qkv = {}
        self._decisions.clear()


# Recorded choices kept for checkpoint recomputes (each a small index tensor): enough for many forwards
# between two backward passes.
_MAX_DECISIONS = 1024


def _pad_rows(rows: list[torch.Tensor]) -> torch.Tensor:
    """Per-image ``(1, K_i)`` kept indices as one ``(B, max K_i)`` tensor, ``-1`` after each image's own
    (images keep different counts under FlowCut's ``keep="auto"``)."""
    width = max(r.shape[1] for r in rows)
    if all(r.shape[1] == width for r in rows):
        return torch.cat(rows)
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[1]), value=-1) for r in rows])


# A patch is processor padding when every pixel of it, in every channel, is within this of 0 after
# normalisation. Processors pad with the mean colour (LLaVA-1.5's expand-to-square, transformers' do_pad),
# which normalises to 0 up to the 8-bit rounding of the mean: at most (1/255) / std, 0.017 for the
# smallest std in use (DINOv2's 0.225), so 0.02 catches it; real content is almost never flat at exactly
# the mean colour over a whole patch (and such a patch holds no information either).
PADDING_TOLERANCE = 0.02


def padding_patches(pixels: torch.Tensor, patch: int, tol: float = PADDING_TOLERANCE) -> torch.Tensor:
    """``(B, N)`` bool: which patches of normalised ``pixels`` (B, C, H, W) are flat processor padding
    (raster order, the order of the tower's patch tokens)."""
    b, _, h, w = pixels.shape
    gh, gw = h // patch, w // patch
    flat = pixels[..., : gh * patch, : gw * patch].detach().abs().amax(dim=1)  # (B, H, W)
    per_patch = flat.reshape(b, gh, patch, gw, patch).amax(dim=(2, 4))  # (B, gh, gw)
    return (per_patch <= tol).reshape(b, gh * gw)


def content_key(x: torch.Tensor) -> int:
    """A 32-bit checksum of one image's pixels (the same image gives the same key in any batch)."""
    return zlib.crc32(x.detach().float().cpu().contiguous().numpy().tobytes())


def _input_key(args: tuple) -> int:
    """Identifies a layer's input across a checkpoint recompute (the same saved tensor storage)."""
    hidden = args[0] if args and isinstance(args[0], torch.Tensor) else None
    return hidden.data_ptr() if hidden is not None else 0


def _one_image_at_a_time(
    root: nn.Module,
    splits: Callable[[torch.Tensor], bool],
    begin: Callable[[], None],
    end: Callable[[], None],
) -> Callable[[], None]:
    """Run ``root``'s forward once per image of its batch (on this instance, when ``splits(pixels)``) and
    join the outputs.

    For selectors whose counts differ per image (FlowCut, Eq. 3 per image): each image is scored alone, so
    its kept tokens and every feature do not depend on its neighbours. The tower's hooks still fire once per
    call; ``begin`` / ``end`` bracket each image. Outputs are concatenated along the batch; hidden states of
    layers whose token count differs between images are right-padded with zeros to the longest (the layers
    a VLM consumes all have ``K`` tokens). Returns the function that puts the original forward back.
    """
    original = root.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        pixels = args[0] if args else kwargs.get("pixel_values")
        if not isinstance(pixels, torch.Tensor) or pixels.dim() < 1 or pixels.shape[0] <= 1:
            return original(*args, **kwargs)
        if not splits(pixels):
            return original(*args, **kwargs)
        batch = pixels.shape[0]

        def take(x: Any, b: int) -> Any:
            return x[b : b + 1] if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == batch else x

        outputs = []
        for b in range(batch):
            if b:
                begin()
            outputs.append(
                original(*(take(a, b) for a in args), **{k: take(v, b) for k, v in kwargs.items()})
            )
            end()
        return _join_outputs(outputs)

    return replace_method(root, "forward", forward)


def _join(parts: list[Any]) -> Any:
    """Concatenate per-image outputs along the batch; tensors whose other dims differ (token counts of early
    layers, attention maps) are zero-padded at the end of each dim to the largest."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        if first.dim() >= 2 and len({p.shape[1:] for p in parts}) > 1:
            size = [max(p.shape[d] for p in parts) for d in range(1, first.dim())]
            padded = []
            for p in parts:
                pad: list[int] = []
                for d in reversed(range(1, p.dim())):
                    pad += [0, size[d - 1] - p.shape[d]]
                padded.append(torch.nn.functional.pad(p, pad))
            parts = padded
        return torch.cat(parts)
    if isinstance(first, tuple):
        return tuple(_join(list(items)) for items in zip(*parts, strict=True))
    if isinstance(first, list):
        return [_join(list(items)) for items in zip(*parts, strict=True)]
    return first


def _join_outputs(outputs: list[Any]) -> Any:
    first = outputs[0]
    if hasattr(first, "keys") and hasattr(first, "__setitem__"):  # a ModelOutput
        joined = type(first)(**{k: _join([o[k] for o in outputs]) for k in first.keys()})
        return joined
    return _join(outputs)


def gather_tokens(hidden: torch.Tensor, idx: torch.Tensor, has_cls: bool) -> torch.Tensor:
    """Keep patch tokens ``idx`` (B, n) of ``hidden`` (B, T, D); the global token stays in front."""
    off = int(has_cls)
    patches = hidden[:, off:]
    kept = torch.gather(patches, 1, idx.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))
    return torch.cat([hidden[:, :off], kept], dim=1) if has_cls else kept


def merge_tokens(hidden: torch.Tensor, merge: TokenMerge, has_cls: bool) -> torch.Tensor:
    """Apply a :class:`TokenMerge` to ``hidden`` (B, T, D): global token, kept tokens, then merged ones."""
    patches = hidden[:, int(has_cls) :]
    dtype = torch.promote_types(hidden.dtype, torch.float32)  # average half-precision tokens in float32
    merged = torch.bmm(merge.weights.to(dtype), patches.to(dtype)).to(hidden.dtype)  # (B, C, D)
    return torch.cat([gather_tokens(hidden, merge.kept, has_cls), merged], dim=1)
