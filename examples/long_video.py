"""Ask several questions about a long video file, encoded once while it decodes.

    python examples/long_video.py --model ./Vamba-Qwen2-VL-7B-hf --video lecture.mp4 --frames 1024

The file's sampled frames decode in background workers (threads, or processes for long decodes);
`processor.video_chunks` hands out their inputs a chunk at a time and `model.encode_video_chunks` encodes each chunk
on the model's device while the next ones decode, into one video state. Every question is then answered from the state
(its first token costs the question's prefill only).
Without --model it runs the embedded demo model (tiny, random weights: meaningless answers); without --video it makes
a sample clip.
"""

import argparse
import tempfile
import time

import torch

from vamba_hf.chat import answer
from vamba_hf.demo import write_demo_video
from vamba_hf.inference import DEMO_NOTE, load_model_and_processor, printable

QUESTIONS = ("What happens in this video?", "What is shown at the end?")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="converted folder or Hub repo id (default: demo model)")
    parser.add_argument("--video", default=None, help="video file (default: a synthetic sample)")
    parser.add_argument("--frames", type=int, default=64, help="frames to sample (e.g. 1024 for an hour)")
    parser.add_argument("--chunk-frames", type=int, default=32, help="frames per chunk (even; e.g. 128)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args()

    loaded = load_model_and_processor(args.model)
    model, processor = loaded.model, loaded.processor
    with tempfile.TemporaryDirectory() as scratch, torch.no_grad():
        video = args.video or str(write_demo_video(f"{scratch}/sample.mp4", num_frames=128))
        started = time.perf_counter()
        chunks = processor.video_chunks(video, chunk_frames=args.chunk_frames, num_frames=args.frames,
                                        max_frames=max(args.frames, processor.video_sampling.max_frames),
                                        device=model.device)
        state = model.encode_video_chunks(chunks)
        print(f"Encoded {state.grid_thw[0, 0].item() * 2} frames while decoding them, in "
              f"{time.perf_counter() - started:.2f} s ({len(state.sampling)} chunks, {state.length} visual tokens)")
        for question in QUESTIONS:
            ids = answer(model, processor, state, question, args.max_new_tokens)
            print(f"Q: {question}")
            print(f"A: {printable(processor.decode(ids, skip_special_tokens=True))}")
    if loaded.is_demo:
        print(DEMO_NOTE)


if __name__ == "__main__":
    main()
