"""`vamba-hf`: convert the official checkpoint, push it to the Hub, and answer questions about videos and images.

    vamba-hf convert SRC DST            official-format folder (or Hub repo id) -> Hub-ready folder
    vamba-hf push DST REPO_ID           upload a converted folder (--dry-run lists the files)
    vamba-hf quantize DST QDST --quantize int8   a converted folder saved with its weights quantized
    vamba-hf generate --video FILE      stream an answer; without --model, runs the embedded demo model
    vamba-hf chat --video FILE          encode a video once, then answer question after question about it
"""

import argparse
import math
import os
import sys
import time
import traceback

from .errors import hub_error_message, one_line

DEFAULT_PROMPTS = {"video": "Describe this video.", "image": "Describe this image.", None: "Hello! Who are you?"}
DEBUG_VARIABLE = "VAMBA_HF_DEBUG"
# What a user's input can cause (a bad path, a checkpoint that does not match, a missing package, a bad video):
# reported in one line. Anything else is a bug in vamba-hf and says so.
USER_ERRORS = (ValueError, TypeError, OSError, ImportError)
EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors in one line, naming the option and the fix (argparse's default also prints the usage)."""

    def error(self, message):
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give a count of 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a count; give 1 or more")
    return value


def positive_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give a rate in frames per second, e.g. 1 or "
                                         f"0.5") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not a usable rate; give a finite number of frames per second "
                                         f"above 0, e.g. 1 or 0.5")
    return value


# -- convert ---------------------------------------------------------------------------------------------------


def run_convert(args) -> int:
    from .card import read_source_facts
    from .convert import convert_checkpoint, resolve_source

    folder = resolve_source(args.source, log=_stderr)
    facts = read_source_facts(folder, args.source)
    result = convert_checkpoint(
        folder, args.destination, force=args.force, base_model=args.base_model or facts.repo_id,
        license=args.license or facts.license, repo_id=args.repo_id, log=_stderr,
    )
    processor = "with processor" if result.has_processor else "WITHOUT processor (weights only)"
    _stderr(f"Done: {result.num_tensors} tensors, {len(result.weight_files)} weight file(s) {result.weights_placement}"
            f", {processor}. Load it with trust_remote_code=True, or upload it: vamba-hf push {result.destination} "
            f"REPO_ID")
    return 0


# -- push ------------------------------------------------------------------------------------------------------


def run_push(args) -> int:
    from .hub import push_folder

    push_folder(args.folder, args.repo_id, private=args.private, revision=args.revision,
                commit_message=args.commit_message, token=args.token, dry_run=args.dry_run, log=_stderr)
    return 0


# -- quantize --------------------------------------------------------------------------------------------------


def run_quantize(args) -> int:
    from .quantized_folder import save_quantized

    save_quantized(args.folder, args.destination, args.quantize, device=args.device, log=_stderr)
    _stderr(f"Load it as the unquantized folder (trust_remote_code=True), or upload it: vamba-hf push "
            f"{args.destination} REPO_ID")
    return 0


# -- generate --------------------------------------------------------------------------------------------------


def check_visual_file(path: str, kind: str) -> None:
    """Before any model loads: the --video or --image file exists, is a regular file and opens as what it should
    be (its container holds a video stream: PyAV reads the header only; or PIL reads an image header). URLs are
    left to the processor."""
    from .video_decode_vamba import is_url

    if is_url(path):
        return
    path = path.removeprefix("file://")
    if not os.path.exists(path):
        raise ValueError(f"--{kind} {path}: {kind} file not found; check the path (relative paths start from "
                         f"{os.getcwd()}).")
    if os.path.isdir(path):
        raise ValueError(f"--{kind} {path}: is a folder, not a {kind} file; give the path of the file itself.")
    if not os.path.isfile(path):
        raise ValueError(f"--{kind} {path}: not a regular file (a device or a pipe?); give the path of a {kind} file.")
    if os.path.getsize(path) == 0:
        raise ValueError(f"--{kind} {path}: the file is empty (0 bytes); re-download or re-export it.")
    with open(path, "rb"):  # unreadable: PermissionError, reported as it is
        pass
    if kind == "video":
        _probe_video(path)
    else:
        _probe_image(path)


