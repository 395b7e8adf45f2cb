"""The embedded demo model: a tiny Vamba with random weights (fixed seed) and the tiny Qwen2-format tokenizer.

It lets the whole path (decode video -> process -> generate) run on a fresh CPU machine in seconds, with no
download. Its answers are meaningless: the weights are random. `build_demo_model_dir()` writes the model folder
(config, weights, processor, generation config, remote code) once into a cache folder and reuses it.
Also here: `write_demo_video`, a small synthetic clip to feed it.
"""

import os
import shutil
import tempfile
from fractions import Fraction
from pathlib import Path

DEMO_SEED = 0
# Bump when the demo model's files would change, so stale cache folders are not reused.
DEMO_FORMAT_VERSION = 3
DEMO_NOTICE = (
    "Using the embedded DEMO model: a tiny Vamba with RANDOM weights (seed {seed}), built locally, nothing "
    "downloaded. Its answer is gibberish; it only shows the decode -> process -> generate path working. "
    "Pass --model with a converted checkpoint (see README) for real answers."
)

# Demo processing: fewer frames and pixels than the real defaults, so a clip is a few hundred visual tokens.
_DEMO_PROCESSOR_OPTIONS = dict(num_frames=16, video_shortest_edge=None, video_longest_edge=224)
_DEMO_IMAGE_MAX_PIXELS = 224 * 224


def demo_config(tokenizer):
    """The demo model's `VambaConfig`: special-token ids taken from `tokenizer`, vocabulary rounded up from it."""
    from .configuration_vamba import VambaConfig
    from .tiny import TINY_SIZES, special_token_ids

    ids = special_token_ids(tokenizer)
    ids.pop("im_start_token_id")  # not a config field; the chat template writes it
    vocab_size = -(-len(tokenizer) // 64) * 64
    return VambaConfig(vocab_size=vocab_size, architectures=["VambaForConditionalGeneration"],
                       max_position_embeddings=4096, **ids, **TINY_SIZES)


def _build_demo_model(config, seed: int):
    import torch

    from .modeling_vamba import VambaForConditionalGeneration

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VambaForConditionalGeneration(config)
    return model.eval()


def _demo_processor():
    from .processing_vamba import VambaProcessor, default_image_processor
    from .tiny import build_tiny_tokenizer

    image_processor = default_image_processor(max_pixels=_DEMO_IMAGE_MAX_PIXELS)
    return VambaProcessor(image_processor=image_processor, tokenizer=build_tiny_tokenizer(), **_DEMO_PROCESSOR_OPTIONS)


def write_demo_model(folder, seed: int = DEMO_SEED) -> Path:
    """Write the demo model (weights, config, processor, generation config, remote code) into `folder`."""
    from transformers import GenerationConfig

    from .convert import copy_remote_code

    folder = Path(folder)
    processor = _demo_processor()
    config = demo_config(processor.tokenizer)
    _build_demo_model(config, seed).save_pretrained(folder)
    processor.save_pretrained(folder)
    GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id).save_pretrained(folder)
    copy_remote_code(folder)
    return folder


def default_cache_dir() -> Path:
    """`$VAMBA_HF_CACHE`, else `$XDG_CACHE_HOME/vamba-hf`, else `~/.cache/vamba-hf`."""
    if os.environ.get("VAMBA_HF_CACHE"):
        return Path(os.environ["VAMBA_HF_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vamba-hf"


def build_demo_model_dir(path=None, seed: int = DEMO_SEED) -> Path:
    """The demo model's folder, written on first use and reused after.

    `path` defaults to a folder in `default_cache_dir()` named after the format version, the seed and the
    transformers major version (4.x and 5.x save processors differently). Written beside its final place and
    renamed, so concurrent first uses never see a half-written folder.
    """
    import transformers

    if path is None:
        major = transformers.__version__.split(".")[0]
        path = default_cache_dir() / f"demo-v{DEMO_FORMAT_VERSION}-seed{seed}-transformers{major}"
    path = Path(path)
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        write_demo_model(staging, seed)
        os.rename(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (path / "config.json").is_file():  # not a lost race with another process: a real failure
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def demo_frames(num_frames: int = 48, width: int = 160, height: int = 120):
    """A synthetic clip as a (frames, height, width, 3) uint8 array: a red square crossing a blue-to-green
    background."""
    import numpy as np

    rows = np.linspace(0, 1, height)[:, None, None]
    background = (np.array([40, 60, 200]) * (1 - rows) + np.array([40, 180, 60]) * rows).astype(np.uint8)
    side = height // 3
    frames = np.repeat(np.repeat(background, width, axis=1)[None], num_frames, axis=0)
    for index, frame in enumerate(frames):
        left = (width - side) * index // max(num_frames - 1, 1)
        frame[side : 2 * side, left : left + side] = (220, 30, 30)
    return frames


def write_demo_video(path, num_frames: int = 48, width: int = 160, height: int = 120, fps: int = 12,
                     codec: str = "h264") -> Path:
    """`demo_frames` written with PyAV: H.264 (4:2:0) by default, which every browser plays in an .mp4 file; "h264"
    is whichever H.264 encoder PyAV's FFmpeg has (libx264 in its wheels). Width and height must be even."""
    import av

    path = Path(path)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for pixels in demo_frames(num_frames, width, height):
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def demo_notice(seed: int = DEMO_SEED) -> str:
    return DEMO_NOTICE.format(seed=seed)
