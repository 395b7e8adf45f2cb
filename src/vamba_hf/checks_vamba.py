"""The model's input boundary: every tensor a caller passes is checked for type, shape and range before it reaches
torch, so that a wrong input gives one line naming the field, what it holds, and the fix, never an IndexError from
inside an embedding or a silently wrong answer."""

import numbers
from typing import Optional

import torch

from .configuration_vamba import VambaConfig


def tracing() -> bool:
    """Whether torch.compile, torch.export or TorchScript traces the forward. The checks of tensor values read the
    tensor on the host, which a traced graph cannot branch on: they run on eager calls only; the shape checks
    always run."""
    return torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()


def _shape(x: torch.Tensor) -> str:
    return f"shape {tuple(x.shape)}"


def _require_tensor(name: str, value, fix: str):
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(value).__name__}: {fix}.")


def _require_integers(name: str, x: torch.Tensor, fix: str):
    if x.dtype == torch.bool or x.is_floating_point() or x.is_complex():
        raise ValueError(f"`{name}` must hold integers (torch.long), got {x.dtype}: {fix}.")


def check_input_ids(input_ids: torch.Tensor, vocab_size: int):
    fix = "pass the tokenizer's output (a (batch, length) tensor of token ids) unchanged"
    _require_tensor("input_ids", input_ids, fix)
    _require_integers("input_ids", input_ids, fix)
    if input_ids.dim() != 2:
        hint = "add the batch dimension: input_ids[None]" if input_ids.dim() == 1 else fix
        raise ValueError(f"`input_ids` must be (batch, length), got {_shape(input_ids)}: {hint}.")
    if input_ids.numel() == 0:
        raise ValueError(f"`input_ids` is empty ({_shape(input_ids)}): give at least one token per row.")
    if tracing():
        return
    outside = (input_ids < 0) | (input_ids >= vocab_size)
    if bool(outside.any()):
        raise ValueError(f"`input_ids` holds id {int(input_ids[outside][0])}, outside the vocabulary "
                         f"(0..{vocab_size - 1}): the tokenizer does not belong to this model, or the ids were "
                         f"altered.")


def check_inputs_embeds(inputs_embeds: torch.Tensor, hidden_size: int):
    fix = f"pass (batch, length, {hidden_size}) floating-point embeddings"
    _require_tensor("inputs_embeds", inputs_embeds, fix)
    if not inputs_embeds.is_floating_point() or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden_size:
        raise ValueError(f"`inputs_embeds` is {inputs_embeds.dtype} of {_shape(inputs_embeds)}: {fix}.")
    if inputs_embeds.shape[1] == 0:
        raise ValueError(f"`inputs_embeds` is empty ({_shape(inputs_embeds)}): give at least one position per row.")


def check_attention_mask(attention_mask: Optional[torch.Tensor], batch_size: int, length: int, past_length,
                         check_values: bool = True, key_length: Optional[int] = None):
    """A (batch, past + new length) mask of 0/1 (or bool), or a custom 4D mask (see `_check_custom_mask`) whose keys
    are the past and new tokens, or the `key_length` positions of a static cache. `check_values` False checks the
    shape only (no device synchronisation: the CUDA-graph decoding step, whose masks generate extends)."""
    if attention_mask is None:
        return
    total_length = past_length + length
    fix = (f"it must be (batch, cached + new tokens) = ({batch_size}, {total_length}), 1 for real tokens and 0 for "
           f"padding, as the processor returns it and generate extends it (or a 4D mask)")
    _require_tensor("attention_mask", attention_mask, fix)
    if attention_mask.dim() == 4:
        _check_custom_mask(attention_mask, batch_size, length, key_length or total_length)
        return
    if attention_mask.dim() != 2 or attention_mask.shape[0] != batch_size:
        raise ValueError(f"`attention_mask` has {_shape(attention_mask)} but the input has batch size {batch_size}: "
                         f"{fix}.")
    if isinstance(total_length, torch.Tensor):  # a static cache's length while tracing: the mask is generate's own
        return
    if attention_mask.shape[1] != total_length:
        raise ValueError(f"`attention_mask` covers {attention_mask.shape[1]} positions but the cache holds "
                         f"{past_length} and the input {length}: {fix}.")
    if check_values and not tracing() and attention_mask.dtype != torch.bool and bool(
            ((attention_mask != 0) & (attention_mask != 1)).any()):
        raise ValueError(f"`attention_mask` holds values other than 0 and 1: {fix}.")


