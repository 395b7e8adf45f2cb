"""The model card (README.md) written into a converted folder: Hub metadata plus what the folder is (its source,
sizes, license, what it can load) and usage snippets that run in an environment built from the card's own
install line. Built with huggingface_hub's own card classes, so the metadata block is what the Hub parses."""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

# The license is the source checkpoint's; when it is not known, the Hub's own identifier for that, in metadata and text.
DEFAULT_LICENSE = "unknown"
# Stands in for the Hub repo id in the usage snippets until `vamba-hf push` writes the real one.
REPO_ID_PLACEHOLDER = "your-namespace/your-vamba-model"
CARD_TAGS = ["vamba", "mamba2", "hybrid", "video", "video-understanding", "multimodal", "qwen2_vl", "custom_code"]
# What the remote code (configuration_vamba.py, modeling_vamba.py, processing_vamba.py) imports, as pip names:
# transformers brings numpy, tqdm, huggingface_hub, safetensors and tokenizers; PyAV decodes video files.
REMOTE_CODE_INSTALL = 'pip install "transformers>=4.57,!=5.0.*" torch av pillow'
# A short public clip, used in transformers' documentation of video models.
WIDGET_VIDEO_URL = "https://huggingface.co/datasets/raushan-testing-hf/videos-test/resolve/main/sample_demo_1.mp4"
WIDGET_PROMPT = "What happens in this video?"
_HUB_CACHE_FOLDER = re.compile(r"models--(?P<namespace>[^/]+?)--(?P<name>[^/]+)/snapshots/[^/]+/?$")

_ABOUT_VAMBA = """\
Vamba is Qwen2-VL whose visual tokens skip self-attention: text tokens run through self-attention,
cross-attention and an MLP in every decoder layer, while the video/image tokens from the Qwen2-VL vision tower
run through a Mamba-2 block per layer and serve as the cross-attention keys and values. Prefill cost grows
linearly with the number of frames, which makes hour-long videos practical
([paper](https://arxiv.org/abs/2503.11579), [original code](https://github.com/TIGER-AI-Lab/Vamba))."""

_USAGE = '''\
## Usage

Install what the remote code needs (no other package; `vamba-hf` is not needed to load this repository). On a
CUDA GPU, PyTorch's Linux wheel brings Triton, and the Mamba-2 blocks run this repository's own Triton kernels
(compiled on first use, cached on disk); `mamba-ssm` and `causal-conv1d`, where installed, run instead:

```bash
{install}
```

Then, on the transformers that line installs (4.57, or 5.1 and later; not 5.0), on CPU or CUDA:

```python
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

model_id = "{repo_id}"
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=True, dtype=dtype).to(device)
processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=True)

messages = [{{"role": "user", "content": [
    {{"type": "video", "path": "video.mp4"}},
    {{"type": "text", "text": "{prompt}"}},
]}}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", num_frames=128).to(model.device)
output = model.generate(**inputs, max_new_tokens=256)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

An image works the same way: `{{"type": "image", "path": "picture.jpg"}}` in place of the video. Code written for
transformers 4.x before 4.57 uses `AutoModelForVision2Seq`, which this repository also maps.

transformers has no `video-text-to-text` pipeline; the `image-text-to-text` pipeline takes the same messages,
with a video or an image:

```python
from transformers import pipeline

pipe = pipeline("image-text-to-text", model=model_id, trust_remote_code=True)
print(pipe(text=messages, max_new_tokens=128, return_full_text=False)[0]["generated_text"])
```

Inputs follow the original release: one image or one video per conversation, the video sampled as
`num_frames` frames (the middle frame of equal intervals; 128 in the original demo, up to 512 in its evaluation),
generation stops at `<|im_end|>`.
'''

_WEIGHTS_ONLY_USAGE = '''\
## Usage

This folder holds **no tokenizer or processor files** (it was converted weights-only), so `AutoProcessor` and the
pipeline cannot load it, and the model alone cannot be given a video. The model itself loads:

```bash
{install}
```

```python
from transformers import AutoModelForImageTextToText

model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)
```

To get a complete repository, add the Qwen2-VL tokenizer and preprocessor files to the source checkpoint and run
`vamba-hf convert` again.
'''

