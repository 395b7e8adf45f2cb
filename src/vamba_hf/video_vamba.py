"""Video (and image file) input for Vamba: frames users already have (`VideoFrames`), and video files sampled and
decoded through `video_decode_vamba.decode`: `load_video` for all the frames at once, `stream_video` for the first
ones while later ones still decode. Which frames are sampled is set by `VideoSampling` (`video_sampling_vamba`).

Served as Hub remote code beside `processing_vamba.py`, so it imports only numpy, PIL, torch, transformers and the
standard library at top level; PyAV and tqdm are imported where they are used.
"""

import os
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import PIL.Image
import torch
from transformers.image_utils import ChannelDimension, infer_channel_dimension_format

from .video_container_vamba import load_image
from .video_decode_vamba import BackgroundDecode, SampledVideoMetadata, decode, start_decode
from .video_frames_vamba import FrameResize, check_frame_size
from .video_sampling_vamba import VideoSampling, sample_frame_indices
from .video_seek_vamba import IndexMismatch

__all__ = ["FrameResize", "FrameStream", "VideoFrames", "VideoSampling", "frame_array", "frames_list",
           "is_single_frame", "load_video", "sample_frame_indices", "stream_video", "to_video_frames"]


@dataclass
class VideoFrames:
    """Frames of one video, a list of HxWx3 uint8 arrays of one size (given as such, as a 4-D array or tensor, or as
    a list of PIL images or arrays), and where they came from."""

    frames: list
    timestamps: Optional[list] = None  # seconds from the start of the stream, one per frame, when known
    frame_indices: Optional[list] = None  # indices of the frames in the decoded stream, when known
    source_fps: Optional[float] = None
    source_frame_count: Optional[int] = None
    # The part of the stream sampled, in seconds: a growing file's next call starts at `end_time`.
    start_time: float = 0.0
    end_time: Optional[float] = None
    # For frames decoded into a `FrameBuffer`: `release(n)` hands back the memory of the first n frames.
    release: Optional[Callable] = field(default=None, repr=False, compare=False)

    def __post_init__(self):
        self.frames = frames_list(self.frames)

    @classmethod
    def from_decoded(cls, frames: list, metadata: SampledVideoMetadata) -> "VideoFrames":
        """The frames `decode` gives, with their metadata."""
        return cls(frames, metadata.timestamps, release=metadata.release, **_stream_fields(metadata))

    def metadata(self) -> dict:
        return {
            "timestamps": self.timestamps,
            "frame_indices": self.frame_indices,
            "source_fps": self.source_fps,
            "source_frame_count": self.source_frame_count,
            "num_frames": len(self.frames),
            "start_time": self.start_time,
            "end_time": self.end_time,
        }

    def first(self, count: int) -> "VideoFrames":
        if count == len(self.frames):
            return self
        cut = (lambda values: None if values is None else values[:count])
        return VideoFrames(self.frames[:count], cut(self.timestamps), cut(self.frame_indices), self.source_fps,
                           self.source_frame_count, self.start_time, self.end_time, self.release)


def _stream_fields(metadata: SampledVideoMetadata) -> dict:
    """The `VideoFrames` fields (but the frames, their timestamps and `release`) of decoded frames' metadata."""
    return dict(frame_indices=metadata.frames_indices, source_fps=metadata.fps,
                source_frame_count=metadata.total_num_frames, start_time=metadata.start_time,
                end_time=metadata.end_time)


def _to_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        return (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    return np.asarray(array)


def _to_uint8(array: np.ndarray) -> np.ndarray:
    """uint8 as is; floats in [0, 1] are scaled to 0..255; other values are rounded and clipped."""
    if array.dtype == np.uint8:
        return array
    if np.issubdtype(array.dtype, np.floating) and array.size and float(array.max()) <= 1.0:
        array = array * 255.0
    return np.clip(np.round(array), 0, 255).astype(np.uint8)


def _rgb_channels_last(array: np.ndarray, what: str) -> np.ndarray:
    """(..., H, W, 3) from 2-D/3-D frames or 4-D videos, channels (1, 3 or 4) first or last."""
    try:
        layout = infer_channel_dimension_format(array, num_channels=(1, 3, 4))
    except ValueError:
        raise ValueError(f"{what} of shape {tuple(array.shape)}: expected channels (1, 3 or 4) first or last") from None
    if layout == ChannelDimension.FIRST:
        array = np.moveaxis(array, -3, -1)
    if array.shape[-1] == 1:
        array = np.repeat(array, 3, axis=-1)
    return array[..., :3]


def frame_array(frame, what: str = "frame") -> np.ndarray:
    """An HxWx3 uint8 array from a PIL image, a 2-D/3-D array or tensor, or an image path or URL."""
    if isinstance(frame, (str, os.PathLike)):
        frame = load_image(frame)
    if isinstance(frame, PIL.Image.Image):
        check_frame_size(*frame.size, what)
        return np.asarray(frame.convert("RGB"))
    if not isinstance(frame, (np.ndarray, torch.Tensor)):
        raise TypeError(f"cannot use a {type(frame).__name__} as a {what}: give a PIL image, array, tensor or path")
    array = _to_numpy(frame)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"{what} must be a 2-D or 3-D array (H, W[, C]) or (C, H, W), got shape {tuple(array.shape)}")
    array = _rgb_channels_last(array, what)
    check_frame_size(array.shape[1], array.shape[0], what)
    return np.ascontiguousarray(_to_uint8(array))


