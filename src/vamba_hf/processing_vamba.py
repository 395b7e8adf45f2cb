"""Processor for Vamba: Qwen2-VL's image processor, a Qwen2 tokenizer and Vamba's chat template.

Vamba's prompts carry `<|vision_start|><|vision_end|>` where the image or video is, with no
`<|image_pad|>`/`<|video_pad|>` tokens: the visual patches go to the model's vision tower
separately (`pixel_values` + `image_grid_thw` or `pixel_values_videos` + `video_grid_thw`).

This file is also served as Hub remote code, so it imports only transformers, torch, numpy, PIL
and the standard library at top level; PyAV and tqdm are optional.
"""

import math
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
import transformers
from transformers.feature_extraction_utils import BatchFeature
from transformers.processing_utils import ProcessorMixin

try:
    import av
except ImportError:
    av = None

try:
    from tqdm.auto import tqdm
except ImportError:
    tqdm = None


VISION_PLACEHOLDER = "<|vision_start|><|vision_end|>"
VISION_START = "<|vision_start|>"
VISUAL_PAD_TOKENS = ("<|image_pad|>", "<|video_pad|>")

# ChatML with the default system prompt of the original release; every image or video item
# becomes one `<|vision_start|><|vision_end|>` pair, text items are copied verbatim.
VAMBA_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] in ['image', 'video'] -%}"
    "{{ '<|vision_start|><|vision_end|>' }}"
    "{%- elif item['type'] == 'text' -%}"
    "{{ item['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|im_start|>assistant\\n' }}"
    "{%- endif -%}"
)

DEFAULT_NUM_FRAMES = 128
DEFAULT_MAX_FRAMES = 512
DEFAULT_VIDEO_LONGEST_EDGE = 640
DEFAULT_VIDEO_SHORTEST_EDGE = 256
# A progress bar is shown (when `progress` is left to None) for decodes at least this long.
PROGRESS_BAR_MIN_FRAMES = 1000
# Consecutive undecodable packets after which a stream is treated as ended.
MAX_CONSECUTIVE_DECODE_ERRORS = 64
# Frames handed to the image processor at once; bounds the float32 working copy of a long video.
FRAMES_PER_CHUNK = 16


def default_image_processor(**kwargs):
    """Qwen2-VL's image processor with its defaults (min_pixels 56*56, max_pixels 28*28*1280, CLIP mean/std).

    The PIL backend is preferred: its bicubic resize is the one the original Vamba release used.
    """
    image_processor_class = getattr(transformers, "Qwen2VLImageProcessorPil", None) or transformers.Qwen2VLImageProcessor
    return image_processor_class(**kwargs)


# ----------------------------------------------------------------------------------------------
# Frame sampling and video decoding


@dataclass
class VideoFrames:
    """Frames of one video (PIL images or HxWx3 uint8 arrays, all the same size) and where they came from."""

    frames: list
    timestamps: list = None  # seconds from the start of the stream, one per frame, when known
    frame_indices: list = None  # indices of the frames in the decoded stream, when known
    source_fps: float = None
    source_frame_count: int = None

    def metadata(self) -> dict:
        return {
            "timestamps": self.timestamps,
            "frame_indices": self.frame_indices,
            "source_fps": self.source_fps,
            "source_frame_count": self.source_frame_count,
            "num_frames": len(self.frames),
        }


