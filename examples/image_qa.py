"""Ask a question about an image.

    python examples/image_qa.py --model ./Vamba-Qwen2-VL-7B-hf --image photo.jpg --prompt "What is in the picture?"

Without --model it runs the embedded demo model (tiny, random weights: meaningless answers); without --image it
draws a sample picture.
"""

import argparse

import torch
from PIL import Image, ImageDraw

from vamba_hf.inference import DEMO_NOTE, build_messages, load_model_and_processor, new_text, prepare_inputs, printable


def sample_image() -> Image.Image:
    image = Image.new("RGB", (320, 240), (235, 235, 220))
    draw = ImageDraw.Draw(image)
    draw.ellipse((40, 60, 160, 180), fill=(220, 40, 40))
    draw.rectangle((190, 80, 290, 180), fill=(40, 80, 220))
    return image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="converted folder or Hub repo id (default: demo model)")
    parser.add_argument("--image", default=None, help="image file (default: a drawn sample)")
    parser.add_argument("--prompt", default="What shapes are in this image?")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    loaded = load_model_and_processor(args.model)
    image = args.image or sample_image()
    inputs = prepare_inputs(loaded.processor, build_messages(args.prompt, image=image), loaded.model.device)
    with torch.no_grad():
        output = loaded.model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(f"Q: {args.prompt}")
    print(f"A: {printable(new_text(loaded.processor, output, inputs)[0])}")
    if loaded.is_demo:
        print(DEMO_NOTE)


if __name__ == "__main__":
    main()
