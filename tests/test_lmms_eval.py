"""The lmms-eval integration: the ``vlmcut`` model, the exported tasks, and the cross-check with ``vlmcut eval``.

Skipped without lmms-eval (the main venv has none); CI runs this file in ``.venv-lmms`` with
``VLMCUT_REQUIRE_LMMS=1``, where a missing lmms-eval is an error, never a skip.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if importlib.util.find_spec("lmms_eval") is None:
    if os.environ.get("VLMCUT_REQUIRE_LMMS"):
        raise RuntimeError(
            "VLMCUT_REQUIRE_LMMS is set but lmms-eval is not installed: "
            "pip install --no-deps lmms-eval==0.7.3 (see .ci/run for its run-time needs)"
        )
    pytest.skip(
        "lmms-eval is not installed (pip install --no-deps lmms-eval==0.7.3)", allow_module_level=True
    )

import tiny  # noqa: E402
from PIL import ImageFile  # noqa: E402

_TRUNCATED = ImageFile.LOAD_TRUNCATED_IMAGES  # lmms_eval.api.task sets it to True for the whole process

from lmms_eval.api.instance import Instance  # noqa: E402

from vlmcut.integrations.lmms_eval.model import VlmcutChatLMM, VlmcutLMM  # noqa: E402
from vlmcut.integrations.lmms_eval.options import prune_options  # noqa: E402

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
QUESTIONS = ["what is in the image ?", "how many red circle ?", "is the square left ?", "describe the image"]
TASK, SPLIT = "t", "test"


ImageFile.LOAD_TRUNCATED_IMAGES = _TRUNCATED  # so that other test modules still see truncated files fail


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch):
    for k, v in OFFLINE.items():
        monkeypatch.setenv(k, v)
    yield
    ImageFile.LOAD_TRUNCATED_IMAGES = _TRUNCATED


@pytest.fixture(scope="module")
def llava():
    return tiny.llava(seed=0), tiny.processor()


def docs(n: int = 4) -> list[dict]:
    imgs = tiny.images(n, seed=3)
    return [{"image": imgs[i], "question": QUESTIONS[i % len(QUESTIONS)], "answer": "yes"} for i in range(n)]


def lm(llava, cls=VlmcutLMM, method="none", keep=None, batch_size=1, **options):
    model, processor = llava
    out = cls.from_loaded(model, processor, method, keep, batch_size=batch_size, max_new_tokens=5, **options)
    out.task_dict = {TASK: {SPLIT: docs()}}
    return out


def req(kind: str, args: tuple, doc_id: int) -> Instance:
    return Instance(kind, args, 0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def gen_requests(n: int = 4, max_new_tokens: int = 5) -> list[Instance]:
    visual = lambda d: [d["image"]]  # noqa: E731
    kw = {"max_new_tokens": max_new_tokens, "temperature": 0, "until": []}
    return [req("generate_until", (QUESTIONS[i], dict(kw), visual, i, TASK, SPLIT), i) for i in range(n)]


def chat_requests(n: int = 4) -> list[Instance]:
    def to_messages(d):
        content = [{"type": "image", "url": d["image"]}, {"type": "text", "text": d["question"]}]
        return [{"role": "user", "content": content}]

    kw = {"max_new_tokens": 5, "temperature": 0, "until": []}
    return [req("generate_until", ("", to_messages, dict(kw), i, TASK, SPLIT), i) for i in range(n)]


def ll_requests(n: int = 4) -> list[Instance]:
    visual = lambda d: [d["image"]]  # noqa: E731
    conts = ["yes", "no", "red circle", "left"]
    return [req("loglikelihood", (QUESTIONS[i], conts[i], visual, i, TASK, SPLIT), i) for i in range(n)]


def run(model, requests, kind="generate_until"):
    try:
        out = getattr(model, kind)(requests)
    finally:
        model.remove()
    return [r.text for r in out] if kind == "loglikelihood" else out


# ------------------------------------------------------------------------------------------------------
# Options
# ------------------------------------------------------------------------------------------------------


def test_options_become_the_config_types():
    keep, opts = prune_options("flowcut", "64", {"history_weight": "0.25", "prune_interval": "3"})
    assert (keep, opts) == (64, {"history_weight": 0.25, "prune_interval": 3})
    assert type(opts["history_weight"]) is float and type(keep) is int
    assert prune_options("flowcut", "0.5", {})[0] == 0.5
    assert prune_options("pdrop", 64, {"layers": "1;2", "ratio": "none"})[1] == {
        "layers": (1, 2),
        "ratio": None,
    }
    assert prune_options("pdrop", 64, {"layers": "[1,2]"})[1] == {"layers": (1, 2)}
    assert prune_options("sparsevlm", 64, {"recycle": "false"})[1] == {"recycle": False}
    from vlmcut.integrations.lmms_eval.model import split_model_args

    assert split_model_args("pretrained=d, method=pdrop,layers=[1,2],keep=8") == [
        "pretrained=d",
        "method=pdrop",
        "layers=[1,2]",
        "keep=8",
    ]
    # Not convertible: passed as given, so vlmcut's own validation names the problem.
    assert prune_options("flowcut", "lots", {"prune_interval": "often"}) == (
        "lots",
        {"prune_interval": "often"},
    )


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        ("method=nosuch,keep=64", ValueError, "unknown method 'nosuch'; available: ['none', "),
        ("method=flowcut,keep=0", ValueError, "keep must be >= 1 (visual tokens per image)"),
        ("method=flowcut,keep=-3", ValueError, "keep must be >= 1 (visual tokens per image)"),
        ("method=flowcut,keep=64,history_weight=2", ValueError, "history_weight"),
        ("method=flowcut,keep=64,nosuch=1", TypeError, "unknown option(s) ['nosuch'] for method 'flowcut'"),
        ("method=flowcut", ValueError, "method=flowcut needs keep="),
        ("method=none,keep=64", ValueError, "method=none runs the unpruned model and takes no keep"),
    ],
)
def test_bad_model_args_raise_vlmcuts_message(tmp_path, args, error, message):
    model, processor = tiny.llava(seed=0), tiny.processor()
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    with pytest.raises(error, match=_literal(message)):
        VlmcutLMM.create_from_arg_string(f"pretrained={tmp_path},{args}", {"device": "cpu"})


def _literal(text: str) -> str:
    import re

    return re.escape(text)


def test_entry_point_registers_both_interfaces():
    from lmms_eval import models

    assert models.get_model("vlmcut") is VlmcutChatLMM
    assert models.get_model("vlmcut", force_simple=True) is VlmcutLMM


# ------------------------------------------------------------------------------------------------------
# Tiny LLaVA: identity, batches, loglikelihood, chat, multi-round, efficiency fields
# ------------------------------------------------------------------------------------------------------


def test_identity_none_equals_keep_all(llava):
    base = run(lm(llava), gen_requests())
    kept = run(lm(llava, method="flowcut", keep=64), gen_requests())
    assert [r.text for r in base] == [r.text for r in kept]
    ll_base = run(lm(llava), ll_requests(), "loglikelihood")
    ll_kept = run(lm(llava, method="flowcut", keep=64), ll_requests(), "loglikelihood")
    assert ll_base == ll_kept
    assert [r.token_counts.visual_tokens for r in base] == [64] * 4


def test_model_is_restored_after_remove(llava):
    model, processor = llava
    before = {k: v.clone() for k, v in model.state_dict().items()}
    m = lm(llava, method="visionzip", keep=16)
    assert m.handle.active
    run(m, gen_requests(2))
    assert not m.handle.active
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(
    ("method", "keep", "opts"), [("flowcut", 16, {}), ("fastv", 16, {"layer": 1}), ("none", None, {})]
)
def test_batch_does_not_change_a_result(llava, method, keep, opts):
    one = run(lm(llava, method=method, keep=keep, batch_size=1, **opts), gen_requests())
    four = run(lm(llava, method=method, keep=keep, batch_size=4, **opts), gen_requests())
    assert [r.text for r in one] == [r.text for r in four]
    assert [r.token_counts.visual_tokens_final for r in one] == [
        r.token_counts.visual_tokens_final for r in four
    ]
    ll1 = run(lm(llava, method=method, keep=keep, batch_size=1, **opts), ll_requests(), "loglikelihood")
    ll4 = run(lm(llava, method=method, keep=keep, batch_size=3, **opts), ll_requests(), "loglikelihood")
    assert [g for _, g in ll1] == [g for _, g in ll4]
    assert [s for s, _ in ll1] == pytest.approx([s for s, _ in ll4], abs=1e-4)


def test_loglikelihood_is_the_sum_of_token_logprobs(llava):
    model, processor = llava
    m = lm(llava)
    (score, greedy), *_ = run(m, ll_requests(1), "loglikelihood")
    prompt = m.prompt(QUESTIONS[0], 1)
    full = dict(processor(images=docs(1)[0]["image"], text=prompt, return_tensors="pt"))
    cont = torch.tensor([processor.tokenizer("yes", add_special_tokens=False)["input_ids"]])
    n = cont.shape[1]
    full["input_ids"] = torch.cat([full["input_ids"], cont], 1)
    full["attention_mask"] = torch.ones_like(full["input_ids"])
    with torch.no_grad():
        logits = model(**full).logits.float().log_softmax(-1)
    target = full["input_ids"][0, -n:]
    expected = logits[0, -n - 1 : -1].gather(-1, target[:, None]).sum().item()
    assert score == pytest.approx(-expected, abs=1e-5)  # lmms-eval 0.7.3 scores choices by argmin: the NLL
    assert greedy == bool((logits[0, -n - 1 : -1].argmax(-1) == target).all())


def test_chat_interface_asks_what_the_simple_one_asks(llava):
    simple = run(lm(llava, method="flowcut", keep=16, batch_size=2), gen_requests())
    chat = run(lm(llava, VlmcutChatLMM, method="flowcut", keep=16, batch_size=2), chat_requests())
    assert [r.text for r in simple] == [r.text for r in chat]
    assert [r.token_counts.to_dict() for r in chat][0]["visual_tokens"] == 16


def test_efficiency_fields(llava):
    flow = run(lm(llava, method="flowcut", keep=16, batch_size=2), gen_requests())
    d = flow[0].token_counts.to_dict()
    assert d["visual_tokens"] == d["visual_tokens_final"] == 16
    assert d["prefill_s"] > 0 and d["vision_s"] > 0 and d["output_tokens"] >= 1
    fastv = run(lm(llava, method="fastv", keep=16, batch_size=2, layer="1"), gen_requests())
    d = fastv[0].token_counts.to_dict()
    assert (
        d["visual_tokens"] == 64 and d["visual_tokens_final"] == 16
    )  # all enter; FastV keeps 16 after layer K


def test_multi_round(llava):
    def rounds(doc, previous_output=None, round_idx=None, previous_round_info=None):
        if round_idx >= 2:
            return None, None, True, previous_output, previous_round_info
        return [doc["image"]], "describe the image", False, previous_output, {"round": round_idx}

    visual = lambda d: [d["image"]]  # noqa: E731
    kw = {"max_new_tokens": 3, "until": []}
    reqs = [req("generate_until_multi_round", (QUESTIONS[0], dict(kw), visual, rounds, 0, TASK, SPLIT), 0)]
    out = run(lm(llava, method="flowcut", keep=16), reqs, "generate_until_multi_round")
    assert len(out) == 1 and len(out[0]) == 2 and all(isinstance(t, str) for t in out[0])

    def messages(doc, round_idx=None, previous_output=None, previous_round_info=None):
        msg = [
            {
                "role": "user",
                "content": [{"type": "image", "url": doc["image"]}, {"type": "text", "text": "yes"}],
            }
        ]
        if round_idx is None:
            return msg
        return (None, True, previous_output, None) if round_idx >= 3 else (msg, False, previous_output, None)

    reqs = [req("generate_until_multi_round", ("", messages, dict(kw), 1, TASK, SPLIT), 1)]
    out = run(lm(llava, VlmcutChatLMM, method="flowcut", keep=16), reqs, "generate_until_multi_round")
    assert len(out[0]) == 3


# ------------------------------------------------------------------------------------------------------
# Exported tasks through lmms-eval (tiny model: the machinery; the zoo model: the exact cross-check)
# ------------------------------------------------------------------------------------------------------


def _evaluate(model, tasks: list[str], include: Path, **kwargs):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include), include_defaults=False)
    return simple_evaluate(model=model, tasks=tasks, task_manager=manager, log_samples=True, **kwargs)


def test_exported_tasks_run_in_lmms_eval(tmp_path, llava):
    from vlmcut.integrations.lmms_eval.export import export_tasks

    (exported,) = export_tasks(["scenes"], "test", 6, tmp_path)
    assert set(exported.tasks) == {"vlmcut_scenes", "vlmcut_scenes_mc"}
    model = lm(llava, method="flowcut", keep=16, batch_size=3)
    try:
        out = _evaluate(model, ["vlmcut_scenes", "vlmcut_scenes_mc"], tmp_path)
    finally:
        model.remove()
    for task in ("vlmcut_scenes", "vlmcut_scenes_mc"):
        assert 0.0 <= out["results"][task]["acc,none"] <= 1.0
        assert len(out["samples"][task]) == 6
    for sample in out["samples"]["vlmcut_scenes_mc"]:  # lmms-eval picks the smallest value: an NLL, >= 0
        nll = [r[0] for r in sample["filtered_resps"]]
        assert all(v >= 0 for v in nll)
        assert sample["acc"] == float(nll.index(min(nll)) == int(sample["target"]))
    counts = out["samples"]["vlmcut_scenes"][0]["token_counts"][0]
    assert counts["visual_tokens"] == 16 and counts["prefill_s"] > 0
    assert out["throughput"]["avg_visual_tokens"] == 16


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    from zoo_gate import require_zoo

    require_zoo()
    from vlmcut.integrations.lmms_eval.export import export_tasks, export_zoo_model

    root = tmp_path_factory.mktemp("lmms-zoo")
    export_zoo_model(root / "model")
    export_tasks(["scenes"], "test", 40, root / "tasks")
    return root


def test_zoo_llava_scores_exactly_what_vlmcut_eval_scores(zoo):
    """The real small LLaVA on 40 scenes questions: lmms-eval (``--model vlmcut``, loaded from the exported
    directory) and ``vlmcut eval``'s runner (the zoo loader) give the same answers, hence the same accuracy."""
    from vlmcut.eval.datasets import load_dataset
    from vlmcut.eval.runner import evaluate
    from vlmcut.eval.scenes import normalize_answer
    from vlmcut.zoo import TRAINED_WEIGHTS, load_small_llava

    samples = list(load_dataset("scenes", "test", n=40))
    model, processor = load_small_llava(projector_path=TRAINED_WEIGHTS)
    ours = evaluate(model, processor, samples, "scenes", "flowcut", 64, batch_size=8, progress=False)
    del model
    out = _evaluate(
        "vlmcut",
        ["vlmcut_scenes"],
        zoo / "tasks",
        model_args=f"pretrained={zoo / 'model'},method=flowcut,keep=64",
        batch_size=8,
        device="cpu",
    )
    rows = sorted(out["samples"]["vlmcut_scenes"], key=lambda r: r["doc_id"])
    theirs = [
        normalize_answer(r["filtered_resps"][0], s.vocabulary) for r, s in zip(rows, samples, strict=True)
    ]
    assert theirs == ours.answers
    assert out["results"]["vlmcut_scenes"]["acc,none"] == ours.accuracy
    assert {r["token_counts"][0]["visual_tokens"] for r in rows} == {64}
    print(
        f"\ncross-check: flowcut@64 on 40 scenes questions: lmms-eval {out['results']['vlmcut_scenes']['acc,none']}"
        f" = vlmcut eval {ours.accuracy}"
    )


