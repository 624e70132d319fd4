"""The ``vlmcut`` model of lmms-eval: any VLM family vlmcut supports, unpruned or pruned by one method.

``python -m lmms_eval --model vlmcut --model_args pretrained=DIR,method=flowcut,keep=64 --tasks ...``

* ``pretrained``: a local Hugging Face model directory (loaded with ``AutoModelForImageTextToText`` and
  ``AutoProcessor``, never from the network). ``method``: one of :func:`vlmcut.available_methods` or ``none``
  (the unpruned baseline); ``keep`` and the method's options (``history_weight=0.5``, ``layers=8;16;24``) are
  converted to the config's field types and checked by vlmcut itself.
* ``VlmcutLMM`` is the simple interface (``--force_simple``), ``VlmcutChatLMM`` the chat one (lmms-eval's
  default); both score ``loglikelihood`` (multiple-choice tasks) as well as generation, in batches with left
  padding. Pruning is per image, so no answer depends on what else is in its batch.
* Efficiency next to accuracy: every generated sample carries, in its logged ``token_counts``,
  ``visual_tokens`` (visual tokens that entered the language model, measured at its prefill; LLaVA-NeXT's
  image-newline tokens included), ``visual_tokens_final`` (those still alive after the last in-LLM pruning
  stage: FastV, PDrop, SparseVLM, FlowCut's second stage on LLaVA-NeXT / Qwen2-VL) and
  ``prefill_s`` / ``vision_s`` (the batch's language-model prefill and vision-tower wall time, divided by its
  rows). The run's means land in the results file under ``throughput`` (``avg_visual_tokens``, ...).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from lmms_eval.protocol import ChatMessages
from PIL import Image

import vlmcut
from vlmcut.inference import DTYPES, model_config
from vlmcut.timing import StageTimer

from .options import NO_PRUNING, check_method, prune_options

# Rounds of one multi-round request before it is treated as a task bug (doc_to_text never says "stop").
MAX_ROUNDS = 64


@dataclass
class VlmcutTokenCounts(TokenCounts):
    """lmms-eval's per-sample token counts plus what pruning changed; ``to_dict`` is what each logged sample
    shows under ``token_counts``."""

    visual_tokens: int | None = None
    visual_tokens_final: int | None = None
    prefill_s: float | None = None
    vision_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = super().to_dict()
        for name in ("visual_tokens", "visual_tokens_final", "prefill_s", "vision_s"):
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        return d


@dataclass
class _Prefill:
    """What one batched call's first language-model step saw, per row."""

    visual_tokens: list[int]
    visual_tokens_final: list[int]
    prefill_s: float
    vision_s: float


def load_model(pretrained: str | Path, dtype: str = "float32", attn: str = "sdpa") -> tuple[Any, Any]:
    """``(model, processor)`` from a local directory, with the Auto classes; never touches the network."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = Path(str(pretrained))
    model_config(path)  # a clear error for a path that is not a model directory
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
    model = AutoModelForImageTextToText.from_pretrained(
        path, local_files_only=True, dtype=DTYPES[dtype], attn_implementation=attn
    )
    return model.eval(), processor


def _submodule(model: Any, names: tuple[str, ...]) -> Any:
    """The first of ``model.model.<name>`` / ``model.<name>`` that exists (public transformers attributes)."""
    for owner in (getattr(model, "model", None), model):
        for name in names:
            mod = getattr(owner, name, None) if owner is not None else None
            if isinstance(mod, torch.nn.Module):
                return mod
    return None


def _visual_token_ids(model: Any) -> set[int]:
    """The placeholder token ids of images and videos in this model's prompts."""
    ids = set()
    for cfg in (model.config, getattr(model.config, "text_config", None)):
        for name in ("image_token_id", "image_token_index", "video_token_id", "video_token_index"):
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int):
                ids.add(value)
    if not ids:
        raise ValueError(
            f"{type(model).__name__}'s config names no image token id (image_token_id); vlmcut's lmms-eval "
            f"model needs a vision-language model with image placeholders in its prompt"
        )
    return ids


