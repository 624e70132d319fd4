"""Serving benchmark: unpruned vs FlowCut at K in {192, 128, 64} through `vlmcut serve` (vLLM's server).

A LLaVA-1.5-7B-shaped model with random weights (CLIP ViT-L/14-336 and the 7B decoder's layer shape,
shortened to ``--llm-layers`` layers, as ``vlmcut bench`` does) is saved once with an offline word-level
tokenizer. One server runs with the model-level keep = 576 (no pruning); each configuration sends ``N``
concurrent streamed chat requests with its own ``vlmcut_keep`` (distinct images, prefix caching off, so
nothing is reused between requests). Reported per configuration: requests/s, prompt tokens/s, time to
first token p50/p95, and the analytic prefill-FLOPs ratio (``vlmcut.bench.flops``) next to the measured
throughput ratio.

Run: ``python -m vlmcut.integrations.vllm.bench --requests 8 --out vlmcut-bench/vllm`` (in the vLLM venv).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

KEEPS = (None, 192, 128, 64)  # None: unpruned (576 placeholders)
WORDS = "describe the image in detail what objects colors shapes left right top bottom is there".split()
PROMPT_WORDS = 60  # with the chat frame: about the paper's 65 text tokens


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + ["USER:", "ASSISTANT:"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return fast


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'].upper() }}: {% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'image' or c['type'] == 'image_url' %}<image> "
    "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_model(path: Path, llm_layers: int) -> Path:
    """Save the random-weight LLaVA-1.5-7B-shaped model (float32) with its offline processor."""
    import torch
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    from ...bench.presets import build_preset_model

    if (path / "config.json").is_file():
        return path
    tok = _tokenizer()
    model = build_preset_model("llava-1.5-7b", num_llm_layers=llm_layers, dtype=torch.float32)
    model.config.image_token_id = tok.convert_tokens_to_ids("<image>")
    model.config.text_config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_convert_rgb=True
    )
    proc = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token="<image>",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    tok.chat_template = CHAT_TEMPLATE
    proc.save_pretrained(path)
    return path


def _image_url(seed: int) -> str:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _stream(url: str, body: dict) -> tuple[float, float, int]:
    """(time to first token, total time, prompt tokens) of one streamed chat completion."""
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    start = time.perf_counter()
    first = None
    prompt_tokens = 0
    with urllib.request.urlopen(req, timeout=1800) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                prompt_tokens = chunk["usage"]["prompt_tokens"]
    total = time.perf_counter() - start
    return (total if first is None else first), total, prompt_tokens


def run_config(port: int, model: str, keep: int | None, n: int, seed0: int, max_tokens: int) -> dict:
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    text = " ".join(WORDS[i % len(WORDS)] for i in range(PROMPT_WORDS))
    results: list[tuple[float, float, int]] = [(0.0, 0.0, 0)] * n

    def one(i: int) -> None:
        body = {
            "model": model,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _image_url(seed0 + i)}},
                        {"type": "text", "text": text},
                    ],
                }
            ],
            "max_tokens": max_tokens,
            "min_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if keep is not None:
            body["mm_processor_kwargs"] = {"vlmcut_keep": keep}
        results[i] = _stream(url, body)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttft = np.array([r[0] for r in results])
    prompt = sum(r[2] for r in results)
    return {
        "keep": keep or 576,
        "requests": n,
        "wall_s": wall,
        "requests_per_s": n / wall,
        "prompt_tokens_per_s": prompt / wall,
        "prompt_tokens_per_request": prompt / n,
        "ttft_p50_s": float(np.percentile(ttft, 50)),
        "ttft_p95_s": float(np.percentile(ttft, 95)),
    }


def flops_ratio(
    model_dir: Path, keep: int | None, text_tokens: int, schedule: list[float] | None = None
) -> float:
    """Analytic prefill FLOPs of the unpruned model over FlowCut's at ``keep``: with the encoder's
    ``schedule`` (tokens entering each layer, CLS included), by default FlowCut's nominal one."""
    from transformers import AutoConfig

    from ...bench.flops import flowcut_vision_schedule, prefill_tflops

    cfg = AutoConfig.from_pretrained(model_dir)
    if keep is None:
        return 1.0
    # vLLM builds the tower up to the layer it reads: count that many layers, the last one read
    layers = cfg.vision_config.num_hidden_layers + 1 + cfg.vision_feature_layer
    cfg.vision_config.num_hidden_layers = layers
    cfg.vision_feature_layer = -1
    if schedule is None:
        schedule = flowcut_vision_schedule(576, keep, layers, layers - 1)
    schedule = [int(round(n)) for n in schedule]
    full = prefill_tflops(cfg, vision_tokens=[577] * layers, text_tokens=text_tokens)
    pruned = prefill_tflops(
        cfg, vision_tokens=schedule, llm_visual_tokens=keep, projector_tokens=keep, text_tokens=text_tokens
    )
    return full / pruned


