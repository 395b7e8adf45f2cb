"""Loading a Vamba model for inference and building its inputs; shared by `vamba-hf generate` and examples/.

Models load with this package's classes (no remote code runs): a converted folder or Hub repo, or, when no model
is given, the embedded demo model (tiny, random weights, built locally).
"""

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEMO_NOTE = "(embedded demo model with random weights: pass --model for a real answer)"


@dataclass
class LoadedModel:
    model: object
    processor: object
    source: str
    is_demo: bool
    quantization: Optional[str] = None  # a `vamba_hf.quantization.QUANTIZATIONS` name; None: unquantized


def resolve_device(name: str = "auto") -> torch.device:
    """"auto": the first CUDA GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu).")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on GPU (the checkpoint's dtype), float32 on CPU (bfloat16 matmuls are slow there)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}.")
    return DTYPES[name]


def check_model_folder(folder: str, name: str) -> None:
    """A one-line error unless `folder` holds a converted Vamba model (config.json with model_type vamba)."""
    config_path = Path(folder) / "config.json"
    if not config_path.is_file():
        raise ValueError(f"--model {name}: {folder} has no config.json, so it is not a model folder.")
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (ValueError, AttributeError) as error:
        raise ValueError(f"--model {name}: {config_path} is not a JSON object ({error}).") from error
    if model_type == "qwen2_vl":
        raise ValueError(f"--model {name}: {folder} is an official-format checkpoint (model_type qwen2_vl); convert "
                         f"it first: vamba-hf convert {name} CONVERTED_FOLDER, then pass --model CONVERTED_FOLDER.")
    if model_type != "vamba":
        raise ValueError(f"--model {name}: {config_path} has model_type {model_type!r}, not a Vamba model.")


def _load_processor(source: str, name: str):
    from .processing_vamba import VambaProcessor

    try:
        # trust_remote_code=False: the sub-processors are stock classes; this avoids a prompt on transformers 5.
        return VambaProcessor.from_pretrained(source, trust_remote_code=False)
    except OSError as error:
        raise ValueError(
            f"--model {name}: the folder has no processor (tokenizer and image processor files): it was converted "
            f"weights-only. Add the Qwen2-VL tokenizer and preprocessor files to the source checkpoint and run "
            f"`vamba-hf convert` again."
        ) from error


def printable(text: str) -> str:
    """`text` with every non-printable character except newline and tab written as an escape (\\x1b, \\u200b), so
    that a model's output cannot drive the terminal."""
    return "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in text)


def load_model_and_processor(model: Optional[str] = None, dtype: str = "auto", device: str = "auto",
                             location: Optional[str] = None, quantization: Optional[str] = None) -> LoadedModel:
    """Model and processor from a converted folder / Hub repo id, or the embedded demo model when `model` is None.
    `location`: where `sources.resolve_model_source` found `model`, when the caller already asked it.
    `quantization`: load the weights quantized (a `vamba_hf.quantization.QUANTIZATIONS` name)."""
    from .convert import quiet_transformers
    from .demo import build_demo_model_dir
    from .sources import resolve_model_source
    from .modeling_vamba import VambaForConditionalGeneration

    is_demo = model is None
    source = str(build_demo_model_dir()) if is_demo else str(model)
    if location is None:
        location = source if is_demo else resolve_model_source(source, option="--model")
    if Path(location).is_dir():
        check_model_folder(location, source)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    # With accelerate, weights go straight to the GPU instead of through CPU memory first.
    placement = {"device_map": str(target)} if target.type == "cuda" and importlib.util.find_spec("accelerate") else {}
    if quantization is not None:
        from .quantization import quantization_config

        placement["quantization_config"] = quantization_config(quantization, target, torch_dtype)
    with quiet_transformers():
        loaded = VambaForConditionalGeneration.from_pretrained(location, dtype=torch_dtype, **placement)
        processor = _load_processor(location, source)
    if "device_map" not in placement:  # bitsandbytes' models refuse .to(), and need no move
        loaded = loaded.to(target)
    return LoadedModel(loaded.eval(), processor, source, is_demo, quantization)


def build_messages(prompt: str, video=None, image=None) -> list:
    """One user turn: the video or image (a path, or anything the processor accepts) followed by the prompt."""
    if video is not None and image is not None:
        raise ValueError("give a video or an image, not both: Vamba reads one per conversation.")
    content = []
    if video is not None:
        content.append({"type": "video", "video": video})
    elif image is not None:
        content.append({"type": "image", "image": image})
    content.append({"type": "text", "text": prompt})
    return [{"role": "user", "content": content}]


def prepare_inputs(processor, conversations, device, num_frames: Optional[int] = None, fps: Optional[float] = None,
                   progress: Optional[bool] = None):
    """Tokenized prompt(s) and pixels for `model.generate(**inputs)`; `conversations` is one or a batch.
    `progress`: show a frame-by-frame bar while a video decodes (None: for long videos only)."""
    inputs = processor.apply_chat_template(
        conversations, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        num_frames=num_frames, fps=fps, progress=progress,
    )
    return inputs.to(device)


def new_text(processor, output_ids, inputs) -> list:
    """The generated answers, one string per row, without the prompt."""
    prompt_length = inputs["input_ids"].shape[1]
    return processor.batch_decode(output_ids[:, prompt_length:], skip_special_tokens=True)
