"""CPU cost of the video input path: a 1-minute 640x360 H.264 file -> model inputs, against plain PyAV decoding.

    python benchmarks/bench_processor_cpu.py [--frames 512] [--runs 3] [--video FILE]

Writes the test file with PyAV when `--video` is not given (30 fps, 1800 frames, libx264), then measures, each run
in a fresh process so that peak RSS is its own:
- `pyav`: PyAV decodes every frame (threaded) and keeps the sampled ones as RGB arrays;
- `processor`: `VambaProcessor(text=..., videos=FILE, num_frames=N, return_tensors="pt")`, the default options
  (the original release's pixels).
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

WIDTH, HEIGHT, FPS, SECONDS = 640, 360, 30, 60


def write_test_video(path: str) -> str:
    """Moving colour gradients with a little fixed noise, encoded like a phone clip (libx264, yuv420p)."""
    import av
    import numpy as np

    rows, columns = np.mgrid[0:HEIGHT, 0:WIDTH]
    noise = np.random.default_rng(0).integers(0, 12, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        for index in range(FPS * SECONDS):
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


def process_with_vamba(path: str, frames: int) -> int:
    from vamba_hf.tiny import build_tiny_processor

    processor = build_tiny_processor(num_frames=frames, max_frames=frames)
    inputs = processor(text="<|vision_start|><|vision_end|>Describe the video.", videos=path, return_tensors="pt")
    return int(inputs["video_grid_thw"][0, 0]) * processor.image_processor.temporal_patch_size


def child(kind: str, path: str, frames: int) -> None:
    import torch  # noqa: F401 - imported before the clock starts, as a user's process has it

    import vamba_hf.processing_vamba  # noqa: F401

    started, cpu_started = time.perf_counter(), time.process_time()
    count = (decode_with_pyav if kind == "pyav" else process_with_vamba)(path, frames)
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20
    print(json.dumps({"kind": kind, "s": seconds, "cpu_s": cpu_seconds, "peak_rss_gb": peak_gb, "frames": count}))


def measure(kind: str, path: str, frames: int) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", kind, "--video", path, "--frames", str(frames)],
                            capture_output=True, text=True, check=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=512)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--video", help="an existing video file (default: write the 1-minute test file)")
    parser.add_argument("--child", choices=["pyav", "processor"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.video, args.frames)
    with tempfile.TemporaryDirectory() as folder:
        path = args.video or write_test_video(os.path.join(folder, "one_minute_640x360.mp4"))
        runs = {kind: [measure(kind, path, args.frames) for _ in range(args.runs)] for kind in ("pyav", "processor")}
    result = {"frames": args.frames, "runs": args.runs, "cpus": os.cpu_count()}
    for kind, measured in runs.items():
        assert all(run["frames"] == args.frames for run in measured), measured
        result[f"{kind}_s"] = round(statistics.median(run["s"] for run in measured), 3)
        result[f"{kind}_cpu_s"] = round(statistics.median(run["cpu_s"] for run in measured), 3)
        result[f"{kind}_peak_rss_gb"] = round(max(run["peak_rss_gb"] for run in measured), 3)
    result["ratio"] = round(result["processor_s"] / result["pyav_s"], 2)
    result["cpu_ratio"] = round(result["processor_cpu_s"] / result["pyav_cpu_s"], 2)
    result["load_average"] = os.getloadavg()[0]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
