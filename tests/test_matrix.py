"""Every registered method on every registered model family (the registries are the source of truth):

* where the family runs the method, ``keep`` above every count is the exact identity (same logits / tower
  output, bit for bit) and ``remove()`` restores the instance exactly (no hook, no instance attribute, same
  output as before);
* where it does not, ``vlmcut.prune`` refuses before touching the model, and the error lists the methods the
  family does run.

A new family registered without a tiny model in :data:`BUILDERS` fails :func:`test_every_family_has_a_builder`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import tiny
import tiny_qwen
import torch

import vlmcut
from vlmcut.api import _ATTACHED
from vlmcut.methods.base import METHODS
from vlmcut.models.registry import ADAPTERS, adapter_for

HUGE = 10**6  # above every token count of the tiny models


def _llava() -> tuple[torch.nn.Module, dict[str, Any]]:
    proc = tiny.processor()
    prompts = ["USER: <image> what is it ? ASSISTANT:", "USER: <image> a longer question here ? ASSISTANT:"]
    inputs = proc(images=tiny.images(2), text=prompts, return_tensors="pt", padding=True)
    return tiny.llava(text_layers=5), dict(inputs)


def _llava_next() -> tuple[torch.nn.Module, dict[str, Any]]:
    import test_llava_next as tn

    return tn.llava_next(text_layers=5), dict(tn._inputs(tn.processor()))


def _qwen(builder: Callable[[], torch.nn.Module]) -> Callable[[], tuple[torch.nn.Module, dict[str, Any]]]:
    def build() -> tuple[torch.nn.Module, dict[str, Any]]:
        inputs = tiny_qwen.prompt_inputs(
            [[5, "image", 6, 7], [8, "image", "image"]], image_grids=[(1, 4, 4), (1, 4, 8), (1, 8, 4)]
        )
        return builder(), inputs

    return build


def _video_llava() -> tuple[torch.nn.Module, dict[str, Any]]:
    import test_video_llava as tv

    return tv.video_llava(text_layers=5), tv.inputs_for(tv.MIXED)


def _tower() -> tuple[torch.nn.Module, dict[str, Any]]:
    return tiny.clip_tower(layers=4), {"pixel_values": tiny.pixels(2), "output_hidden_states": True}


# family name -> (tiny model, inputs of one forward)
BUILDERS: dict[str, Callable[[], tuple[torch.nn.Module, dict[str, Any]]]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "qwen2_vl": _qwen(lambda: tiny_qwen.qwen2_vl(text_layers=5)),
    "video_llava": _video_llava,
    "tower": _tower,
}
PAIRS = [(a.name, m) for a in ADAPTERS for m in sorted(METHODS)]


def test_every_family_has_a_builder() -> None:
    assert sorted(BUILDERS) == sorted(a.name for a in ADAPTERS), "add a tiny model for the new family"
    assert len(PAIRS) >= 5 * 8


@pytest.fixture(scope="module")
def built() -> dict[str, tuple[torch.nn.Module, dict[str, Any]]]:
    return {}


def _model(built, family: str) -> tuple[torch.nn.Module, dict[str, Any], Any]:
    if family not in built:
        model, inputs = BUILDERS[family]()
        with torch.no_grad():
            reference = _output(model(**inputs))
        built[family] = (model, inputs, reference)
    return built[family]


def _output(out: Any) -> torch.Tensor:
    if getattr(out, "logits", None) is not None:
        return out.logits
    return out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state


def _wiring(model: torch.nn.Module) -> list[tuple]:
    """Every hook and instance attribute of every module (transformers adds hooks of its own)."""
    return [
        (
            name,
            tuple(m._forward_hooks),
            tuple(m._forward_pre_hooks),
            tuple(sorted(k for k in vars(m) if not k.startswith("_") and callable(vars(m)[k]))),
            "__deepcopy__" in vars(m) or "__reduce_ex__" in vars(m),
        )
        for name, m in model.named_modules()
    ]


@pytest.mark.parametrize(("family", "method"), PAIRS, ids=[f"{f}-{m}" for f, m in PAIRS])
def test_identity_restore_or_refusal(built, family: str, method: str) -> None:
    model, inputs, reference = _model(built, family)
    before = _wiring(model)
    adapter = adapter_for(model)
    assert adapter.name == family
    if method not in adapter.supported_methods():
        with pytest.raises((TypeError, ValueError, NotImplementedError)) as info:
            vlmcut.prune(model, method, keep=HUGE)
        for name in adapter.supported_methods():
            assert name in str(info.value), f"the refusal does not list {name}: {info.value}"
        assert model not in _ATTACHED and _wiring(model) == before
        return
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad(), vlmcut.prune(model, method, keep=HUGE) as handle:
        pruned = _output(model(**inputs))
        assert handle.active
    assert torch.equal(pruned, reference), f"{method} at keep={HUGE} is not the identity on {family}"
    assert model not in _ATTACHED and _wiring(model) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(_output(model(**inputs)), reference)


def test_supported_lists_come_from_the_registry() -> None:
    table = vlmcut.supported()
    for adapter in ADAPTERS:
        for cls in adapter.classes:
            assert table[cls] == adapter.supported_methods()
    # Qwen2-VL's merger needs whole merge units: the single-token vision methods are not there
    qwen = next(a for a in ADAPTERS if a.name == "qwen2_vl")
    assert "flowcut" in qwen.supported_methods() and "grid" not in qwen.supported_methods()
    tower = next(a for a in ADAPTERS if a.name == "tower")
    assert all(METHODS[m].make_selector is not None for m in tower.supported_methods())
