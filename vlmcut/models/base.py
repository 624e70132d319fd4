"""The skeleton every VLM family's attachment shares (:class:`VLMAttachment`), and ``generate`` wrapping.

An attachment wires one method onto one model instance. Every family does the same dance around its own
layout:

* a forward pre-hook on the instance binds the call's arguments by name, lets the family rewrite them
  (:meth:`VLMAttachment.compact_inputs`: run or plan the vision stage, cut the prompt to the kept tokens)
  and tell its language-model stage where the visual tokens are (:meth:`VLMAttachment.announce`);
* ``generate`` is wrapped on the instance (:func:`wrap_generate`): the prompt is compacted once, the
  attachment keeps per-generate state while it runs (the compacted prompt's length; the family's own
  state in :meth:`VLMAttachment.begin_session`), and the caller's ``input_ids`` come back in front;
* the pruners it owns (:meth:`VLMAttachment.own`), the hook and the wrapper all come off in
  :meth:`VLMAttachment.remove`, leaving the instance exactly as before.

A family file keeps only what differs: its layout, its records, its constructor.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .instance import replace_method
from .llm import DecoderPruner
from .prompt import call_inputs, pad_token_id
from .vit import EncoderPassRecord


def _shorten_lengths(kwargs: dict[str, Any], default_config: Any, removed: int) -> None:
    """``max_length`` / ``min_length`` count the prompt: shorten them by the ``removed`` placeholders, whether
    they come as keywords, in a ``generation_config`` argument or in the model's own generation config, so
    that the same number of new tokens is generated as without pruning (``max_new_tokens`` needs nothing)."""
    config = kwargs.get("generation_config") or default_config
    for name, new_tokens in (("max_length", "max_new_tokens"), ("min_length", "min_new_tokens")):
        if kwargs.get(name) is not None:
            kwargs[name] = kwargs[name] - removed
            continue
        if kwargs.get(new_tokens) is not None or getattr(config, new_tokens, None) is not None:
            continue
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            kwargs[name] = max(0, value - removed)


def wrap_generate(
    outer: nn.Module,
    compact: Callable[[dict[str, Any]], tuple | None],
    session: Callable[[dict[str, Any], tuple | None], AbstractContextManager],
) -> Callable[[], None]:
    """Wrap ``outer.generate`` on this instance; returns the function that puts the original back.

    ``compact(kwargs)`` returns ``(new_kwargs, new_len, ...)`` for a prompt it shortened, or ``None``. The
    prompt is compacted once; ``max_length`` / ``min_length`` (which count the prompt) are shortened by the
    same amount so the same number of new tokens is generated; ``session(kwargs, result)`` is entered around
    the original call (the attachment's per-generate state); the returned sequences get the caller's own
    ``input_ids`` back in front (each row repeated ``num_return_sequences`` times, as generate repeats it), so
    ``out[:, inputs["input_ids"].shape[1]:]`` is still the answer. A second concurrent call (another thread)
    on the same model is refused with a ``RuntimeError``: the attachment holds per-generate state.
    """
    if not hasattr(outer, "generate"):
        return lambda: None
    original = outer.generate
    # The attachment keeps per-generate state (prompt length, counts): one generate at a time per model.
    busy = threading.Lock()

    def generate(*args: Any, **kwargs: Any) -> Any:
        if not busy.acquire(blocking=False):
            raise RuntimeError(
                "this pruned model is already running generate() (in another thread, or from a callback of "
                "that call); a pruned model keeps per-call state, so generate with one model per thread or "
                "wait for the first call to return"
            )
        try:
            return _generate(*args, **kwargs)
        finally:
            busy.release()

    def _generate(*args: Any, **kwargs: Any) -> Any:
        if args and isinstance(args[0], torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"], args = args[0], args[1:]
        elif isinstance(kwargs.get("inputs"), torch.Tensor) and "input_ids" not in kwargs:
            kwargs["input_ids"] = kwargs.pop("inputs")
        result = compact(kwargs)
        if result is None:
            with session(kwargs, None):
                return original(*args, **kwargs)
        new_kwargs, new_len = result[0], result[1]
        caller_ids = kwargs["input_ids"]
        _shorten_lengths(new_kwargs, getattr(outer, "generation_config", None), caller_ids.shape[1] - new_len)
        with session(kwargs, result):
            out = original(*args, **new_kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        # num_return_sequences / beams: generate repeats each prompt row in place (repeat_interleave)
        rows = caller_ids.repeat_interleave(sequences.shape[0] // caller_ids.shape[0], dim=0)
        full = torch.cat([rows, sequences[:, new_len:]], dim=1)
        if isinstance(out, torch.Tensor):
            return full
        out.sequences = full
        return out

    return replace_method(outer, "generate", generate)


class VLMAttachment:
    """Base of the VLM attachments (see the module docstring). A subclass calls ``super().__init__(model,
    parts)`` first, builds its pruners through :meth:`own`, and calls :meth:`install` last."""

    title = "VLM"  # the family, for messages

    def __init__(self, model: nn.Module, parts: tuple[nn.Module, nn.Module] | None) -> None:
        """``parts``: ``(outer, inner)`` as the family's ``..._parts(model)`` finds them, ``None`` if ``model``
        is not of the family."""
        if parts is None:
            raise TypeError(f"{type(model).__name__} is not a {self.title} model")
        self.outer, self.inner = parts  # the module taking the prompt; the one holding towers and LLM
        self.config = self.inner.config
        self.pad_token_id = pad_token_id(self.config)
        self.prompt_len: int | None = None  # while our generate runs: the compacted prompt's length
        self.generating = False  # inside our generate: its forwards see a prompt that was cut once
        self.decoder: Any = None  # the language-model stage, if the method has one
        self._pruners: list[Any] = []
        self._handles: list[RemovableHandle] = []
        self._restore_generate: Callable[[], None] = lambda: None
        self._signature: inspect.Signature | None = None

    # -- set-up -----------------------------------------------------------------------------------------
    def own(self, pruner: Any) -> Any:
        """Remember ``pruner`` (anything with ``remove()``) so that :meth:`remove` takes it off; returns it."""
        if pruner is not None:
            self._pruners.append(pruner)
        return pruner

    def own_decoder(self, selector: Any) -> None:
        """The language-model stage: a :class:`~vlmcut.models.llm.DecoderPruner` driving ``selector`` on
        ``inner.language_model``, as :attr:`decoder` (nothing for ``None``)."""
        if selector is not None:
            self.decoder = self.own(DecoderPruner(self.inner.language_model, selector))

    def install(self) -> None:
        """Put the forward pre-hook and the ``generate`` wrapper on the instance."""
        self._signature = inspect.signature(self.outer.forward)
        self._handles.append(self.outer.register_forward_pre_hook(self._pre_forward, with_kwargs=True))
        self._restore_generate = wrap_generate(self.outer, self.compact_for_generate, self._session)

    def prompt_ids(self, inputs: dict[str, Any], placeholders: str = "image") -> torch.Tensor:
        """The call's ``input_ids``, which the prompt surgery needs (an error that says so without them)."""
        ids = inputs.get("input_ids")
        if ids is None:
            raise ValueError(
                f"pruned {self.title} needs input_ids with the {placeholders} placeholders (inputs_embeds with "
                f"pixel values is not supported); pass the processor's output"
            )
        return ids

    # -- what a family implements -------------------------------------------------------------------------
    def compact_inputs(self, inputs: dict[str, Any]) -> tuple | None:
        """``(new_inputs, new_len, ...)`` for a call whose prompt this attachment rewrites, or ``None``."""
        raise NotImplementedError

    def compact_for_generate(self, kwargs: dict[str, Any]) -> tuple | None:
        """The compaction ``generate`` applies once to its prompt (default: :meth:`compact_inputs`)."""
        return self.compact_inputs(kwargs)

    def announce(self, final: dict[str, Any], result: tuple | None, inputs: dict[str, Any]) -> None:
        """Before the model runs on ``final`` (the rewritten inputs, or the caller's when ``result`` is
        ``None``): tell the language-model stage where this prefill's visual tokens are. Default: nothing."""

    def forward_inputs(self, inputs: dict[str, Any]) -> dict[str, Any] | None:
        """The inputs the model runs on instead of the caller's, or ``None`` to leave the call as it is."""
        result = self.compact_inputs(inputs)
        final = result[0] if result is not None else inputs
        self.announce(final, result, inputs)
        return final if result is not None else None

    def begin_session(self, kwargs: dict[str, Any], result: tuple | None) -> None:
        """Per-generate state of the family (``result``: what :meth:`compact_for_generate` returned)."""

    def end_session(self) -> None:
        """Forget the per-generate state (also called by :meth:`remove`)."""

    # -- the shared machinery -----------------------------------------------------------------------------
    def _pre_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        assert self._signature is not None
        final = self.forward_inputs(call_inputs(self._signature, args, kwargs))
        return None if final is None else ((), final)

    @contextmanager
    def _session(self, kwargs: dict[str, Any], result: tuple | None) -> Iterator[None]:
        ids = kwargs.get("input_ids")
        if result is not None:
            self.prompt_len = result[1]
        else:
            self.prompt_len = ids.shape[1] if isinstance(ids, torch.Tensor) else None
        self.generating = True
        try:
            self.begin_session(kwargs, result)
            yield
        finally:
            self.prompt_len = None
            self.generating = False
            self.end_session()

    # -- handle interface ---------------------------------------------------------------------------------
    @property
    def record(self) -> EncoderPassRecord:
        raise NotImplementedError

    @property
    def llm_record(self):  # noqa: ANN201 - LLMPassRecord | None
        """The language-model stage's record of the last prefill (``None`` without one)."""
        return getattr(self.decoder, "record", None) if self.decoder is not None else None

    def remove(self) -> None:
        """Take every pruner, hook and wrapper off. Idempotent."""
        for pruner in self._pruners:
            pruner.remove()
        self._pruners.clear()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._restore_generate()
        self._restore_generate = lambda: None
        self.end_session()