def measured_schedules(model_dir: Path, keeps: list[int], seeds: list[int]) -> dict[int, list[float]]:
    """FlowCut's real sequence length entering each encoder layer (CLS included, averaged over the benchmark's
    images), from ``vlmcut.prune`` on the HF tower with the same weights (the plugin keeps the same tokens as
    the HF path; the equality tests check it). With random weights attention is nearly uniform, so FlowCut
    prunes less in early layers than the nominal schedule (entropy 0.8) assumes."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    import vlmcut

    model = LlavaForConditionalGeneration.from_pretrained(model_dir, dtype=torch.float32).eval()
    proc = AutoProcessor.from_pretrained(model_dir)
    tower = model.model.vision_tower
    layers = tower.config.num_hidden_layers + 1 + model.config.vision_feature_layer  # what vLLM builds
    images = []
    for seed in seeds:
        rng = np.random.default_rng(seed)
        images.append(Image.fromarray(rng.integers(0, 256, (336, 336, 3), dtype=np.uint8)))
    pixels = proc.image_processor(images, return_tensors="pt")["pixel_values"]
    out = {}
    for keep in keeps:
        rows = []
        with vlmcut.prune(tower, "flowcut", keep=keep, feature_layer=model.config.vision_feature_layer) as h:
            for x in pixels:
                with torch.no_grad():
                    tower(x[None])
                rows.append([576, *h.tokens_per_layer[: layers - 1]])
        out[keep] = [float(np.mean(col)) + 1 for col in zip(*rows, strict=True)]
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlmcut.integrations.vllm.bench", description=__doc__)
    parser.add_argument("--requests", type=int, default=8, help="concurrent requests per configuration")
    parser.add_argument("--llm-layers", type=int, default=2, help="decoder layers of the 7B-shaped LLM")
    parser.add_argument("--max-tokens", type=int, default=4, help="tokens generated per request")
    parser.add_argument("--model-dir", default="vlmcut-bench/vllm-llava-7b-shape")
    parser.add_argument("--out", default="vlmcut-bench/vllm")
    parser.add_argument(
        "--recount", action="store_true", help="only redo the FLOPs columns of OUT/results.json (no server)"
    )
    args = parser.parse_args(argv)
    model_dir = build_model(Path(args.model_dir), args.llm_layers)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.recount:
        return report(json.loads((out / "results.json").read_text()), model_dir, out)
    port = _free_port()
    cmd = [sys.executable, "-m", "vlmcut.cli", "serve", str(model_dir), "--method", "flowcut", "--keep", "576",
           "--port", str(port), "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
           "--max-num-seqs", str(args.requests), "--max-num-batched-tokens", "8192",
           "--no-enable-prefix-caching", "--mm-processor-cache-gb", "0", "--trust-request-mm-kwargs",
           "--gpu-memory-utilization", "0.3", "--kv-cache-memory-bytes", str(2 << 30)]  # fmt: skip
    log = open(out / "server.log", "wb")  # noqa: SIM115
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    rows = []
    try:
        deadline = time.monotonic() + 900
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited; see {out / 'server.log'}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                    break
            except OSError:
                time.sleep(2)
            if time.monotonic() > deadline:
                raise RuntimeError("the server did not come up in 900 s")
        run_config(port, str(model_dir), 64, 2, 10_000, args.max_tokens)  # warm-up
        for j, keep in enumerate(KEEPS):
            row = run_config(port, str(model_dir), keep, args.requests, 1000 * (j + 1), args.max_tokens)
            row["image_seeds"] = [1000 * (j + 1) + i for i in range(args.requests)]
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()
    return report(rows, model_dir, out)


def report(rows: list[dict], model_dir: Path, out: Path) -> int:
    """Add the FLOPs ratios (nominal and measured FlowCut schedules) and write results.json / results.md."""
    keeps = [r["keep"] for r in rows if r["keep"] < 576]
    seeds = [r["image_seeds"][:2] for r in rows if r["keep"] < 576]
    schedules = {k: measured_schedules(model_dir, [k], s)[k] for k, s in zip(keeps, seeds, strict=True)}
    for r in rows:
        text_tokens = int(round(r["prompt_tokens_per_request"] - r["keep"]))
        keep = None if r["keep"] >= 576 else r["keep"]
        r["flops_ratio_nominal"] = flops_ratio(model_dir, keep, text_tokens)
        r["flops_ratio"] = flops_ratio(model_dir, keep, text_tokens, schedules.get(r["keep"]))
        r["vision_schedule"] = schedules.get(r["keep"])
    base = rows[0]
    lines = [
        "| keep | req/s | prompt tok/s | TTFT p50 (s) | TTFT p95 (s) | speed-up | FLOPs ratio (measured "
        "schedule) | speed-up / FLOPs | FLOPs ratio (nominal schedule) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        speedup = r["requests_per_s"] / base["requests_per_s"]
        r["speedup"] = speedup
        lines.append(
            f"| {r['keep']}{' (unpruned)' if r is base else ''} | {r['requests_per_s']:.3f} | "
            f"{r['prompt_tokens_per_s']:.1f} | {r['ttft_p50_s']:.1f} | {r['ttft_p95_s']:.1f} | {speedup:.2f}x | "
            f"{r['flops_ratio']:.2f}x | {speedup / r['flops_ratio']:.0%} | {r['flops_ratio_nominal']:.2f}x |"
        )
    table = "\n".join(lines)
    print(table)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    (out / "results.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