class VlmcutLMM(lmms):
    """lmms-eval model (simple interface): a local VLM, pruned with ``method`` at ``keep`` tokens per image.

    Args:
        pretrained: local Hugging Face model directory.
        method: a vlmcut method or ``"none"`` (the unpruned model; ``keep`` is then ignored).
        keep: visual tokens per image (see :func:`vlmcut.prune`).
        dtype: ``float32`` (default), ``bfloat16`` or ``float16``.
        device: ``cpu``, ``cuda``, ``cuda:1``...; ``cuda`` without a GPU is an error, not a silent CPU run.
        batch_size: requests per forward (left padding).
        attn: ``sdpa`` (default) or ``eager``.
        max_new_tokens: the default when a task does not set one.
        **options: the method's settings (``history_weight``, ``layers``...).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        method: str = NO_PRUNING,
        keep: Any = None,
        dtype: str = "float32",
        device: str | None = None,
        batch_size: int | str = 1,
        attn: str = "sdpa",
        max_new_tokens: int | str = 128,
        max_batch_size: Any = None,  # lmms-eval passes it to every model; unused
        **options: Any,
    ) -> None:
        super().__init__()
        method = check_method(method)
        self.batch_size_per_gpu = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        device = _device(device)
        model, processor = load_model(pretrained, dtype=str(dtype), attn=str(attn))
        self._setup(model.to(device), processor, method, keep, options)
        self.pretrained = str(pretrained)

    @classmethod
    def from_loaded(
        cls,
        model: Any,
        processor: Any,
        method: str = NO_PRUNING,
        keep: Any = None,
        batch_size: int = 1,
        max_new_tokens: int = 128,
        **options: Any,
    ) -> VlmcutLMM:
        """The lmms-eval model around an already loaded ``(model, processor)`` (tests, sweeps: load once)."""
        self = cls.__new__(cls)
        lmms.__init__(self)
        self.batch_size_per_gpu = _positive_int("batch_size", batch_size)
        self.max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
        self._setup(model, processor, check_method(method), keep, options)
        self.pretrained = type(model).__name__
        return self

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> VlmcutLMM:
        """Like lmms-eval's, but every value reaches the constructor as the text the user wrote, so it is
        converted once, to the method config's field types (lmms-eval's own parsing turns ``keep=-1``
        into ``-1.0`` and ``layers=8;16`` stays text anyway)."""
        args = {}
        for item in split_model_args(arg_string):
            if "=" not in item:
                raise ValueError(f"--model_args entry {item!r} is not key=value; e.g. method=flowcut,keep=64")
            key, value = item.split("=", 1)
            args[key.strip()] = value.strip()
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        if "pretrained" not in args:
            raise ValueError("--model_args needs pretrained=DIR (a local Hugging Face model directory)")
        return cls(**{**extra, **args})  # what --model_args says wins over --batch_size / --device

    # --------------------------------------------------------------------------------------------------
    # Set-up
    # --------------------------------------------------------------------------------------------------

    def _setup(self, model: Any, processor: Any, method: str, keep: Any, options: dict[str, Any]) -> None:
        self._model = model
        self.processor = processor
        self._tokenizer = getattr(processor, "tokenizer", processor)
        self._device = next(model.parameters()).device
        self.method = method
        self.visual_ids = _visual_token_ids(model)
        self.language_model = _submodule(model, ("language_model",))
        if self.language_model is None:
            raise ValueError(f"{type(model).__name__} has no language_model; pass a vision-language model")
        self.vision = _submodule(model, ("vision_tower", "visual", "image_tower"))
        self.handle = None
        self.keep = None
        if method != NO_PRUNING:
            if keep is None:
                raise ValueError(f"method={method} needs keep=<visual tokens per image>, e.g. keep=64")
            keep, options = prune_options(method, keep, options)
            self.handle = vlmcut.prune(model, method, keep=keep, **options)
            self.keep = keep
        elif keep is not None or options:
            given = sorted(options) + (["keep"] if keep is not None else [])
            raise ValueError(
                f"method=none runs the unpruned model and takes no keep or options; drop {given}"
            )
        self.options = options

    def remove(self) -> None:
        """Take the pruning off the model (it is exactly as loaded again)."""
        if self.handle is not None:
            self.handle.remove()

    @property
    def model(self) -> Any:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def clean(self) -> None:
        """lmms-eval calls this after a run: keep the model (a sweep reuses it); free CUDA's cache only."""
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --------------------------------------------------------------------------------------------------
    # Prompts and forward passes
    # --------------------------------------------------------------------------------------------------

    def prompt(self, text: str, n_images: int) -> str:
        """One user turn: ``n_images`` images, then ``text``, in the processor's chat template (LLaVA-1.5's
        plain format without one); a prompt that already holds the image token is used as given."""
        token = getattr(self.processor, "image_token", "<image>")
        if token in text:
            return text
        content: list[dict[str, Any]] = [{"type": "image"} for _ in range(n_images)]
        return self.chat_prompt([{"role": "user", "content": [*content, {"type": "text", "text": text}]}])

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """``messages`` (HF format; images as ``{"type": "image"}``) in the chat template, generation prompt
        appended."""
        if getattr(self.processor, "chat_template", None):
            return self.processor.apply_chat_template(messages, add_generation_prompt=True)
        token = getattr(self.processor, "image_token", "<image>")
        turns = []
        for m in messages:
            parts = [token if c.get("type") == "image" else c.get("text", "") for c in m["content"]]
            text = "\n".join(parts)
            turns.append(f"{'USER' if m['role'] == 'user' else m['role'].upper()}: {text}")
        return " ".join(turns) + " ASSISTANT:"

    def _inputs(self, texts: list[str], images: list[Image.Image]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"text": texts, "return_tensors": "pt", "padding": True}
        if images:
            kwargs["images"] = images
        tok = self._tokenizer
        side = tok.padding_side
        tok.padding_side = "left"  # every row continues at its end
        try:
            inputs = dict(self.processor(**kwargs))
        finally:
            tok.padding_side = side
        out = {k: v.to(self._device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        if "pixel_values" in out and out["pixel_values"].is_floating_point():
            out["pixel_values"] = out["pixel_values"].to(self._model.dtype)
        return out

    def _run(self, call: Any, text_tokens: list[int]) -> tuple[Any, _Prefill]:
        """``call()`` with the prefill's visual tokens and stage times recorded.

        Measured, not derived from ``keep``: the language model's first call (the prefill) shows how many
        tokens each row feeds it (its 2-D attention mask, else the sequence length); minus the row's text
        tokens (``text_tokens``; pruning never drops text) that is the visual tokens that reached the LLM,
        LLaVA-NeXT's image-newline tokens included. Methods that prune inside the LLM record the positions
        alive after their last stage (``handle.llm_record``): those minus the text tokens are the final ones.
        """
        rows = len(text_tokens)
        seen: list[torch.Tensor] = []  # the prefill's (B, T) mask of real (non-padding) positions

        def capture(module: Any, args: tuple, kwargs: dict) -> None:
            if seen:
                return
            mask = kwargs.get("attention_mask")
            embeds = kwargs.get("inputs_embeds")
            if embeds is None:
                embeds = kwargs.get("input_ids", args[0] if args else None)
            if torch.is_tensor(mask) and mask.dim() == 2:
                seen.append(mask.detach().bool().cpu())
            elif torch.is_tensor(embeds):
                seen.append(torch.ones(rows, embeds.shape[1], dtype=torch.bool))

        hook = self.language_model.register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with StageTimer(self.vision or self.language_model, self.language_model) as timer:
                out = call()
        finally:
            hook.remove()
        real = seen[0] if seen else None
        lengths = real.sum(-1).tolist() if real is not None else list(text_tokens)
        visual = [max(int(n) - t, 0) for n, t in zip(lengths, text_tokens, strict=True)]
        final = list(visual)
        record = self.handle.llm_record if self.handle is not None else None
        stages = getattr(record, "kept_positions", None) if record is not None else None
        if stages and real is not None:
            last = stages[-1].cpu()  # (B, T_s): positions alive after the last prune layer, -1 = filler
            alive = (last >= 0) & real.gather(1, last.clamp(min=0))  # padding columns are not tokens
            final = [max(int(n) - t, 0) for n, t in zip(alive.sum(-1).tolist(), text_tokens, strict=True)]
        times = timer.times
        vision_s = sum(times.vision) if self.vision is not None else 0.0
        return out, _Prefill(visual, final, times.prefill / max(rows, 1), vision_s / max(rows, 1))

    @torch.no_grad()
    def _generate(
        self, texts: list[str], images: list[Image.Image], gen_kwargs: dict[str, Any]
    ) -> tuple[list[str], list[VlmcutTokenCounts]]:
        """Greedy (or sampled, when the task asks) continuations of a left-padded batch."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(kwargs.pop("max_new_tokens", self.max_new_tokens))
        temperature = float(kwargs.pop("temperature", 0) or 0)
        do_sample = bool(kwargs.pop("do_sample", False)) or temperature > 0
        top_p = kwargs.pop("top_p", None)
        num_beams = int(kwargs.pop("num_beams", 1) or 1)
        for ignored in ("image_sizes", "image_aspect_ratio"):
            kwargs.pop(ignored, None)
        sampling: dict[str, Any] = {"do_sample": do_sample}
        if do_sample:
            sampling.update(temperature=temperature, top_p=top_p)
        if num_beams > 1:
            sampling["num_beams"] = num_beams
        inputs = self._inputs(texts, images)
        width = inputs["input_ids"].shape[1]
        text_tokens = self._text_tokens(inputs)
        out, pre = self._run(
            lambda: self._model.generate(**inputs, max_new_tokens=max_new, **sampling), text_tokens
        )
        new = out[:, width:]
        decoded = self.processor.batch_decode(new, skip_special_tokens=True)
        pad = getattr(self._tokenizer, "pad_token_id", None)
        answers, counts = [], []
        for row, text in enumerate(decoded):
            for stop in until:
                if stop:
                    text = text.split(stop)[0]
            answers.append(text)
            n_out = int((new[row] != pad).sum()) if pad is not None else int(new.shape[1])
            counts.append(
                VlmcutTokenCounts(
                    input_tokens=text_tokens[row] + pre.visual_tokens[row],  # what the LLM read
                    output_tokens=n_out,
                    visual_tokens=pre.visual_tokens[row],
                    visual_tokens_final=pre.visual_tokens_final[row],
                    prefill_s=pre.prefill_s,
                    vision_s=pre.vision_s,
                )
            )
        return answers, counts

    def _text_tokens(self, inputs: dict[str, Any]) -> list[int]:
        """Per row: prompt tokens that are not padding and not image placeholders."""
        ids = inputs["input_ids"]
        keep = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        for token in self.visual_ids:
            keep &= ids != token
        return keep.sum(-1).tolist()

    def _log(self, counts: list[VlmcutTokenCounts], seconds: float) -> None:
        """The run's means in the results file (``throughput``: ``avg_visual_tokens``, ...)."""
        if not counts:
            return
        n = len(counts)
        extra = {
            "visual_tokens": sum(c.visual_tokens or 0 for c in counts) / n,
            "visual_tokens_final": sum(c.visual_tokens_final or 0 for c in counts) / n,
            "prefill_s": sum(c.prefill_s or 0.0 for c in counts) / n,
            "vision_s": sum(c.vision_s or 0.0 for c in counts) / n,
            "total_requests": n,
        }
        tokens = sum(c.output_tokens or 0 for c in counts)
        log_metrics(seconds, tokens, tokens / seconds if seconds > 0 else 0.0, additional_metrics=extra)

    def _doc(self, task: str, split: str, doc_id: int) -> dict[str, Any]:
        return self.task_dict[task][split][doc_id]

    # --------------------------------------------------------------------------------------------------
    # lmms-eval's request types
    # --------------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Simple requests: ``(context, gen_kwargs, doc_to_visual, doc_id, task, split)``. Batches keep the
        requests' order and group equal generation settings (a different batch never changes an answer)."""
        t0 = time.perf_counter()
        results: list[GenerationResult | None] = [None] * len(requests)
        all_counts: list[VlmcutTokenCounts] = []
        for batch in _batches(requests, self.batch_size, key=lambda r: repr(sorted(r.args[1].items()))):
            texts, images = [], []
            for _, req in batch:
                context, _, doc_to_visual, doc_id, task, split = req.args
                visuals = _images(doc_to_visual(self._doc(task, split, doc_id)) if doc_to_visual else [])
                texts.append(self.prompt(context, len(visuals)))
                images += visuals
            answers, counts = self._generate(texts, images, batch[0][1].args[1])
            for (index, _), text, count in zip(batch, answers, counts, strict=True):
                results[index] = GenerationResult(text=text, token_counts=count)
            all_counts += counts
        self._log(all_counts, time.perf_counter() - t0)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """``(-log P(continuation | image, context), continuation is the greedy one)`` per request:
        ``(context, continuation or doc_to_target, doc_to_visual, doc_id, task, split)``. The continuation is
        tokenized on its own and appended to the prompt's tokens (no merge across the boundary).

        The first value is the *negative* log-likelihood (summed over the continuation's tokens): lmms-eval
        0.7.3's multiple-choice scoring takes the choice with the smallest value (``np.argmin``; its own
        models return the loss), unlike lm-eval's log-probability convention.

        Each pair comes wrapped as ``GenerationResult(text=(nll, is_greedy), token_counts=...)``:
        lmms-eval 0.7.3's evaluator passes every model output through ``unwrap_generation_output``, which
        turns a bare ``(float, bool)`` tuple into its ``str`` (multiple-choice scoring then fails for every
        model); a ``GenerationResult`` is unwrapped to the pair itself, with the efficiency counts logged."""
        t0 = time.perf_counter()
        results: list[GenerationResult | None] = [None] * len(requests)
        all_counts: list[VlmcutTokenCounts] = []
        for batch in _batches(requests, self.batch_size):
            texts, images, conts = [], [], []
            for _, req in batch:
                context, target, doc_to_visual, doc_id, task, split = req.args
                doc = self._doc(task, split, doc_id)
                continuation = target if isinstance(target, str) else str(target(doc))
                visuals = _images(doc_to_visual(doc) if doc_to_visual else [])
                texts.append(self.prompt(context, len(visuals)))
                images += visuals
                ids = self._tokenizer(continuation, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise ValueError(f"continuation {continuation!r} of doc {doc_id} has no tokens")
                conts.append(torch.tensor(ids, dtype=torch.long))
            inputs = _append(self._inputs(texts, images), conts, self._pad_id())
            out, pre = self._run(lambda inputs=inputs: self._model(**inputs), self._text_tokens(inputs))
            logprobs = torch.log_softmax(out.logits.float(), dim=-1)  # (B, T', V): T' <= T after pruning
            for row, ((index, _), cont) in enumerate(zip(batch, conts, strict=True)):
                n = cont.numel()
                target_ids = inputs["input_ids"][
                    row, -n:
                ]  # left padding: every row ends with its continuation
                lp = logprobs[row, -n - 1 : -1]  # (n, V): the predictions of those tokens
                nll = -lp.gather(-1, target_ids[:, None]).sum().item()
                counts = VlmcutTokenCounts(
                    visual_tokens=pre.visual_tokens[row],
                    visual_tokens_final=pre.visual_tokens_final[row],
                    prefill_s=pre.prefill_s,
                    vision_s=pre.vision_s,
                )
                pair = (nll, bool((lp.argmax(-1) == target_ids).all()))
                results[index] = GenerationResult(text=pair, token_counts=counts)  # type: ignore[arg-type]
                all_counts.append(counts)
        self._log(all_counts, time.perf_counter() - t0)
        return results  # type: ignore[return-value]

    def _pad_id(self) -> int:
        pad = getattr(self._tokenizer, "pad_token_id", None)
        if pad is None:
            pad = getattr(self._tokenizer, "eos_token_id", None)
        return 0 if pad is None else int(pad)

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Simple multi-round requests ``(context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task,
        split)``: round 0 answers the context; each later round asks ``doc_to_text(doc, previous_output=...,
        round_idx=..., previous_round_info=...)`` for ``(visuals, context, terminal, outputs, info)``. One
        request at a time (rounds of different requests end at different times)."""
        t0 = time.perf_counter()
        results, all_counts = [], []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            visuals = _images(doc_to_visual(doc) if doc_to_visual else [])
            outputs: list[str] = []
            info = None
            for round_idx in range(MAX_ROUNDS + 1):
                if round_idx == MAX_ROUNDS:
                    raise RuntimeError(
                        f"task {task!r} doc {doc_id}: no terminal signal after {MAX_ROUNDS} rounds"
                    )
                if round_idx > 0:
                    visuals, context, terminal, outputs, info = doc_to_text(
                        doc, previous_output=list(outputs), round_idx=round_idx, previous_round_info=info
                    )
                    outputs = list(outputs)
                    if terminal:
                        break
                    visuals = _images(visuals or [])
                answer, counts = self._generate([self.prompt(context, len(visuals))], visuals, gen_kwargs)
                outputs.append(answer[0].strip())
                all_counts += counts
            results.append(outputs)
        self._log(all_counts, time.perf_counter() - t0)
        return results


class VlmcutChatLMM(VlmcutLMM):
    """lmms-eval model (chat interface, lmms-eval's default): requests carry ``doc_to_messages``."""

    is_simple = False

    def _messages(self, messages: Any) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """lmms-eval chat messages as HF messages (images as ``{"type": "image"}``) and the images in order."""
        chat = ChatMessages(messages=messages)
        hf, images = [], []
        for message in chat.messages:
            content = []
            for part in message.content:
                if part.type == "text":
                    content.append({"type": "text", "text": part.text})
                elif part.type == "image":
                    images += _images([part.url])
                    content.append({"type": "image"})
                else:
                    raise NotImplementedError(
                        f"vlmcut's lmms-eval model takes text and images; this task sends {part.type!r}"
                    )
            hf.append({"role": message.role, "content": content})
        return hf, images

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Chat requests: ``(context, doc_to_messages, gen_kwargs, doc_id, task, split)``."""
        t0 = time.perf_counter()
        results: list[GenerationResult | None] = [None] * len(requests)
        all_counts: list[VlmcutTokenCounts] = []
        for batch in _batches(requests, self.batch_size, key=lambda r: repr(sorted(r.args[2].items()))):
            texts, images = [], []
            for _, req in batch:
                _, doc_to_messages, _, doc_id, task, split = req.args
                messages, visuals = self._messages(doc_to_messages(self._doc(task, split, doc_id)))
                texts.append(self.chat_prompt(messages))
                images += visuals
            answers, counts = self._generate(texts, images, batch[0][1].args[2])
            for (index, _), text, count in zip(batch, answers, counts, strict=True):
                results[index] = GenerationResult(text=text, token_counts=count)
            all_counts += counts
        self._log(all_counts, time.perf_counter() - t0)
        return results  # type: ignore[return-value]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[list[str]]:
        """Chat multi-round requests: round 0 is ``doc_to_messages(doc)``; later rounds
        ``doc_to_messages(doc, round_idx=..., previous_output=..., previous_round_info=...)`` returns
        ``(messages, terminal, outputs, info)``."""
        t0 = time.perf_counter()
        results, all_counts = [], []
        for req in requests:
            _, doc_to_messages, gen_kwargs, doc_id, task, split = req.args
            doc = self._doc(task, split, doc_id)
            messages = doc_to_messages(doc)
            outputs: list[str] = []
            info = None
            for round_idx in range(MAX_ROUNDS + 1):
                if round_idx == MAX_ROUNDS:
                    raise RuntimeError(
                        f"task {task!r} doc {doc_id}: no terminal signal after {MAX_ROUNDS} rounds"
                    )
                if round_idx > 0:
                    messages, terminal, outputs, info = doc_to_messages(
                        doc, round_idx=round_idx, previous_output=list(outputs), previous_round_info=info
                    )
                    outputs = list(outputs)
                    if terminal:
                        break
                hf, visuals = self._messages(messages)
                answer, counts = self._generate([self.chat_prompt(hf)], visuals, gen_kwargs)
                outputs.append(answer[0].strip())
                all_counts += counts
            results.append(outputs)
        self._log(all_counts, time.perf_counter() - t0)
        return results


# ------------------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------------------


def split_model_args(text: str) -> list[str]:
    """``key=value`` items of a ``--model_args`` string: commas split them except inside quotes or brackets
    (``layers=[8,16,24]``)."""
    items, current, depth, quote = [], [], 0, ""
    for char in text.strip():
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return [item.strip() for item in items if item.strip()]


def _positive_int(name: str, value: Any) -> int:
    try:
        number = int(str(value))
    except ValueError:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}") from None
    if number < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {number}")
    return number


def _device(device: str | None) -> torch.device:
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(str(device))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device} but this torch has no CUDA device; pass --device cpu")
    return dev


def _images(visuals: Any) -> list[Image.Image]:
    """A task's visuals as RGB PIL images; other media are an error naming what was sent."""
    out = []
    for v in visuals or []:
        if isinstance(v, Image.Image):
            out.append(v.convert("RGB") if v.mode != "RGB" else v)
        else:
            raise NotImplementedError(
                f"vlmcut's lmms-eval model takes images (PIL); this task sends {type(v).__name__} "
                f"(video and audio tasks are not supported)"
            )
    return out


def _append(inputs: dict[str, Any], conts: list[torch.Tensor], pad: int) -> dict[str, Any]:
    """The left-padded batch ``inputs`` with each row's continuation ids appended (rows re-padded on the
    left); other per-token tensors (attention mask, token types) are extended alike."""
    ids = inputs["input_ids"]
    b, t = ids.shape
    width = max(c.numel() for c in conts)
    out = dict(inputs)
    for key, value in inputs.items():
        if not (torch.is_tensor(value) and value.shape == (b, t)):
            continue
        rows = []
        for row, cont in enumerate(conts):
            left = width - cont.numel()
            if key == "input_ids":
                head, tail = torch.full((left,), pad, dtype=value.dtype), cont.to(value.dtype)
            elif key == "attention_mask":
                head, tail = torch.zeros(left, dtype=value.dtype), torch.ones(cont.numel(), dtype=value.dtype)
            else:
                head, tail = (
                    torch.zeros(left, dtype=value.dtype),
                    torch.zeros(cont.numel(), dtype=value.dtype),
                )
            rows.append(torch.cat([head.to(value.device), value[row], tail.to(value.device)]))
        out[key] = torch.stack(rows)
    return out


def _batches(requests: list[Instance], size: int, key: Any = None) -> list[list[tuple[int, Instance]]]:
    """``(index, request)`` batches of at most ``size`` in request order; with ``key`` only requests with
    equal keys share a batch (each key's requests stay in order)."""
    groups: dict[str, list[tuple[int, Instance]]] = {}
    for index, req in enumerate(requests):
        groups.setdefault(key(req) if key else "", []).append((index, req))
    return [items[i : i + size] for items in groups.values() for i in range(0, len(items), size)]
