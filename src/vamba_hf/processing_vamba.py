"""Processor for Vamba: Qwen2-VL's image processor, a Qwen2 tokenizer and Vamba's chat template.

Vamba's prompts carry `<|vision_start|><|vision_end|>` where the image or video is, with no
`<|image_pad|>`/`<|video_pad|>` tokens: the visual patches go to the model's vision tower
separately (`pixel_values` + `image_grid_thw` or `pixel_values_videos` + `video_grid_thw`).

Call keyword arguments follow transformers' typed processing kwargs: flat (`max_length=...`, `num_frames=...`) or
per modality (`text_kwargs`, `images_kwargs`, `videos_kwargs`, `common_kwargs`), merged with the tokenizer's init
defaults by `ProcessorMixin._merge_kwargs`. The video options are `VideoSampling`'s fields (how frames are taken from
a file), then:
- `min_pixels` / `max_pixels`: the pixel budget of a frame's patch grid (the image processor's by default).
- `device`: where frames are patched and normalised ("cpu" by default; e.g. "cuda"); uint8 frames go there in chunks.
- `frame_resize`: where frames that are not at the patch-grid size (frames given as arrays or `VideoFrames`) are
  resized to it; both give PIL's bytes, the original release's pixels, bit for bit. "pil": PIL on the CPU, a thread
  per CPU. "torch": on `device`, chunk by chunk as frames are patched: PIL's fixed-point weights and integer sums in
  torch, one pass per axis in PIL's order (tests/test_processor_resize.py checks the bytes for every filter PIL
  resizes with, on sizes up and down). By default "torch" when `device` is a CUDA GPU, else "pil" (and
  "pil" for any size whose bytes a noise frame shows torch's passes not to reproduce, should a Pillow change its
  arithmetic; given explicitly, "torch" then raises). Frames decoded from a file are decoded at the grid size.
- `return_metadata`: also return each video's sampled timestamps and frame indices.

This file is also served as Hub remote code (with `video_vamba.py`), so it imports only transformers, torch, numpy,
PIL, jinja2 and the standard library at top level.
"""

import dataclasses
import functools
import json
import math
import os
import re
import typing
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
import numpy as np
import PIL.Image
import torch
import transformers
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import ImageInput
from transformers.processing_utils import (
    ImagesKwargs,
    MultiModalData,
    ProcessingKwargs,
    ProcessorMixin,
    TextKwargs,
    Unpack,
    VideosKwargs,
)
from transformers.tokenization_utils_base import PreTokenizedInput, TextInput
from transformers.video_utils import VideoInput
from transformers.utils.chat_template_utils import render_jinja_template

from .video_decode_vamba import resize_frame
from .video_vamba import (
    FrameResize,
    FrameStream,
    VideoFrames,
    VideoSampling,
    frame_array,
    is_single_frame,
    load_video,
    stream_video,
    to_video_frames,
)

# transformers 4.x copies into its module cache only the modules this file imports, not the ones they import: the
# video decoding modules behind `video_vamba` are named here for that.
from .video_container_vamba import open_container  # noqa: F401
from .video_frames_vamba import FrameBuffer  # noqa: F401
from .video_nvdec_vamba import open_on_device  # noqa: F401
from .video_sampling_vamba import sample_times  # noqa: F401
from .video_seek_vamba import serve_decoding  # noqa: F401

__all__ = ["VAMBA_CHAT_TEMPLATE", "VambaProcessor", "VideoFrames", "VideoSampling", "default_image_processor",
           "load_video"]

VISION_PLACEHOLDER = "<|vision_start|><|vision_end|>"
VISION_START = "<|vision_start|>"
VISUAL_PAD_TOKENS = ("<|image_pad|>", "<|video_pad|>")

