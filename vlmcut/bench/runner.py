"""End-to-end efficiency benchmark: unpruned vs pruned vs oracle, timed A/B and counted analytically.

:func:`run_benchmark` builds (or loads) one vision-language model -- LLaVA-1.5, LLaVA-NeXT or Qwen2-VL --
and measures, for the unpruned model, every ``method x keep`` and one **oracle** per ``keep``:

* analytic TFLOPs of the prefill (vision tower + projector + LLM + ``lm_head``) from the *real* per-layer
  token counts of the run, read by hooks in an untimed set-up pass: the sequence length entering every
  encoder layer of every encoder pass (an image; a LLaVA-NeXT crop; a Qwen2-VL image's packed patches,
  from the block's ``cu_seqlens``, before the 2x2 merger) and the tokens entering every decoder layer
  (methods that prune inside the LLM -- FastV, PDrop, SparseVLM, FlowCut's LLaVA-NeXT / Qwen2-VL second
  stage -- shrink it at their layers: ``handle.llm_record.kept_positions``). They are counted with
  :data:`vlmcut.bench.flops.PAPER_CONVENTION` (the paper's Table 5 accounting: ``lm_head`` on every prompt
  position, no attention products) and with an *executed* convention (:data:`EXEC_CONVENTION`: attention
  products counted, ``lm_head`` on the last position only, which is what the timed forward with
  ``logits_to_keep=1`` runs). The FLOPs-allowed speed-up is computed with the executed convention. The
  unpruned row equals :func:`vlmcut.bench.flops.prefill_breakdown` of the unpruned model;
* prefill wall time (one forward with the image, ``use_cache=True``, ``logits_to_keep=1``), the vision
  tower's share and the language model's share (:class:`vlmcut.timing.StageTimer`);
* decode time per token (greedy forward steps on the returned KV cache);
* KV-cache bytes (read from the returned cache; cross-checked with :func:`vlmcut.bench.flops.kv_cache_bytes`
  on the per-layer token counts: a decoder-stage method caches fewer tokens in its later layers; with
  ``batch_size > 1`` the cache also holds the padding / filler columns that the analytic count leaves out);
* peak memory: CUDA ``max_memory_allocated`` above the weights; on CPU the peak resident-set growth
  during the prefill, sampled from ``/proc/self/statm`` every few ms (a lower bound: the allocator may
  reuse memory it already holds; ``tracemalloc`` does not see torch's allocations and ``ru_maxrss`` is a
  process-lifetime high-water mark, useless once a bigger variant has run);
* selection time: the time spent inside each method's selector calls during the timed prefill
  (:class:`~vlmcut.bench.selection.SelectionClock`: wall clock on CPU, CUDA events on a GPU; the selectors
  are wrapped by :func:`~vlmcut.bench.selection.timed_spec`, which costs two clock reads per call). It is
  the direct measure of a method's selection overhead; the A/B against the oracle (below) is the end-to-end
  cross-check, but on a shared CPU its noise (several %) is larger than the overhead it measures.

Timing protocol: ``warmup`` untimed rounds, then ``repeats`` rounds; every round runs every variant once,
in a freshly shuffled order (seeded), attaching the pruning hooks just before and removing them just after
the variant's own calls, so slow drifts of a shared machine hit all variants alike. Ratios against the
unpruned model are medians of the per-round (paired) ratios.

A method the model's family does not support (its adapter's ``check`` refuses it; Qwen2-VL: only the methods
that keep whole merge units or prune in the language model), or a budget a staged method cannot reach, is
skipped in the set-up pass with a note in ``meta["skipped"]`` and the Markdown; a ``ValueError`` is raised
only when nothing is left to compare.

The oracle
----------
"The same model fed exactly the kept tokens, without the selection work": FlowCut's choices for this input
are recorded once in a set-up pass and replayed through the public :func:`vlmcut.prune` by selectors that
compute nothing (:mod:`vlmcut.bench.oracle`): every encoder layer gets the same fixed index gather as with
FlowCut, and where FlowCut prunes in the language model (its LLaVA-NeXT / Qwen2-VL second stage) the same keep
mask. The model adapter does everything else as it does for FlowCut (hook plumbing, q/k/v capture, gathers,
prompt surgery), so ``selection overhead = flowcut prefill / oracle prefill - 1`` is the cost of choosing the
tokens. The replay is checked once to keep exactly FlowCut's tokens; its TFLOPs equal FlowCut's (the scoring
itself is ``O(T)`` per layer and not counted).

The modules: :mod:`~vlmcut.bench.results` (rows, targets, reports), :mod:`~vlmcut.bench.oracle`,
:mod:`~vlmcut.bench.selection` (selection clock), :mod:`~vlmcut.bench.memory`, :mod:`~vlmcut.bench.tokens`
(token counts), :mod:`~vlmcut.bench.loading` (model, dtype, image size); this one runs the rounds.
"""

