"""CPU cost of the video input path: a 1-minute 640x360 H.264 file -> model inputs, against plain PyAV decoding.

    python benchmarks/bench_processor_cpu.py [--frames 512] [--runs 3] [--video FILE] [--decoder auto]
        [--decode-workers N] [--decode-in auto|threads|processes] [--decode-device cuda]
        [--decode-device-workers N] [--kinds pyav,processor]
        [--seconds 60 --fps 30 --preset veryfast --gop 250]

Writes the test file with PyAV when `--video` is not given (by default 30 fps, 1800 frames, libx264 veryfast),
then measures, each run in a fresh process so that peak RSS is its own:
- `pyav`: PyAV decodes every frame (threaded) and keeps the sampled ones as RGB arrays;
- `load_video`: `load_video(FILE, num_frames=N, decoder=..., decode_workers=..., decode_processes=...,
  decode_device=..., decode_device_workers=...)`, frames only (default resize; `--decode-device cuda` decodes on
  the GPU's NVDEC, with `--decode-device-workers N` in N of the workers and on the CPU in the others);
- `processor`: `VambaProcessor(text=..., videos=FILE, num_frames=N, return_tensors="pt")`, the default options
  (the original release's pixels) but for `--decoder` / `--decode-workers`.
Prints one JSON line: medians of the wall and CPU times, the largest peak RSS of each, their ratios, and the load
average when done (the ratio of CPU times is the steadier one on a shared machine).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_utils import DECODE_IN  # noqa: E402

WIDTH, HEIGHT = 640, 360
KINDS = ("pyav", "load_video", "processor")


def write_test_video(path: str, seconds: int = 60, fps: int = 30, preset: str = "veryfast", gop: int = 250) -> str:
    """Moving colour gradients with a little fixed noise, encoded like a phone clip (libx264, yuv420p)."""
    import av
    import numpy as np

    rows, columns = np.mgrid[0:HEIGHT, 0:WIDTH]
    noise = np.random.default_rng(0).integers(0, 12, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": preset, "crf": "23", "g": str(gop)}
        for index in range(fps * seconds):
            pixels = np.stack([(columns + 3 * index) % 256, (rows + 2 * index) % 256,
                               ((columns + rows) // 2 + index) % 256], axis=-1).astype(np.uint8)
            pixels += np.roll(noise, 7 * index, axis=1)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decode_with_pyav(path: str, frames: int) -> int:
    import av

    from vamba_hf.video_vamba import sample_frame_indices

    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        wanted = set(sample_frame_indices(stream.frames, frames))
        kept = [frame.to_ndarray(format="rgb24") for index, frame in enumerate(container.decode(stream))
                if index in wanted]
    return len(kept)


def load_with_vamba(path: str, frames: int, decoding: dict) -> int:
    from vamba_hf.video_vamba import load_video

    return len(load_video(path, num_frames=frames, max_frames=frames, **decoding).frames)


def process_with_vamba(path: str, frames: int, decoding: dict) -> int:
    from vamba_hf.tiny import build_tiny_processor

    processor = build_tiny_processor(num_frames=frames, max_frames=frames, **decoding)
    inputs = processor(text="<|vision_start|><|vision_end|>Describe the video.", videos=path, return_tensors="pt")
    return int(inputs["video_grid_thw"][0, 0]) * processor.image_processor.temporal_patch_size


def cpu_time() -> float:
    """CPU seconds of this process and of its ended children (the decoding processes, when there are any)."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def child(kind: str, path: str, frames: int, decoding: dict) -> None:
    import torch  # noqa: F401 - imported before the clock starts, as a user's process has it

    import vamba_hf.processing_vamba  # noqa: F401

    started, cpu_started = time.perf_counter(), cpu_time()
    if kind == "pyav":
        count = decode_with_pyav(path, frames)
    else:
        count = (load_with_vamba if kind == "load_video" else process_with_vamba)(path, frames, decoding)
    seconds, cpu_seconds = time.perf_counter() - started, cpu_time() - cpu_started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"kind": kind, "s": seconds, "cpu_s": cpu_seconds, "peak_rss_gb": peak_gb, "frames": count}))