# ChatML with the default system prompt of the original release; every image or video item becomes one
# `<|vision_start|><|vision_end|>` pair, text items are copied verbatim. Assistant turns (their text and
# `<|im_end|>`) are `generation` blocks, for `return_assistant_tokens_mask`.
VAMBA_CHAT_TEMPLATE = (
    "{%- macro render_content(content) -%}"
    "{%- if content is string -%}"
    "{{ content }}"
    "{%- else -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] in ['image', 'video'] -%}"
    "{{ '<|vision_start|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{%- generation -%}"
    "{{ render_content(message['content']) + '<|im_end|>' }}"
    "{%- endgeneration -%}"
    "{%- else -%}"
    "{{ render_content(message['content']) + '<|im_end|>' }}"
    "{%- endif -%}"
    "{{ '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

# Output bytes normalised per step: large enough that each torch op's thread start-up is amortised (on a busy
# machine a small step waits for descheduled threads), small enough that frames are handed back as they go.
STEP_BYTES = 64 * 2 ** 20
FRAME_RESIZES = ("pil", "torch")
MAX_ASPECT_RATIO = 200  # Qwen2-VL's vision tower
CONTENT_TYPES = ("text", "image", "video")
SOURCE_TYPES = {"image": (str, os.PathLike, PIL.Image.Image, np.ndarray, torch.Tensor),
                "video": (str, os.PathLike, np.ndarray, torch.Tensor, list, tuple, VideoFrames)}
MODALITY_KWARGS = {"text_kwargs": "text", "images_kwargs": "images", "videos_kwargs": "videos"}
PROCESSOR_FILE = "processor_config.json"
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_vamba.VambaProcessor"}
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"


class VambaImagesKwargs(ImagesKwargs, total=False):
    min_pixels: int
    max_pixels: int


# The video options: the sampling ones, then the pixel budget, where to normalise, how to resize to the patch grid,
# and what to return.
VambaVideosKwargs = typing.TypedDict(
    "VambaVideosKwargs",
    {**{field.name: field.type for field in fields(VideoSampling)}, "min_pixels": int, "max_pixels": int,
     "device": typing.Optional[typing.Union[str, torch.device]], "frame_resize": typing.Optional[str],
     "return_metadata": bool,
     "return_tensors": VideosKwargs.__annotations__.get("return_tensors", typing.Optional[str])},
    total=False,
)


class VambaProcessorKwargs(ProcessingKwargs, total=False):
    text_kwargs: TextKwargs
    images_kwargs: VambaImagesKwargs
    videos_kwargs: VambaVideosKwargs
    _defaults = {"text_kwargs": {"padding": True}, "videos_kwargs": {"return_metadata": False}}


def default_image_processor(**kwargs):
    """Qwen2-VL's image processor with its defaults (min_pixels 56*56, max_pixels 28*28*1280, CLIP mean/std).

    The PIL backend is preferred: its bicubic resize is the one the original Vamba release used.
    """
    image_processor_class = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return image_processor_class(**kwargs)


def image_processor_settings(image_processor) -> dict:
    """The image processor's saved settings, readable by transformers 4.x and 5.x alike: Qwen2-VL's image processor
    in 4.x takes its pixel budget from `min_pixels` / `max_pixels` only (it resets `size` to its defaults)."""
    settings = json.loads(image_processor.to_json_string())
    size = settings.get("size") or {}
    if "shortest_edge" in size and "longest_edge" in size:
        settings.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return settings


def smart_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple:
    """Qwen2-VL's resize target: (height, width), multiples of `factor`, area within [min_pixels, max_pixels]."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"a {width}x{height} image or frame has an aspect ratio of "
                         f"{max(height, width) / min(height, width):.0f}; Qwen2-VL's vision tower takes at most "
                         f"{MAX_ASPECT_RATIO}. Crop or pad it first.")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


# ----------------------------------------------------------------------------------------------
# Video patches: uint8 frames to Qwen2-VL's flattened video patches, with vectorised torch ops


@dataclass(frozen=True)
class PatchLayout:
    """The image processor's settings that turn frames into patches, with the call's pixel budget."""

    patch_size: int
    merge_size: int
    temporal_patch_size: int
    min_pixels: int
    max_pixels: int
    resample: int
    do_resize: bool
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    mean: tuple
    std: tuple
    frame_resize: str = "pil"  # where frames are resized to the grid: before patching with PIL, or while patching
    frame_resize_given: bool = True  # False: chosen by the device, and PIL's own resize wherever torch's is not PIL's

    @classmethod
    def of(cls, image_processor, min_pixels=None, max_pixels=None, frame_resize=None,
           device=None) -> "PatchLayout":
        size = dict(image_processor.size)
        mean, std = image_processor.image_mean, image_processor.image_std
        layout = cls(
            image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size,
            size["shortest_edge"] if min_pixels is None else min_pixels,
            size["longest_edge"] if max_pixels is None else max_pixels,
            int(image_processor.resample), bool(image_processor.do_resize), bool(image_processor.do_rescale),
            float(image_processor.rescale_factor), bool(image_processor.do_normalize),
            tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3,
            tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3,
            default_frame_resize(device) if frame_resize is None else frame_resize, frame_resize is not None,
        )
        layout.check_frame_resize()
        return layout

    def check_frame_resize(self) -> None:
        if self.frame_resize not in FRAME_RESIZES:
            raise ValueError(f"frame_resize={self.frame_resize!r} is not valid: give one of "
                             f"{', '.join(map(repr, FRAME_RESIZES))}.")
        if self.frame_resize_given and self.frame_resize == "torch" and self.do_resize \
                and self.resample not in PIL_FILTERS:
            raise ValueError(f"frame_resize='torch' follows PIL's {', '.join(PIL_FILTER_NAMES)} filters, and this "
                             f"image processor resamples with {PIL.Image.Resampling(self.resample).name}: use "
                             "frame_resize='pil'.")

    def frame_size(self, width: int, height: int) -> tuple:
        """(width, height) a frame is resized to before patching."""
        if not self.do_resize:
            return width, height
        factor = self.patch_size * self.merge_size
        new_height, new_width = smart_size(height, width, factor, self.min_pixels, self.max_pixels)
        return new_width, new_height

    def resizes_while_patching(self, width: int, height: int) -> bool:
        """Whether `video_patches_into` resizes frames of this size to the grid (frame_resize "torch"), rather than
        PIL before it ("pil", or frames already at the grid size)."""
        size = self.frame_size(width, height)
        if self.frame_resize != "torch" or size == (width, height):
            return False
        return self.frame_resize_given or torch_resizes_as_pil((width, height), size, self.resample)

    def patched_size(self, frames: list) -> tuple:
        """(width, height) `video_patches_into` patches HxWx3 `frames` at: the grid size when it resizes them,
        else their own size (`frames_to_patch` resized them)."""
        height, width, _ = frames[0].shape
        return self.frame_size(width, height) if self.resizes_while_patching(width, height) else (width, height)

    def frames_to_patch(self, frames: list) -> list:
        """The frames `video_patches_into` takes: resized to the grid with PIL here unless it resizes them."""
        height, width, _ = frames[0].shape
        if self.resizes_while_patching(width, height):
            return frames
        return resize_frames(frames, self.frame_size(width, height), self.resample)

    @property
    def patch_dim(self) -> int:
        return 3 * self.temporal_patch_size * self.patch_size ** 2

    def rescale_by_division(self) -> bool:
        """Whether float32 `x / (1 / rescale_factor)` gives transformers' float64 rescale exactly for every byte
        (true for 1/255); then the fast float32 path reproduces its pixels bit for bit."""
        divisor = np.float32(1 / self.rescale_factor)
        values = np.arange(256, dtype=np.float32)
        return bool(np.array_equal(values / divisor, (np.arange(256, dtype=np.float64) * self.rescale_factor)
                                   .astype(np.float32)))


def _normalize_(patches: torch.Tensor, layout: PatchLayout, exact_division: bool) -> None:
    """In place on (rows, 3, tp*p*p) float32 patches holding byte values."""
    if layout.do_rescale:
        if exact_division:
            # A tensor on the device: CUDA multiplies by the reciprocal of a Python-number divisor, a bit off.
            patches.div_(torch.tensor(np.float32(1 / layout.rescale_factor), device=patches.device))
        else:
            patches.copy_(patches.double().mul_(layout.rescale_factor))
    if layout.do_normalize:
        shape = (1, 3, 1)
        patches.sub_(torch.tensor(layout.mean, dtype=torch.float32, device=patches.device).view(shape))
        patches.div_(torch.tensor(layout.std, dtype=torch.float32, device=patches.device).view(shape))


def default_frame_resize(device) -> str:
    """"torch" on a CUDA GPU, where it is the faster of two resizes that give the same bytes (and where its bytes
    are tested); "pil" elsewhere: on the CPU PIL's own loops are faster (torch's passes make and add a whole
    intermediate tensor per filter tap)."""
    return "torch" if device is not None and torch.device(device).type == "cuda" else "pil"


def resize_frames(frames: list, size: tuple, resample: int) -> list:
    """HxWx3 uint8 frames resized to `size` (width, height) with PIL, in a thread per CPU up to 32, as Python's own
    pools (PIL lets go of the interpreter while it resizes)."""
    if (frames[0].shape[1], frames[0].shape[0]) == tuple(size):
        return frames
    with ThreadPoolExecutor(max_workers=min(len(frames), 32, os.cpu_count() or 1)) as pool:
        return list(pool.map(lambda frame: resize_frame(frame, size, resample), frames))


# PIL's resampling filters (libImaging/Resample.c), written with the same double arithmetic so that the fixed-point
# weights come out the same.
def _box_kernel(x: float) -> float:
    return 1.0 if -0.5 < x <= 0.5 else 0.0


def _bilinear_kernel(x: float) -> float:
    x = abs(x)
    return 1.0 - x if x < 1.0 else 0.0


def _hamming_kernel(x: float) -> float:
    x = abs(x)
    if x == 0.0:
        return 1.0
    if x >= 1.0:
        return 0.0
    x = x * math.pi
    return math.sin(x) / x * (_FLOAT_0_54 + _FLOAT_0_46 * math.cos(x))


def _bicubic_kernel(x: float) -> float:
    a = -0.5
    x = abs(x)
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos_kernel(x: float) -> float:
    return _sinc(x) * _sinc(x / 3) if -3.0 <= x < 3.0 else 0.0


_FLOAT_0_54, _FLOAT_0_46 = float(np.float32(0.54)), float(np.float32(0.46))  # single-precision constants in PIL
# resample -> (support, kernel)
PIL_FILTERS = {int(PIL.Image.BOX): (0.5, _box_kernel), int(PIL.Image.BILINEAR): (1.0, _bilinear_kernel),
               int(PIL.Image.HAMMING): (1.0, _hamming_kernel), int(PIL.Image.BICUBIC): (2.0, _bicubic_kernel),
               int(PIL.Image.LANCZOS): (3.0, _lanczos_kernel)}
PIL_FILTER_NAMES = [PIL.Image.Resampling(resample).name for resample in PIL_FILTERS]
# PIL's fixed-point weights for 8-bit images: 32 bits less 8 for the value and 2 for sums above 1 or below 0.
PIL_PRECISION_BITS = 22


@functools.lru_cache(maxsize=128)
def pil_axis_weights(in_size: int, out_size: int, resample: int) -> tuple:
    """PIL's resize of one axis from `in_size` to `out_size` pixels, as (first, weights): output pixel i is the sum
    over taps t of input pixel first[i] + t times weights[i, t] (int32 fixed point, PIL_PRECISION_BITS), with
    taps past an output's window weighted 0 and pointed at a valid pixel."""
    support, kernel = PIL_FILTERS[resample]
    scale = float(in_size) / out_size
    filter_scale = max(scale, 1.0)
    support = support * filter_scale
    taps = int(math.ceil(support)) * 2 + 1
    inverse_scale = 1.0 / filter_scale
    first = np.zeros(out_size, dtype=np.int64)
    weights = np.zeros((out_size, taps), dtype=np.int32)
    for index in range(out_size):
        center = (index + 0.5) * scale
        low = max(int(center - support + 0.5), 0)
        count = min(int(center + support + 0.5), in_size) - low
        window = [kernel((tap + low - center + 0.5) * inverse_scale) for tap in range(count)]
        total = 0.0
        for weight in window:
            total += weight
        if total != 0.0:
            window = [weight / total for weight in window]
        # Rounded half away from zero, as PIL's (int)(w * 2^bits -/+ 0.5).
        weights[index, :count] = [int(weight * (1 << PIL_PRECISION_BITS) + (-0.5 if weight < 0 else 0.5))
                                  for weight in window]
        first[index] = min(low, in_size - taps) if in_size >= taps else 0
        weights[index] = np.roll(weights[index], low - first[index])
    return first, weights