def _probe_video(path: str) -> None:
    try:
        import av
    except ImportError:
        raise ImportError("--video needs PyAV to read video files: pip install av (or pip install -e '.[video]' in "
                          "the clone)") from None
    try:
        with av.open(path) as container:
            has_video = bool(container.streams.video)
    except av.error.FFmpegError as error:
        raise ValueError(f"--video {path}: not a video file PyAV can read ({error.strerror}); give an MP4, MKV, "
                         f"WebM, ... file, or re-encode it (ffmpeg -i in -c:v libx264 out.mp4).") from None
    if not has_video:
        raise ValueError(f"--video {path}: the file has no video stream (audio only?); give a video file.")


def _probe_image(path: str) -> None:
    import PIL.Image

    try:
        PIL.Image.open(path).close()
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"--image {path}: not an image PIL can read ({error}); give a PNG, JPEG, ... file.") from None


def _describe_inputs(inputs, vision_config) -> str:
    for grid_name, kind in (("video_grid_thw", "video"), ("image_grid_thw", "image")):
        if grid_name in inputs:
            t, h, w = (int(n) for n in inputs[grid_name][0])
            frames = f"{t * vision_config.temporal_patch_size} frames, " if kind == "video" else ""
            tokens = t * h * w // vision_config.spatial_merge_size ** 2
            return f"{kind}: {frames}{tokens} visual tokens; prompt: {inputs['input_ids'].shape[1]} tokens"
    return f"prompt: {inputs['input_ids'].shape[1]} tokens, no image or video"


def printable_streamer(tokenizer):
    """transformers' `TextStreamer`, printing only printable text (control bytes escaped)."""
    from transformers import TextStreamer

    from .inference import printable

    class PrintableTextStreamer(TextStreamer):
        line_open = False  # the last text printed did not end its line

        def on_finalized_text(self, text: str, stream_end: bool = False):
            text = printable(text)
            super().on_finalized_text(text, stream_end)
            if stream_end or text:
                self.line_open = not stream_end and not text.endswith("\n")

        def interrupt(self):
            """After an answer cut short (Ctrl-C): the text held back, and the line ended, so that whatever is
            printed next starts a line of its own; ready for the next answer."""
            if self.token_cache or self.line_open:
                self.end()
            self.next_tokens_are_prompt = True

    return PrintableTextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _precision(loaded) -> str:
    """The loaded model's dtype, and its quantization when it has one."""
    from .quantization import QUANTIZATIONS

    dtype = loaded.model.dtype
    return str(dtype) if loaded.quantization is None else f"{dtype}, {QUANTIZATIONS[loaded.quantization]}"


def run_generate(args) -> int:
    from .demo import demo_notice
    from .sources import resolve_model_source

    started = time.perf_counter()
    # Before torch is imported: a wrong --model is reported within a second or two.
    location = None if args.model is None else resolve_model_source(args.model, option="--model")
    from .chat import check_question
    if args.video or args.image:
        check_visual_file(args.video or args.image, "video" if args.video else "image")
    from .inference import build_messages, load_model_and_processor, prepare_inputs

    if args.prompt is not None:
        check_question(args.prompt, "--prompt")

    if args.model is None:
        _stderr(demo_notice())
    loaded = load_model_and_processor(args.model, dtype=args.dtype, device=args.device, location=location,
                                      quantization=args.quantize)
    model, processor = loaded.model, loaded.processor
    kind = "video" if args.video else "image" if args.image else None
    prompt = args.prompt or DEFAULT_PROMPTS[kind]
    messages = build_messages(prompt, video=args.video, image=args.image)
    inputs = prepare_inputs(processor, messages, model.device, num_frames=args.frames, fps=args.fps)
    summary = _describe_inputs(inputs, model.config.vision_config)
    _stderr(f"Model: {loaded.source} ({_precision(loaded)}, {model.device}); {summary}")
    _stderr(f"Prompt: {prompt}")
    streamer = printable_streamer(processor.tokenizer)
    prefill_started = time.perf_counter()
    try:
        output = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False, streamer=streamer)
    except KeyboardInterrupt:
        streamer.interrupt()
        raise
    finished = time.perf_counter()
    new_tokens = output.shape[1] - inputs["input_ids"].shape[1]
    _stderr(f"[{new_tokens} new tokens in {finished - prefill_started:.1f} s; {finished - started:.1f} s in all]")
    if loaded.is_demo:
        _stderr("(demo model with random weights: the text above is meaningless by design)")
    return 0


