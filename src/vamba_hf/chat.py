"""Questions about a video encoded once: what `vamba-hf chat` and examples/streaming_video.py share.

`encode_video_file` samples and processes a video (a progress bar while it decodes) and encodes it into a
`VideoState`, chunk by chunk as it decodes; `question_inputs` tokenizes one question whose prompt keeps the
<|vision_start|><|vision_end|> placeholder the state fills; `answer` streams the answer to one question from the state.
"""

import hashlib
import os
import time
from pathlib import Path
from typing import Optional

from .inference import build_messages
from .conversation_vamba import special_token_in
from .video_state_vamba import VideoState

# A name standing for the video in the chat template (the state holds the video itself).
VIDEO_PLACEHOLDER = "video"
# Frames per chunk when a file is encoded as it decodes.
CHUNK_FRAMES = 128
# The longest question `chat`, `generate --prompt` and the Space take, in characters (about 2,000 tokens): a longer
# one would hold the model (and the Space's queue) for minutes and gigabytes.
MAX_QUESTION_CHARS = 8192
# UTF-8 takes at most 4 bytes a character; a line also ends in "\r\n".
MAX_QUESTION_LINE_BYTES = 4 * MAX_QUESTION_CHARS + 2


def check_question(question: str, what: str = "the question") -> str:
    """`question`, or a ValueError when it is longer than `MAX_QUESTION_CHARS` or holds bytes that were not UTF-8
    (a command line's, kept as surrogates)."""
    if len(question) > MAX_QUESTION_CHARS:
        raise ValueError(f"{what} is {len(question):,} characters long; the most is {MAX_QUESTION_CHARS:,}: ask a "
                         f"shorter question.")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{what} is not UTF-8 text (character {error.start} is a byte that is not): give it as "
                         f"UTF-8, with the terminal set to UTF-8.") from None
    return question


def read_question(stream, tokenizer=None) -> Optional[str]:
    """The next line of the binary `stream`, stripped, as a question; None at the end of input. A line that is not
    UTF-8, is longer than `MAX_QUESTION_CHARS` or holds one of `tokenizer`'s special tokens raises a ValueError once
    it has been read past (at most `MAX_QUESTION_LINE_BYTES` of it is held), so that the next line can be read."""
    line = stream.readline(MAX_QUESTION_LINE_BYTES)
    if not line:
        return None
    if len(line) == MAX_QUESTION_LINE_BYTES and not line.endswith(b"\n"):
        while True:
            rest = stream.readline(MAX_QUESTION_LINE_BYTES)
            if not rest or rest.endswith(b"\n"):
                break
        raise ValueError(f"that line is longer than {MAX_QUESTION_CHARS:,} characters, the most a question may be: "
                         f"ask a shorter question.")
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"that line is not UTF-8 text (byte {line[error.start]:#04x} at position {error.start}): "
                         f"type it again, with the terminal set to UTF-8.") from None
    special = None if tokenizer is None else special_token_in(text, tokenizer)
    if special is not None:
        raise ValueError(f"that line holds {special!r}, one of the tokenizer's special tokens, which would end the "
                         f"question and open another turn: ask it without that token.")
    return check_question(text.strip())


def video_pixels(processor, video, device, num_frames: Optional[int] = None, fps: Optional[float] = None,
                 start_time: Optional[float] = None, progress: Optional[bool] = True) -> tuple:
    """(pixel_values_videos, video_grid_thw, the sampling metadata) of `video` (a file or frames), on `device`."""
    options = {key: value for key, value in (("num_frames", num_frames), ("fps", fps), ("start_time", start_time))
               if value is not None}
    messages = build_messages("", video=video)
    messages[0]["content"][0].update(options)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", progress=progress, return_metadata=True)
    metadata = inputs["video_metadata"][0] if inputs.get("video_metadata") else {}
    return inputs["pixel_values_videos"].to(device), inputs["video_grid_thw"].to(device), metadata