@functools.lru_cache(maxsize=128)
def _axis_taps_on(in_size: int, out_size: int, resample: int, device: torch.device) -> tuple:
    """`pil_axis_weights` on `device`, once per sizes (the resize runs chunk by chunk): per tap, the input pixel of
    every output pixel (taps, out_size) and its weight (taps, out_size); only the taps an input this short has."""
    first, weights = pil_axis_weights(in_size, out_size, resample)
    taps = min(weights.shape[1], in_size)
    pixels = torch.from_numpy(first[None, :] + np.arange(taps)[:, None])
    return pixels.to(device), torch.from_numpy(np.ascontiguousarray(weights[:, :taps].T)).to(device)


def _pil_axis_pass(pixels: torch.Tensor, dim: int, out_size: int, resample: int) -> torch.Tensor:
    """int32 byte values resized along `dim` as PIL's 8-bit pass does: the fixed-point sum plus one half,
    shifted down and clamped to bytes (its clip8)."""
    sources, weights = _axis_taps_on(pixels.shape[dim], out_size, resample, pixels.device)
    shape = [1] * pixels.dim()
    shape[dim] = out_size
    output_shape = list(pixels.shape)
    output_shape[dim] = out_size
    total = torch.full(output_shape, 1 << (PIL_PRECISION_BITS - 1), dtype=torch.int32, device=pixels.device)
    for tap_sources, tap_weights in zip(sources, weights):
        total += pixels.index_select(dim, tap_sources) * tap_weights.view(shape)
    return total.bitwise_right_shift_(PIL_PRECISION_BITS).clamp_(0, 255)


def _pil_passes(frames: torch.Tensor, size: tuple, resample: int, order: str) -> torch.Tensor:
    """(n, H, W, 3) uint8 frames resized to `size` (width, height), one PIL pass per axis that changes, in `order`
    ("hv": width first). Returns int32 byte values."""
    pixels = frames.to(torch.int32)
    for axis in order:
        dim, out_size = (2, size[0]) if axis == "h" else (1, size[1])
        if pixels.shape[dim] != out_size:
            pixels = _pil_axis_pass(pixels, dim, out_size, resample)
    return pixels


@functools.lru_cache(maxsize=64)
def pil_pass_order(source_size: tuple, size: tuple, resample: int) -> typing.Optional[str]:
    """"hv" or "vh": the order of the two axis passes in which `_pil_passes` gives this Pillow's bytes for a resize
    from `source_size` to `size` (width, height), or None if neither does. Pillow (13) resizes width or height first
    depending on the sizes, and each pass rounds to bytes, so the order shows in the pixels; it is read off one noise
    frame, which also checks that this Pillow's arithmetic is the one `_pil_axis_pass` follows."""
    noise = np.random.default_rng(0).integers(0, 256, (1, source_size[1], source_size[0], 3), dtype=np.uint8)
    whole = torch.from_numpy(np.array(PIL.Image.fromarray(noise[0]).resize(size, resample=resample)))
    for order in ("hv", "vh"):
        if torch.equal(_pil_passes(torch.from_numpy(noise), size, resample, order)[0], whole.to(torch.int32)):
            return order
    return None


def torch_resizes_as_pil(source_size: tuple, size: tuple, resample: int) -> bool:
    """Whether `resized_as_pil` gives PIL's bytes for this resize (checked on a noise frame, once per sizes)."""
    return resample in PIL_FILTERS and pil_pass_order(tuple(source_size), tuple(size), resample) is not None


def resized_as_pil(frames: torch.Tensor, size: tuple, resample: int) -> torch.Tensor:
    """(n, H, W, 3) uint8 frames resized to `size` (width, height) on their device, PIL's bytes exactly: PIL's
    fixed-point weights and integer sums, pass by pass in PIL's order (`torch_resizes_as_pil` must hold).
    Returns int32 (n, height, width, 3) byte values."""
    order = pil_pass_order((frames.shape[2], frames.shape[1]), tuple(size), resample)
    if order is None:
        raise RuntimeError(f"this Pillow ({PIL.__version__}) resizes {frames.shape[2]}x{frames.shape[1]} frames to "
                           f"{size[0]}x{size[1]} in a way frame_resize='torch' does not reproduce: use "
                           "frame_resize='pil'.")
    return _pil_passes(frames, size, resample, order)