def _check_custom_mask(attention_mask: torch.Tensor, batch_size: int, length: int, key_length: int):
    """A 4D self-attention mask as transformers takes it: (batch or 1, 1, new tokens, keys), bool (True attends) or
    floats added to the attention scores."""
    fix = (f"a 4D mask must be (batch, 1, new tokens, keys) = ({batch_size}, 1, {length}, {key_length}), bool (True "
           f"attends) or floats added to the attention scores (0 attends, a large negative value masks)")
    if attention_mask.dtype != torch.bool and not attention_mask.is_floating_point():
        raise ValueError(f"`attention_mask` is a 4D mask of {attention_mask.dtype}: {fix}.")
    if (attention_mask.shape[0] not in (1, batch_size) or attention_mask.shape[1] != 1
            or tuple(attention_mask.shape[2:]) != (length, key_length)):
        raise ValueError(f"`attention_mask` has {_shape(attention_mask)}: {fix}.")


def check_position_ids(position_ids: Optional[torch.Tensor], batch_size: int, length: int):
    if position_ids is None:
        return
    fix = f"pass (batch, length) = ({batch_size}, {length}) integer positions, or leave it out"
    _require_tensor("position_ids", position_ids, fix)
    _require_integers("position_ids", position_ids, fix)
    rows_ok = position_ids.dim() == 2 and position_ids.shape[0] in (1, batch_size)
    sections_ok = position_ids.dim() == 3 and position_ids.shape[0] == 3 and position_ids.shape[1] in (1, batch_size)
    if not (rows_ok or sections_ok) or position_ids.shape[-1] != length:
        raise ValueError(f"`position_ids` has {_shape(position_ids)}: {fix}.")


def check_labels(name: str, labels: Optional[torch.Tensor], batch_size: int, length: int):
    if labels is None:
        return
    fix = f"pass ({batch_size}, {length}) integer token ids, -100 where no loss is taken"
    _require_tensor(name, labels, fix)
    _require_integers(name, labels, fix)
    if tuple(labels.shape) != (batch_size, length):
        raise ValueError(f"`{name}` has {_shape(labels)} but the input is ({batch_size}, {length}): {fix}.")


def check_visual_pixels(config: VambaConfig, kind: str, pixels, grid):
    """`kind` "image" or "video": pixel rows (patches, C*T*P*P) and their (items, 3) grid of (t, h, w) patches."""
    vision = config.vision_config
    pixels_name, grid_name = ("pixel_values", "image_grid_thw") if kind == "image" else (
        "pixel_values_videos", "video_grid_thw")
    fix = "pass the pixels and the grid from the same processor call, unchanged"
    _require_tensor(pixels_name, pixels, fix)
    if grid is None:
        raise ValueError(f"{kind} pixels were given without `{grid_name}`: pass the grid sizes the processor returned "
                         f"alongside the pixels.")
    _require_tensor(grid_name, grid, fix)
    width = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
    if not pixels.is_floating_point() or pixels.dim() != 2 or pixels.shape[1] != width:
        raise ValueError(f"`{pixels_name}` is {pixels.dtype} of {_shape(pixels)}, but pixel rows are floats of "
                         f"width {width} (channels x temporal patch x patch x patch): {fix}.")
    _check_grid(grid_name, grid, vision.spatial_merge_size, fix)
    if tracing():
        return
    if kind == "image":
        check_image_grid_steps(grid)
    patches = int(grid.prod(-1).sum())
    if patches != pixels.shape[0]:
        raise ValueError(f"`{grid_name}` describes {patches} patches but the {kind} pixels hold {pixels.shape[0]}: "
                         f"they must come from the same processor call.")
    if not bool(torch.isfinite(pixels).all()):
        raise ValueError(f"`{pixels_name}` holds NaN or infinite values: the frames were decoded or normalised "
                         f"wrongly; pass the processor's output.")


