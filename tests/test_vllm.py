"""The vLLM plugin (vlmcut.integrations.vllm) against the Hugging Face path, on a tiny LLaVA saved to disk.

Needs vLLM (its own venv, README "Serve with vLLM"); skipped without it unless ``VLMCUT_REQUIRE_VLLM=1``
(CI), where a missing vLLM is an error. Engines are started once per method (module-scoped) and reused
with different per-request budgets.
"""

from __future__ import annotations

import base64
import gc
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

if os.environ.get("VLMCUT_REQUIRE_VLLM"):
    import vllm  # noqa: F401  (CI: a missing vLLM fails here instead of skipping)
else:
    pytest.importorskip("vllm")

import tiny  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

import vlmcut  # noqa: E402
from vlmcut.integrations.vllm import engine_overrides  # noqa: E402

METHODS = ["flowcut", "visionzip", "fastervlm", "random", "grid"]
ENGINE_KEEP = 64  # every patch: requests without a budget are unpruned
KEEPS = [16, 8, 4]
NEW_TOKENS = 8
PROMPTS = [  # (text, number of images)
    ("USER: <image> what is in the image ? ASSISTANT:", 1),
    ("USER: <image> <image> how many circle left right ? ASSISTANT:", 2),
]
# A chat template for the server test (the tiny tokenizer has no chat format of its own).
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' or c['type'] == 'image_url' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
# vLLM's CPU backend reserves memory up front: keep it small for a tiny model on a 2-core CI machine.
ENGINE_ARGS = dict(
    max_model_len=512,
    enforce_eager=True,
    dtype="float32",
    seed=0,
    max_num_seqs=8,
    limit_mm_per_prompt={"image": 2},
    gpu_memory_utilization=0.2,
    kv_cache_memory_bytes=1 << 28,
)