def video_patches_into(output: torch.Tensor, frames: list, layout: PatchLayout, release=None) -> tuple:
    """Writes the flattened patches `(t*h*w, C*tp*P*P)` of HxWx3 uint8 frames (a multiple of tp of them, H and W
    multiples of P*merge, or any size where `layout.resizes_while_patching`: resized to the grid here, chunk by
    chunk) into `output`, rows (t, h/m, w/m, m, m), features (C, tp, P, P) as Qwen2-VL lays them out.
    `release(n)`, when given, is told each time the first n frames are no longer needed.
    Returns the grid (t, h, w)."""
    tp, patch, merge = layout.temporal_patch_size, layout.patch_size, layout.merge_size
    source_height, source_width, _ = frames[0].shape
    width, height = layout.patched_size(frames)
    resizing = (width, height) != (source_width, source_height)
    t, grid_h, grid_w = len(frames) // tp, height // patch, width // patch
    exact_division = layout.rescale_by_division()
    rows_per_group = grid_h * grid_w
    group_bytes = rows_per_group * output.shape[1] * output.element_size()
    if resizing:  # int32 frames at the larger of each edge bound every buffer the resize makes
        group_bytes = max(group_bytes, tp * 3 * 4 * max(width, source_width) * max(height, source_height))
    step = max(1, STEP_BYTES // group_bytes)
    for first in range(0, t, step):
        groups = min(step, t - first)
        frame_range = slice(first * tp, (first + groups) * tp)
        chunk = torch.from_numpy(np.stack(frames[frame_range])).to(output.device)
        if resizing:
            chunk = resized_as_pil(chunk, (width, height), layout.resample)
        chunk = chunk.view(groups, tp, grid_h // merge, merge, patch, grid_w // merge, merge, patch, 3)
        if release is not None:
            release(frame_range.stop)
        target = output[first * rows_per_group:(first + groups) * rows_per_group]
        target.view(groups, grid_h // merge, grid_w // merge, merge, merge, 3, tp, patch, patch).copy_(
            chunk.permute(0, 2, 5, 3, 6, 8, 1, 4, 7))
        _normalize_(target.view(-1, 3, tp * patch * patch), layout, exact_division)
    return t, grid_h, grid_w


def _patch_rows(frames: list, layout: PatchLayout) -> int:
    """Patch rows of HxWx3 frames (a multiple of the temporal patch of them) at their patched size."""
    width, height = layout.patched_size(frames)
    return len(frames) // layout.temporal_patch_size * (height // layout.patch_size) * (width // layout.patch_size)


def _even_length(video: VideoFrames, temporal_patch_size: int) -> VideoFrames:
    """Drops trailing frames so the count divides the temporal patch (an odd count loses its last frame)."""
    sampled, total = len(video.frames), video.source_frame_count
    if sampled < temporal_patch_size and total is not None and total > sampled:
        raise ValueError(
            f"a video needs at least {temporal_patch_size} sampled frames; {sampled} of its {total} "
            f"{'was' if sampled == 1 else 'were'} sampled. Sample {temporal_patch_size} or more (num_frames, or a "
            "higher fps; --frames / --fps on the command line), or pass a single frame as an image."
        )
    if sampled < temporal_patch_size:
        raise ValueError(
            f"a video needs at least {temporal_patch_size} frames, this one has {sampled}. "
            "Give a longer video, sample more frames, or pass a single frame as an image."
        )
    return video.first(len(video.frames) - len(video.frames) % temporal_patch_size)


# ----------------------------------------------------------------------------------------------
# Conversations


def _type_name(value) -> str:
    return "None" if value is None else type(value).__name__


def _check_item(item, path: str) -> None:
    if not isinstance(item, dict):
        raise TypeError(f"{path} is a {_type_name(item)}; a content item is a dict such as "
                        "{'type': 'text', 'text': '...'} or {'type': 'video', 'video': 'clip.mp4'}.")
    kind = item.get("type")
    if kind not in CONTENT_TYPES:
        hint = f" (did you mean {kind.lower()!r}?)" if isinstance(kind, str) and kind.lower() in CONTENT_TYPES else ""
        raise ValueError(f"{path}[\"type\"] is {kind!r}{hint}; Vamba reads items of type "
                         f"{', '.join(map(repr, CONTENT_TYPES))}.")
    if kind == "text" and not isinstance(item.get("text"), str):
        raise TypeError(f"{path}[\"text\"] is {_type_name(item.get('text'))}; a text item needs a string.")
    if kind == "text":
        return
    key = next((key for key in (kind, "path", "url") if item.get(key) is not None), None)
    if key is None:
        raise ValueError(f"{path} has no `{kind}`, `path` or `url`: say which {kind} it is.")
    if not isinstance(item[key], SOURCE_TYPES[kind]):
        raise TypeError(f"{path}[{key!r}] is a {_type_name(item[key])}; give a path or URL, or the {kind} itself "
                        f"({', '.join(cls.__name__ for cls in SOURCE_TYPES[kind][2:])}).")
    allowed = {"type", kind, "path", "url"} | (set(VideoSampling.option_names()) if kind == "video" else set())
    unknown = sorted(map(str, set(item) - allowed))
    if unknown:
        raise ValueError(f"{path} has unknown key(s) {', '.join(unknown)}; a {kind} item takes "
                         f"{', '.join(sorted(allowed))}.")


def _check_message(message, path: str) -> None:
    if not isinstance(message, dict):
        raise TypeError(f"{path} is a {_type_name(message)}; a message is a dict with \"role\" and \"content\".")
    role = message.get("role")
    if not isinstance(role, str) or not role:
        raise TypeError(f"{path}[\"role\"] is {role!r}; give a role string such as 'user' or 'assistant'.")
    content = message.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise TypeError(f"{path}[\"content\"] is a {_type_name(content)}; give a string or a list of items.")
    for index, item in enumerate(content):
        _check_item(item, f"{path}[\"content\"][{index}]")


def _check_conversation(messages, path: str) -> None:
    if not isinstance(messages, list):
        raise TypeError(f"{path} is a {_type_name(messages)}; a conversation is a list of messages (dicts).")
    if not messages:
        raise ValueError(f"{path} is empty; give at least one message.")
    for index, message in enumerate(messages):
        _check_message(message, f"{path}[{index}]")


def _as_dict(value):
    """A message or content-block object as the dict transformers 5 reads it as: a dataclass by its fields, a
    pydantic model by `model_dump()`; anything else unchanged."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return value.model_dump()
    return value


def _image_url_block(item):
    """An OpenAI-style `{"type": "image_url", "image_url": {"url": ...}}` block as the image item it names."""
    if not (isinstance(item, Mapping) and item.get("type") == "image_url" and "image_url" in item):
        return item
    url = item["image_url"].get("url") if isinstance(item["image_url"], Mapping) else item["image_url"]
    return {"type": "image", "url": url}


def _plain_message(message):
    message = _as_dict(message)
    if not isinstance(message, Mapping):
        return message
    plain = {key: value for key, value in message.items() if value is not None}
    if isinstance(plain.get("content"), (list, tuple)):
        plain["content"] = [_image_url_block(_as_dict(item)) for item in plain["content"]]
    return plain


def plain_conversations(conversation):
    """Message objects (dataclasses, pydantic models, a conversation object with `.messages`) as the dicts they hold,
    keys set to None dropped and OpenAI `image_url` blocks read as image items, as transformers 5 renders them; the
    caller's objects are left as they are."""
    def plain(messages):
        messages = getattr(messages, "messages", messages)
        return [_plain_message(message) for message in messages] if isinstance(messages, (list, tuple)) else messages

    if isinstance(conversation, (list, tuple)) and conversation and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages")):
        return [plain(messages) for messages in conversation]
    return plain(conversation)


def validated_conversations(conversation) -> tuple:
    """(list of conversations, whether a batch was given), after checking every message and item; errors name
    the path of what is wrong, e.g. `conversation[0]["content"][1]`."""
    if isinstance(conversation, tuple):
        conversation = list(conversation)
    if not isinstance(conversation, list) or not conversation:
        _check_conversation(conversation, "conversation")
    if isinstance(conversation[0], (list, tuple)):
        conversations = [list(messages) if isinstance(messages, tuple) else messages for messages in conversation]
        for index, messages in enumerate(conversations):
            _check_conversation(messages, f"conversation[{index}]")
        return conversations, True
    _check_conversation(conversation, "conversation")
    return [conversation], False


def _message_texts(conversations: list, batched: bool):
    """(path, text) of every text in the conversations' messages, the path named as the errors name it."""
    for number, messages in enumerate(conversations):
        prefix = f"conversation[{number}]" if batched else "conversation"
        for index, message in enumerate(messages):
            content = message["content"]
            if isinstance(content, str):
                yield f"{prefix}[{index}][\"content\"]", content
                continue
            for position, item in enumerate(content):
                if item["type"] == "text":
                    yield f"{prefix}[{index}][\"content\"][{position}][\"text\"]", item["text"]


def special_token_in(text: str, tokenizer) -> typing.Optional[str]:
    """The first of the tokenizer's special tokens (`<|im_end|>`, `<|im_start|>`, a vision token) in `text`."""
    specials = {token.content for token in tokenizer.added_tokens_decoder.values() if token.special}
    specials = sorted(specials | set(tokenizer.all_special_tokens), key=len, reverse=True)
    found = re.search("|".join(map(re.escape, specials)), text) if specials else None
    return found.group() if found else None


def check_no_special_tokens(conversations: list, batched: bool, tokenizer) -> None:
    """A message's text holding one of the tokenizer's special tokens is refused: the tokenizer would read it as
    that token, ending the turn or opening another one that the writer of the message could forge."""
    for path, text in _message_texts(conversations, batched):
        found = special_token_in(text, tokenizer)
        if found is not None:
            raise ValueError(f"{path} holds {found!r}, one of the tokenizer's special tokens: in a message it would "
                             f"end the turn or open another. Remove it from the text (the chat template writes "
                             f"every special token itself).")


def _visual_items(messages: list) -> list:
    return [item for message in messages if isinstance(message["content"], list)
            for item in message["content"] if item["type"] in ("image", "video")]


def _item_source(item: dict):
    kind = item["type"]
    return next(item[key] for key in (kind, "path", "url") if item.get(key) is not None)


@dataclass(frozen=True)
class _VideoItem:
    """A video named by a chat-template item, with the sampling options the item sets."""

    source: object
    options: dict


class _GenerationBlocks(jinja2.ext.Extension):
    """Parses `{% generation %}...{% endgeneration %}` (rendered by transformers), to read a template's variables."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def template_variables(template: str) -> set:
    return jinja2.meta.find_undeclared_variables(jinja2.Environment(extensions=[_GenerationBlocks]).parse(template))


def _assistant_masks(offsets, attention_mask, spans: list) -> np.ndarray:
    """1 for each token whose text starts inside one of its row's generation spans (character ranges)."""
    offsets, attention_mask = np.asarray(offsets), np.asarray(attention_mask)
    starts, ends = offsets[..., 0], offsets[..., 1]
    masks = np.zeros(attention_mask.shape, dtype=np.int64)
    for row, row_spans in enumerate(spans):
        for first, last in row_spans:
            masks[row] |= (starts[row] >= first) & (starts[row] < last) & (ends[row] > starts[row])
    return masks * (attention_mask != 0)


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _per_prompt_images(images, texts: list) -> list:
    """The images in prompt order: a flat list, or transformers' nested form, one list per prompt (empty for a
    prompt without an image), checked against the prompts' placeholders."""
    if not (isinstance(images, (list, tuple)) and images and all(isinstance(item, (list, tuple)) for item in images)):
        return _as_list(images)
    if len(images) != len(texts):
        raise ValueError(f"images is nested per prompt but has {len(images)} lists for {len(texts)} prompts: give one "
                         "list per prompt (empty for a prompt without an image).")
    for index, (prompt_images, prompt) in enumerate(zip(images, texts)):
        if len(prompt_images) != prompt.count(VISION_START):
            raise ValueError(f"prompt {index} has {prompt.count(VISION_START)} vision placeholder(s) "
                             f"`{VISION_PLACEHOLDER}` but its list holds {len(prompt_images)} image(s): give one image "
                             "per placeholder (Vamba takes at most one per prompt).")
    return [image for prompt_images in images for image in prompt_images]


def _as_video_list(videos) -> list:
    """A list of videos; a list of single frames (PIL images or 2-D/3-D arrays) is one video."""
    if videos is None:
        return []
    if isinstance(videos, list) and videos and not is_single_frame(videos[0]):
        return videos
    return [videos]


# ----------------------------------------------------------------------------------------------
# The processor


class VambaProcessor(ProcessorMixin):
    r"""Vamba's processor: Qwen2-VL's image processor (its settings also patch video frames), a Qwen2 tokenizer and
    the Vamba chat template.

    `video_sampling`: the default `VideoSampling` (or a dict of its options; extra keyword arguments set single
    options), saved with the processor. A call, a chat template call or a video item overrides any of them.
    With `return_metadata=True`, a call's output holds `video_metadata`: each video's sampled timestamps and
    frame indices.
    """

    attributes = ["image_processor", "tokenizer"]
    valid_processor_kwargs = VambaProcessorKwargs

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, video_sampling=None,
                 **sampling_options):
        if isinstance(video_sampling, dict):
            video_sampling = VideoSampling(**video_sampling)
        self.video_sampling = (video_sampling or VideoSampling()).with_options(**sampling_options)
        chat_template = chat_template or VAMBA_CHAT_TEMPLATE
        if tokenizer is not None:
            tokenizer.chat_template = chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # The tokenizer and image processor are stock transformers classes: loading them never needs the folder's
        # remote code, so do not stop to ask about it (the model's config.json beside them declares some).
        kwargs.setdefault("trust_remote_code", False)
        # transformers passes a saved processor only the keywords its __init__ names; apply sampling options here.
        sampling_options = {name: kwargs.pop(name) for name in VideoSampling.option_names() if name in kwargs}
        processor = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        processor.video_sampling = processor.video_sampling.with_options(**sampling_options)
        return processor

    def to_dict(self, *args, **kwargs) -> dict:
        output = super().to_dict(*args, **kwargs)
        output["video_sampling"] = self.video_sampling.to_dict()
        # Always, not only once saving has set it on this instance (loading drops it): a loaded processor's dict is
        # then the saved one's.
        output["auto_map"] = dict(PROCESSOR_AUTO_MAP)
        return output

    def to_json_file(self, json_file_path, *args, **kwargs) -> None:
        super().to_json_file(json_file_path, *args, **kwargs)
        # transformers 5 keeps the image processor's settings inside processor_config.json, which 4.x does not read
        # (it would take Qwen2-VL's defaults): saving the processor writes them where 4.x looks too.
        if os.path.basename(json_file_path) == PROCESSOR_FILE and "image_processor" in self.to_dict(*args, **kwargs):
            with open(os.path.join(os.path.dirname(json_file_path), IMAGE_PROCESSOR_FILE), "w", encoding="utf-8") as f:
                json.dump(image_processor_settings(self.image_processor), f, indent=2, sort_keys=True)
                f.write("\n")

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]

    # -- keyword arguments ----------------------------------------------------------------------

    def _valid_keys(self) -> dict:
        """Per modality, the keyword names a call may use."""
        annotations = VambaProcessorKwargs.__annotations__
        keys = {modality: set(annotations[modality].__annotations__) for modality in MODALITY_KWARGS}
        image_processor_kwargs = getattr(self.image_processor, "valid_kwargs", None)
        keys["images_kwargs"] |= set(getattr(image_processor_kwargs, "__annotations__", {}))
        if "common_kwargs" in annotations:  # transformers 4.x: return_tensors is a common kwarg
            keys = {modality: names | set(annotations["common_kwargs"].__annotations__)
                    for modality, names in keys.items()}
        return keys

    def _check_call_kwargs(self, kwargs: dict) -> None:
        valid = self._valid_keys()
        flat_keys = set().union(*valid.values()) | {
            key for key, value in VambaProcessorKwargs.__annotations__.items()
            if key not in MODALITY_KWARGS and not typing.is_typeddict(value)}
        for key, value in kwargs.items():
            if key in MODALITY_KWARGS or key == "common_kwargs":
                if not isinstance(value, dict):
                    raise TypeError(f"{key} must be a dict of options, got a {_type_name(value)}.")
                allowed = flat_keys if key == "common_kwargs" else valid[key]
                unknown = sorted(set(value) - allowed)
                if unknown:
                    raise TypeError(f"{key} has unknown option(s) {', '.join(unknown)} for VambaProcessor; its "
                                    f"options are: {', '.join(sorted(allowed))}.")
            elif key not in flat_keys:
                raise TypeError(f"VambaProcessor got an unknown keyword argument {key!r}. Video sampling options: "
                                f"{', '.join(VideoSampling.option_names())}; tokenizer, image and video options as "
                                "in transformers' TextKwargs, ImagesKwargs and VideosKwargs.")

    def _merged_kwargs(self, kwargs: dict) -> dict:
        self._check_call_kwargs(kwargs)
        # transformers 4.x pops the options out of the per-modality dicts it is given: merge copies of the caller's.
        kwargs = {key: dict(value) if isinstance(value, dict) else value for key, value in kwargs.items()}
        merged = self._merge_kwargs(VambaProcessorKwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs)
        for key in ("return_mm_token_type_ids", "return_text_replacement_offsets"):
            if merged["text_kwargs"].pop(key, None) or merged.get(key):
                raise ValueError(f"{key}=True is not supported: Vamba prompts hold no image or video pad tokens.")
        return merged

    # -- plain call ---------------------------------------------------------------------------

    def __call__(
        self,
        images: typing.Optional[ImageInput] = None,
        text: typing.Union[TextInput, PreTokenizedInput, list[TextInput], list[PreTokenizedInput], None] = None,
        videos: typing.Optional[VideoInput] = None,
        **kwargs: Unpack[VambaProcessorKwargs],
    ) -> BatchFeature:
        """Tokenize `text` (one prompt or a list; each with at most one `<|vision_start|><|vision_end|>`) and
        process the images or videos that fill its placeholders, in order.

        Returns `input_ids`, `attention_mask` (padded on the tokenizer's `padding_side`) and `pixel_values` +
        `image_grid_thw` or `pixel_values_videos` + `video_grid_thw` when there are images or videos; with
        `return_metadata=True` also `video_metadata`. Keyword arguments: see the module docstring.
        """
        # No `audio` parameter: transformers gives a processor audio only when its signature names it.
        if kwargs.pop("audio", None) is not None:
            raise ValueError("Vamba reads no audio: leave `audio` out.")
        if text is None:
            raise ValueError("text is required: the prompt, with `<|vision_start|><|vision_end|>` where the image or "
                             "video goes")
        texts = [text] if isinstance(text, str) else list(text)
        if not all(isinstance(prompt, str) for prompt in texts):
            raise TypeError("text must be a string or a list of strings.")
        image_list, video_list = _per_prompt_images(images, texts), _as_video_list(videos)
        self._check_placeholders(texts, len(image_list), len(video_list))
        options = self._merged_kwargs(kwargs)
        text_kwargs = options["text_kwargs"]
        return_tensors = text_kwargs.pop("return_tensors", None)

        data = dict(self.tokenizer(texts, **text_kwargs))
        self._check_placeholders_kept(texts, data["input_ids"])
        if image_list:
            data.update(self._process_images(image_list, options["images_kwargs"]))
        metadata = None
        if video_list:
            pixel_values_videos, video_grid_thw, metadata = self._process_videos(video_list, options["videos_kwargs"])
            if return_tensors != "pt":
                pixel_values_videos = pixel_values_videos.cpu().numpy()
            data.update(pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
        output = BatchFeature(data=data, tensor_type=return_tensors)
        if options["videos_kwargs"].get("return_metadata"):
            output["video_metadata"] = metadata or []
        return output

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs) -> MultiModalData:
        """Per image (height, width) and video (frames, height, width): the prompt tokens it takes
        (`num_image_tokens` / `num_video_tokens`: its `<|vision_start|><|vision_end|>` pair, whatever its size: the
        model reads the visual tokens through cross-attention, not in the prompt) and, per image, its rows of
        `pixel_values` (`num_image_patches`) under the call's keyword arguments."""
        images_kwargs = self._merged_kwargs(kwargs)["images_kwargs"]
        placeholder_tokens = len(self.tokenizer(VISION_PLACEHOLDER, add_special_tokens=False)["input_ids"])
        data = {}
        if image_sizes is not None:
            size = dict(images_kwargs.get("size") or self.image_processor.size)
            layout = PatchLayout.of(self.image_processor, images_kwargs.get("min_pixels", size["shortest_edge"]),
                                    images_kwargs.get("max_pixels", size["longest_edge"]))
            patches = [math.prod(layout.frame_size(width, height)) // layout.patch_size ** 2
                       for height, width in image_sizes]
            data.update(num_image_tokens=[placeholder_tokens] * len(patches), num_image_patches=patches)
        if video_sizes is not None:
            data["num_video_tokens"] = [placeholder_tokens] * len(video_sizes)
        return MultiModalData(**data)

    @staticmethod
    def _check_placeholders(texts: list, num_images: int, num_videos: int) -> None:
        for index, prompt in enumerate(texts):
            for pad in VISUAL_PAD_TOKENS:
                if pad in prompt:
                    raise ValueError(
                        f"prompt {index} contains {pad}: Vamba prompts mark an image or video with "
                        f"`{VISION_PLACEHOLDER}` only. Remove the pad tokens, or build the prompt with "
                        "processor.apply_chat_template."
                    )
            if prompt.count(VISION_START) > 1:
                raise ValueError(
                    f"prompt {index} has {prompt.count(VISION_START)} vision placeholders; Vamba takes at most one image "
                    "or video per conversation. Split it into separate conversations."
                )
        if num_images and num_videos:
            raise ValueError(
                "a batch mixes images and videos, but the prompts' placeholders cannot say which row gets which. "
                "Process image conversations and video conversations in separate batches."
            )
        placeholders = sum(prompt.count(VISION_START) for prompt in texts)
        visuals = num_images + num_videos
        if placeholders != visuals:
            kind = "video(s)" if num_videos else "image(s)"
            raise ValueError(
                f"got {visuals} {kind} but the text has {placeholders} vision placeholder(s) `{VISION_PLACEHOLDER}`. "
                "Put one placeholder where each image or video goes (one per prompt at most), or build the prompt "
                "with processor.apply_chat_template."
            )

    def _check_placeholders_kept(self, texts: list, input_ids) -> None:
        vision_start_id = self.tokenizer.convert_tokens_to_ids(VISION_START)
        for index, (prompt, ids) in enumerate(zip(texts, input_ids)):
            if prompt.count(VISION_START) != list(ids).count(vision_start_id):
                raise ValueError(f"prompt {index} lost its `{VISION_PLACEHOLDER}` to truncation; raise max_length "
                                 "or turn truncation off.")

    def _process_images(self, images: list, images_kwargs: dict) -> dict:
        images = [frame_array(image, "image") for image in images]
        options = {key: value for key, value in images_kwargs.items() if key != "return_tensors"}
        min_pixels, max_pixels = options.pop("min_pixels", None), options.pop("max_pixels", None)
        if min_pixels is not None or max_pixels is not None:
            size = dict(options.get("size") or self.image_processor.size)
            size["shortest_edge"] = size["shortest_edge"] if min_pixels is None else min_pixels
            size["longest_edge"] = size["longest_edge"] if max_pixels is None else max_pixels
            options["size"] = size
        output = self.image_processor(images=images, return_tensors="np", **options)
        return {"pixel_values": output["pixel_values"], "image_grid_thw": output["image_grid_thw"]}

    # -- videos ---------------------------------------------------------------------------------

    def _video_options(self, videos_kwargs: dict) -> tuple:
        """(sampling, patch layout, frame resize) of a call's video options."""
        sampling = self.video_sampling.with_changes(
            **{name: videos_kwargs.get(name) for name in VideoSampling.option_names()})
        layout = PatchLayout.of(self.image_processor, videos_kwargs.get("min_pixels"), videos_kwargs.get("max_pixels"),
                                videos_kwargs.get("frame_resize"), videos_kwargs.get("device"))
        resize = FrameResize(sampling.video_shortest_edge, sampling.video_longest_edge, layout.frame_size,
                             layout.resample)
        return sampling, layout, resize

    def _process_videos(self, videos: list, videos_kwargs: dict) -> tuple:
        """(pixel_values_videos as a float32 tensor, video_grid_thw, per-video metadata)."""
        sampling, layout, resize = self._video_options(videos_kwargs)
        loaded = [_even_length(self._load_video(video, sampling, resize), layout.temporal_patch_size)
                  for video in videos]
        frames, releases = [], []
        for video, given in zip(loaded, videos):
            frames.append(layout.frames_to_patch(video.frames))
            # The memory of frames decoded here is handed back as they are patched; frames a caller gave are kept.
            decoded_here = isinstance(given, (str, os.PathLike, _VideoItem)) and frames[-1] is video.frames
            releases.append(video.release if decoded_here else None)
        rows = [_patch_rows(video, layout) for video in frames]
        output = torch.empty((sum(rows), layout.patch_dim), dtype=torch.float32,
                             device=videos_kwargs.get("device") or "cpu")
        grids, first = [], 0
        for video, count, release in zip(frames, rows, releases):
            grids.append(video_patches_into(output[first:first + count], video, layout, release))
            first += count
        return output, np.array(grids, dtype=np.int64), [video.metadata() for video in loaded]

    def video_chunks(self, video, chunk_frames: int = 64, **kwargs):
        """One video's inputs, `chunk_frames` frames at a time, as its frames decode: for a local file the frames
        decode in background workers (`stream_video`), so a model can encode each chunk while the next ones decode
        (`model.encode_video_chunks(processor.video_chunks(path, device="cuda"))`).

        Yields `BatchFeature`s with `pixel_values_videos` and `video_grid_thw` (torch tensors; a multiple of the
        temporal patch of frames, the last chunk shorter), `video_metadata` (a one-item list: the chunk's
        timestamps and frame indices) and `remaining_frames` (frames in the chunks still to come). The chunks'
        pixels, in order, are the rows of `processor(videos=video, ...)["pixel_values_videos"]`, bit for bit.
        Keyword arguments: a call's video options (sampling, `min_pixels` / `max_pixels`, `device`, `frame_resize`),
        flat or as `videos_kwargs`."""
        tp = self.image_processor.temporal_patch_size
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < tp \
                or chunk_frames % tp:
            raise ValueError(f"chunk_frames={chunk_frames!r} is not valid: give a multiple of the temporal patch "
                             f"({tp} frames), e.g. 64.")
        options = self._video_call_options(kwargs)
        return self._video_chunks(video, chunk_frames, options)

    def _video_call_options(self, kwargs: dict) -> dict:
        """The video options of a `video_chunks` call; any other keyword is refused."""
        allowed = self._valid_keys()["videos_kwargs"]
        for key, value in kwargs.items():
            if key == "videos_kwargs":
                if not isinstance(value, dict):
                    raise TypeError(f"videos_kwargs must be a dict of options, got a {_type_name(value)}.")
                unknown = sorted(set(value) - allowed)
            else:
                unknown = [] if key in allowed else [key]
            if unknown:
                raise TypeError(f"video_chunks got unknown option(s) {', '.join(unknown)}; its options are the video "
                                f"options: {', '.join(sorted(allowed))}.")
        options = {**{key: value for key, value in kwargs.items() if key != "videos_kwargs"},
                   **kwargs.get("videos_kwargs", {})}
        if options.pop("return_tensors", "pt") not in ("pt", None):
            raise ValueError("video_chunks returns torch tensors: leave return_tensors out (or pass 'pt').")
        if options.pop("return_metadata", True) is not True:
            raise ValueError("video_chunks always returns each chunk's video_metadata: leave return_metadata out.")
        return options

    def _video_chunks(self, video, chunk_frames: int, options: dict):
        sampling, layout, resize = self._video_options(options)
        tp, device = layout.temporal_patch_size, options.get("device") or "cpu"
        if isinstance(video, (str, os.PathLike)):
            stream = stream_video(video, sampling, resize)
        else:
            stream = FrameStream.of(to_video_frames(video, sampling, resize))
        with stream:
            total = stream.count - stream.count % tp
            if total == 0:
                _even_length(VideoFrames(stream.frames(stream.count)), tp)  # raises: too few frames
            start = 0
            while start < total:
                decoded = stream.frames(start + chunk_frames)
                # A file decoded again in one pass (its index did not match, or damage was skipped) may have fewer.
                total = min(total, stream.count - stream.count % tp)
                end = min(start + chunk_frames, total)
                if end <= start:
                    break
                frames = layout.frames_to_patch(decoded[start:end])
                output = torch.empty((_patch_rows(frames, layout), layout.patch_dim), dtype=torch.float32,
                                     device=device)
                grid = video_patches_into(output, frames, layout)
                stream.release(end)
                yield BatchFeature({"pixel_values_videos": output, "video_grid_thw": torch.tensor([grid]),
                                    "video_metadata": [stream.metadata(start, end)], "remaining_frames": total - end})
                start = end

    @staticmethod
    def _load_video(video, sampling: VideoSampling, resize: FrameResize) -> VideoFrames:
        if isinstance(video, _VideoItem):
            return to_video_frames(video.source, sampling.with_changes(**video.options), resize)
        return to_video_frames(video, sampling, resize)

    # -- chat template -----------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation,
        chat_template: str = None,
        tools: list = None,
        documents: list = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        return_assistant_tokens_mask: bool = False,
        tokenize: bool = False,
        return_tensors=None,
        return_dict: bool = False,
        processor_kwargs: dict = None,
        **kwargs,
    ):
        """Render one conversation (a list of messages) or a batch of them with the Vamba template.

        Messages use transformers' multimodal format: content items `{"type": "text", "text": ...}`,
        `{"type": "image", "image"|"path"|"url": ...}` and `{"type": "video", "video"|"path"|"url": ...}`
        (a video item may also set any `VideoSampling` option, e.g. `num_frames`). At most one image or video
        per conversation. A malformed conversation raises a ValueError/TypeError naming the path of what is wrong.

        With `tokenize=False`, the prompt string(s). With `tokenize=True, return_dict=True`, a BatchFeature ready
        for `model.generate(**inputs)` (`assistant_masks` too with `return_assistant_tokens_mask=True`);
        `tokenize=True` alone gives `input_ids`. Processor options go in `processor_kwargs` or as keyword
        arguments; other keyword arguments are variables of the template.
        """
        conversations, batched = validated_conversations(plain_conversations(conversation))
        check_no_special_tokens(conversations, batched, self.tokenizer)
        template = chat_template or self.chat_template
        processor_kwargs, template_kwargs = self._split_template_kwargs(template, dict(processor_kwargs or {}), kwargs)
        if return_assistant_tokens_mask and not (tokenize and return_dict):
            raise ValueError("return_assistant_tokens_mask=True needs tokenize=True and return_dict=True.")
        if return_assistant_tokens_mask and continue_final_message:
            raise ValueError("continue_final_message is not compatible with return_assistant_tokens_mask.")
        prompts, generation_spans = render_jinja_template(
            conversations=conversations, tools=tools, documents=documents, chat_template=template,
            return_assistant_tokens_mask=return_assistant_tokens_mask, continue_final_message=continue_final_message,
            add_generation_prompt=add_generation_prompt, **self.tokenizer.special_tokens_map, **template_kwargs,
        )
        if not tokenize:
            return prompts if batched else prompts[0]

        images, videos = self._visual_inputs(conversations)
        return_tensors = None if return_tensors == "auto" else return_tensors  # transformers 5: the defaults
        if return_assistant_tokens_mask:
            processor_kwargs["return_offsets_mapping"] = True
        inputs = self(text=prompts, images=images or None, videos=videos or None,
                      **({"return_tensors": return_tensors} if return_tensors is not None else {}), **processor_kwargs)
        if not return_dict:
            return inputs["input_ids"]
        if return_assistant_tokens_mask:
            masks = _assistant_masks(inputs.pop("offset_mapping"), inputs["attention_mask"], generation_spans)
            inputs["assistant_masks"] = torch.from_numpy(masks) if isinstance(inputs["input_ids"], torch.Tensor) else (
                masks if isinstance(inputs["input_ids"], np.ndarray) else masks.tolist())
        return inputs

    def _split_template_kwargs(self, template: str, processor_kwargs: dict, kwargs: dict) -> tuple:
        """(processor kwargs, template variables): a keyword is a processor option, or a variable the template
        reads; anything else is refused."""
        variables = template_variables(template)
        template_kwargs = {key: value for key, value in kwargs.items() if key in variables}
        processor_kwargs.update({key: value for key, value in kwargs.items() if key not in variables})
        self._check_call_kwargs(processor_kwargs)
        return processor_kwargs, template_kwargs

    @staticmethod
    def _visual_inputs(conversations: list) -> tuple:
        images, videos = [], []
        for index, messages in enumerate(conversations):
            items = _visual_items(messages)
            if len(items) > 1:
                raise ValueError(
                    f"conversation {index} has {len(items)} images/videos; Vamba takes at most one per conversation. "
                    "Split it into separate conversations."
                )
            if items and items[0]["type"] == "image":
                images.append(_item_source(items[0]))
            elif items:
                options = {key: items[0][key] for key in VideoSampling.option_names() if key in items[0]}
                videos.append(_VideoItem(_item_source(items[0]), options))
        return images, videos


VambaProcessor.register_for_auto_class("AutoProcessor")

if transformers.__version__.split(".")[0] == "4":
    # transformers 4.x finds sub-processor classes through these; 5.x reads the __init__ signature.
    VambaProcessor.image_processor_class = "AutoImageProcessor"
    VambaProcessor.tokenizer_class = "AutoTokenizer"
