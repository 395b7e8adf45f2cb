"""PIL's resize, bit for bit, in torch: PIL's fixed-point weights and integer sums, one pass per axis in PIL's order,
on any device (the video processor's `frame_resize="torch"`). tests/test_processor_resize.py checks the bytes for
every filter PIL resizes with, on sizes up and down.

Served as Hub remote code, so it imports only numpy, PIL, torch and the standard library.
"""

import functools
import math
import typing

import numpy as np
import PIL.Image
import torch

__all__ = ["PIL_FILTERS", "PIL_FILTER_NAMES", "pil_axis_weights", "pil_pass_order", "resized_as_pil",
           "torch_resizes_as_pil"]


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