def save_tiny_llava(path: Path, tower: str = "clip") -> Path:
    """A tiny LLaVA (CLIP 4 layers / 64 patches, or SigLIP with the "full" strategy) whose Llama has head
    size 64 (vLLM's CPU attention supports 32, 64, 80, ...), saved by transformers 5 with its processor."""
    proc = tiny.processor()
    tok = proc.tokenizer
    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if tower == "clip":
        vision = tiny.clip_config(4).to_dict()
        strategy = "default"
    else:
        vision = SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=tiny.IMAGE,
            patch_size=tiny.PATCH,
        ).to_dict()
        strategy = "full"
        proc.vision_feature_select_strategy = "full"
        proc.num_additional_image_tokens = 0
    cfg = LlavaConfig(
        vision_config=vision,
        text_config=text.to_dict(),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(cfg)
    tiny.sharpen(model.model.vision_tower)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    proc.chat_template = CHAT_TEMPLATE
    tok.chat_template = CHAT_TEMPLATE
    proc.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return save_tiny_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture(scope="module")
def hf(model_dir):
    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoProcessor.from_pretrained(model_dir)


IMAGES = tiny.images(6, seed=3)


def requests() -> list[tuple[str, list, int]]:
    """(prompt, images, keep): every prompt at every keep, images differing between requests."""
    out = []
    i = 0
    for keep in KEEPS:
        for text, n in PROMPTS:
            out.append((text, IMAGES[i % 5 : i % 5 + n], keep))
            i += 1
    return out


def hf_tokens(hf, method: str, prompt: str, images: list, keep: int) -> list[int]:
    model, proc = hf
    with vlmcut.prune(model, method, keep=keep):
        inputs = proc(text=prompt, images=images, return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def vllm_request(prompt: str, images: list, keep: int | None) -> dict:
    req = {"prompt": prompt, "multi_modal_data": {"image": images if len(images) > 1 else images[0]}}
    if keep is not None:
        req["mm_processor_kwargs"] = {"vlmcut_keep": keep}
    return req


def start_engine(model_dir: Path, method: str, keep: int = ENGINE_KEEP):
    from vllm import LLM

    return LLM(str(model_dir), hf_overrides=engine_overrides(method, keep=keep), **ENGINE_ARGS)


def stop_engine(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module", params=METHODS)
def engine(request, model_dir):
    llm = start_engine(model_dir, request.param)
    yield request.param, llm
    stop_engine(llm)


def greedy(llm, reqs: list[dict]) -> list[list[int]]:
    from vllm import SamplingParams

    outs = llm.generate(reqs, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def test_greedy_tokens_match_hf(engine, hf):
    """Every request of a batch whose requests ask for different K (one and two images each) decodes the
    same greedy tokens as vlmcut.prune + generate at that K."""
    method, llm = engine
    reqs = requests()
    got = greedy(llm, [vllm_request(p, ims, k) for p, ims, k in reqs])
    want = [hf_tokens(hf, method, p, ims, k) for p, ims, k in reqs]
    assert got == want


def test_request_alone_equals_batched(engine):
    """A request's tokens do not depend on the requests (and budgets) batched with it."""
    _, llm = engine
    reqs = [vllm_request(p, ims, k) for p, ims, k in requests()]
    batched = greedy(llm, reqs)
    alone = [greedy(llm, [r])[0] for r in reqs[::2]]
    assert alone == batched[::2]


def test_placeholders_per_image(engine):
    """The prompt holds min(K, 64) placeholders per image; K defaults to the engine's keep."""
    _, llm = engine
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    image_id = tok.convert_tokens_to_ids("<image>")
    sp = SamplingParams(max_tokens=1, temperature=0)
    text, n = PROMPTS[1]
    for keep in (None, 8, 4):
        out = llm.generate([vllm_request(text, IMAGES[:n], keep)], sp, use_tqdm=False)[0]
        assert out.prompt_token_ids.count(image_id) == n * (ENGINE_KEEP if keep is None else keep)


def test_request_keep_above_engine_keep_is_refused(engine):
    _, llm = engine
    text, _ = PROMPTS[0]
    with pytest.raises(ValueError, match="exceeds the engine's keep"):
        greedy(llm, [vllm_request(text, IMAGES[:1], ENGINE_KEEP + 1)])


def test_unpruned_request_is_identity(engine, hf):
    """Without a budget a request keeps all 64 patches: the unpruned HF model's tokens. The stock
    architecture stays vLLM's own class."""
    from vllm import ModelRegistry
    from vllm.model_executor.models.llava import LlavaForConditionalGeneration as StockLlava

    assert ModelRegistry._try_load_model_cls("LlavaForConditionalGeneration") is StockLlava
    _, llm = engine
    model, proc = hf
    text, n = PROMPTS[1]
    inputs = proc(text=text, images=IMAGES[:n], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert greedy(llm, [vllm_request(text, IMAGES[:n], None)]) == [
        out[0, inputs["input_ids"].shape[1] :].tolist()
    ]


def test_siglip_tower_matches_hf(tmp_path_factory):
    siglip_dir = save_tiny_llava(tmp_path_factory.mktemp("tiny-llava-siglip"), tower="siglip")
    model = LlavaForConditionalGeneration.from_pretrained(siglip_dir, dtype=torch.float32).eval()
    hf_siglip = (model, AutoProcessor.from_pretrained(siglip_dir))
    llm = start_engine(siglip_dir, "flowcut", keep=16)
    try:
        reqs = requests()
        got = greedy(llm, [vllm_request(p, ims, k) for p, ims, k in reqs])
    finally:
        stop_engine(llm)
    assert got == [hf_tokens(hf_siglip, "flowcut", p, ims, k) for p, ims, k in reqs]


def test_tensor_parallel_2_matches_hf(model_dir, hf, monkeypatch):
    """TP = 2: each rank holds half of the tower's heads; the plugin gathers q, k, v before scoring, so the
    choice (and every token) is the HF path's, as with one rank."""
    from vllm import LLM

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank on a 2-core machine
    llm = LLM(
        str(model_dir),
        hf_overrides=engine_overrides("flowcut", keep=ENGINE_KEEP),
        tensor_parallel_size=2,
        **ENGINE_ARGS,
    )
    try:
        reqs = requests()
        got = greedy(llm, [vllm_request(p, ims, k) for p, ims, k in reqs])
    finally:
        stop_engine(llm)
    assert got == [hf_tokens(hf, "flowcut", p, ims, k) for p, ims, k in reqs]


def test_decoder_methods_are_refused():
    for method in ("fastv", "pdrop", "sparsevlm"):
        with pytest.raises(ValueError, match="prunes inside the language model"):
            engine_overrides(method, keep=16)
    with pytest.raises(TypeError, match="unknown option"):
        engine_overrides("flowcut", keep=16, bogus=1)


# ---------------------------------------------------------------------------------------------------
# The server: `vlmcut serve` as a real process on a free local port
# ---------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def post_json(url: str, body: dict, timeout: float = 60) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        raise AssertionError(f"{url}: HTTP {err.code}: {err.read()[:2000]!r}") from None


@pytest.mark.parametrize("engine", ["flowcut"], indirect=True)
def test_server_answers_like_the_offline_engine(model_dir, engine):
    """`vlmcut serve` on a free local port: a chat completion with a base64 image and a per-request budget
    gets the offline engine's text; SIGINT stops the server within 30 s."""
    port = free_port()
    engine_flags = [
        "--max-model-len", "512", "--enforce-eager", "--dtype", "float32", "--seed", "0",
        "--max-num-seqs", "8", "--limit-mm-per-prompt", '{"image": 2}',
        "--gpu-memory-utilization", "0.2", "--kv-cache-memory-bytes", str(1 << 28),
        "--trust-request-mm-kwargs",  # vLLM refuses per-request mm_processor_kwargs without it
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "vlmcut.cli", "serve", str(model_dir), "--method", "flowcut", "--keep", "64",
           "--port", str(port), *engine_flags]  # fmt: skip
    log = open(model_dir / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": png_data_url(IMAGES[0])}},
                {"type": "text", "text": "what is in the image ?"},
            ],
        }
    ]
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (model_dir / "server.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not come up in 240 s"
            time.sleep(1)
        body = {
            "model": str(model_dir),
            "messages": messages,
            "max_tokens": NEW_TOKENS,
            "temperature": 0,
            "mm_processor_kwargs": {"vlmcut_keep": 8},
        }
        served = post_json(f"http://127.0.0.1:{port}/v1/chat/completions", body)["choices"][0]["message"]
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            pytest.fail("the server did not stop within 30 s of SIGINT")
        finally:
            log.close()
    from vllm import SamplingParams

    _, llm = engine
    sp = SamplingParams(max_tokens=NEW_TOKENS, temperature=0)
    offline = llm.chat(messages, sp, mm_processor_kwargs={"vlmcut_keep": 8}, use_tqdm=False)[0].outputs[0]
    assert served["content"] == offline.text