def sample_frame_indices(total_frames: int, num_frames: int) -> list:
    """The middle frame of each of `num_frames` equal intervals of the video (the original release's sampling).

    A video shorter than `num_frames` gives each of its frames once (the original repeated the last one).
    """
    if total_frames < 1 or num_frames < 1:
        return []
    count = min(num_frames, total_frames)
    bounds = np.linspace(0, total_frames, count + 1).astype(int)
    return [int(start + end - 1) // 2 for start, end in zip(bounds[:-1], bounds[1:])]


def frame_count_for_fps(total_frames: int, source_fps: float, sample_fps: float, max_frames: int) -> int:
    """How many frames to sample at `sample_fps` from a video, capped at `max_frames`."""
    if not source_fps or source_fps <= 0:
        raise ValueError("sampling by fps needs the video's frame rate, which this video does not report; pass num_frames instead")
    duration = total_frames / source_fps
    return max(1, min(max_frames, math.ceil(duration * sample_fps)))


def resize_within_edges(image: PIL.Image.Image, shortest_edge, longest_edge) -> PIL.Image.Image:
    """The original release's frame resize: longest edge at most `longest_edge` (aspect kept), then each edge at least `shortest_edge`."""
    if shortest_edge is None and longest_edge is None:
        return image
    width, height = image.size
    aspect_ratio = width / height
    if longest_edge is not None:
        if width >= height and width > longest_edge:
            width, height = longest_edge, int(longest_edge / aspect_ratio)
        elif height > width and height > longest_edge:
            width, height = int(longest_edge * aspect_ratio), longest_edge
    if shortest_edge is not None:
        width, height = max(width, shortest_edge), max(height, shortest_edge)
    if (width, height) == image.size:
        return image
    return image.resize((width, height), resample=PIL.Image.BICUBIC)


def _is_url(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def _local_path(source) -> str:
    source = os.fspath(source)
    return source[len("file://"):] if source.startswith("file://") else source


def _check_readable_file(path: str, kind: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{kind} file not found: {path!r}. Check the path (relative paths start from {os.getcwd()!r}).")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a folder, not a {kind} file. Give the path of the {kind} file itself.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{kind} file {path!r} is empty (0 bytes). Re-download or re-export it.")


def _open_video(path: str):
    if av is None:
        raise ImportError("decoding video files needs PyAV: `pip install av` (or pass the frames yourself)")
    try:
        container = av.open(path, timeout=30.0) if _is_url(path) else av.open(path)
    except av.error.FFmpegError as error:
        raise ValueError(
            f"cannot read {path!r} as a video ({error}). The file is not a video, or it is truncated or corrupt; "
            "check that it plays, or re-encode it (e.g. `ffmpeg -i in -c:v libx264 out.mp4`)."
        ) from None
    if not container.streams.video:
        container.close()
        raise ValueError(f"{path!r} has no video stream (an audio-only or data file?). Give a video file.")
    return container


def _count_packets(path: str) -> int:
    """Frames in the first video stream, counted without decoding (one packet per frame)."""
    with _open_video(path) as container:
        count = 0
        try:
            for packet in container.demux(container.streams.video[0]):
                if packet.size:
                    count += 1
        except av.error.FFmpegError:
            pass
        return count


def _probe_video(path: str) -> tuple:
    """(frame count, frame rate) of the first video stream: the declared count, or else the packet count."""
    with _open_video(path) as container:
        stream = container.streams.video[0]
        declared = stream.frames
        source_fps = float(stream.average_rate) if stream.average_rate else None
    return (declared if declared > 0 else _count_packets(path)), source_fps


def _stream_start_seconds(stream) -> float:
    if stream.start_time is None or stream.time_base is None:
        return 0.0
    return float(stream.start_time * stream.time_base)


def _iter_decoded_frames(container, stream):
    """Decoded frames of `stream`, in order; undecodable packets are skipped, a broken container ends the stream."""
    consecutive_errors = 0
    try:
        for packet in container.demux(stream):
            try:
                frames = packet.decode()
            except av.error.FFmpegError:
                consecutive_errors += 1
                if consecutive_errors > MAX_CONSECUTIVE_DECODE_ERRORS:
                    return
                continue
            consecutive_errors = 0
            yield from frames
    except av.error.FFmpegError:
        return


def _progress_bar(total: int, progress, description: str):
    show = progress if progress is not None else total >= PROGRESS_BAR_MIN_FRAMES
    if not show or tqdm is None:
        return None
    return tqdm(total=total, unit="frame", desc=description, leave=False)


def _decode_sampled_frames(path, wanted_indices, shortest_edge, longest_edge, progress, frame_count_hint):
    """One sequential pass: keeps (and resizes at once) only the frames at `wanted_indices`.

    Returns the kept frames, their timestamps and indices, the stream's frame rate and the number
    of frames decoded in all.
    """
    wanted = sorted(set(wanted_indices))
    frames, timestamps, indices = [], [], []
    decoded = 0
    with _open_video(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        source_fps = float(stream.average_rate) if stream.average_rate else None
        start_seconds = _stream_start_seconds(stream)
        bar = _progress_bar(frame_count_hint, progress, f"decoding {os.path.basename(path)}")
        try:
            for frame in _iter_decoded_frames(container, stream):
                if len(indices) < len(wanted) and decoded == wanted[len(indices)]:
                    frames.append(resize_within_edges(frame.to_image(), shortest_edge, longest_edge))
                    if frame.time is not None:
                        timestamps.append(float(frame.time) - start_seconds)
                    elif source_fps:
                        timestamps.append(decoded / source_fps)
                    indices.append(decoded)
                decoded += 1
                if bar is not None:
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
    if len(timestamps) != len(frames):
        timestamps = None
    return frames, timestamps, indices, source_fps, decoded


def _plan_indices(frame_count, num_frames, fps, max_frames, source_fps) -> list:
    if fps is not None:
        num_frames = frame_count_for_fps(frame_count, source_fps, fps, max_frames)
    return sample_frame_indices(frame_count, min(num_frames, max_frames))


def load_video(
    source,
    num_frames: int = DEFAULT_NUM_FRAMES,
    fps: float = None,
    max_frames: int = DEFAULT_MAX_FRAMES,
    shortest_edge: int = DEFAULT_VIDEO_SHORTEST_EDGE,
    longest_edge: int = DEFAULT_VIDEO_LONGEST_EDGE,
    progress: bool = None,
) -> VideoFrames:
    """Decode a video file with PyAV and sample frames from it.

    By count (default): `num_frames` frames, the middle one of each of `num_frames` equal intervals.
    By rate: `fps` frames per second of video (the middle frame of each 1/fps interval), at most
    `max_frames`. Frames are decoded sequentially and only the sampled ones are kept, resized as
    they come so the longest edge is at most `longest_edge` and each edge at least `shortest_edge`
    (either None to skip). `progress`: a tqdm bar; None shows one for long videos only.

    Returns a `VideoFrames` with PIL frames, their timestamps (seconds) and frame indices.
    """
    path = os.fspath(source)
    if not _is_url(path):
        path = _local_path(path)
        _check_readable_file(path, "video")
    frame_count, source_fps = _probe_video(path)
    if frame_count == 0:
        raise ValueError(
            f"no frame of video {path!r} could be read: its video stream is empty, or the file is truncated or "
            "corrupt. Check that it plays, or re-encode it."
        )
    wanted = _plan_indices(frame_count, num_frames, fps, max_frames, source_fps)
    frames, timestamps, indices, source_fps, decoded = _decode_sampled_frames(
        path, wanted, shortest_edge, longest_edge, progress, frame_count
    )
    if decoded == 0:
        raise ValueError(f"no frame of {path!r} could be decoded: the video stream is empty or corrupt. Re-encode the video.")
    if decoded != frame_count:
        # The declared count was wrong (e.g. a truncated file): sample again over the frames that exist.
        wanted = _plan_indices(decoded, num_frames, fps, max_frames, source_fps)
        frames, timestamps, indices, source_fps, _ = _decode_sampled_frames(
            path, wanted, shortest_edge, longest_edge, progress, decoded
        )
    return VideoFrames(
        frames=frames,
        timestamps=timestamps,
        frame_indices=indices,
        source_fps=source_fps,
        source_frame_count=decoded,
    )


# ----------------------------------------------------------------------------------------------
# Turning what users have (paths, PIL images, arrays, tensors, qwen_vl_utils output) into frames


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        if array.dtype == torch.bfloat16:
            array = array.float()
        return array.numpy()
    return np.asarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating) and array.size and float(array.max()) <= 1.0:
        array = array * 255.0
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def _channels_last(array: np.ndarray, what: str) -> np.ndarray:
    """(..., H, W, C) from (..., H, W, C) or (..., C, H, W), with C in 1, 3 or 4; RGB out."""
    if array.shape[-1] not in (1, 3, 4):
        if array.shape[-3] not in (1, 3, 4):
            raise ValueError(f"{what} of shape {tuple(array.shape)}: expected channels (1, 3 or 4) first or last")
        array = np.moveaxis(array, -3, -1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array[..., :3]


def _check_image_size(width: int, height: int, what: str) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"{what} has zero size ({width}x{height}); give a non-empty image.")


def _image_from_array(array, what: str) -> np.ndarray:
    array = _to_numpy(array)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"{what} must be a 2-D or 3-D array (H, W[, C]) or (C, H, W), got shape {tuple(array.shape)}")
    array = _channels_last(array, what)
    _check_image_size(array.shape[1], array.shape[0], what)
    return np.ascontiguousarray(_to_uint8(array))


def _open_image_file(path: str) -> PIL.Image.Image:
    _check_readable_file(path, "image")
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"cannot read {path!r} as an image ({error}). Check that the file is a complete PNG/JPEG/... image.") from None