# -- chat ------------------------------------------------------------------------------------------------------

CHAT_EXIT_WORDS = ("exit", "quit")


def _questions(prompt: str, tokenizer=None):
    """The lines typed at the prompt until end of input or an exit word; blank lines are skipped, and a line too
    long, not UTF-8 or holding one of `tokenizer`'s special tokens is answered with a message."""
    from .chat import read_question

    while True:
        # On stdout, where the answers go (input() may show its prompt on stderr).
        print(prompt, end="", flush=True)
        try:
            question = read_question(sys.stdin.buffer, tokenizer)
        except ValueError as error:  # the line is skipped; the chat goes on
            _stderr(f"vamba-hf: {error}")
            continue
        if question is None:  # end of input
            print(flush=True)
            return
        if question.lower() in CHAT_EXIT_WORDS:
            return
        if question:
            yield question


def _save_state_path(args):
    """Where --save-state writes the state (None: nowhere), checked: no existing file without --force, never a file
    the chat reads."""
    from .chat import check_state_path

    if args.save_state is None:
        return None
    return check_state_path(args.save_state, "--save-state", args.force, inputs=(args.video, args.state))


def _chat_state(args, model, processor):
    """The video state of this chat: loaded from --state, or the video encoded once (and saved to --save-state)."""
    from .chat import check_state_matches_video, encode_video_file
    from .video_state_vamba import load_video_state

    save_to = _save_state_path(args)  # again: a file may have appeared there while the model loaded
    if args.state is not None:
        if not os.path.lexists(args.state):
            raise ValueError(f"--state {args.state}: no such file; write one with --save-state first.")
        state = load_video_state(args.state, model, device=model.device)
        if args.video is not None:
            check_state_matches_video(state, args.state, args.video)
        _stderr(f"Loaded the video state {args.state}: {state.length} visual tokens (no video decoded, nothing "
                f"encoded)")
    else:
        state = encode_video_file(model, processor, args.video, num_frames=args.frames, fps=args.fps, log=_stderr)
    if save_to is not None:
        state.save(save_to)
        _stderr(f"Saved the video state to {save_to} (reuse it with --state {save_to})")
    return state


def _answer_until_interrupted(model, processor, state, question: str, max_new_tokens: int, streamer) -> None:
    """Streams the answer to one question; Ctrl-C stops this answer only, and the chat goes on."""
    from .chat import answer

    started = time.perf_counter()
    try:
        new_tokens = answer(model, processor, state, question, max_new_tokens, streamer=streamer).shape[0]
    except KeyboardInterrupt:
        streamer.interrupt()
        _stderr("[answer stopped; ask another question, or end the chat with Ctrl-C or Ctrl-D at the prompt]")
        return
    _stderr(f"[{new_tokens} new tokens in {time.perf_counter() - started:.1f} s, from the encoded video]")