from __future__ import annotations

import dataclasses
import inspect
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api import METHODS, available_methods, prune
from ..compat import CACHE_KWARG, cache_from_output
from ..models.registry import ModelParts, adapter_for
from ..timing import StageTimer
from .flops import (
    DENSE_CONVENTION,
    PAPER_CONVENTION,
    FlopsConvention,
    ModelShape,
    PrefillFlops,
    kv_cache_bytes,
    model_shape,
    prefill_breakdown,
)
from .loading import bench_image_size, bench_parts, load_model, resolve_dtype
from .memory import PeakMemory, cache_bytes
from .oracle import record_choices
from .presets import example_inputs
from .results import BenchResult, BenchRow
from .selection import SelectionClock, timed_spec
from .tokens import PromptCounts, count_tokens, forward_once

# What the timed prefill executes: dense attention products in the tower and the LLM, last-position logits.
EXEC_CONVENTION: FlopsConvention = DENSE_CONVENTION

ORACLE_DESCRIPTION = (
    "FlowCut's choices on this input, recorded once and replayed through vlmcut.prune with no scoring: the "
    "same per-layer gathers in the vision tower and, where FlowCut prunes in the language model, the same "
    "keep masks; the model adapter does the rest (hooks, gathers, prompt surgery) as with FlowCut"
)


# ---------------------------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------------------------


