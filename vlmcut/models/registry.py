"""The model-adapter registry: which models vlmcut can prune, and how each family is wired.

A family is one file in this package that subclasses :class:`ModelAdapter`, declares the ``transformers``
classes it takes, its own options (``video_budget``, a bare tower's ``feature_layer``), which methods it can
run (:meth:`ModelAdapter.check`, with an error that says what to do) and how to attach one
(:meth:`ModelAdapter.attach`), and registers an instance with :func:`register_adapter`. :func:`vlmcut.prune`
looks the model's class up here and names no family itself; the lists of supported models and of the
methods each family supports are derived from the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from torch import nn

from ..methods.base import METHODS, MethodSpec
from .vit import EncoderPassRecord, tower_spec


class Attachment(Protocol):
    """What :meth:`ModelAdapter.attach` returns and :class:`vlmcut.PruneHandle` holds."""

    @property
    def record(self) -> EncoderPassRecord: ...

    @property
    def llm_record(self) -> Any: ...

    def remove(self) -> None: ...


@dataclass(frozen=True)
class AdapterOption:
    """An option of a model family (not of a method): ``vlmcut.prune(model, method, keep=K, name=value)``.

    ``elsewhere``: the exception type and the phrase that end the error when the option is passed to a family
    that does not take it (a family may give its own phrase in :attr:`ModelAdapter.refuses`).
    """

    name: str
    help: str
    elsewhere: str = "does not take it"
    elsewhere_error: type[Exception] = TypeError


VIDEO_BUDGETS = ("per_frame", "shared")
VIDEO_BUDGET = AdapterOption(
    "video_budget",
    "how a video's budget is shared: 'per_frame' (every frame keeps its part) or 'shared' (the frames compete "
    "for it); see the family's module for the defaults",
    elsewhere="takes no videos",
)


@dataclass(frozen=True)
class ModelParts:
    """The modules of a model that measurements hook (the benchmark times and counts them)."""

    vision: nn.Module  # timed as the vision stage
    vision_layers: list[nn.Module]  # its encoder layers
    llm: nn.Module  # the language model (decoder stack)
    llm_layers: list[nn.Module]
    image_token_id: int
    packed_vision: bool = False  # the tower takes all images as one packed sequence split by cu_seqlens


UNBOUNDED_KEEP = 1 << 30  # keep="auto" without max_keep: no image is capped below its own token count


class ModelAdapter:
    """One model family. Subclass, set the class attributes, implement :meth:`attach` (and :meth:`check`
    where some methods cannot run), and :func:`register_adapter` an instance at the end of the file."""

    name: str = ""  # short id, e.g. "llava"
    title: str = ""  # for messages, e.g. "LLaVA-1.5"
    classes: tuple[str, ...] = ()  # transformers class names this adapter takes
    options: tuple[AdapterOption, ...] = ()
    refuses: dict[str, str] = {}  # option of another family -> why this one does not take it
    ratio_keep: bool = False  # images may keep different counts, so a float keep ratio is allowed
    auto_keep: bool = False  # keep="auto": every image's placeholders shrink to the count it chose

    def model_classes(self) -> tuple[type, ...]:
        """The classes of :attr:`classes` this ``transformers`` has (older releases may lack some)."""
        import transformers

        found = (getattr(transformers, name, None) for name in self.classes)
        return tuple(c for c in found if isinstance(c, type))

    def matches(self, model: nn.Module) -> bool:
        return isinstance(model, self.model_classes())

    def why_not(self, spec: MethodSpec) -> tuple[type[Exception], str] | None:
        """Why ``spec`` can never run on this family (the exception type and the reason), or ``None``; the
        default accepts every method."""
        return None

    def check_options(self, spec: MethodSpec, options: dict[str, Any]) -> None:
        """Raise an error that says what to do when this family's ``options`` do not fit ``spec``."""

    def check(self, spec: MethodSpec, options: dict[str, Any]) -> None:
        """:meth:`why_not` as an error that lists the methods this family runs, then :meth:`check_options`."""
        refusal = self.why_not(spec)
        if refusal is not None:
            error, reason = refusal
            raise error(
                f"{spec.name!r} {reason}; supported methods on {self.title}: {', '.join(self.supported_methods())}"
            )
        self.check_options(spec, options)

    def attach(self, model: nn.Module, spec: MethodSpec, config: Any, options: dict[str, Any]) -> Attachment:
        raise NotImplementedError

    def parts(self, model: nn.Module) -> ModelParts | None:
        """The modules measurements hook, for the classes that hold a language-model head; ``None`` where the
        benchmark cannot run this model."""
        return None

    def supported_methods(self) -> list[str]:
        """The registered methods this family runs (those :meth:`why_not` does not refuse)."""
        return [name for name in sorted(METHODS) if self.why_not(METHODS[name]) is None]

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}: {', '.join(self.classes)}>"


