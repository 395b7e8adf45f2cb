"""Vamba's video processor: video frames to Qwen2-VL's flattened video patches (resize to the patch grid, patch,
rescale and normalise) with vectorised torch ops, the original release's pixels bit for bit.

Its settings are Qwen2-VL's image processor's (`VambaVideoProcessor.from_image_processor`; `VambaProcessor` keeps
only the image processor and builds this from it), and the default `VideoSampling`. The call options are
`VideoSampling`'s fields (how frames are taken from a file), then:
- `min_pixels` / `max_pixels`: the pixel budget of a frame's patch grid (the image processor's by default).
- `device`: where frames are patched and normalised ("cpu" by default; e.g. "cuda"); uint8 frames go there in chunks.
- `frame_resize`: where frames that are not at the patch-grid size (frames given as arrays or `VideoFrames`) are
  resized to it; both give PIL's bytes, the original release's pixels, bit for bit. "pil": PIL on the CPU, a thread
  per CPU. "torch": on `device`, chunk by chunk as frames are patched (`resize_vamba.py`). By default "torch" when
  `device` is a CUDA GPU, else "pil" (and "pil" for any size whose bytes a noise frame shows torch's passes not to
  reproduce, should a Pillow change its arithmetic; given explicitly, "torch" then raises). Frames decoded from a
  file are decoded at the grid size.
- `return_metadata`: also return each video's sampled timestamps and frame indices.

Served as Hub remote code, so it imports only transformers, torch, numpy, PIL and the standard library at top level.
"""

import math
import os
import typing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields

import numpy as np
import PIL.Image
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from transformers.processing_utils import VideosKwargs
from transformers.video_processing_utils import BaseVideoProcessor

from .resize_vamba import PIL_FILTER_NAMES, PIL_FILTERS, resized_as_pil, torch_resizes_as_pil
from .video_decode_vamba import resize_frame
from .video_vamba import (
    FrameResize,
    FrameStream,
    VideoFrames,
    VideoSampling,
    is_single_frame,
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

__all__ = ["PatchLayout", "VambaVideoProcessor", "VambaVideosKwargs", "VideoItem", "video_patches_into"]

# Output bytes normalised per step: large enough that each torch op's thread start-up is amortised (on a busy
# machine a small step waits for descheduled threads), small enough that frames are handed back as they go.
STEP_BYTES = 64 * 2 ** 20
FRAME_RESIZES = ("pil", "torch")
MAX_ASPECT_RATIO = 200  # Qwen2-VL's vision tower
VIDEO_PROCESSOR_AUTO_MAP = {"AutoVideoProcessor": "video_processing_vamba.VambaVideoProcessor"}
# The image processor's settings that patch frames, with Qwen2-VL's defaults.
PATCH_SETTINGS = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2,
                  "size": {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280},
                  "resample": int(PIL.Image.BICUBIC), "do_resize": True, "do_rescale": True,
                  "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_CLIP_MEAN),
                  "image_std": list(OPENAI_CLIP_STD)}

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


@dataclass(frozen=True)
class VideoItem:
    """A video named by a chat-template item, with the sampling options the item sets."""

    source: object
    options: dict


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


def patch_rows(frames: list, layout: PatchLayout) -> int:
    """Patch rows of HxWx3 frames (a multiple of the temporal patch of them) at their patched size."""
    width, height = layout.patched_size(frames)
    return len(frames) // layout.temporal_patch_size * (height // layout.patch_size) * (width // layout.patch_size)


def even_length(video: VideoFrames, temporal_patch_size: int) -> VideoFrames:
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


def as_video_list(videos) -> list:
    """A list of videos; a list of single frames (PIL images or 2-D/3-D arrays) is one video."""
    if videos is None:
        return []
    if isinstance(videos, list) and videos and not is_single_frame(videos[0]):
        return videos
    return [videos]