def test_cli_bad_model_args_fail_with_our_message(zoo, tmp_path):
    """``python -m lmms_eval --model vlmcut`` (the entry point) with an unknown method: our message, and a
    non-zero exit with ``--verbosity DEBUG``."""
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "vlmcut",
        "--device",
        "cpu",
        "--verbosity",
        "DEBUG",
        "--model_args",
        f"pretrained={zoo / 'model'},method=nosuch,keep=64",
        "--include_path",
        str(zoo / "tasks"),
        "--tasks",
        "vlmcut_scenes",
        "--output_path",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600)
    assert proc.returncode != 0
    assert "unknown method 'nosuch'; available: ['none', 'fastervlm', " in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("*_results.json"))


def test_results_file_carries_efficiency(zoo, tmp_path):
    """The CLI run's results file (not only its exit code): accuracy and the efficiency means."""
    cmd = [
        sys.executable,
        "-m",
        "lmms_eval",
        "--model",
        "vlmcut",
        "--device",
        "cpu",
        "--batch_size",
        "4",
        "--model_args",
        f"pretrained={zoo / 'model'},method=visionzip,keep=32",
        "--include_path",
        str(zoo / "tasks"),
        "--tasks",
        "vlmcut_scenes",
        "--limit",
        "4",
        "--output_path",
        str(tmp_path),
        "--log_samples",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **OFFLINE}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = tmp_path.rglob("*_results.json")
    data = json.loads(results.read_text())
    assert 0.0 <= data["results"]["vlmcut_scenes"]["acc,none"] <= 1.0
    assert data["throughput"]["avg_visual_tokens"] == 32
    (samples,) = tmp_path.rglob("*_samples_vlmcut_scenes.jsonl")
    first = json.loads(samples.read_text().splitlines()[0])
    assert first["token_counts"][0]["visual_tokens"] == 32


