"""What the model tests share: the tiny model and its inputs, the golden fixtures' models and inputs, comparisons."""

import torch
from safetensors.torch import load_file

from vamba_hf import VambaForConditionalGeneration
from vamba_hf.tiny import TINY_MODEL_SETTINGS, tiny_config

VISION_START = TINY_MODEL_SETTINGS["vision_start_token_id"]
VISION_END = TINY_MODEL_SETTINGS["vision_end_token_id"]
EOS = TINY_MODEL_SETTINGS["eos_token_id"]

__all__ = ["EOS", "VISION_END", "VISION_START", "enable_checkpointing", "golden_batch", "golden_inputs",
           "golden_video", "left_pad", "load_golden", "prompt", "relative_error", "tiny_config", "tiny_model",
           "video_pixels"]


def relative_error(ours, ref) -> float:
    return ((ours.double() - ref.double()).norm() / ref.double().norm()).item()


# -- the tiny model ----------------------------------------------------------------------------------------------


def tiny_model(**overrides) -> VambaForConditionalGeneration:
    """A random tiny model whose norms, biases, alpha and SSM parameters are all perturbed away from their
    initial values, so that a wrong wiring shows."""
    torch.manual_seed(0)
    model = VambaForConditionalGeneration(tiny_config(**overrides)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("alpha"):
                param.uniform_(0.2, 0.8)
            elif param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return model


def video_pixels(t, h, w, seed=0):
    """Random pixel rows of a (t, h, w) patch grid, and the grid."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(t * h * w, 3 * 2 * 14 * 14, generator=generator), torch.tensor([[t, h, w]])


def prompt(length_before, length_after, seed=0, visual=True):
    """Random text ids with a <|vision_start|><|vision_end|> placeholder between the two parts."""
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(0, 300, (length_before,), generator=generator)
    after = torch.randint(0, 300, (length_after,), generator=generator)
    middle = torch.tensor([VISION_START, VISION_END] if visual else [])
    return torch.cat([before, middle, after]).long()


def left_pad(rows, pad_id=EOS):
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, longest - len(row):] = row
        mask[i, longest - len(row):] = 1
    return ids, mask


# -- the golden fixtures --------------------------------------------------------------------------------------------


def load_golden(folder, attn="eager", dtype=torch.float32, **kwargs):
    """A golden case's model in eval mode, and its loading info."""
    model, info = VambaForConditionalGeneration.from_pretrained(
        folder, attn_implementation=attn, dtype=dtype, output_loading_info=True, **kwargs
    )
    return model.eval(), info


def golden_inputs(folder):
    inputs = load_file(str(folder / "inputs.safetensors"))
    visual = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    return inputs["input_ids"], inputs["attention_mask"], visual


def golden_video(golden_dir, case):
    inputs = load_file(golden_dir / case / "inputs.safetensors")
    return inputs["pixel_values_videos"], inputs["video_grid_thw"]


def golden_batch(golden_dir, case="video_short"):
    """A golden case's inputs with labels that supervise all but the first 9 tokens (the "prompt")."""
    inputs = load_file(golden_dir / case / "inputs.safetensors")
    labels = inputs["input_ids"].clone()
    labels[:, :9] = -100
    return {**inputs, "labels": labels}


def enable_checkpointing(model, checkpoint_kwargs=None):
    """transformers 5 renamed gradient checkpointing to activation checkpointing (the old name warns)."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def golden_model(golden_dir, case="video_long", implementation="sdpa", dtype=torch.float32):
    return load_golden(golden_dir / case, implementation, dtype)[0]