def measure(kind: str, path: str, frames: int, decoding: dict) -> dict:
    command = [sys.executable, __file__, "--child", kind, "--video", path, "--frames", str(frames),
               "--decoder", decoding["decoder"]]
    if decoding["decode_workers"] is not None:
        command += ["--decode-workers", str(decoding["decode_workers"])]
    command += ["--decode-in", {value: name for name, value in DECODE_IN.items()}[decoding["decode_processes"]]]
    if decoding["decode_device"] is not None:
        command += ["--decode-device", decoding["decode_device"]]
    if decoding["decode_device_workers"] is not None:
        command += ["--decode-device-workers", str(decoding["decode_device_workers"])]
    run = subprocess.run(command, capture_output=True, text=True)
    if run.returncode:
        sys.exit(f"the {kind} run failed: {(run.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--video", help="an existing video file (default: write the 1-minute test file)")
    parser.add_argument("--decoder", choices=["auto", "sequential", "seek"], default="auto")
    parser.add_argument("--decode-workers", type=int, help="decoding threads (default: min(4, CPU count))")
    parser.add_argument("--decode-in", choices=sorted(DECODE_IN), default="auto",
                        help="seeking decodes in threads or in processes (VideoSampling.decode_processes)")
    parser.add_argument("--decode-device", help="decode on this GPU's NVDEC, e.g. cuda (VideoSampling.decode_device; "
                        "default: the CPU)")
    parser.add_argument("--decode-device-workers", type=int, help="with --decode-device, how many workers decode on "
                        "it (VideoSampling.decode_device_workers; default: all)")
    parser.add_argument("--kinds", default="pyav,processor", help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--seconds", type=int, default=60, help="length of the test file written")
    parser.add_argument("--fps", type=int, default=30, help="frame rate of the test file written")
    parser.add_argument("--preset", default="veryfast", help="libx264 preset of the test file written")
    parser.add_argument("--gop", type=int, default=250, help="keyframe interval of the test file written")
    parser.add_argument("--keep-video", help="write the test file here and keep it")
    parser.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    decoding = {"decoder": args.decoder, "decode_workers": args.decode_workers,
                "decode_processes": DECODE_IN[args.decode_in], "decode_device": args.decode_device,
                "decode_device_workers": args.decode_device_workers}
    if args.child:
        return child(args.child, args.video, args.frames, decoding)
    kinds = args.kinds.split(",")
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        parser.error(f"--kinds {','.join(unknown)}: give some of {', '.join(KINDS)}")
    with tempfile.TemporaryDirectory() as folder:
        path = args.video or write_test_video(args.keep_video or os.path.join(folder, "test_640x360.mp4"),
                                              args.seconds, args.fps, args.preset, args.gop)
        runs = {kind: [measure(kind, path, args.frames, decoding) for _ in range(args.runs)] for kind in kinds}
    result = {"frames": args.frames, "runs": args.runs, "cpus": os.cpu_count(), **decoding}
    for kind, measured in runs.items():
        assert all(run["frames"] == args.frames for run in measured), measured
        result[f"{kind}_s"] = round(statistics.median(run["s"] for run in measured), 3)
        result[f"{kind}_cpu_s"] = round(statistics.median(run["cpu_s"] for run in measured), 3)
        result[f"{kind}_peak_rss_gb"] = round(max(run["peak_rss_gb"] for run in measured), 3)
    for kind in kinds:
        if kind != "pyav" and "pyav" in kinds:
            result[f"{kind}_ratio"] = round(result[f"{kind}_s"] / result["pyav_s"], 2)
            result[f"{kind}_cpu_ratio"] = round(result[f"{kind}_cpu_s"] / result["pyav_cpu_s"], 2)
    result["load_average"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
