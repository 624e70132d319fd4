"""`vlmcut serve` and the vLLM plugin's settings, without vLLM (the main venv): errors and the command line."""

from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from vlmcut.cli import main
from vlmcut.integrations.vllm import engine_overrides
from vlmcut.integrations.vllm.serve import serve_command


@pytest.fixture
def llava_dir(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    return tmp_path


def test_serve_without_vllm_is_one_line_and_exit_2(llava_dir, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a)
    )
    assert main(["serve", str(llava_dir), "--keep", "64", "--port", "8000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("vlmcut serve: error: vLLM is not installed")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--method", "fastv"], "prunes inside the language model"),
        (["--method", "nope"], "unknown method"),
        (["--option", "bogus=1"], "unknown option"),
        (["--option", "history_weight=2"], "history_weight"),
        (["--hf-overrides", "{}"], "--hf-overrides is set by `vlmcut serve`"),
    ],
)
def test_serve_refuses_bad_settings(llava_dir, capsys, argv, message):
    assert main(["serve", str(llava_dir), *argv]) == 2
    assert message in capsys.readouterr().err


def test_serve_refuses_a_non_llava_directory(tmp_path, capsys):
    assert main(["serve", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen2VLForConditionalGeneration"]}))
    assert main(["serve", str(tmp_path)]) == 2
    assert "supports LLaVA-1.5" in capsys.readouterr().err


def test_other_commands_still_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--bogus"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_serve_command_binds_loopback_and_carries_the_overrides(llava_dir):
    argv = serve_command(llava_dir, "visionzip", 32, {"contextual": 4}, vllm_args=["--port", "9000"])
    assert argv[:3] == [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    overrides = json.loads(argv[argv.index("--hf-overrides") + 1])
    assert overrides == engine_overrides("visionzip", 32, contextual=4)
    assert overrides["architectures"] == ["FlowCutLlavaForConditionalGeneration"]
    assert argv[-2:] == ["--port", "9000"]


def test_engine_overrides_validate_like_prune():
    with pytest.raises(ValueError, match="feature_layer"):
        engine_overrides("flowcut", 64, feature_layer=-2)
    with pytest.raises(ValueError, match="int count"):
        engine_overrides("flowcut", 0.5)
    with pytest.raises((TypeError, ValueError), match="keep"):
        engine_overrides("grid", 0)
    with pytest.raises(ValueError, match="fixed int count"):
        engine_overrides("flowcut", "auto")


def test_transformers5_tower_names_are_nested():
    from vlmcut.integrations.vllm.tower import nest_tower_names

    names = [
        "vision_tower.embeddings.patch_embedding.weight",
        "model.vision_tower.encoder.layers.0.self_attn.q_proj.weight",
        "vision_tower.vision_model.post_layernorm.weight",
        "language_model.model.embed_tokens.weight",
    ]
    assert [n for n, _ in nest_tower_names((n, None) for n in names)] == [
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight",
        "vision_tower.vision_model.post_layernorm.weight",
        "language_model.model.embed_tokens.weight",
    ]