def load_image(source):
    """An RGB image (PIL image, or HxWx3 uint8 array for array input) from a path, URL, PIL image, array or tensor."""
    if isinstance(source, PIL.Image.Image):
        _check_image_size(*source.size, "image")
        return source.convert("RGB")
    if isinstance(source, (str, os.PathLike)):
        location = os.fspath(source)
        if _is_url(location) or location.startswith("data:"):
            from transformers.image_utils import load_image as load_image_from_url

            image = load_image_from_url(location, timeout=30.0)
        else:
            image = _open_image_file(_local_path(location))
        _check_image_size(*image.size, f"image {location!r}")
        return image.convert("RGB")
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return _image_from_array(source, "image")
    raise TypeError(f"cannot use a {type(source).__name__} as an image: give a path, URL, PIL image, array or tensor")


def _frames_from_array(array) -> list:
    array = _to_numpy(array)
    if array.ndim != 4:
        raise ValueError(f"a video array must have 4 dimensions (T, H, W, C) or (T, C, H, W), got shape {tuple(array.shape)}")
    array = _channels_last(array, "video")
    _check_image_size(array.shape[2], array.shape[1], "video frame")
    return list(_to_uint8(array))


def _is_single_frame(item) -> bool:
    return isinstance(item, PIL.Image.Image) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3))


