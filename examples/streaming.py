"""Stream an answer chunk by chunk while generation runs in a background thread (as a chat UI would).

    python examples/streaming.py --model ./Vamba-Qwen2-VL-7B-hf --video clip.mp4

Without --model it runs the embedded demo model (tiny, random weights: meaningless answers); without --video it
makes a sample clip.
"""

import argparse
import tempfile
import time
from threading import Thread

import torch
from transformers import TextIteratorStreamer

from vamba_hf.demo import write_demo_video
from vamba_hf.inference import DEMO_NOTE, build_messages, load_model_and_processor, prepare_inputs, printable


def stream_answer(loaded, inputs, max_new_tokens):
    """Yield the answer's text pieces as the model produces them."""
    streamer = TextIteratorStreamer(loaded.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)

    def generate():
        with torch.no_grad():
            loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)

    worker = Thread(target=generate)
    worker.start()
    yield from streamer
    worker.join()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="converted folder or Hub repo id (default: demo model)")
    parser.add_argument("--video", default=None, help="video file (default: a synthetic sample)")
    parser.add_argument("--prompt", default="Describe this video in detail.")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    loaded = load_model_and_processor(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        video = args.video or str(write_demo_video(f"{scratch}/sample.mp4"))
        inputs = prepare_inputs(loaded.processor, build_messages(args.prompt, video=video), loaded.model.device)
    started = time.perf_counter()
    first_piece_at = None
    for piece in stream_answer(loaded, inputs, args.max_new_tokens):
        if first_piece_at is None and piece:
            first_piece_at = time.perf_counter() - started
        print(printable(piece), end="", flush=True)
    print()
    if first_piece_at is not None:
        print(f"(first text after {first_piece_at:.2f} s, done after {time.perf_counter() - started:.2f} s)")
    if loaded.is_demo:
        print(DEMO_NOTE)


if __name__ == "__main__":
    main()