_CLI = """\
## The `vamba-hf` package

Needed only to convert checkpoints, for the `vamba-hf generate` command and for the fine-tuning example, not to
load this repository. From a clone of {source}: `pip install -e '.[video]'`, then
`vamba-hf generate --model {repo_id} --video video.mp4 --prompt "Describe the video."`. On CUDA, the Mamba-2
blocks run the package's own Triton kernels with nothing to build; mamba-ssm's (`pip install mamba-ssm
causal-conv1d`, built for your torch and CUDA) are faster (first token by about 5%, a training step by about 1.5x)
and run instead where installed. Without Triton or CUDA a PyTorch path computes the same function.
"""


@dataclass
class SourceFacts:
    """What is known about a conversion's source: its Hub repo id and its license, each None when unknown."""

    repo_id: Optional[str] = None
    license: Optional[str] = None


def _repo_id_of(folder: Path, name: str) -> Optional[str]:
    from .source_files import is_hub_repo_id

    if not Path(name).exists() and is_hub_repo_id(name):
        return name  # downloaded from the Hub under this id
    match = _HUB_CACHE_FOLDER.search(folder.resolve().as_posix())
    return f"{match['namespace']}/{match['name']}" if match else None


def _source_text(path: Path) -> Optional[str]:
    """The text of the source's file `path` (None when there is none), read only when it is a regular file of
    bounded size in the folder (ConversionError otherwise: a FIFO or a device is never opened for reading)."""
    from .source_files import check_source_file, read_regular_file

    if not os.path.lexists(path):
        return None
    check_source_file(path)
    return read_regular_file(path).decode("utf-8-sig")


def _card_metadata_of(text: Optional[str]) -> dict:
    """The YAML metadata block of a model card's text, as huggingface_hub's `metadata_load` reads it."""
    import yaml
    from huggingface_hub.repocard import REGEX_YAML_BLOCK

    match = REGEX_YAML_BLOCK.search(text or "")
    metadata = yaml.safe_load(match.group(2)) if match else None
    if not (metadata is None or isinstance(metadata, dict)):
        raise ValueError("repo card metadata block should be a dict")
    return metadata or {}


def _license_of(folder: Path) -> Optional[str]:
    license_id = _card_metadata_of(_source_text(folder / "README.md")).get("license")
    if isinstance(license_id, str):
        return license_id
    try:
        license_id = json.loads(_source_text(folder / "config.json") or "{}").get("license")
    except (ValueError, AttributeError):
        return None
    return license_id if isinstance(license_id, str) else None


def read_source_facts(folder, name: str) -> SourceFacts:
    """The repo id (when `name` is a Hub id, or `folder` is a Hub cache snapshot) and the license (the source's
    model card metadata, else its config.json) of the checkpoint in `folder`, which the user named `name`."""
    folder = Path(folder)
    return SourceFacts(repo_id=_repo_id_of(folder, name), license=_license_of(folder))


def card_metadata(base_model: Optional[str], license: str):
    """The card's metadata as a `huggingface_hub.ModelCardData`: a video-text-to-text model whose widget asks
    about a video (the Hub's asset-and-text widget example: `src` and `text`)."""
    from huggingface_hub import ModelCardData

    return ModelCardData(
        library_name="transformers",
        pipeline_tag="video-text-to-text",
        license=license,
        base_model=base_model,
        language=["en"],
        tags=list(CARD_TAGS),
        widget=[{"src": WIDGET_VIDEO_URL, "text": WIDGET_PROMPT, "example_title": "Video question"}],
    )


def parameter_count(config) -> int:
    """Parameters of `VambaForConditionalGeneration(config)`, counted on the meta device (nothing allocated)."""
    from math import prod

    from .source_files import expected_shapes

    return sum(prod(shape) for shape in expected_shapes(config).values())


def human_count(count: int) -> str:
    for size, suffix in ((10**9, "B"), (10**6, "M"), (10**3, "K")):
        if count >= size:
            return f"{count / size:.1f}{suffix}"
    return str(count)