def _timestamps_from_qwen_metadata(metadata: dict, num_frames: int):
    indices = metadata.get("frames_indices")
    fps = metadata.get("fps")
    if indices is None or not fps or len(indices) != num_frames:
        return None, None
    indices = [int(index) for index in _to_numpy(indices).reshape(-1)]
    return [index / float(fps) for index in indices], indices


def to_video_frames(video, **load_options) -> VideoFrames:
    """A `VideoFrames` from a path/URL (decoded with `load_video(**load_options)`), a `VideoFrames`, a
    (T,H,W,C)/(T,C,H,W) array or tensor, a list of frames (PIL images, arrays, or image paths), or a
    `qwen_vl_utils` `(video_tensor, metadata)` pair."""
    if isinstance(video, VideoFrames):
        return video
    if isinstance(video, (str, os.PathLike)):
        return load_video(video, **load_options)
    if isinstance(video, tuple) and len(video) == 2 and isinstance(video[1], dict):
        frames = _frames_from_array(video[0])
        timestamps, indices = _timestamps_from_qwen_metadata(video[1], len(frames))
        return VideoFrames(frames=frames, timestamps=timestamps, frame_indices=indices, source_fps=video[1].get("fps"))
    if isinstance(video, (np.ndarray, torch.Tensor)):
        return VideoFrames(frames=_frames_from_array(video))
    if isinstance(video, (list, tuple)):
        return VideoFrames(frames=[load_image(frame) for frame in video])
    raise TypeError(f"cannot use a {type(video).__name__} as a video: give a path, frames array/tensor, list of frames or VideoFrames")