def run_benchmark(
    model_or_preset: str | Path | nn.Module,
    methods: Sequence[str] = ("flowcut", "random", "grid"),
    keeps: Sequence[int] = (128, 64),
    *,
    layers: int | None = None,
    image_size: Sequence[int] | None = None,
    text_tokens: int = 65,
    repeats: int = 5,
    warmup: int = 2,
    decode_tokens: int = 8,
    batch_size: int = 1,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    oracle: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> BenchResult:
    """Benchmark pruning methods against the unpruned model and the oracle (see the module docstring).

    Args:
        model_or_preset: a preset name (``"llava-1.5-7b"``, ``"llava-next-7b"``, ``"qwen2-vl-7b"``, ``"tiny"``,
            ``"tiny-llava-next"``, ``"tiny-qwen2-vl"``; random weights), a local LLaVA / LLaVA-NeXT /
            Qwen2-VL directory, or a ``Llava[Next]ForConditionalGeneration`` /
            ``Qwen2VLForConditionalGeneration`` instance.
        methods: pruning methods (``vlmcut.available_methods()``); those the model's family does not support
            are skipped with a note in ``meta["skipped"]`` (Qwen2-VL: ``fastv``, ``flowcut``, ``pdrop``,
            ``sparsevlm``), as are budgets a staged method cannot reach.
        keeps: visual tokens per image to keep (LLaVA-NeXT: patch tokens per image, newlines not counted;
            Qwen2-VL: merged tokens).
        layers: shorten the language model to this many decoder layers (presets / directories only).
        image_size: ``(height, width)`` of the image (LLaVA-NeXT: crop grid and unpadding; Qwen2-VL: patch
            grid); default :func:`bench_image_size` (NeXT: the paper's 640x427, Qwen2-VL: 448x448).
        text_tokens: text tokens of the prompt besides the image placeholders (65: a POPE prompt).
        repeats: timed rounds; warmup: untimed rounds before them.
        decode_tokens: greedy decode steps after every prefill (0: skip decode timing).
        batch_size: images (= prompts) per forward.
        dtype: parameter dtype; default float32 on CPU, bfloat16 on CUDA.
        device: ``"cpu"`` or ``"cuda"``.
        oracle: add one oracle row per keep (needs ``"flowcut"`` in ``methods``).
        seed: seeds the weights, the inputs and the order of variants in each round.
        progress: show a tqdm progress bar (and print skipped variants to stderr as they are found).

    Returns:
        A :class:`BenchResult` (already finalised: ratios and targets filled in).

    Raises:
        ValueError: unknown methods, bad counts, or no variant left to compare with the unpruned model.
        TypeError: a model class the benchmark does not run.
    """
    unknown = sorted(set(methods) - set(available_methods()))
    unknown = sorted(set(methods) - set(available_methods()))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; available: {available_methods()}")
    if repeats < 1 or warmup < 0 or decode_tokens < 0 or batch_size < 1:
        raise ValueError("repeats >= 1, warmup >= 0, decode_tokens >= 0 and batch_size >= 1 are required")
    bad = [k for k in keeps if isinstance(k, bool) or not isinstance(k, int) or k < 1]
    if bad:
        raise ValueError(f"keeps must be ints >= 1 (visual tokens per image), got {bad}")
    methods, keeps = list(dict.fromkeys(methods)), list(dict.fromkeys(keeps))  # one row per variant
    dev = torch.device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model, label, note = load_model(model_or_preset, layers, torch_dtype, dev, seed=seed)
    parts = bench_parts(model)
    family = adapter_for(model).name
    config = model.config
    shape = model_shape(config)
    if family == "llava" and image_size is not None:
        raise ValueError(
            "image_size applies to LLaVA-NeXT (crop grid) and Qwen2-VL (patch grid); LLaVA-1.5 resizes every "
            "image to its tower's square size"
        )
    size = bench_image_size(config, image_size)
    param = next(model.parameters())
    inputs = example_inputs(
        config, text_tokens=text_tokens, image_size=size, batch_size=batch_size, seed=seed, dtype=param.dtype
    )
    inputs = {k: v.to(dev) for k, v in inputs.items()}
    is_image = inputs["input_ids"] == parts.image_token_id
    text = ((~is_image) & inputs["attention_mask"].bool()).sum(dim=1).tolist()
    oracle_skipped: str | None = None
    if not oracle:
        oracle_skipped = "disabled (oracle=False / --no-oracle)"
    elif "flowcut" not in methods:
        oracle_skipped = "it replays FlowCut's choices; add flowcut to the methods"

    run = _Run(
        model,
        parts,
        inputs,
        text,
        shape,
        bytes_per_value=param.element_size(),
        device=dev,
        logits_to_keep="logits_to_keep" in inspect.signature(model.forward).parameters,
        clock=SelectionClock(dev),
        progress=progress,
    )
    variants = run.set_up(methods, keeps, oracle=oracle_skipped is None)
    if len(variants) == 1:
        raise ValueError(
            f"nothing to benchmark on {type(model).__name__} besides the unpruned model: "
            + "; ".join(run.skipped)
        )
    memory_note = run.time_rounds(variants, warmup, repeats, decode_tokens, seed)

    import transformers

    reference = prefill_breakdown(
        shape, None, None, text_tokens=text[0], image_size=None if family == "llava" else size
    )
    meta: dict[str, Any] = {
        "model": label,
        "family": family,
        "model_class": type(model).__name__,
        "llm_layers": int(shape.lm.num_layers),
        "llm_layers_note": note,
        "methods": list(methods),
        "keeps": list(keeps),
        "skipped": run.skipped,
        "image_size": list(size),
        "device": str(dev),
        "device_name": _device_name(dev),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "batch_size": batch_size,
        "text_tokens": text[0],
        "visual_tokens": int(is_image[0].sum()),
        "repeats": repeats,
        "warmup": warmup,
        "decode_tokens": decode_tokens,
        "logits_to_keep": run.logits_to_keep,
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "memory_note": memory_note,
        "selection_note": "time inside each method's selector calls during the prefill (scoring and choosing; "
        + ("CUDA events around each call" if dev.type == "cuda" else "wall clock around each call")
        + "); the tensor surgery that follows a choice is not in it (the oracle does the same surgery)",
        "seed": seed,
        # flops.prefill_breakdown of the unpruned model (paper convention, whole batch): the unpruned row
        # counted from the run's own token counts must equal it
        "unpruned_reference_tflops": batch_size * reference.tflops,
        "oracle": f"none, {oracle_skipped}" if oracle_skipped is not None else ORACLE_DESCRIPTION,
        "oracle_skipped": oracle_skipped,
    }
    result = BenchResult(meta=meta, rows=[v.row for v in variants])
    result.finalise()
    return result


@dataclass
class _Variant:
    row: BenchRow
    attach: Callable[[], Any]  # -> handle-like with .remove(), or None
    timed: bool = False  # its selectors report to the run's SelectionClock


@dataclass
class _Sample:
    prefill_s: float
    vision_s: float
    llm_s: float
    decode_s: float | None
    kv_bytes: int | None
    peak_mem: int | None
    select_s: float
    select_calls: int


@dataclass
class _Run:
    """One benchmark's model and inputs: the untimed set-up passes (every variant's real token counts, for its
    row), then the timed rounds."""

    model: nn.Module
    parts: ModelParts
    inputs: dict[str, torch.Tensor]
    text: list[int]  # non-visual tokens of each prompt
    shape: ModelShape
    bytes_per_value: int
    device: torch.device
    logits_to_keep: bool
    clock: SelectionClock  # the timed selectors report to it
    progress: bool
    skipped: list[str] = field(default_factory=list)

    # -- set-up ------------------------------------------------------------------------------------------
    def set_up(self, methods: Sequence[str], keeps: Sequence[int], oracle: bool) -> list[_Variant]:
        """The unpruned model, then per keep every method the model runs and (``oracle``) FlowCut's oracle."""
        model = self.model
        adapter = adapter_for(model)
        variants = [_Variant(self.row("unpruned", "none", None, lambda: None, []), lambda: None)]
        refused: set[str] = set()
        for keep in keeps:
            for method in methods:
                if method in refused:
                    continue
                try:
                    adapter.check(METHODS[method], {})
                except (TypeError, ValueError, NotImplementedError) as e:
                    refused.add(method)
                    self.skip(f"{method}: not supported on {type(model).__name__} ({e})")
                    continue
                # One untimed pass per method to learn its real per-layer token counts for the FLOPs model.
                try:
                    handle = prune(model, method, keep=keep)
                except ValueError as e:  # e.g. a keep the model cannot honour
                    self.skip(f"{method}@{keep}: {e}")
                    continue
                try:
                    prompts = self.count(lambda h=handle: h.llm_record)
                except ValueError as e:  # e.g. a budget a staged method cannot reach
                    self.skip(f"{method}@{keep}: {e}")
                    continue
                finally:
                    handle.remove()
                row = self.make_row(f"{method}@{keep}", method, keep, prompts, handle.tokens_per_layer)
                spec = timed_spec(METHODS[method], self.clock)
                variants.append(
                    _Variant(row, lambda spec=spec, keep=keep: prune(model, spec, keep=keep), True)
                )
            if oracle and any(v.row.name == f"flowcut@{keep}" for v in variants):
                variants.append(self.oracle(keep))
        return variants

    def oracle(self, keep: int) -> _Variant:
        """FlowCut's choices at ``keep``, recorded once and replayed (:mod:`vlmcut.bench.oracle`); the replay
        is checked to keep exactly FlowCut's tokens before it is timed."""
        model = self.model
        recording = record_choices(
            model, METHODS["flowcut"], keep, lambda: forward_once(model, self.inputs, self.logits_to_keep)
        )
        check = recording.attach(model)
        try:
            prompts = self.count(lambda: check.llm_record)
            recording.verify(check)
        finally:
            check.remove()
        row = self.make_row(f"oracle@{keep}", "oracle", keep, prompts, recording.tokens_per_layer)
        return _Variant(row, lambda: recording.attach(model))

    def count(self, llm_record: Callable[[], Any]) -> list[PromptCounts]:
        """One untimed forward (pruning attached by the caller) with the counting hooks on."""
        return count_tokens(self.model, self.parts, self.inputs, self.text, llm_record, self.logits_to_keep)

    def row(
        self, name: str, method: str, keep: int | None, llm_record: Callable[[], Any], tpl: Sequence[int]
    ) -> BenchRow:
        return self.make_row(name, method, keep, self.count(llm_record), tpl)

    def make_row(
        self,
        name: str,
        method: str,
        keep: int | None,
        prompts: Sequence[PromptCounts],
        tokens_per_layer: Sequence[int],
    ) -> BenchRow:
        """The row of a variant from its token counts: TFLOPs in both conventions and analytic KV bytes for
        the whole batch, the first prompt's schedules."""
        shape = self.shape
        paper = _batch_flops(shape, prompts, PAPER_CONVENTION)
        ex = _batch_flops(shape, prompts, EXEC_CONVENTION)
        first = prompts[0]
        return BenchRow(
            name=name,
            method=method,
            keep=keep,
            vision_tokens=[list(s) for s in first.vision],
            llm_visual_tokens=list(first.llm_visual),
            text_tokens=first.text,
            tokens_per_layer=list(tokens_per_layer),
            tflops=paper.tflops,
            tflops_parts={k: getattr(paper, k) / 1e12 for k in ("vision", "projector", "llm", "lm_head")},
            tflops_exec=ex.tflops,
            kv_bytes_analytic=sum(
                kv_cache_bytes(
                    shape, [v + p.text for v in p.llm_visual], bytes_per_value=self.bytes_per_value
                )
                for p in prompts
            ),
        )

    def skip(self, msg: str) -> None:
        self.skipped.append(msg)
        if self.progress:
            print(f"vlmcut bench: skipped {msg}", file=sys.stderr)

    # -- timing --------------------------------------------------------------------------------------------
    def time_rounds(
        self, variants: list[_Variant], warmup: int, repeats: int, decode_tokens: int, seed: int
    ) -> str:
        """Every variant once per round, in a freshly shuffled order (seeded), with its pruning attached just
        before and removed just after its own calls; the rows' series filled after the warm-up rounds.
        Returns what the peak-memory numbers are (for the report)."""
        rounds = warmup + repeats
        rng = random.Random(seed)
        memory = PeakMemory(self.device)
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=rounds * len(variants), desc="vlmcut bench", unit="run")
        try:
            for rnd in range(rounds):
                order = list(variants)
                rng.shuffle(order)
                for var in order:
                    if bar is not None:
                        bar.set_postfix_str(
                            f"{'warm-up' if rnd < warmup else 'round'} {rnd + 1}/{rounds} {var.row.name}"
                        )
                    handle = var.attach()
                    try:
                        sample = self.measure(decode_tokens, memory)
                    finally:
                        if handle is not None:
                            handle.remove()
                    if rnd >= warmup:
                        _add(var, sample)
                    if bar is not None:
                        bar.update(1)
        finally:
            if bar is not None:
                bar.close()
            note = memory.describe()
            memory.close()
        return note

    def measure(self, decode_tokens: int, memory: PeakMemory) -> _Sample:
        """One prefill (timed as a whole, per stage, and inside the selectors that the clock watches) and
        ``decode_tokens`` greedy steps on its cache."""
        model, device, clock = self.model, self.device, self.clock
        extra: dict[str, Any] = {"use_cache": True}
        if self.logits_to_keep:
            extra["logits_to_keep"] = 1
        with torch.inference_mode():
            with StageTimer(self.parts.vision, self.parts.llm) as timer:
                clock.reset()
                memory.start()
                _sync(device)
                t0 = time.perf_counter()
                out = model(**self.inputs, **extra)
                _sync(device)
                prefill = time.perf_counter() - t0
                peak = memory.stop()
            select_s, select_calls = clock.seconds(), clock.calls
            cache = cache_from_output(out)
            kv = cache_bytes(cache)
            decode: float | None = None
            if decode_tokens > 0:
                token = out.logits[:, -1].argmax(dim=-1, keepdim=True)
                steps = []
                for _ in range(decode_tokens):
                    _sync(device)
                    t0 = time.perf_counter()
                    step = model(input_ids=token, **{CACHE_KWARG: cache}, **extra)
                    _sync(device)
                    steps.append(time.perf_counter() - t0)
                    cache = cache_from_output(step)
                    token = step.logits[:, -1].argmax(dim=-1, keepdim=True)
                decode = statistics.median(steps)
        return _Sample(
            prefill_s=prefill,
            vision_s=sum(timer.times.vision),
            llm_s=timer.times.prefill,
            decode_s=decode,
            kv_bytes=kv,
            peak_mem=peak,
            select_s=select_s,
            select_calls=select_calls,
        )


