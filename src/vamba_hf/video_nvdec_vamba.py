"""Decoding on a GPU's NVDEC (`decode_device`) for Vamba's video decoders: the CUDA context a container decodes in
(FFmpeg's hwaccel through PyAV) and the copy of a decoded frame to system memory. Both decoders (one pass and
seeking) open their containers through `open_on_device` when a device is given.

Served as Hub remote code; imports only the standard library (torch only when the caller already imported it).
"""

import contextlib
import errno
import sys


def open_on_device(av, location: str, device: str, options: dict):
    """The container of `location` decoding on `device` ("cuda" or "cuda:N") in the CUDA context FFmpeg can take;
    PyAV's and FFmpeg's errors are raised as they come."""
    if not hasattr(av.VideoFrame, "sw_format"):  # a hardware frame's layout, which `in_system_memory` reads
        raise RuntimeError(f"PyAV {av.__version__} is too old for it; `pip install -U av`")
    # FFmpeg takes the device's primary CUDA context only if it is inactive or was made with blocking sync.
    # torch makes it with other flags (a model on the GPU): FFmpeg then uses it as this thread's current one.
    if _torch_holds_cuda():
        with _torch_context_current(device):
            return _open_in_context(av, location, device, options, "current")
    try:
        return _open_in_context(av, location, device, options, "primary")
    except av.error.OSError as error:
        if error.errno != errno.EOPNOTSUPP:
            raise
        # Another library made the primary context with other flags: the container gets one of its own.
        return _open_in_context(av, location, device, options, "own")


# FFmpeg's cuda device options for each CUDA context a container can decode in (PyAV passes a HWAccel's options on;
# its `flags` it drops before PyAV 19, and it asks for the primary context itself unless told otherwise).
CUDA_CONTEXT_OPTIONS = {"primary": {"primary_ctx": "1"}, "current": {"primary_ctx": "0", "current_ctx": "1"},
                        "own": {"primary_ctx": "0"}}


def _torch_holds_cuda() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.cuda.is_initialized()


@contextlib.contextmanager
def _torch_context_current(device: str):
    """The device's primary context current in this thread while FFmpeg takes it; the thread's torch device is
    restored after."""
    import torch

    with torch.cuda.device(int(device.partition(":")[2] or 0)):
        torch.cuda.mem_get_info()  # a runtime call, which makes the primary context current in this thread
        yield


def _open_in_context(av, location: str, device: str, options: dict, context: str):
    # Frames stay in GPU memory (is_hw_owned): only the sampled ones are copied out, by `in_system_memory`.
    hwaccel = av.codec.hwaccel.HWAccel("cuda", device=device.partition(":")[2] or None, allow_software_fallback=False,
                                       is_hw_owned=True, options=dict(CUDA_CONTEXT_OPTIONS[context]))
    return av.open(location, hwaccel=hwaccel, **options)


def device_error(device: str, location: str, reason) -> RuntimeError:
    return RuntimeError(f"decode_device={device!r} cannot decode {location!r} ({reason}): decoding on the GPU needs "
                        "an NVIDIA driver with NVDEC, a PyAV whose FFmpeg has the cuda device, and a codec NVDEC "
                        "decodes (H.264, HEVC, VP9, AV1). Decode on the CPU: decode_device=None.")


def in_system_memory(frame):
    """A hardware (NVDEC) frame copied to system memory; other frames as they are. NVDEC's 8-bit 4:2:0 frames (all
    of its H.264) come as NV12, the software decoder's yuv420p samples interleaved: FFmpeg deinterleaves them, so
    their RGB is the CPU decoder's bit for bit. Other layouts are copied as NVDEC gives them."""
    if frame.format.name != "cuda":
        return frame
    layout = frame.sw_format.name
    return frame.reformat(format="yuv420p" if layout == "nv12" else layout)


