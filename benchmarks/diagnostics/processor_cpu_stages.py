"""Where the CPU processor's time goes: 512 frames of the 1-minute 640x360 H.264 file of bench_processor_cpu.py
(24 fps, GOP 250, x264 ultrafast), each stage alone in this process, wall and CPU seconds (all threads), medians of
3 after a warm-up:
- `pyav`: PyAV decodes every frame (threaded) and keeps the sampled ones as RGB arrays (the target's baseline);
- `decode`: `load_video` without a resize (decode, RGB conversion of the sampled frames);
- `decode_and_resize`: `load_video` as the processor calls it (PIL bicubic to the 644x364 grid in its threads);
- `resize`: PIL bicubic of the 512 decoded frames to the grid alone (`resize_frames`, a thread per CPU);
- `patches`: the grid-sized uint8 frames -> the float32 normalised patches (`video_patches_into`, 1.44 GB);
- `processor`: the whole call, `processor(text=..., videos=FILE)`.
Run on the CPU machine: PYTHONPATH=src:benchmarks python benchmarks/diagnostics/processor_cpu_stages.py"""
import json, os, statistics, sys, tempfile, time
import torch
import bench_processor_cpu
from vamba_hf.video_processing_vamba import load_item, patch_rows, resize_frames, video_patches_into
from vamba_hf.tiny import build_tiny_processor
from vamba_hf.video_vamba import load_video

FRAMES = int(sys.argv[1]) if len(sys.argv) > 1 else 512


def timed(fn, runs=3):
    fn()
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"s": round(statistics.median(walls), 3), "cpu_s": round(statistics.median(cpus), 3)}


with tempfile.TemporaryDirectory() as folder:
    path = bench_processor_cpu.write_test_video(os.path.join(folder, "test_640x360.mp4"), 60, 24, "ultrafast", 250)
    processor = build_tiny_processor(num_frames=FRAMES, max_frames=FRAMES)
    sampling, layout, resize = processor.vamba_video_processor.settings({"progress": False})
    plain = sampling.with_options(video_shortest_edge=None, video_longest_edge=None)
    decoded = load_video(path, plain).frames
    at_grid = load_item(path, sampling, resize).frames
    width, height = layout.patched_size(at_grid)
    record = {"frames": FRAMES, "cpus": os.cpu_count(), "source": list(decoded[0].shape), "grid": [height, width]}
    output = torch.empty((patch_rows(at_grid, layout), layout.patch_dim), dtype=torch.float32)
    stages = {
        "pyav": lambda: bench_processor_cpu.decode_with_pyav(path, FRAMES),
        "decode": lambda: load_video(path, plain),
        "decode_and_resize": lambda: load_item(path, sampling, resize),
        "resize": lambda: resize_frames(decoded, (width, height), layout.resample),
        "patches_into_a_reused_output": lambda: video_patches_into(output, at_grid, layout),
        "patches": lambda: video_patches_into(torch.empty_like(output), at_grid, layout),
        "processor": lambda: processor(text="<|vision_start|><|vision_end|>Describe the video.", videos=path,
                                       return_tensors="pt", progress=False),
    }
    for name, stage in stages.items():
        record[name] = timed(stage)
        print(name, record[name], file=sys.stderr, flush=True)
print(json.dumps(record))
