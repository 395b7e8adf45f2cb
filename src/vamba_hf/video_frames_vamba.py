"""Frames for Vamba's video decoders: the output size of a frame (the original release's edges, then the
processor's grid), a decoded frame turned as its display matrix says and resized with PIL, the memory-mapped buffer
the sampled frames are converted into, and the budget that bounds how many source-size frames are held at once.

Served as Hub remote code; imports only numpy, PIL and the standard library (decoding worker processes load it).
"""

import mmap
import os
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import PIL.Image

from .video_nvdec_vamba import in_system_memory


def edges_size(width: int, height: int, shortest_edge, longest_edge) -> tuple:
    """The original release's frame size: longest edge at most `longest_edge` (aspect kept), then each edge at least
    `shortest_edge`. A side never drops below 1 pixel."""
    aspect_ratio = width / height
    if longest_edge is not None:
        if width >= height and width > longest_edge:
            width, height = longest_edge, max(1, int(longest_edge / aspect_ratio))
        elif height > width and height > longest_edge:
            width, height = max(1, int(longest_edge * aspect_ratio)), longest_edge
    if shortest_edge is not None:
        width, height = max(width, shortest_edge), max(height, shortest_edge)
    return width, height


def resize_frame(frame: np.ndarray, size: tuple, resample=PIL.Image.BICUBIC) -> np.ndarray:
    """An HxWx3 uint8 frame resized to `size` (width, height) with PIL; unchanged when it already has that size."""
    if (frame.shape[1], frame.shape[0]) == tuple(size):
        return frame
    return np.asarray(PIL.Image.fromarray(frame).resize(tuple(size), resample=resample))


@dataclass(frozen=True)
class FrameResize:
    """The resizes each frame goes through: to `edges_size`, then to `final_size(width, height)` when given (the
    processor's patch grid), both with PIL."""

    shortest_edge: Optional[int] = None
    longest_edge: Optional[int] = None
    final_size: Optional[Callable] = None
    final_resample: int = PIL.Image.BICUBIC

    def output_size(self, width: int, height: int) -> tuple:
        size = edges_size(width, height, self.shortest_edge, self.longest_edge)
        return size if self.final_size is None else tuple(self.final_size(*size))

    def apply(self, image: PIL.Image.Image, output_size: tuple) -> np.ndarray:
        """The image, resized to its edges size and then to `output_size`, as an HxWx3 uint8 array."""
        size = edges_size(*image.size, self.shortest_edge, self.longest_edge)
        if size != image.size:
            image = image.resize(size, resample=PIL.Image.BICUBIC)
        if tuple(output_size) != image.size:
            image = image.resize(tuple(output_size), resample=self.final_resample)
        return np.asarray(image)


def check_frame_size(width: int, height: int, what: str) -> None:
    if width == 0 or height == 0:
        raise ValueError(f"{what} has zero size ({width}x{height}); give a non-empty image.")


def _quarter_turns(frame) -> int:
    """Counter-clockwise quarter turns the frame's display matrix asks for."""
    return round(getattr(frame, "rotation", 0) / 90) % 4


QUARTER_TURN_TRANSPOSES = {1: PIL.Image.Transpose.ROTATE_90, 2: PIL.Image.Transpose.ROTATE_180,
                           3: PIL.Image.Transpose.ROTATE_270}


def display_image(frame) -> PIL.Image.Image:
    """The frame (in system memory or not) as an RGB PIL image, turned as its display matrix says."""
    image = in_system_memory(frame).to_image()
    turns = _quarter_turns(frame)
    return image.transpose(QUARTER_TURN_TRANSPOSES[turns]) if turns else image


def display_size_of(frame) -> tuple:
    return (frame.height, frame.width) if _quarter_turns(frame) % 2 else (frame.width, frame.height)


class FrameBuffer:
    """Frames of one size in one anonymous memory map, whose pages are handed back to the system as the frames
    are used, first to last (so that patching a long video moves memory from frames to patches)."""

    def __init__(self, capacity: int, width: int, height: int):
        self.frame_bytes = width * height * 3
        size = max(1, capacity * self.frame_bytes)
        if hasattr(mmap, "MAP_ANONYMOUS"):  # private: handed-back pages are freed (a shared mapping keeps them)
            self.map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:
            self.map = mmap.mmap(-1, size)
        self.array = np.frombuffer(self.map, dtype=np.uint8, count=capacity * self.frame_bytes).reshape(
            capacity, height, width, 3)
        self.released = 0  # bytes, a multiple of the page size

    def release(self, count: int) -> None:
        end = count * self.frame_bytes // mmap.PAGESIZE * mmap.PAGESIZE
        if end > self.released and hasattr(mmap, "MADV_DONTNEED"):
            self.map.madvise(mmap.MADV_DONTNEED, self.released, end - self.released)
            self.released = end


def conversion_workers() -> int:
    return min(4, os.cpu_count() or 1)


# Bytes that source-size frames may take at once in decoded frames waiting for conversion, in conversions, in the
# decoders of seeking workers, and in a decoder's frame threads: frames up to 4K take as many as before (two per
# conversion thread, one decoder per worker, FFmpeg's thread count), larger ones fewer (a 16000x16000 frame one at
# a time), so that memory follows the output size rather than the source's.
SOURCE_FRAMES_BUDGET = 1 << 30
# A frame being converted: decoded (YUV 4:2:0, 1.5 bytes a pixel), in RGB (3) and as PIL's image (4 bytes a pixel).
CONVERTED_BYTES_PER_PIXEL = 9
# A decoded frame, as a frame thread holds it (4:2:0 at 16 bits or 4:4:4 at 8: 3 bytes a pixel).
DECODED_BYTES_PER_PIXEL = 3


def source_frames_allowed(display_size: tuple, most: int, bytes_per_pixel: int = CONVERTED_BYTES_PER_PIXEL) -> int:
    """How many source frames of `display_size` (width, height) may be held at once, from 1 to `most`."""
    frame_bytes = max(1, bytes_per_pixel * display_size[0] * display_size[1])
    return max(1, min(most, SOURCE_FRAMES_BUDGET // frame_bytes))


def convert_into(buffer: FrameBuffer, resize: FrameResize, frame, row: int) -> None:
    output = buffer.array[row]
    output[...] = resize.apply(display_image(frame), output.shape[1::-1])

