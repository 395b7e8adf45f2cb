"""Watch a video as it arrives and answer questions between chunks, encoding each frame once.

    python examples/streaming_video.py                                   # demo model, a synthetic camera
    python examples/streaming_video.py --model ./Vamba-Qwen2-VL-7B-hf --video recording.mp4 --fps 1

Frames come from a source as they are produced: a generator (by default a synthetic camera, `camera_frames`), or
a video file being written (`--video`), read in rounds from where the previous round ended (the processor's
`start_time`). Every `--chunk-frames` frames the video state grows by those frames only (`model.extend_video`:
the vision tower on the new frames, each Mamba-2 block continuing from its carried state), and each question is
answered from the state, with nothing re-encoded. Without --model it runs the embedded demo model (random
weights: its answers are meaningless).
"""

import argparse
import os
import time

from vamba_hf.chat import answer, video_pixels
from vamba_hf.demo import demo_frames
from vamba_hf.inference import DEMO_NOTE, load_model_and_processor, printable


def camera_frames(count: int = 48, frames_per_second: float = 12.0):
    """A synthetic camera: the demo clip's frames, one every 1/frames_per_second seconds."""
    for frame in demo_frames(count):
        time.sleep(1 / frames_per_second)
        yield frame


def chunks_of(frames, size: int):
    """Lists of `size` frames from the iterator `frames` as they arrive (the last, shorter one kept when even)."""
    chunk = []
    for frame in frames:
        chunk.append(frame)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk and len(chunk) % 2 == 0:
        yield chunk


def recorded_until(path: str) -> float:
    """Seconds of video in the file `path` so far (the end of its last video packet)."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        ends = [float((packet.pts + (packet.duration or 0)) * stream.time_base)
                for packet in container.demux(stream) if packet.pts is not None]
    return max(ends, default=0.0)


def file_rounds(processor, path: str, fps: float, device, idle_seconds: float, poll_seconds: float = 1.0):
    """(pixels, grid, metadata) of the frames written to `path` since the previous round, sampled at `fps`, until
    the file has not grown for `idle_seconds`."""
    start, idle_since = 0.0, time.monotonic()
    while time.monotonic() - idle_since < idle_seconds:
        if not os.path.isfile(path) or recorded_until(path) <= start + 2 / fps:  # not two new frames yet
            time.sleep(poll_seconds)
            continue
        pixels, grid, metadata = video_pixels(processor, path, device, fps=fps, start_time=start, progress=False)
        start, idle_since = metadata["end_time"], time.monotonic()
        yield pixels, grid, metadata


def generator_rounds(processor, frames, chunk_frames: int, device):
    """(pixels, grid, metadata) of each chunk of `chunk_frames` frames of the iterator `frames`."""
    for chunk in chunks_of(frames, chunk_frames):
        yield video_pixels(processor, chunk, device, num_frames=len(chunk), progress=False)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="converted folder or Hub repo id (default: demo model)")
    parser.add_argument("--video", default=None, help="a video file being written (default: a synthetic camera)")
    parser.add_argument("--fps", type=float, default=1.0, help="with --video: frames sampled per second")
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="with --video: stop when the file has not grown for this long")
    parser.add_argument("--chunk-frames", type=int, default=8, help="the camera's frames per extension (even)")
    parser.add_argument("--question", action="append", default=None,
                        help="asked after every chunk (repeatable; default: what happens now)")
    parser.add_argument("--max-new-tokens", type=int, default=24)
    args = parser.parse_args()
    if args.chunk_frames < 2 or args.chunk_frames % 2:
        parser.error(f"--chunk-frames {args.chunk_frames}: give an even count of 2 or more (frames enter the model "
                     f"two at a time)")
    questions = args.question or ["What is happening now?"]

    loaded = load_model_and_processor(args.model)
    model, processor = loaded.model, loaded.processor
    if args.video is None:
        rounds = generator_rounds(processor, camera_frames(), args.chunk_frames, model.device)
    else:
        rounds = file_rounds(processor, args.video, args.fps, model.device, args.idle_seconds)

    state = None
    for pixels, grid, metadata in rounds:
        started = time.perf_counter()
        if state is None:
            state = model.encode_video(pixels, grid, sampling=metadata)
        else:
            state = model.extend_video(state, pixels, grid, sampling=metadata)
        frames = 2 * int(state.grid_thw[0, 0])
        print(f"[+{2 * int(grid[0, 0])} frames in {time.perf_counter() - started:.2f} s: {frames} frames, "
              f"{state.length} visual tokens so far]")
        for question in questions:
            started = time.perf_counter()
            ids = answer(model, processor, state, question, args.max_new_tokens)
            text = processor.decode(ids, skip_special_tokens=True)
            print(f"  Q: {question}\n  A ({time.perf_counter() - started:.2f} s): {printable(text)}")
    if state is None:
        print("No frames arrived.")
    if loaded.is_demo:
        print(DEMO_NOTE)


if __name__ == "__main__":
    main()