def _about_this_folder(config, base_model: Optional[str], license: Optional[str], has_processor: bool,
                       precision: Optional[str]) -> str:
    source = (f"the weights of [`{base_model}`](https://huggingface.co/{base_model})" if base_model
              else "weights from a local folder (its Hub origin was not recorded)")
    license_text = (f"`{license}`" if license else
                    f"`{DEFAULT_LICENSE}`: the source did not state one; check the original weights' terms before use")
    loads = ("`AutoModelForImageTextToText` (and `AutoModelForVision2Seq` on 4.x) for the model, `AutoProcessor` "
             "for the processor (tokenizer, image processor, chat template)" if has_processor else
             "`AutoModelForImageTextToText` (and `AutoModelForVision2Seq` on 4.x) for the model only: there is no "
             "tokenizer or processor")
    from .source_files import REMOTE_CODE_FILES

    remote_code = ", ".join(f"`{name}`" for name in REMOTE_CODE_FILES)
    mamba, vision = config.vision_mamba_mixer_config, config.vision_config
    parameters = parameter_count(config)
    if precision is None:
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        precision = f"the source's {str(dtype).removeprefix('torch.')} weights, unquantized"
    return f"""\
## This repository

- **Source:** {source}, **unchanged**, with a `transformers` configuration and remote code
  ({remote_code}) written by the `vamba-hf` converter. Load it with `trust_remote_code=True`.
- **Size:** {human_count(parameters)} parameters ({parameters:,}): {config.num_hidden_layers} decoder layers, \
hidden size {config.hidden_size}, vocabulary {config.vocab_size}; vision tower depth {vision.depth}, width \
(embed_dim) {vision.embed_dim}, output (hidden_size, after merging patches) {vision.hidden_size}; Mamba-2 d_state \
{mamba.d_state}, head dim {mamba.headdim}.
- **License:** {license_text}.
- **Precision:** {precision}.
- **Loads with:** {loads}.
"""


def package_source_link() -> str:
    """Where vamba-hf's source is, as the installed package's metadata records it (pyproject.toml's
    [project.urls] Source): a Markdown link, or the package's name when no address was recorded."""
    from importlib.metadata import PackageNotFoundError, metadata

    try:
        urls = metadata("vamba-hf").get_all("Project-URL") or []
    except PackageNotFoundError:
        urls = []
    for entry in urls:
        label, _, url = (part.strip() for part in entry.partition(","))
        if label.lower() == "source":
            return f"[its source]({url})"
    return "its source (the `vamba-hf` repository)"


def render_model_card(config, *, base_model: Optional[str] = None, license: Optional[str] = None,
                      repo_id: Optional[str] = None, has_processor: bool = True, precision: Optional[str] = None):
    """A `huggingface_hub.ModelCard` for a converted Vamba folder with this `config`. `base_model`: the source's
    Hub repo id, None for a local folder; `license`: the source's license id, None when unknown; `precision`: how
    the weights are stored, None for the source's dtype, unquantized."""
    from huggingface_hub import ModelCard

    repo_id = repo_id or REPO_ID_PLACEHOLDER
    usage = (_USAGE if has_processor else _WEIGHTS_ONLY_USAGE).format(
        install=REMOTE_CODE_INSTALL, repo_id=repo_id, prompt=WIDGET_PROMPT)
    sections = [
        f"# Vamba: {repo_id.split('/')[-1]}",
        _ABOUT_VAMBA,
        _about_this_folder(config, base_model, license, has_processor, precision),
        usage,
        _CLI.format(repo_id=repo_id, source=package_source_link()),
    ]
    metadata = card_metadata(base_model, license or DEFAULT_LICENSE)
    body = "\n\n".join(section.strip() for section in sections)
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n\n{body}\n")


def write_model_card(folder, config, **options) -> Path:
    """Write README.md into `folder`; `options` as in `render_model_card`."""
    path = Path(folder) / "README.md"
    render_model_card(config, **options).save(path)
    return path