def video_options(kwargs: dict, caller: str) -> dict:
    """The video options of a call given flat or as `videos_kwargs`; any other keyword is refused."""
    allowed = set(VambaVideosKwargs.__annotations__)
    for key, value in kwargs.items():
        if key == "videos_kwargs":
            if not isinstance(value, dict):
                raise TypeError(f"videos_kwargs must be a dict of options, got a {type_name(value)}.")
            unknown = sorted(set(value) - allowed)
        else:
            unknown = [] if key in allowed else [key]
        if unknown:
            raise TypeError(f"{caller} got unknown option(s) {', '.join(unknown)}; its options are the video "
                            f"options: {', '.join(sorted(allowed))}.")
    return {**{key: value for key, value in kwargs.items() if key != "videos_kwargs"},
            **kwargs.get("videos_kwargs", {})}


def type_name(value) -> str:
    return "None" if value is None else type(value).__name__


class VambaVideoProcessor(BaseVideoProcessor):
    r"""Vamba's video processor: videos (file paths, frame arrays, lists of frames, `VideoFrames`, `VideoItem`s) to
    `pixel_values_videos` + `video_grid_thw`, Qwen2-VL's layout, with `video_sampling` (a `VideoSampling` or a dict
    of its options) taking the frames from a file. Call options: see the module docstring."""

    model_input_names = ["pixel_values_videos", "video_grid_thw"]

    def __init__(self, video_sampling=None, **kwargs):
        settings = {name: kwargs.pop(name, default) for name, default in PATCH_SETTINGS.items()}
        super().__init__(**kwargs)
        for name, value in settings.items():
            setattr(self, name, value)
        # As JSON holds them, so that a loaded processor's dict is the saved one's.
        self.size, self.resample = dict(self.size), int(self.resample)
        self.image_mean, self.image_std = (list(value) if isinstance(value, (list, tuple)) else value
                                           for value in (self.image_mean, self.image_std))
        if isinstance(video_sampling, dict):
            video_sampling = VideoSampling(**video_sampling)
        self.video_sampling = video_sampling or VideoSampling()

    @classmethod
    def from_image_processor(cls, image_processor, video_sampling=None) -> "VambaVideoProcessor":
        """The video processor patching with `image_processor`'s settings (Qwen2-VL's image processor)."""
        return cls(video_sampling, **{name: getattr(image_processor, name) for name in PATCH_SETTINGS})

    def to_dict(self) -> dict:
        output = super().to_dict()
        output["video_sampling"] = self.video_sampling.to_dict()
        # Always, not only once saving has set it on this instance: a loaded video processor's dict is the saved one's.
        output["auto_map"] = dict(VIDEO_PROCESSOR_AUTO_MAP)
        return output

    def preprocess(self, videos, **kwargs) -> BatchFeature:
        """`pixel_values_videos` (float32, on `device`) and `video_grid_thw` of one video or a list of them, and
        `video_metadata` with `return_metadata=True`."""
        options = video_options(kwargs, type(self).__name__)
        return_tensors = options.get("return_tensors")
        videos = as_video_list(videos)
        if not videos:
            raise ValueError("videos is required: give a video (a path, frames or VideoFrames) or a list of them.")
        pixels, grids, metadata = self.patches(videos, options)
        data = {"pixel_values_videos": pixels if return_tensors == "pt" else pixels.cpu().numpy(),
                "video_grid_thw": grids}
        output = BatchFeature(data=data, tensor_type=return_tensors)
        if options.get("return_metadata"):
            output["video_metadata"] = metadata
        return output

    def settings(self, videos_kwargs: dict) -> tuple:
        """(sampling, patch layout, frame resize) of a call's video options."""
        sampling = self.video_sampling.with_changes(
            **{name: videos_kwargs.get(name) for name in VideoSampling.option_names()})
        layout = PatchLayout.of(self, videos_kwargs.get("min_pixels"), videos_kwargs.get("max_pixels"),
                                videos_kwargs.get("frame_resize"), videos_kwargs.get("device"))
        resize = FrameResize(sampling.video_shortest_edge, sampling.video_longest_edge, layout.frame_size,
                             layout.resample)
        return sampling, layout, resize

    def patches(self, videos: list, videos_kwargs: dict) -> tuple:
        """(pixel_values_videos as a float32 tensor, video_grid_thw, per-video metadata)."""
        sampling, layout, resize = self.settings(videos_kwargs)
        loaded = [even_length(load_item(video, sampling, resize), layout.temporal_patch_size) for video in videos]
        frames, releases = [], []
        for video, given in zip(loaded, videos):
            frames.append(layout.frames_to_patch(video.frames))
            # The memory of frames decoded here is handed back as they are patched; frames a caller gave are kept.
            decoded_here = isinstance(given, (str, os.PathLike, VideoItem)) and frames[-1] is video.frames
            releases.append(video.release if decoded_here else None)
        rows = [patch_rows(video, layout) for video in frames]
        output = torch.empty((sum(rows), layout.patch_dim), dtype=torch.float32,
                             device=videos_kwargs.get("device") or "cpu")
        grids, first = [], 0
        for video, count, release in zip(frames, rows, releases):
            grids.append(video_patches_into(output[first:first + count], video, layout, release))
            first += count
        return output, np.array(grids, dtype=np.int64), [video.metadata() for video in loaded]

    def video_chunks(self, video, chunk_frames: int = 64, **kwargs):
        """One video's inputs, `chunk_frames` frames at a time, as its frames decode: for a local file the frames
        decode in background workers (`stream_video`), so a model can encode each chunk while the next ones decode.

        Yields `BatchFeature`s with `pixel_values_videos` and `video_grid_thw` (torch tensors; a multiple of the
        temporal patch of frames, the last chunk shorter), `video_metadata` (a one-item list: the chunk's
        timestamps and frame indices) and `remaining_frames` (frames in the chunks still to come). The chunks'
        pixels, in order, are the rows of the whole video's `pixel_values_videos`, bit for bit.
        Keyword arguments: the video options (sampling, `min_pixels` / `max_pixels`, `device`, `frame_resize`),
        flat or as `videos_kwargs`."""
        tp = self.temporal_patch_size
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < tp \
                or chunk_frames % tp:
            raise ValueError(f"chunk_frames={chunk_frames!r} is not valid: give a multiple of the temporal patch "
                             f"({tp} frames), e.g. 64.")
        options = video_options(kwargs, "video_chunks")
        if options.pop("return_tensors", "pt") not in ("pt", None):
            raise ValueError("video_chunks returns torch tensors: leave return_tensors out (or pass 'pt').")
        if options.pop("return_metadata", True) is not True:
            raise ValueError("video_chunks always returns each chunk's video_metadata: leave return_metadata out.")
        return self._chunks(video, chunk_frames, options)

    def _chunks(self, video, chunk_frames: int, options: dict):
        sampling, layout, resize = self.settings(options)
        tp, device = layout.temporal_patch_size, options.get("device") or "cpu"
        if isinstance(video, (str, os.PathLike)):
            stream = stream_video(video, sampling, resize)
        else:
            stream = FrameStream.of(to_video_frames(video, sampling, resize))
        with stream:
            total = stream.count - stream.count % tp
            if total == 0:
                even_length(VideoFrames(stream.frames(stream.count)), tp)  # raises: too few frames
            start = 0
            while start < total:
                decoded = stream.frames(start + chunk_frames)
                # A file decoded again in one pass (its index did not match, or damage was skipped) may have fewer.
                total = min(total, stream.count - stream.count % tp)
                end = min(start + chunk_frames, total)
                if end <= start:
                    break
                frames = layout.frames_to_patch(decoded[start:end])
                output = torch.empty((patch_rows(frames, layout), layout.patch_dim), dtype=torch.float32,
                                     device=device)
                grid = video_patches_into(output, frames, layout)
                stream.release(end)
                yield BatchFeature({"pixel_values_videos": output, "video_grid_thw": torch.tensor([grid]),
                                    "video_metadata": [stream.metadata(start, end)], "remaining_frames": total - end})
                start = end


def load_item(video, sampling: VideoSampling, resize: FrameResize) -> VideoFrames:
    """The frames of one video: a `VideoItem` with its own sampling options, or anything `to_video_frames` takes."""
    if isinstance(video, VideoItem):
        return to_video_frames(video.source, sampling.with_changes(**video.options), resize)
    return to_video_frames(video, sampling, resize)


VambaVideoProcessor.register_for_auto_class("AutoVideoProcessor")
