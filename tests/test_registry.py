"""The two registries are the extension points: a method or a model family registered from outside the package
is used by ``vlmcut.prune`` with nothing else edited, options go to whoever declares them, and misuse says
what to do."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import tiny
import torch
from torch import nn

import vlmcut
from vlmcut.methods.base import METHODS, MethodSpec, check_int, register_method
from vlmcut.models.registry import ADAPTERS, AdapterOption, ModelAdapter, register_adapter
from vlmcut.models.vit import EncoderPassRecord


@dataclass(frozen=True)
class FirstConfig:
    keep: int

    def __post_init__(self) -> None:
        check_int("keep", self.keep, 1)


class FirstSelector:
    """Keeps the first ``keep`` patches at the last layer before the consumed one."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.consume = 0

    def start(self, consume_layer: int) -> None:
        self.consume = consume_layer

    def needs_scores(self, num_patches: int) -> bool:
        return num_patches > self.keep

    def step(self, layer, q, k, v, scale, has_cls, group=1):  # noqa: ANN001, ANN201
        if layer != self.consume - 1:
            return None
        n = q.shape[2] - int(has_cls)
        return torch.arange(min(self.keep, n)).expand(q.shape[0], -1)


class ToyVLM(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ToyAttachment:
    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options
        self.removed = False

    @property
    def record(self) -> EncoderPassRecord:
        return EncoderPassRecord(num_patches=int(self.options.get("frames", 1)))

    @property
    def llm_record(self) -> None:
        return None

    def remove(self) -> None:
        self.removed = True


class ToyAdapter(ModelAdapter):
    name = "toy"
    title = "Toy"
    options = (AdapterOption("frames", "frames per clip", elsewhere="takes no clips"),)

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, ToyVLM)

    def why_not(self, spec: MethodSpec) -> tuple[type[Exception], str] | None:
        return None if spec.make_selector is not None else (ValueError, "needs a vision stage")

    def attach(
        self, model: nn.Module, spec: MethodSpec, config: Any, options: dict[str, Any]
    ) -> ToyAttachment:
        return ToyAttachment(options)


@pytest.fixture
def toy_family():
    adapter = register_adapter(ToyAdapter())
    try:
        yield adapter
    finally:
        ADAPTERS.remove(adapter)


@pytest.fixture
def first_method():
    spec = register_method(MethodSpec("first", FirstConfig, lambda cfg, keep: FirstSelector(keep)))
    try:
        yield spec
    finally:
        del METHODS["first"]


def test_a_family_registered_outside_the_package(toy_family) -> None:
    model = ToyVLM()
    with vlmcut.prune(model, "flowcut", keep=8, frames=4) as handle:
        assert handle._attachment.options == {"frames": 4}  # the family's option went to the family
        assert handle.num_patches == 4
    assert handle._attachment is None
    with pytest.raises(
        ValueError, match=r"'fastv' needs a vision stage; supported methods on Toy: .*flowcut"
    ):
        vlmcut.prune(model, "fastv", keep=8)
    # its option is refused elsewhere with its own phrase, and the method's options are not swallowed
    with pytest.raises(
        TypeError, match=r"frames is an option of Toy; LlavaForConditionalGeneration .* takes no clips"
    ):
        vlmcut.prune(tiny.llava(), "flowcut", keep=8, frames=4)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['frame'\]"):
        vlmcut.prune(model, "flowcut", keep=8, frame=4)


def test_a_method_registered_outside_the_package(first_method) -> None:
    assert "first" in vlmcut.available_methods()
    tower = tiny.clip_tower(layers=4)
    pixels = tiny.pixels(2)
    with torch.no_grad(), vlmcut.prune(tower, "first", keep=5) as handle:
        out = tower(pixel_values=pixels)
    assert out.last_hidden_state.shape[1] == 1 + 5
    assert torch.equal(handle.kept_indices, torch.arange(5).expand(2, -1))
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodSpec("first", FirstConfig, None))


def test_a_spec_object_prunes_without_registration() -> None:
    spec = MethodSpec("mine", FirstConfig, lambda cfg, keep: FirstSelector(keep))
    tower = tiny.clip_tower(layers=4)
    with torch.no_grad(), vlmcut.prune(tower, spec, keep=3) as handle:
        tower(pixel_values=tiny.pixels(1))
    assert handle.method == "mine" and handle.kept_indices.shape == (1, 3)
    assert "mine" not in METHODS


def test_unknown_model_lists_the_registry() -> None:
    with pytest.raises(TypeError, match="supported models: .*LlavaForConditionalGeneration.*CLIPVisionModel"):
        vlmcut.prune(nn.Linear(2, 2), "flowcut", keep=4)
    with pytest.raises(TypeError, match="ModelAdapter"):
        register_adapter(object())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        register_adapter(type(ADAPTERS[0])())