def run_chat(args) -> int:
    from .demo import demo_notice
    from .sources import resolve_model_source

    if args.video is None and args.state is None:
        raise ValueError("chat needs --video FILE (or --state PATH saved by an earlier chat's --save-state).")
    _save_state_path(args)  # before the model loads
    location = None if args.model is None else resolve_model_source(args.model, option="--model")
    if args.state is None:
        check_visual_file(args.video, "video")
    from .inference import load_model_and_processor

    if args.model is None:
        _stderr(demo_notice())
    loaded = load_model_and_processor(args.model, dtype=args.dtype, device=args.device, location=location,
                                      quantization=args.quantize)
    model, processor = loaded.model, loaded.processor
    _stderr(f"Model: {loaded.source} ({_precision(loaded)}, {model.device})")
    state = _chat_state(args, model, processor)
    _stderr(f"Ask about the video; {' or '.join(CHAT_EXIT_WORDS)} (or end of input, or Ctrl-C at the prompt) ends the "
            f"chat; Ctrl-C during an answer stops that answer.")
    streamer = printable_streamer(processor.tokenizer)
    try:
        for question in _questions("> ", processor.tokenizer):
            _answer_until_interrupted(model, processor, state, question, args.max_new_tokens, streamer)
    except KeyboardInterrupt:  # at the prompt: ends the chat, as end of input does
        print(flush=True)
    if loaded.is_demo:
        _stderr("(demo model with random weights: the answers above are meaningless by design)")
    return 0


# -- parser ----------------------------------------------------------------------------------------------------


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="official-format checkpoint folder -> Hub-ready folder",
        description="Convert an official-format Vamba checkpoint (config.json with model_type qwen2_vl, "
                    "safetensors weights, Qwen2-VL tokenizer and preprocessor files) into a folder that "
                    "transformers' Auto classes load with trust_remote_code=True. Weights are hard-linked or copied "
                    "unchanged; only their headers are read, to check every tensor name and shape first.")
    parser.add_argument("source", help="the official checkpoint folder, or its Hub repo id "
                                       "(e.g. TIGER-Lab/Vamba-Qwen2-VL-7B, downloaded into the Hub cache)")
    parser.add_argument("destination", help="the folder to write (must not exist, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace DESTINATION if it exists")
    parser.add_argument("--base-model", default=None,
                        help="model card base_model (default: SOURCE when it is a Hub repo id, else none)")
    parser.add_argument("--license", default=None,
                        help="model card license id (default: the source's model card's, else unknown)")
    parser.add_argument("--repo-id", default=None, help="Hub repo id for the card's usage snippets (push sets it too)")
    parser.set_defaults(run=run_convert)


def _add_push(subparsers) -> None:
    parser = subparsers.add_parser("push", help="upload a converted folder to the Hugging Face Hub",
                                   description="Upload a folder written by `vamba-hf convert` to a model repo "
                                               "(created if needed). Needs a token: `hf auth login` or "
                                               "--token / HF_TOKEN.")
    parser.add_argument("folder", help="the converted folder")
    parser.add_argument("repo_id", help="the model repo, e.g. your-name/Vamba-Qwen2-VL-7B-hf")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; upload nothing")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--revision", default=None, help="branch to push to (default: main)")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    parser.set_defaults(run=run_push)


