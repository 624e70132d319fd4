"""lmms-eval integration: the ``vlmcut`` model, vlmcut's data sets as lmms-eval tasks, and sweeps.

``pip install --no-deps lmms-eval==0.7.3`` (plus its run-time needs; see the README), then::

    python -m lmms_eval --model vlmcut --model_args pretrained=DIR,method=flowcut,keep=64 --tasks pope

The model registers itself through the entry-point group ``lmms_eval.models`` (:func:`manifest`). This
package's modules import lmms-eval only where they need it: :mod:`.model` (the model classes) and
:mod:`.sweep`; :mod:`.tasks` (export of vlmcut's data) and :mod:`.options` need only vlmcut.
"""

from __future__ import annotations

from typing import Any

MODEL_ID = "vlmcut"
SIMPLE_CLASS = "vlmcut.integrations.lmms_eval.model.VlmcutLMM"
CHAT_CLASS = "vlmcut.integrations.lmms_eval.model.VlmcutChatLMM"


def manifest() -> Any:
    """The ``lmms_eval.models`` entry point: model id ``vlmcut``, chat and simple interfaces."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=SIMPLE_CLASS, chat_class_path=CHAT_CLASS)