def _check_grid(name: str, grid: torch.Tensor, merge: int, fix: str):
    _require_integers(name, grid, fix)
    if grid.dim() != 2 or grid.shape[1] != 3 or grid.shape[0] == 0:
        raise ValueError(f"`{name}` has {_shape(grid)} but must be (items, 3), one (t, h, w) row per image or video: "
                         f"{fix}.")
    if tracing():
        return
    if bool((grid < 1).any()):
        raise ValueError(f"`{name}` holds {grid.tolist()}: every t, h, w must be at least 1; {fix}.")
    if bool((grid[:, 1:] % merge != 0).any()):
        raise ValueError(f"`{name}` holds {grid.tolist()}: h and w count patches and must be multiples of "
                         f"spatial_merge_size={merge}; {fix}.")


def check_image_grid_steps(grid: torch.Tensor):
    """An image is one temporal patch (the processor repeats it to the temporal patch size): t is 1 in every row
    of `image_grid_thw`. What the tensors cannot tell is checked nowhere: h and w swapped, or rows swapped between
    items of equal patch counts, give pixel rows of the same shape and are read as given."""
    if bool((grid[:, 0] != 1).any()):
        raise ValueError(f"`image_grid_thw` holds {grid.tolist()}: an image is one temporal patch, so t must be 1 in "
                         f"every row (a t above 1 is a video: pass it as pixel_values_videos and video_grid_thw).")


def check_visual_embeds(visual_embeds, hidden_size: int):
    fix = f"pass a list with one (tokens, {hidden_size}) floating-point tensor per image or video"
    if isinstance(visual_embeds, torch.Tensor) or not isinstance(visual_embeds, (list, tuple)):
        raise TypeError(f"`visual_embeds` must be a list of tensors, got {type(visual_embeds).__name__}: {fix}.")
    for i, item in enumerate(visual_embeds):
        _require_tensor(f"visual_embeds[{i}]", item, fix)
        if not item.is_floating_point() or item.dim() != 2 or item.shape[1] != hidden_size or item.shape[0] == 0:
            raise ValueError(f"`visual_embeds[{i}]` is {item.dtype} of {_shape(item)}: {fix}.")
        if not tracing() and not bool(torch.isfinite(item).all()):
            raise ValueError(f"`visual_embeds[{i}]` holds NaN or infinite values: {fix}.")


def check_finite_logits(logits: torch.Tensor):
    """At prefill: non-finite logits make generate repeat token 0 without a word."""
    if not tracing() and not bool(torch.isfinite(logits).all()):
        raise ValueError("The model's logits for the prompt are NaN or infinite. Likely causes: non-finite weights (a "
                         "corrupted or wrongly converted checkpoint: reconvert it), a float16 overflow (load with "
                         "dtype=torch.bfloat16 or torch.float32), or non-finite inputs_embeds.")


# generate's token counts and their least values: transformers compares them with the sequence length, so that
# max_new_tokens=1.5 would generate 2 tokens without a word.
GENERATION_COUNTS = {"max_new_tokens": 1, "max_length": 1, "min_new_tokens": 0, "min_length": 0}


def check_generation_counts(kwargs: dict, generation_config) -> None:
    """`generate`'s token counts (given as keywords, else the generation config's) are whole numbers."""
    for name, least in GENERATION_COUNTS.items():
        value = kwargs[name] if kwargs.get(name) is not None else getattr(generation_config, name, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < least:
            raise ValueError(f"`{name}` must be a whole number (int) of at least {least}, got {value!r}: it counts "
                             f"tokens, e.g. {name}=128.")