def _is_frame_array(frame) -> bool:
    return isinstance(frame, np.ndarray) and frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[2] == 3 \
        and frame.flags.c_contiguous


def frames_list(frames) -> list:
    """HxWx3 uint8 arrays of one size from a 4-D array/tensor (channels first or last) or a list of frames."""
    if isinstance(frames, (np.ndarray, torch.Tensor)):
        array = _to_numpy(frames)
        if array.ndim != 4:
            raise ValueError(f"a video array must have 4 dimensions (T, H, W, C) or (T, C, H, W), "
                             f"got shape {tuple(array.shape)}")
        array = _rgb_channels_last(array, "video")
        check_frame_size(array.shape[2], array.shape[1], "video frame")
        return list(np.ascontiguousarray(_to_uint8(array)))
    if not isinstance(frames, (list, tuple)):
        raise TypeError(f"cannot use a {type(frames).__name__} as video frames: give an array, tensor or list")
    if not frames:
        raise ValueError("a video has no frames: give at least 2 frames.")
    arrays = [frame if _is_frame_array(frame) else frame_array(frame, f"frame {index} of the video")
              for index, frame in enumerate(frames)]
    if any(array.shape != arrays[0].shape for array in arrays):
        raise ValueError("all frames of a video must have the same size; resize them to one size first")
    return arrays


def is_single_frame(item) -> bool:
    return isinstance(item, PIL.Image.Image) or (isinstance(item, (np.ndarray, torch.Tensor)) and item.ndim in (2, 3))


def _frames_from_qwen_vl_utils(video, metadata: dict) -> VideoFrames:
    """qwen_vl_utils' `(video_tensor, {"fps": ..., "frames_indices": ...})`."""
    frames = frames_list(video)
    indices, fps = metadata.get("frames_indices"), metadata.get("fps")
    if indices is None or not fps or len(indices) != len(frames):
        return VideoFrames(frames, source_fps=fps)
    indices = [int(index) for index in _to_numpy(indices).reshape(-1)]
    return VideoFrames(frames, [index / float(fps) for index in indices], indices, float(fps))


def to_video_frames(video, sampling: "VideoSampling" = None, resize: FrameResize = None) -> VideoFrames:
    """A `VideoFrames` from a path/URL (decoded with `load_video`), a `VideoFrames`, a (T,H,W,C)/(T,C,H,W) array
    or tensor, a list of frames (PIL images, arrays, or image paths), or a `qwen_vl_utils` `(video, metadata)`."""
    if isinstance(video, VideoFrames):
        return video
    if isinstance(video, (str, os.PathLike)):
        return load_video(video, sampling, resize=resize)
    if isinstance(video, tuple) and len(video) == 2 and isinstance(video[1], dict):
        return _frames_from_qwen_vl_utils(*video)
    if isinstance(video, (np.ndarray, torch.Tensor, list, tuple)):
        return VideoFrames(frames_list(video))
    raise TypeError(f"cannot use a {type(video).__name__} as a video: give a path, frames array/tensor, list of "
                    "frames or VideoFrames")


def load_video(source, sampling: VideoSampling = None, resize: FrameResize = None, **options) -> VideoFrames:
    """Decode a video file or URL with PyAV and sample frames from it (see `VideoSampling` for how; `options` set
    `VideoSampling` options for this call, None included). The container is opened once.

    Frames are resized as they are decoded: by `resize` when given, else to the sampling's edges.
    Returns a `VideoFrames` with HxWx3 uint8 frames, their timestamps (seconds) and frame indices.
    """
    return VideoFrames.from_decoded(*decode(source, (sampling or VideoSampling()).with_options(**options), resize))


