"""Every bad method option is a ``ValueError`` / ``TypeError`` that names the option.

Each method's options come from its config class (``dataclasses.fields``), so a new option without a rule
below fails :func:`test_every_option_has_a_rule`. Bad values go through the config classes directly and
through ``vlmcut.prune`` on the tiny LLaVA (every method runs on it); nothing may stay attached.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import pytest
import tiny
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vlmcut
from vlmcut.api import _ATTACHED
from vlmcut.methods import base as checks
from vlmcut.methods.base import METHODS


def _real(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _int(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, int)


def _layers(minimum: int) -> Callable[[Any, dict[str, Any]], bool]:
    def ok(x: Any, _: dict[str, Any]) -> bool:
        if x is None:
            return True
        if isinstance(x, (str, bytes)) or not isinstance(x, (list, tuple)) or not x:
            return False
        return all(_int(v) and v >= minimum for v in x) and list(x) == sorted(set(x))

    return ok


RATIO_KEEP = {"flowcut", "fastv", "pdrop", "sparsevlm"}  # float ratios allowed (resolved on Qwen2-VL)

# option -> whether a value is valid (given the other options of the call); None: either outcome is right.
RULES: dict[str, Callable[[Any, dict[str, Any]], bool | None]] = {
    "semantic_scaling": lambda x, _: isinstance(x, str) and x in ("code", "paper"),
    "history_weight": lambda x, _: _real(x) and 0 <= x < 1,
    "prune_interval": lambda x, _: _int(x) and x >= 1,
    "layer": lambda x, _: _int(x) and x >= 1,
    "ratio": lambda x, _: x is None or (_real(x) and 0 < x < 1),
    "recycle": lambda x, _: isinstance(x, bool),
    "recycle_ratio": lambda x, _: _real(x) and 0 < x <= 1,
    "cluster_ratio": lambda x, _: _real(x) and 0 < x < 1,
    "seed": lambda x, _: _int(x) and 0 <= x < 2**64,
    "contextual": lambda x, o: x is None or (_int(x) and 0 <= x <= o["keep"]),
    "merge": lambda x, _: isinstance(x, str) and x in ("mean", "release"),
    "padding": lambda x, _: isinstance(x, str) and x in ("exclude", "compete"),
    # bounds of keep="auto" only: with an int keep any value is refused
    "mass": lambda x, o: x is None if o.get("keep") != "auto" else x is None or (_real(x) and 0 < x < 1),
    "min_keep": lambda x, o: x is None if o.get("keep") != "auto" else x is None or (_int(x) and x >= 1),
    "max_keep": lambda x, o: x is None if o.get("keep") != "auto" else None,
}
LAYER_MINIMUM = {"pdrop": 1, "sparsevlm": 0}


def keep_ok(method: str, x: Any) -> bool:
    if _int(x):
        return x >= 1
    return method in RATIO_KEEP and isinstance(x, float) and math.isfinite(x) and 0 < x <= 1


def valid(method: str, option: str, value: Any, others: dict[str, Any]) -> bool | None:
    if option == "keep":
        return keep_ok(method, value)
    if option == "layers":
        return _layers(LAYER_MINIMUM[method])(value, others)
    return RULES[option](value, others)


def options_of(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(METHODS[method].config_cls)]


ALL = [(m, o) for m in sorted(METHODS) for o in options_of(m)]

# Junk of every kind: None, bools, ints, floats (inf / nan too), strings, sequences, other objects.
JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 40),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([math.inf, -math.inf, math.nan, 0.0, 0.5, 1.0, 1.5, 2.0, 1e300]),
    st.text(max_size=6),
    st.sampled_from(["code", "paper", "mean", "release", "8", "a", ""]),
    st.lists(st.integers(-2, 40), max_size=4),
    st.tuples(st.integers(-2, 40), st.integers(-2, 40)),
    st.lists(st.one_of(st.floats(0, 10), st.booleans(), st.text(max_size=2)), min_size=1, max_size=3),
    st.builds(object),
    st.just({"a": 1}),
    st.just(b"\x00"),
)


def _assert_names(err: BaseException, option: str) -> None:
    name = "keep" if option == "keep" else option
    assert name in str(err), f"{type(err).__name__} for {option} does not name it: {err}"


def _build(method: str, option: str, value: Any) -> Any:
    base = {"keep": 8}
    base[option] = value
    return METHODS[method].config_cls(**base)


def test_every_option_has_a_rule() -> None:
    for method, option in ALL:
        assert option in ("keep", "layers") or option in RULES, f"add a rule for {method}.{option}"
    assert len(ALL) >= 20


@pytest.mark.parametrize(("method", "option"), ALL, ids=[f"{m}.{o}" for m, o in ALL])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=JUNK)
def test_config_accepts_exactly_the_valid_values(method: str, option: str, value: Any) -> None:
    others = {"keep": 8}
    ok = valid(method, option, value, others)
    try:
        _build(method, option, value)
    except (TypeError, ValueError) as err:
        assert ok is not True, f"{method}: {option}={value!r} is valid but raised {err}"
        _assert_names(err, option)
    else:
        assert ok is not False, f"{method}: {option}={value!r} was accepted"


# The cases reported in the issue, plus their neighbours: (method, options, exception, fragment).
EXPLICIT: list[tuple[str, dict[str, Any], type[Exception], str]] = [
    ("pdrop", {"ratio": "a"}, TypeError, "ratio"),
    ("pdrop", {"ratio": True}, TypeError, "ratio"),
    ("pdrop", {"ratio": math.nan}, ValueError, "ratio"),
    ("pdrop", {"ratio": 1}, ValueError, "ratio"),
    ("pdrop", {"layers": 5}, TypeError, "layers"),
    ("pdrop", {"layers": "8,16"}, TypeError, "layers"),
    ("pdrop", {"layers": ()}, ValueError, "layers"),
    ("pdrop", {"layers": [8, 4]}, ValueError, "layers"),
    ("pdrop", {"layers": [0, 4]}, ValueError, "layers"),
    ("pdrop", {"layers": [1.0, 4]}, TypeError, "layers"),
    ("pdrop", {"layers": [True, 4]}, TypeError, "layers"),
    ("sparsevlm", {"recycle_ratio": None}, TypeError, "recycle_ratio"),
    ("sparsevlm", {"recycle_ratio": "0.3"}, TypeError, "recycle_ratio"),
    ("sparsevlm", {"recycle_ratio": math.inf}, ValueError, "recycle_ratio"),
    ("sparsevlm", {"cluster_ratio": None}, TypeError, "cluster_ratio"),
    ("sparsevlm", {"cluster_ratio": math.nan}, ValueError, "cluster_ratio"),
    ("sparsevlm", {"recycle": 1}, TypeError, "recycle"),
    ("sparsevlm", {"recycle": "yes"}, TypeError, "recycle"),
    ("sparsevlm", {"layers": 2}, TypeError, "layers"),
    ("sparsevlm", {"layers": [-1, 3]}, ValueError, "layers"),
    ("fastv", {"layer": 2.0}, TypeError, "layer"),
    ("fastv", {"layer": None}, TypeError, "layer"),
    ("fastv", {"layer": 0}, ValueError, "layer"),
    ("random", {"seed": -1}, ValueError, "seed"),
    ("random", {"seed": 2**64}, ValueError, "seed"),
    ("random", {"seed": "0"}, TypeError, "seed"),
    ("visionzip", {"contextual": -1}, ValueError, "contextual"),
    ("visionzip", {"contextual": 9}, ValueError, "contextual"),
    ("visionzip", {"contextual": 2.0}, TypeError, "contextual"),
    ("visionzip", {"merge": None}, ValueError, "merge"),
    ("visionzip", {"merge": "sum"}, ValueError, "merge"),
    ("flowcut", {"semantic_scaling": None}, ValueError, "semantic_scaling"),
    ("flowcut", {"history_weight": math.nan}, ValueError, "history_weight"),
    ("flowcut", {"history_weight": "0.5"}, TypeError, "history_weight"),
    ("flowcut", {"prune_interval": 0}, ValueError, "prune_interval"),
    ("flowcut", {"prune_interval": 2.0}, TypeError, "prune_interval"),
]
for _m in sorted(METHODS):
    ratio = _m in RATIO_KEEP
    EXPLICIT += [
        (_m, {"keep": None}, TypeError, "keep"),
        (_m, {"keep": "64"}, TypeError, "keep"),
        (_m, {"keep": True}, TypeError, "keep"),
        (_m, {"keep": 0}, ValueError, "keep"),
        (_m, {"keep": -5}, ValueError, "keep"),
        (_m, {"keep": math.nan}, ValueError if ratio else TypeError, "keep"),
        (_m, {"keep": [8]}, TypeError, "keep"),
    ]
    EXPLICIT += [
        (_m, {"keep": -math.inf}, ValueError if ratio else TypeError, "keep"),
        (_m, {"keep": 1e300}, TypeError, "keep"),
    ]
    EXPLICIT.append((_m, {"keep": math.inf}, ValueError if ratio else TypeError, "keep"))


def _ids(case: tuple[str, dict[str, Any], type[Exception], str]) -> str:
    method, options, exc, _ = case
    return f"{method}-" + ",".join(f"{k}={v!r}" for k, v in options.items())


@pytest.mark.parametrize(("method", "options", "exc", "fragment"), EXPLICIT, ids=[_ids(c) for c in EXPLICIT])
def test_bad_option_through_config_class(method, options, exc, fragment) -> None:
    kwargs = {"keep": 8, **options}
    with pytest.raises(exc) as info:
        METHODS[method].config_cls(**kwargs)
    assert fragment in str(info.value)


@pytest.fixture(scope="module")
def llava():
    return tiny.llava()


def _no_hooks(model) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize(("method", "options", "exc", "fragment"), EXPLICIT, ids=[_ids(c) for c in EXPLICIT])
def test_bad_option_through_prune(llava, method, options, exc, fragment) -> None:
    kwargs = {"keep": 8, **options}
    keep = kwargs.pop("keep")
    try:
        handle = vlmcut.prune(llava, method, keep=keep, **kwargs)
    except exc as err:
        assert fragment in str(err)
    else:
        handle.remove()  # leave the shared model clean for the next case
        pytest.fail(f"{method}: {options} was accepted")
    assert llava not in _ATTACHED and _no_hooks(llava)


@pytest.mark.parametrize("method", sorted(METHODS))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(keep=JUNK)
def test_any_keep_through_prune_is_accepted_or_named(llava, method: str, keep: Any) -> None:
    try:
        handle = vlmcut.prune(llava, method, keep=keep)
    except (TypeError, ValueError) as err:
        assert "keep" in str(err)
        assert not (_int(keep) and keep >= 1), f"{method}: keep={keep!r} is valid but raised {err}"
    else:
        handle.remove()
        assert _int(keep) and keep >= 1, f"{method}: keep={keep!r} accepted on LLaVA"
    assert llava not in _ATTACHED and _no_hooks(llava)


@pytest.mark.parametrize(
    "keep",
    [
        math.inf,
        -math.inf,
        1e300,
    ],
)
def test_flowcut_keep_inf(keep: float) -> None:
    with pytest.raises((TypeError, ValueError), match="keep"):
        METHODS["flowcut"].config_cls(keep=keep)


def test_unknown_options_and_methods_are_named(llava) -> None:
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['ratios'\] for method 'pdrop'.*ratio"):
        vlmcut.prune(llava, "pdrop", keep=8, ratios=0.5)
    with pytest.raises(ValueError, match="unknown method 'flow'"):
        vlmcut.prune(llava, "flow", keep=8)
    with pytest.raises(ValueError, match="unknown method"):
        vlmcut.prune(llava, None, keep=8)  # type: ignore[arg-type]
    assert llava not in _ATTACHED and _no_hooks(llava)


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: checks.check_int("layer", 1.0, 1), "layer"),
        (lambda: checks.check_int("layer", 9, 1, 8), "layer must be <= 8"),
        (lambda: checks.check_ratio("r", math.inf, 0, 1), "r must be in (0, 1)"),
        (lambda: checks.check_ratio("r", 1, 0, 1, high_open=False) == 1.0 or None, ""),
        (
            lambda: checks.check_choice("merge", 3, ("mean", "release"), "how groups merge"),
            "'mean' or 'release'",
        ),
        (lambda: checks.check_layers("layers", range(3, 1, -1), 0), "layers"),
        (lambda: checks.check_layers("layers", [1] * 200, 0), "..."),  # long values are cut
        (lambda: checks.check_bool("recycle", None), "True or False"),
        (lambda: checks.check_keep(math.inf), "keep must be an int >= 1"),
        (lambda: checks.check_keep(1e300), "keep must be an int count"),
    ],
)
def test_checks_messages(call, fragment) -> None:
    if not fragment:
        assert call() is True
        return
    with pytest.raises((TypeError, ValueError)) as info:
        call()
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    ("method", "value", "exc"),
    [
        ("random", "last", TypeError),
        ("grid", 1.5, TypeError),
        ("fastervlm", True, TypeError),
        ("flowcut", 99, ValueError),
    ],
)
def test_feature_layer_is_a_tower_option(method, value, exc) -> None:
    """``feature_layer`` belongs to the bare-tower family, not to any method: a bad value on a tower names it;
    on LLaVA (which reads vision_feature_layer from its config) any value is refused."""
    tower = tiny.clip_tower()
    with pytest.raises(exc, match="feature_layer"):
        vlmcut.prune(tower, method, keep=8, feature_layer=value)
    assert tower not in _ATTACHED and _no_hooks(tower)
    assert "feature_layer" not in options_of(method)