def _frame_size(frame) -> tuple:
    return frame.size if isinstance(frame, PIL.Image.Image) else (frame.shape[1], frame.shape[0])


def _even_length(video: VideoFrames, temporal_patch_size: int) -> VideoFrames:
    """Drops trailing frames so the count divides the temporal patch (an odd count loses its last frame)."""
    if len(video.frames) < temporal_patch_size:
        raise ValueError(
            f"a video needs at least {temporal_patch_size} frames, this one has {len(video.frames)}. "
            "Give a longer video, sample more frames, or pass a single frame as an image."
        )
    keep = len(video.frames) - len(video.frames) % temporal_patch_size
    if keep == len(video.frames):
        return video
    return VideoFrames(
        frames=video.frames[:keep],
        timestamps=None if video.timestamps is None else video.timestamps[:keep],
        frame_indices=None if video.frame_indices is None else video.frame_indices[:keep],
        source_fps=video.source_fps,
        source_frame_count=video.source_frame_count,
    )


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _as_video_list(videos) -> list:
    """A list of videos; a list of single frames (PIL images or 2-D/3-D arrays) is one video."""
    if videos is None:
        return []
    if isinstance(videos, list) and videos and not _is_single_frame(videos[0]):
        return videos
    return [videos]


# ----------------------------------------------------------------------------------------------
# The processor