def test_sweep_writes_table_1(tmp_path):
    from vlmcut.integrations.lmms_eval.export import export_tasks
    from vlmcut.integrations.lmms_eval.sweep import run_sweep, write_sweep

    export_tasks(["scenes"], "test", 4, tmp_path / "tasks")
    model, processor = tiny.llava(seed=0, text_layers=4), tiny.processor()
    results, effs = run_sweep(
        model, processor, ["vlmcut_scenes"], ["flowcut", "fastv"], [32, 16], tmp_path / "tasks", batch_size=2
    )
    assert [(r.method, r.keep) for r in results] == [
        ("unpruned", None),
        ("flowcut", 32),
        ("fastv", 32),
        ("flowcut", 16),
        ("fastv", 16),
    ]
    assert results[0].retention == 1.0 and all(r.retention is not None for r in results)
    assert [e.visual_tokens for e in effs] == [64, 32, 64, 16, 64]
    assert [e.visual_tokens_final for e in effs] == [64, 32, 32, 16, 16]
    assert all(not h for h in [getattr(model, "_forward_hooks", {})])  # every run took its method off
    paths = write_sweep(results, effs, tmp_path / "out")
    text = paths["md"].read_text()
    assert "| method | 32 tokens | 16 tokens |" in text and "visual tokens -> LLM" in text