def encode_video_file(model, processor, video, num_frames: Optional[int] = None, fps: Optional[float] = None,
                      log=None) -> VideoState:
    """Sample, process and encode `video` once, each chunk of frames encoded while the next ones decode
    (`processor.video_chunks`); `log(line)` reports what was encoded and how long it took."""
    options = {key: value for key, value in (("num_frames", num_frames), ("fps", fps)) if value is not None}
    started = time.perf_counter()
    chunks = processor.video_chunks(video, chunk_frames=CHUNK_FRAMES, device=model.device, progress=True, **options)
    state = model.encode_video_chunks(_named_chunks(chunks, video))
    if log is not None:
        log(f"Encoded the video once: {state.grid_thw[0, 0].item() * 2} frames, {state.length} visual tokens in "
            f"{time.perf_counter() - started:.1f} s, decoding included ({state.nbytes() / 2**20:.1f} MiB of state)")
    return state


def _named_chunks(chunks, video):
    """The chunks, each one's sampling naming the video and its contents' digest (a saved state says what it holds,
    and a file of the same name is told apart)."""
    identity = {"video": str(video), "video_sha256": file_digest(video)}
    for chunk in chunks:
        chunk["video_metadata"] = [{**chunk["video_metadata"][0], **identity}]
        yield chunk


def question_inputs(processor, question: str, device):
    """The tokenized prompt of one question about the encoded video (input_ids, attention_mask), on `device`."""
    text = processor.apply_chat_template(build_messages(question, video=VIDEO_PLACEHOLDER),
                                         add_generation_prompt=True)
    return processor.tokenizer(text, return_tensors="pt").to(device)


def answer(model, processor, state: VideoState, question: str, max_new_tokens: int, streamer=None):
    """The generated ids of the answer to `question` about the video in `state`, streamed to `streamer`."""
    inputs = question_inputs(processor, question, model.device)
    output = model.generate(**inputs, video_state=state, max_new_tokens=max_new_tokens, do_sample=False,
                            streamer=streamer)
    return output[0, inputs["input_ids"].shape[1]:]


def check_state_path(path: str, option: str, force: bool = False, inputs: tuple = ()) -> Path:
    """`path` as a file a state may be written to: its folder exists, it is not a folder, a device or any other
    special file, it exists only with `force`, and it is none of `inputs` (the files this run reads), even with
    `force`."""
    target = Path(path)
    if target.is_dir():
        raise ValueError(f"{option} {path}: is a folder; give a file path, e.g. {Path(path) / 'video.state'}")
    if not target.parent.is_dir():
        raise ValueError(f"{option} {path}: the folder {target.parent} does not exist; create it first.")
    for source in inputs:
        if source is not None and _same_file(target, Path(source)):
            raise ValueError(f"{option} {path}: is the file this chat reads ({source}); give another path.")
    if target.exists() and not target.is_file():
        raise ValueError(f"{option} {path}: is not a regular file (a device, a FIFO or a socket); give a file path.")
    if os.path.lexists(target) and not force:
        raise ValueError(f"{option} {path}: the file exists; pass --force to replace it, or give another path.")
    return target


def _same_file(a: Path, b: Path) -> bool:
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def file_digest(path) -> str:
    """The SHA-256 of the file at `path`: which video a saved state was encoded from, whatever its name."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def check_state_matches_video(state: VideoState, state_path, video) -> None:
    """Refuse `--video` beside `--state` unless the state was encoded from a file with the same contents."""
    recorded = (state.sampling[0] if state.sampling else {}).get("video_sha256")
    if recorded is None:
        raise ValueError(f"--state {state_path} does not record the file it was encoded from, so it cannot be checked "
                         f"against --video {video}: drop --video, or encode {video} without --state.")
    if recorded != file_digest(video):
        encoded_from = state.sampling[0].get("video")
        raise ValueError(f"--state {state_path} was encoded from {encoded_from}, whose contents differ from --video "
                         f"{video}: drop --video, or encode {video} without --state.")
