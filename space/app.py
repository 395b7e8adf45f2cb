"""A Gradio demo of Vamba for a Hugging Face Space: upload a video or an image, ask a question, watch the answer
stream in.

The model is `$VAMBA_MODEL` (a converted Hub repo id or folder) when set, else the embedded demo model (tiny, random
weights, built in seconds on the CPU: its answers are gibberish, it shows the app working). `$VAMBA_FRAMES_MAX` caps
the frames slider (default 128, the original demo's count). `$VAMBA_QUANTIZE` loads the weights quantized (int8,
int4, float8, bnb-int8 or bnb-nf4: `vamba-hf generate --help` says what each is and where it runs), e.g. int8 to fit
the 7B model with a long video on a 24 GB GPU.

    VAMBA_MODEL=your-name/Vamba-Qwen2-VL-7B-hf python space/app.py
"""

import os
import re
import sys
from threading import Thread

import gradio as gr
import torch
from transformers import TextIteratorStreamer

try:
    from vamba_hf.chat import MAX_QUESTION_CHARS, check_question
    from vamba_hf.inference import build_messages, load_model_and_processor, prepare_inputs, printable
    from vamba_hf.quantization import QUANTIZATIONS
except ImportError as error:
    sys.exit(f"app.py needs the vamba_hf package ({error}): in a clone, `pip install -e '.[video]'`; in a Space, copy "
             f"src/vamba_hf next to app.py (see space/README.md).")

MODEL_VARIABLE = "VAMBA_MODEL"
FRAMES_MAX_VARIABLE = "VAMBA_FRAMES_MAX"
QUANTIZE_VARIABLE = "VAMBA_QUANTIZE"
MAX_NEW_TOKENS = 256
DEMO_WARNING = ("**Demo model:** no checkpoint is configured (set `VAMBA_MODEL` to a converted Hub repo id), so this "
                "runs a tiny Vamba with **random weights**: the answers are gibberish by design; they show the path "
                "video -> frames -> answer working.")


def load(model_name):
    loaded = load_model_and_processor(model_name, quantization=quantization_setting())
    return loaded, loaded.processor.video_sampling.num_frames


def quantization_setting():
    """The quantization `$VAMBA_QUANTIZE` names, None when it is unset or empty."""
    text = os.environ.get(QUANTIZE_VARIABLE, "").strip()
    if text and text not in QUANTIZATIONS:
        raise ValueError(f"{QUANTIZE_VARIABLE}={text!r}: give one of {', '.join(QUANTIZATIONS)}, or leave it unset.")
    return text or None


def frames_cap() -> int:
    text = os.environ.get(FRAMES_MAX_VARIABLE, "128")
    if not text.isdigit() or int(text) < 2:
        raise ValueError(f"{FRAMES_MAX_VARIABLE}={text!r}: give a whole number of frames, 2 or more.")
    return int(text)


def start_generation(loaded, inputs, max_new_tokens: int) -> TextIteratorStreamer:
    """`generate` in a background thread; the returned streamer yields the answer's text as it is produced."""
    streamer = TextIteratorStreamer(loaded.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)

    def generate():
        with torch.inference_mode():
            loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer)

    Thread(target=generate, daemon=True).start()
    return streamer


# A path on the server (the uploads' temporary folders, the app's working folder): the user sees its last part only.
SERVER_PATH = re.compile(r"(?:/[^/\s'\"]+)+/([^/\s'\"]+)")


def user_message(error: BaseException, uploads: list) -> str:
    """The error's message with the server's paths cut to their file names: the uploads' (the names the user
    gave them), then any other."""
    text = str(error)
    for path in filter(None, uploads):
        text = text.replace(path, os.path.basename(path))
    return SERVER_PATH.sub(r"\1", text)


def answer(loaded, video, image, question, frames, progress):
    """Yield the answer so far, piece by piece (Gradio streams each value to the page)."""
    if not video and not image:
        raise gr.Error("Upload a video or an image first.")
    if video and image:
        raise gr.Error("Vamba reads one video or one image per question: remove one of them.")
    question = (question or "").strip() or ("Describe this video." if video else "Describe this image.")
    try:
        check_question(question, "The question")
    except ValueError as error:
        raise gr.Error(str(error)) from None
    messages = build_messages(question, video=video, image=image)
    progress(0, desc=f"Decoding {int(frames)} frames of the video" if video else "Reading the image")
    try:
        # progress=True: the processor's frame-by-frame bar, which track_tqdm shows on the page.
        inputs = prepare_inputs(loaded.processor, messages, loaded.model.device, num_frames=int(frames),
                                progress=bool(video))
    except (ValueError, OSError, RuntimeError) as error:  # RuntimeError: a decoding worker's
        raise gr.Error(user_message(error, [video, image])) from None
    progress(1, desc="Answering")
    text = ""
    for piece in start_generation(loaded, inputs, MAX_NEW_TOKENS):
        text += printable(piece)
        yield text
    yield text


def build_app(model_name=None) -> gr.Blocks:
    loaded, default_frames = load(model_name)
    cap = frames_cap()
    with gr.Blocks(title="Vamba: questions about videos") as app:
        gr.Markdown("# Vamba: ask a question about a video or an image\n"
                    "Vamba reads long videos cheaply: its video tokens go through Mamba-2 blocks instead of "
                    "self-attention ([paper](https://arxiv.org/abs/2503.11579)).")
        precision = "" if loaded.quantization is None else f" ({QUANTIZATIONS[loaded.quantization]})"
        gr.Markdown(DEMO_WARNING if loaded.is_demo else f"Model: `{loaded.source}`{precision}")
        with gr.Row():
            with gr.Column():
                video = gr.Video(label="Video", sources=["upload"], elem_id="video")
                image = gr.Image(label="...or an image", type="filepath", sources=["upload"], elem_id="image")
            with gr.Column():
                question = gr.Textbox(label="Question", placeholder="What happens in this video?", elem_id="question",
                                      max_length=MAX_QUESTION_CHARS)
                frames = gr.Slider(2, cap, value=min(default_frames, cap), step=2, label="Frames sampled from the video",
                                   elem_id="frames")
                ask = gr.Button("Ask", variant="primary", elem_id="ask")
                reply = gr.Textbox(label="Answer", lines=8, interactive=False, elem_id="answer")

        def respond(video_path, image_path, question_text, frame_count, progress=gr.Progress(track_tqdm=True)):
            yield from answer(loaded, video_path, image_path, question_text, frame_count, progress)

        ask.click(respond, inputs=[video, image, question, frames], outputs=reply)
    return app


if __name__ == "__main__":
    build_app(os.environ.get(MODEL_VARIABLE) or None).queue().launch()