class VambaProcessor(ProcessorMixin):
    r"""Vamba's processor: Qwen2-VL's image processor (also used on video frames), a Qwen2 tokenizer and the
    Vamba chat template.

    Video sampling defaults (`num_frames`, `fps`, `max_frames`, `video_shortest_edge`,
    `video_longest_edge`) are saved with the processor and can be overridden per call or per
    message item. After each call, `last_video_metadata` lists each video's sampled timestamps and
    frame indices.
    """

    attributes = ["image_processor", "tokenizer"]

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template=None,
        num_frames: int = DEFAULT_NUM_FRAMES,
        fps: float = None,
        max_frames: int = DEFAULT_MAX_FRAMES,
        video_shortest_edge: int = DEFAULT_VIDEO_SHORTEST_EDGE,
        video_longest_edge: int = DEFAULT_VIDEO_LONGEST_EDGE,
    ):
        self.num_frames = num_frames
        self.fps = fps
        self.max_frames = max_frames
        self.video_shortest_edge = video_shortest_edge
        self.video_longest_edge = video_longest_edge
        self.last_video_metadata = []
        chat_template = chat_template or VAMBA_CHAT_TEMPLATE
        if tokenizer is not None:
            tokenizer.chat_template = chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        # The tokenizer and image processor are stock transformers classes: loading them never needs the folder's
        # remote code, so do not stop to ask about it (the model's config.json beside them declares some).
        kwargs.setdefault("trust_remote_code", False)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"]

    # -- plain call ---------------------------------------------------------------------------

    def __call__(
        self,
        images=None,
        text=None,
        videos=None,
        return_tensors=None,
        padding=True,
        num_frames: int = None,
        fps: float = None,
        max_frames: int = None,
        progress: bool = None,
        min_pixels: int = None,
        max_pixels: int = None,
    ) -> BatchFeature:
        """Tokenize `text` (one prompt or a list; each with at most one `<|vision_start|><|vision_end|>`) and
        process the images or videos that fill its placeholders, in order.

        Returns `input_ids`, `attention_mask` (left-padded) and `pixel_values` + `image_grid_thw` or
        `pixel_values_videos` + `video_grid_thw` when there are images or videos.
        """
        if text is None:
            raise ValueError("text is required: the prompt, with `<|vision_start|><|vision_end|>` where the image or video goes")
        texts = [text] if isinstance(text, str) else list(text)
        image_list, video_list = _as_list(images), _as_video_list(videos)
        self._check_placeholders(texts, len(image_list), len(video_list))

        encoding = self.tokenizer(texts, padding=padding, padding_side="left")
        data = {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}
        size = self._size_kwargs(min_pixels, max_pixels)
        if image_list:
            data.update(self._process_images(image_list, size))
        self.last_video_metadata = []
        if video_list:
            load_options = self._video_load_options(num_frames=num_frames, fps=fps, max_frames=max_frames, progress=progress)
            data.update(self._process_videos(video_list, load_options, size))
        return BatchFeature(data=data, tensor_type=return_tensors)

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

    def _size_kwargs(self, min_pixels, max_pixels) -> dict:
        """Image-processor kwargs for a per-call pixel budget (both bounds, the unset one from its config)."""
        if min_pixels is None and max_pixels is None:
            return {}
        size = dict(self.image_processor.size)
        if min_pixels is not None:
            size["shortest_edge"] = min_pixels
        if max_pixels is not None:
            size["longest_edge"] = max_pixels
        return {"size": size}

    def _process_images(self, images: list, size: dict) -> dict:
        images = [load_image(image) for image in images]
        output = self.image_processor(images=images, return_tensors="np", **size)
        return {"pixel_values": output["pixel_values"], "image_grid_thw": output["image_grid_thw"]}

    # -- videos ---------------------------------------------------------------------------------

    def _video_load_options(self, num_frames=None, fps=None, max_frames=None, progress=None) -> dict:
        return {
            "num_frames": self.num_frames if num_frames is None else num_frames,
            "fps": self.fps if fps is None else fps,
            "max_frames": self.max_frames if max_frames is None else max_frames,
            "shortest_edge": self.video_shortest_edge,
            "longest_edge": self.video_longest_edge,
            "progress": progress,
        }

    def _process_videos(self, videos: list, load_options: dict, size: dict) -> dict:
        temporal_patch_size = self.image_processor.temporal_patch_size
        patches, grids = [], []
        for video in videos:
            frames = _even_length(to_video_frames(video, **load_options), temporal_patch_size)
            video_patches, grid = self._video_patches(frames.frames, size)
            patches.append(video_patches)
            grids.append(grid)
            self.last_video_metadata.append(frames.metadata())
        return {"pixel_values_videos": np.concatenate(patches), "video_grid_thw": np.array(grids, dtype=np.int64)}

    def _video_patches(self, frames: list, size: dict) -> tuple:
        """Flattened patches `(t*h*w, C*tp*P*P)` and grid `(t, h, w)` of one video.

        Each frame goes through the image processor (resize, rescale, normalize, patchify) as an
        image, which repeats it over the temporal patch; consecutive frames are then interleaved on
        the temporal axis, giving the layout of Qwen2-VL's video processing.
        """
        first_size = _frame_size(frames[0])
        if any(_frame_size(frame) != first_size for frame in frames):
            raise ValueError("all frames of a video must have the same size; resize them to one size first")
        temporal_patch_size = self.image_processor.temporal_patch_size
        output, grid = None, None
        for start in range(0, len(frames), FRAMES_PER_CHUNK):
            chunk = frames[start:start + FRAMES_PER_CHUNK]
            processed = self.image_processor(images=chunk, return_tensors="np", **size)
            _, grid_h, grid_w = (int(n) for n in processed["image_grid_thw"][0])
            if output is None:
                grid = (len(frames) // temporal_patch_size, grid_h, grid_w)
                output = np.empty((grid[0] * grid_h * grid_w, processed["pixel_values"].shape[1]), dtype=np.float32)
            rows = self._interleave_frames(processed["pixel_values"], len(chunk), temporal_patch_size)
            first_row = start // temporal_patch_size * grid_h * grid_w
            output[first_row:first_row + len(rows)] = rows
        return output, grid

    @staticmethod
    def _interleave_frames(pixel_values: np.ndarray, num_frames: int, temporal_patch_size: int) -> np.ndarray:
        """Per-frame image patches `(F*hw, C*tp*P*P)`, each frame repeated over tp, to video patches `(F/tp*hw, C*tp*P*P)`."""
        patch_dim = pixel_values.shape[1]
        per_frame = pixel_values.reshape(num_frames, -1, 3, temporal_patch_size, patch_dim // (3 * temporal_patch_size))
        single = per_frame[:, :, :, 0, :]  # (F, hw, C, P*P): the frame once
        groups = single.reshape(num_frames // temporal_patch_size, temporal_patch_size, *single.shape[1:])
        return groups.transpose(0, 2, 3, 1, 4).reshape(-1, patch_dim)

    # -- chat template -----------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation,
        chat_template: str = None,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors=None,
        padding=True,
        num_frames: int = None,
        fps: float = None,
        max_frames: int = None,
        progress: bool = None,
        min_pixels: int = None,
        max_pixels: int = None,
        **template_kwargs,
    ):
        """Render one conversation (a list of messages) or a batch of them with the Vamba template.

        Messages use transformers' multimodal format: content items `{"type": "text", "text": ...}`,
        `{"type": "image", "image"|"path"|"url": ...}` and `{"type": "video", "video"|"path"|"url": ...}`
        (a video item may also set `num_frames`, `fps`, `max_frames`). At most one image or video
        per conversation.

        With `tokenize=False`, the prompt string(s). With `tokenize=True, return_dict=True`, a
        BatchFeature ready for `model.generate(**inputs)`; `tokenize=True` alone gives `input_ids`.
        """
        conversations, batched = self._as_conversations(conversation)
        template = chat_template or self.chat_template
        prompts = [
            self.tokenizer.apply_chat_template(
                messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False, **template_kwargs
            )
            for messages in conversations
        ]
        if not tokenize:
            return prompts if batched else prompts[0]

        call_options = self._video_load_options(num_frames=num_frames, fps=fps, max_frames=max_frames, progress=progress)
        images, videos = [], []
        for index, messages in enumerate(conversations):
            item = self._visual_item(messages, index)
            if item is None:
                continue
            if item["type"] == "image":
                images.append(self._item_source(item, "image", index))
            else:
                videos.append(self._load_video_item(item, index, call_options))
        inputs = self(
            text=prompts,
            images=images or None,
            videos=videos or None,
            return_tensors=return_tensors,
            padding=padding,
            min_pixels=min_pixels,
            max_pixels=max_pixels,
        )
        return inputs if return_dict else inputs["input_ids"]

    @staticmethod
    def _as_conversations(conversation) -> tuple:
        """(list of conversations, whether a batch was given)."""
        if conversation and isinstance(conversation[0], dict):
            return [list(conversation)], False
        return [list(messages) for messages in conversation], True

    @staticmethod
    def _visual_item(messages: list, index: int):
        items = [
            item
            for message in messages
            if not isinstance(message.get("content"), str)
            for item in message.get("content") or []
            if item.get("type") in ("image", "video")
        ]
        if len(items) > 1:
            raise ValueError(
                f"conversation {index} has {len(items)} images/videos; Vamba takes at most one per conversation. "
                "Split it into separate conversations."
            )
        return items[0] if items else None

    @staticmethod
    def _item_source(item: dict, kind: str, index: int):
        for key in (kind, "path", "url"):
            if item.get(key) is not None:
                return item[key]
        raise ValueError(f"the {kind} item of conversation {index} has no `{kind}`, `path` or `url`: {item!r}")

    def _load_video_item(self, item: dict, index: int, call_options: dict) -> VideoFrames:
        options = dict(call_options)
        options.update({key: item[key] for key in ("num_frames", "fps", "max_frames") if item.get(key) is not None})
        return to_video_frames(self._item_source(item, "video", index), **options)


VambaProcessor.register_for_auto_class("AutoProcessor")

if transformers.__version__.split(".")[0] == "4":
    # transformers 4.x finds sub-processor classes through these; 5.x reads the __init__ signature.
    VambaProcessor.image_processor_class = "AutoImageProcessor"
    VambaProcessor.tokenizer_class = "AutoTokenizer"
