"""The model card (README.md) written into a converted folder: Hub metadata plus usage with the Auto classes and
the pipeline. Built with huggingface_hub's own card classes, so the metadata block is what the Hub parses."""

from pathlib import Path
from typing import Optional

DEFAULT_BASE_MODEL = "TIGER-Lab/Vamba-Qwen2-VL-7B"
# The license is the source checkpoint's, which this package cannot know; "other" until the uploader sets it.
DEFAULT_LICENSE = "other"
# Stands in for the Hub repo id in the usage snippets until `vamba-hf push` writes the real one.
REPO_ID_PLACEHOLDER = "your-namespace/your-vamba-model"
CARD_TAGS = ["vamba", "mamba2", "hybrid", "video", "video-understanding", "multimodal", "qwen2_vl", "custom_code"]
WIDGET_IMAGE_URL = ("https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/"
                    "pipeline-cat-chonk.jpeg")

_CARD_BODY = """
# Vamba ({model_name})

Vamba is Qwen2-VL-7B whose visual tokens skip self-attention: text tokens run through self-attention,
cross-attention and an MLP in every decoder layer, while the video/image tokens from the Qwen2-VL vision tower
run through a Mamba-2 block per layer and serve as the cross-attention keys and values. Prefill cost grows
linearly with the number of frames, which makes hour-long videos practical
([paper](https://arxiv.org/abs/2503.11579), [original code](https://github.com/TIGER-AI-Lab/Vamba)).

This repository holds the weights of `{base_model}` **unchanged**, with a `transformers` configuration,
remote code (`configuration_vamba.py`, `modeling_vamba.py`, `processing_vamba.py`){processor_note} written by
the `vamba-hf` converter. Load it with `trust_remote_code=True`.

Model: {num_layers} decoder layers, hidden size {hidden_size}, vocabulary {vocab_size}; vision tower depth
{vision_depth}; Mamba-2 d_state {d_state}, head dim {headdim}.

## Usage

transformers 5.x:

```python
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "{repo_id}"
model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype=torch.bfloat16,
                                                    device_map="auto")
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)

messages = [{{"role": "user", "content": [
    {{"type": "video", "path": "video.mp4"}},
    {{"type": "text", "text": "What happens in this video?"}},
]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", num_frames=128).to(model.device)
output = model.generate(**inputs, max_new_tokens=256)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

transformers 4.x: the code above works on 4.57 too; code written for earlier 4.x releases uses
`AutoModelForVision2Seq`, which this repository also maps:

```python
from transformers import AutoModelForVision2Seq

model = AutoModelForVision2Seq.from_pretrained(model_id, trust_remote_code=True, dtype=torch.bfloat16,
                                               device_map="auto")
```

With the pipeline (images and videos, transformers 4.57 and 5.x):

```python
from transformers import pipeline

pipe = pipeline("image-text-to-text", model="{repo_id}", trust_remote_code=True)
messages = [{{"role": "user", "content": [
    {{"type": "video", "path": "video.mp4"}},
    {{"type": "text", "text": "Describe the video."}},
]}}]
print(pipe(text=messages, max_new_tokens=128, return_full_text=False)[0]["generated_text"])
```

From the command line: `pip install 'vamba-hf[video]'`, then
`vamba-hf generate --model {repo_id} --video video.mp4 --prompt "Describe the video."`.

Inputs follow the original release: one image or one video per conversation, the video sampled as
`num_frames` frames (the middle frame of equal intervals; 128 in the original demo, up to 512 in its evaluation),
generation stops at `<|im_end|>`. On CUDA, install the Mamba-2 kernels for speed:
`pip install 'vamba-hf[cuda]'` (without them a PyTorch path computes the same function).
"""


def card_metadata(base_model: str, license: str):
    """The card's metadata as a `huggingface_hub.ModelCardData`."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        library_name="transformers",
        pipeline_tag="video-text-to-text",
        license=license,
        base_model=base_model,
        language=["en"],
        tags=list(CARD_TAGS),
        widget=[{
            "text": "What animal is in this picture?",
            "src": WIDGET_IMAGE_URL,
            "example_title": "Image question",
        }],
    )


def render_model_card(config, *, base_model: Optional[str] = None, license: Optional[str] = None,
                      repo_id: Optional[str] = None, has_processor: bool = True):
    """A `huggingface_hub.ModelCard` for a converted Vamba folder with this `config`."""
    from huggingface_hub import ModelCard

    base_model = base_model or DEFAULT_BASE_MODEL
    repo_id = repo_id or REPO_ID_PLACEHOLDER
    body = _CARD_BODY.format(
        model_name=repo_id.split("/")[-1],
        base_model=base_model,
        repo_id=repo_id,
        processor_note=", the processor and chat template" if has_processor else " (no processor: weights only)",
        num_layers=config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        vision_depth=config.vision_config.depth,
        d_state=config.vision_mamba_mixer_config.d_state,
        headdim=config.vision_mamba_mixer_config.headdim,
    )
    metadata = card_metadata(base_model, license or DEFAULT_LICENSE)
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}")


def write_model_card(folder, config, **options) -> Path:
    """Write README.md into `folder`; `options` as in `render_model_card`."""
    path = Path(folder) / "README.md"
    render_model_card(config, **options).save(path)
    return path


def set_card_repo_id(folder, repo_id: str) -> bool:
    """Put the real repo id into a card written with the placeholder. Returns whether the card changed."""
    path = Path(folder) / "README.md"
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    if REPO_ID_PLACEHOLDER not in text:
        return False
    path.write_text(text.replace(REPO_ID_PLACEHOLDER, repo_id), encoding="utf-8")
    return True