class FrameStream:
    """The sampled frames of one video as its decoding workers write them, first to last: `frames(n)` waits for
    the first n. Made by `stream_video`; `video()` waits for all and gives the `VideoFrames`. A file whose frames
    turn out not to match its packet index is decoded again in one pass (as `load_video` does); frames already
    handed out must then be the same ones, else the stream raises."""

    def __init__(self, video: Optional[VideoFrames], count: int, facts: dict = None, writer=None, decoder=None,
                 one_pass: Callable = None):
        # Decoded here (`video`), or decoding: `facts` are the VideoFrames fields known before the frames.
        self._video, self.count, self._facts = video, count, facts
        self._writer, self._decoder, self._one_pass = writer, decoder, one_pass
        self._handed_out = 0

    @classmethod
    def of(cls, video: VideoFrames) -> "FrameStream":
        """A stream of frames that are all there already."""
        return cls(video, len(video.frames))

    def frames(self, count: int) -> list:
        """The first `count` frames (at most `count`), once they are decoded."""
        count = min(count, self.count)
        if self._writer is not None:
            try:
                self._writer.wait_rows(count)
            except IndexMismatch:
                self._decode_in_one_pass()
        if self._writer is not None:
            frames = list(self._writer.buffer.array[:count]) if count else []
        else:
            frames = self._video.frames[:count]
        self._handed_out = max(self._handed_out, count)
        return frames

    def metadata(self, start: int, end: int) -> dict:
        """The processor's `video_metadata` of frames [start, end) (decoded already: call `frames(end)` first)."""
        if self._writer is None:
            video = self._video
            times, indices = video.timestamps, video.frame_indices
            facts = dict(source_fps=video.source_fps, source_frame_count=video.source_frame_count,
                         start_time=video.start_time, end_time=video.end_time)
        else:
            times, indices = self._writer.times, self._facts["frame_indices"]
            facts = {name: value for name, value in self._facts.items() if name != "frame_indices"}
        return {"timestamps": None if times is None else list(times[start:end]),
                "frame_indices": None if indices is None else list(indices[start:end]), **facts,
                "num_frames": end - start}

    def _decode_in_one_pass(self) -> None:
        self._decoder.cancel()
        self._writer.wait_closed()
        video = self._one_pass()
        if video.frame_indices[: self._handed_out] != self._facts["frame_indices"][: self._handed_out]:
            raise ValueError(f"{self._handed_out} frames of this video were handed out before its packet index "
                             "turned out wrong, and decoding it in one pass samples other frames: load it with "
                             "decoder='sequential'.")
        self._video, self.count, self._writer, self._decoder = video, len(video.frames), None, None

    def release(self, count: int) -> None:
        """Hand back the memory of the first `count` frames (for frames decoded into a `FrameBuffer`)."""
        if self._writer is not None:
            self._writer.buffer.release(count)
        elif self._video.release is not None:
            self._video.release(count)

    def video(self) -> VideoFrames:
        """All the frames, with their timestamps and indices (waits for the decoding workers)."""
        frames = self.frames(self.count)
        if self._writer is None:
            return self._video
        self._writer.wait_closed()
        return VideoFrames(frames, list(self._writer.times[: self.count]), release=self._writer.buffer.release,
                           **self._facts)

    def close(self) -> None:
        """Stop decoding (frames already handed out stay valid)."""
        if self._decoder is not None:
            self._decoder.cancel()
            self._writer.wait_closed()

    def __enter__(self) -> "FrameStream":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def stream_video(source, sampling: VideoSampling = None, resize: FrameResize = None, **options) -> FrameStream:
    """`load_video`, returning as soon as the frames to sample are planned: the frames decode in background workers
    (seeking, for local files with a usable packet index) while the caller uses the first ones. Other sources are
    decoded before this returns. The frames are those `load_video` gives, bit for bit."""
    sampling = (sampling or VideoSampling()).with_options(**options)
    started = start_decode(source, sampling, resize)
    if not isinstance(started, BackgroundDecode):
        return FrameStream.of(VideoFrames.from_decoded(*started))
    return FrameStream(None, started.count, _stream_fields(started.metadata), started.writer, started.decoder,
                       lambda: load_video(source, sampling, resize, decoder="sequential"))
