"""``vlmcut demo``: the small real LLaVA (DINOv2-S + SmolLM2-135M), unpruned vs FlowCut, on a few images."""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from .inference import compare, save_overlay
from .zoo.small_llava import TRAINED_WEIGHTS as TRAINED_PROJECTOR

PHOTO_QUESTIONS = {
    "astronaut": "What is the person wearing?",
    "coffee": "What is in the cup?",
    "chelsea": "What animal is in the image?",
}


def demo_images(n_scenes: int = 3) -> list[tuple[str, Image.Image, str, str | None]]:
    """``(name, image, question, gold answer or None)``: synthetic scenes and scikit-image photos."""
    from .eval.scenes import load_scenes

    items: list[tuple[str, Image.Image, str, str | None]] = []
    seen: set[str] = set()
    for s in load_scenes("validation", n=40):
        if s.scene_id in seen or len(seen) >= n_scenes:
            continue
        seen.add(s.scene_id)
        items.append((f"scene-{s.scene_id}", s.image, s.prompt(), s.answer))
    try:
        from skimage import data
    except ImportError:
        return items
    for name, question in PHOTO_QUESTIONS.items():
        items.append((name, Image.fromarray(getattr(data, name)()).convert("RGB"), question, None))
    return items


def load_demo_model() -> tuple[object, object, bool]:
    """``(model, processor, trained)``: the small zoo LLaVA with the shipped projector when there is one."""
    from .zoo import load_small_llava

    trained = TRAINED_PROJECTOR.is_file()
    model, processor = load_small_llava(projector_path=TRAINED_PROJECTOR if trained else None)
    return model, processor, trained


def run_demo(
    out_dir: str | Path = "vlmcut-demo", keep: int = 64, n_scenes: int = 3, max_new_tokens: int = 12
) -> Path:
    model, processor, trained = load_demo_model()
    if not trained:
        print(
            f"note: {TRAINED_PROJECTOR} is missing, so the answers below come from a randomly initialised\n"
            "      projector; the pruning, timings and kept-token pictures are real.\n"
        )
    out = Path(out_dir)
    for name, image, question, gold in demo_images(n_scenes):
        base, pruned = compare(model, processor, image, question, keep=keep, max_new_tokens=max_new_tokens)
        png = save_overlay(processor, model, image, pruned.kept_indices[0], out / f"{name}-flowcut{keep}.png")
        print(f"== {name}: {question}" + (f"  (gold: {gold})" if gold else ""))
        for label, a in (("unpruned", base), (f"flowcut@{keep}", pruned)):
            t = a.times.as_dict()
            print(
                f"  {label:>12} [{a.visual_tokens:3d} tokens] {a.text[:60]!r:64} vision {t['vision_s'] * 1e3:6.0f} ms"
                f"  prefill {t['llm_prefill_s'] * 1e3:6.0f} ms  total {a.total_s:5.2f} s"
            )
        print(f"  kept patches: {png}")
    return out