ADAPTERS: list[ModelAdapter] = []


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Add a family (each family file calls this once at import)."""
    if not isinstance(adapter, ModelAdapter):
        raise TypeError(f"register_adapter takes a ModelAdapter, got {type(adapter).__name__}")
    if any(a.name == adapter.name for a in ADAPTERS):
        raise ValueError(f"a model family named {adapter.name!r} is already registered")
    ADAPTERS.append(adapter)
    return adapter


def supported_models() -> list[str]:
    """Every model class name a registered family takes."""
    return [name for a in ADAPTERS for name in a.classes]


def adapter_named(name: str) -> ModelAdapter:
    """The family registered as ``name`` (its ``ModelAdapter.name``, e.g. a config's ``model_type``)."""
    for adapter in ADAPTERS:
        if adapter.name == name:
            return adapter
    raise KeyError(f"no model family named {name!r}; registered: {', '.join(a.name for a in ADAPTERS)}")


def adapter_for(model: nn.Module) -> ModelAdapter:
    """The family of ``model`` (by its class); a ``TypeError`` listing the supported classes otherwise."""
    for adapter in ADAPTERS:
        if adapter.matches(model):
            return adapter
    raise TypeError(
        f"{type(model).__name__} is not supported; supported models: {', '.join(supported_models())}"
    )


def split_options(adapter: ModelAdapter, model: nn.Module, options: dict[str, Any]) -> dict[str, Any]:
    """Take ``adapter``'s own options out of ``options`` (which keeps the method's); an option of another
    family is an error that says which families take it and why this one does not."""
    own = {o.name for o in adapter.options}
    taken = {name: options.pop(name) for name in list(options) if name in own}
    for name in list(options):
        owners = [a for a in ADAPTERS if any(o.name == name for o in a.options)]
        if not owners:
            continue  # a method option (or an unknown one: the method's config says so)
        option = next(o for o in owners[0].options if o.name == name)
        why = adapter.refuses.get(name, option.elsewhere)
        raise option.elsewhere_error(
            f"{name} is an option of {', '.join(a.title for a in owners)}; {type(model).__name__} "
            f"({adapter.title}) {why}"
        )
    return taken


def check_keep_kind(adapter: ModelAdapter, model: nn.Module, keep: Any) -> None:
    """A float ``keep`` (a ratio) only where the family gives images their own counts; ``"auto"`` only
    where a family lets every image keep its own count."""
    if keep == "auto" and not adapter.auto_keep:
        auto_families = " / ".join(a.title for a in ADAPTERS if a.auto_keep)
        raise ValueError(
            f"keep='auto' (a budget per image) is supported on {auto_families} only: there every image's "
            f"placeholders can shrink to its own count; pass an int count of visual tokens per image for "
            f"{type(model).__name__}"
        )
    if isinstance(keep, float) and not adapter.ratio_keep:
        ratio_families = " / ".join(a.title for a in ADAPTERS if a.ratio_keep)
        raise ValueError(
            f"keep={keep!r}: a ratio keep is supported on {ratio_families} only (images of varying size); pass "
            f"an int count of visual tokens per image for {type(model).__name__}"
        )


def tower_parts(inner: nn.Module, tower: nn.Module) -> ModelParts:
    """:class:`ModelParts` of a model whose ``inner`` holds a vision tower vlmcut recognises (``tower_spec``)
    and a ``language_model``."""
    llm = inner.language_model
    return ModelParts(tower, tower_spec(tower).layers, llm, list(llm.layers), image_token_id(inner.config))


def image_token_id(config: Any) -> int:
    """The placeholder id of an image in the prompt (``image_token_id``; older configs ``image_token_index``)."""
    value = getattr(config, "image_token_id", None)
    if value is None:
        value = config.image_token_index
    return int(value)


__all__ = [
    "ADAPTERS",
    "AdapterOption",
    "Attachment",
    "ModelAdapter",
    "ModelParts",
    "VIDEO_BUDGET",
    "VIDEO_BUDGETS",
    "adapter_for",
    "adapter_named",
    "check_keep_kind",
    "image_token_id",
    "register_adapter",
    "split_options",
    "supported_models",
    "tower_parts",
]