def _add_quantize(subparsers) -> None:
    from .quantization import QUANTIZATIONS, choices_help

    parser = subparsers.add_parser(
        "quantize", help="save a converted folder with its weights quantized",
        description="Load a folder written by `vamba-hf convert` with its weights quantized and save it into a new "
                    "folder (safetensors, with the processor, the remote code and a model card that states the "
                    "precision), loadable like the original with trust_remote_code=True.")
    parser.add_argument("folder", help="the converted folder")
    parser.add_argument("destination", help="the folder to write (must not exist)")
    parser.add_argument("--quantize", required=True, choices=list(QUANTIZATIONS), help=choices_help())
    parser.add_argument("--device", default="auto",
                        help="where to quantize: auto (CUDA if available), cpu, cuda, ... (int8 runs on the CPU)")
    parser.set_defaults(run=run_quantize)


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate", help="answer a question about a video or image, streaming the answer",
        description="Stream Vamba's answer about a video or an image. Without --model, runs the embedded demo "
                    "model: tiny, random weights, built locally (no download) - it shows the path works, its answers "
                    "are meaningless.")
    parser.add_argument("--model", default=None,
                        help="converted folder or Hub repo id (default: the embedded demo model)")
    visual = parser.add_mutually_exclusive_group()
    visual.add_argument("--video", default=None, help="video file (decoded with PyAV)")
    visual.add_argument("--image", default=None, help="image file")
    parser.add_argument("--prompt", default=None, help="the question (default: describe the video/image)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    _add_sampling_and_device_options(parser)
    parser.set_defaults(run=run_generate)


def _add_sampling_and_device_options(parser) -> None:
    """--frames / --fps, --dtype and --device, as generate and chat take them."""
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--frames", type=positive_int, default=None,
                          help="frames sampled uniformly from the video (default: the processor's, 128 for the "
                               "real model; an odd count drops the last frame)")
    sampling.add_argument("--fps", type=positive_rate, default=None,
                          help="sample frames at this rate (frames per second) instead of --frames")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="auto: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    _add_quantize_option(parser)


def _add_quantize_option(parser) -> None:
    from .quantization import QUANTIZATIONS, choices_help

    parser.add_argument("--quantize", default=None, choices=list(QUANTIZATIONS),
                        help=f"load the weights quantized (default: unquantized): {choices_help()}")


def _add_chat(subparsers) -> None:
    parser = subparsers.add_parser(
        "chat", help="encode a video once, then answer question after question about it",
        description="Encode a video once (vision tower and every Mamba-2 block), then read questions at the prompt "
                    "and stream each answer from the encoded video, with no re-encoding. Ctrl-C stops an answer; exit, "
                    "end of input (Ctrl-D) or Ctrl-C at the prompt ends the chat. Without --model, runs the embedded "
                    "demo model (random weights).")
    parser.add_argument("--video", default=None, help="video file (decoded with PyAV)")
    parser.add_argument("--model", default=None,
                        help="converted folder or Hub repo id (default: the embedded demo model)")
    parser.add_argument("--save-state", default=None, metavar="PATH",
                        help="write the encoded video to PATH (safetensors) for a later --state")
    parser.add_argument("--state", default=None, metavar="PATH",
                        help="answer from a video encoded earlier (--save-state) instead of encoding --video")
    parser.add_argument("--force", action="store_true",
                        help="let --save-state replace an existing file (never the --video or --state read)")
    parser.add_argument("--max-new-tokens", type=positive_int, default=128)
    _add_sampling_and_device_options(parser)
    parser.set_defaults(run=run_chat)


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="vamba-hf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help=f"show the full traceback of an error (or set {DEBUG_VARIABLE}=1)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_convert(subparsers)
    _add_push(subparsers)
    _add_quantize(subparsers)
    _add_generate(subparsers)
    _add_chat(subparsers)
    return parser


def user_error_message(error: BaseException):
    """One line for an error the user's input or machine caused (a Hub or network error included), None for a bug."""
    if isinstance(error, USER_ERRORS):
        return one_line(error)
    return hub_error_message(error, "Talking to the Hugging Face Hub failed")


def debug_requested(args) -> bool:
    return args.debug or os.environ.get(DEBUG_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        _stderr("vamba-hf: interrupted")
        return 130
    except Exception as error:  # noqa: BLE001 - the one place every failure is turned into a message
        if debug_requested(args):
            traceback.print_exc()
        hint = "" if debug_requested(args) else f" (--debug or {DEBUG_VARIABLE}=1 shows the traceback)"
        message = user_error_message(error)
        if message is not None:
            _stderr(f"vamba-hf: error: {message}")
            return EXIT_USER_ERROR
        _stderr(f"vamba-hf: internal error: {type(error).__name__}: {one_line(error)}; this is a bug in vamba-hf, "
                f"please report it{hint}")
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":
    sys.exit(main())