def test_llava_next_images_of_two_sizes():
    """LLaVA-NeXT (crops per image, FlowCut's second stage in the LLM): neither the answer nor the visual
    token counts of one image depend on its batch (padding is not counted)."""
    from test_llava_next import SIZES, llava_next
    from test_llava_next import images as next_images
    from test_llava_next import processor as next_processor

    model, processor = llava_next(seed=4), next_processor()
    pictures = next_images(SIZES[:2], seed=4)

    def answers(batch_size: int):
        m = VlmcutLMM.from_loaded(model, processor, "flowcut", 12, batch_size=batch_size, max_new_tokens=4)
        m.task_dict = {TASK: {SPLIT: [{"image": p} for p in pictures]}}
        visual = lambda d: [d["image"]]  # noqa: E731
        reqs = [
            req("generate_until", (QUESTIONS[i], {"max_new_tokens": 4}, visual, i, TASK, SPLIT), i)
            for i in range(2)
        ]
        return run(m, reqs)

    one, two = answers(1), answers(2)
    assert [r.text for r in one] == [r.text for r in two]
    counts = [(r.token_counts.visual_tokens, r.token_counts.visual_tokens_final) for r in one]
    assert counts == [(r.token_counts.visual_tokens, r.token_counts.visual_tokens_final) for r in two]
    # FlowCut keeps keep/2 patches per crop in the tower, then keep in the LLM; the image-newline tokens of
    # the unpadded grid count as visual tokens too (they are image placeholders in the prompt).
    assert all(final < entered for entered, final in counts)
