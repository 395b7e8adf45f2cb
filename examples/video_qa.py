"""Ask a question about a video.

    python examples/video_qa.py --model ./Vamba-Qwen2-VL-7B-hf --video clip.mp4 --prompt "What happens?"

Without --model it runs the embedded demo model (tiny, random weights: meaningless answers); without --video it
makes a sample clip.
"""

import argparse
import tempfile

import torch

from vamba_hf.demo import write_demo_video
from vamba_hf.inference import DEMO_NOTE, build_messages, load_model_and_processor, new_text, prepare_inputs, printable


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="converted folder or Hub repo id (default: demo model)")
    parser.add_argument("--video", default=None, help="video file (default: a synthetic sample)")
    parser.add_argument("--prompt", default="What happens in this video?")
    parser.add_argument("--frames", type=int, default=None, help="frames to sample (default: the processor's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    loaded = load_model_and_processor(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        video = args.video or str(write_demo_video(f"{scratch}/sample.mp4"))
        inputs = prepare_inputs(loaded.processor, build_messages(args.prompt, video=video), loaded.model.device,
                                num_frames=args.frames)
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"Q: {args.prompt}")
    print(f"A: {printable(new_text(loaded.processor, output, inputs)[0])}")
    if loaded.is_demo:
        print(DEMO_NOTE)


if __name__ == "__main__":
    main()