def _batch_flops(
    shape: ModelShape, prompts: Sequence[PromptCounts], convention: FlopsConvention
) -> PrefillFlops:
    """:func:`prefill_breakdown` of every prompt (its own vision passes and decoder schedule), summed."""
    parts = [
        prefill_breakdown(
            shape, p.vision, p.llm_visual, text_tokens=p.text, num_crops=len(p.vision), convention=convention
        )
        for p in prompts
    ]
    return PrefillFlops(
        *(sum(getattr(x, f.name) for x in parts) for f in dataclasses.fields(PrefillFlops))  # type: ignore[arg-type]
    )


def _add(var: _Variant, sample: _Sample) -> None:
    """A timed round's sample into the variant's row."""
    r = var.row
    r.prefill_s.append(sample.prefill_s)
    r.vision_s.append(sample.vision_s)
    r.llm_s.append(sample.llm_s)
    if sample.decode_s is not None:
        r.decode_s.append(sample.decode_s)
    r.kv_bytes = sample.kv_bytes
    if sample.peak_mem is not None:
        r.peak_mem_bytes.append(sample.peak_mem)
    if var.timed:
        r.select_s.append(sample.select_s)
        r.select_calls = sample.select_calls


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name


__all__ = ["EXEC_CONVENTION", "ORACLE_DESCRIPTION", "run_benchmark"]
