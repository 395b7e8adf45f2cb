"""Ask the same question about every video in a folder, a few videos per batch.

    python examples/batch_videos.py --model ./Vamba-Qwen2-VL-7B-hf --folder videos/ --batch-size 4

Videos of different lengths and sizes share a batch: their visual streams are padded and masked inside the model.
Without --model it runs the embedded demo model (tiny, random weights: meaningless answers); without --folder it
makes three sample clips.
"""

import argparse
import tempfile
from pathlib import Path

import torch

from vamba_hf.demo import write_demo_video
from vamba_hf.inference import DEMO_NOTE, build_messages, load_model_and_processor, new_text, prepare_inputs, printable

VIDEO_SUFFIXES = {".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v"}


def sample_folder(folder: Path) -> Path:
    for index, (frames, width) in enumerate([(24, 160), (48, 128), (36, 192)]):
        write_demo_video(folder / f"sample_{index}.mp4", num_frames=frames, width=width)
    return folder


def answer_batch(loaded, videos, prompt, frames, max_new_tokens):
    conversations = [build_messages(prompt, video=str(video)) for video in videos]
    inputs = prepare_inputs(loaded.processor, conversations, loaded.model.device, num_frames=frames)
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return new_text(loaded.processor, output, inputs)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="converted folder or Hub repo id (default: demo model)")
    parser.add_argument("--folder", default=None, help="folder of videos (default: three synthetic samples)")
    parser.add_argument("--prompt", default="Describe this video in one sentence.")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--frames", type=int, default=None, help="frames per video (default: the processor's)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()

    loaded = load_model_and_processor(args.model)
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(args.folder) if args.folder else sample_folder(Path(scratch))
        videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
        if not videos:
            raise SystemExit(f"no video files ({', '.join(sorted(VIDEO_SUFFIXES))}) in {folder}")
        for start in range(0, len(videos), args.batch_size):
            batch = videos[start:start + args.batch_size]
            for video, answer in zip(batch, answer_batch(loaded, batch, args.prompt, args.frames,
                                                         args.max_new_tokens)):
                print(f"{video.name}: {printable(answer)}")
    if loaded.is_demo:
        print(DEMO_NOTE)


if __name__ == "__main__":
    main()
