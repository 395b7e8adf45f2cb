"""Turn an official-format Vamba checkpoint folder into a Hub-ready folder the Auto classes load.

The official release (`TIGER-Lab/Vamba-Qwen2-VL-7B`) is a `model_type: "qwen2_vl"` folder with no `auto_map`.
`convert_checkpoint` writes our config (`model_type: "vamba"`, `auto_map`), the remote-code files, the processor
with Vamba's chat template, a generation config and a model card next to the *unchanged* weight files. Weights are
never loaded: only the safetensors headers are read, to check every tensor name and shape against the config
before anything is written.
"""

import contextlib
import json
import os
import shutil
import struct
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .card import write_model_card

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
# The Hub folder's remote code: every module of the package that the modeling, configuration and processing files
# import (relatively), so that a converted folder loads where vamba_hf is not installed.
REMOTE_CODE_FILES = tuple(sorted(path.name for path in Path(__file__).resolve().parent.glob("*_vamba.py")))
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
# transformers 5 saves the image processor's settings inside this file instead.
PROCESSOR_FILE = "processor_config.json"
# Either of these makes a loadable Qwen2 tokenizer (the fast one, or the slow BPE files).
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
IM_END_TOKEN = "<|im_end|>"

_MAX_HEADER_BYTES = 100 * 2**20  # real headers are kilobytes; a huge length means this is not safetensors
_MAX_LISTED_NAMES = 20


class ConversionError(ValueError):
    """The source folder cannot be converted; the message says what is wrong and where."""


@dataclass
class ConversionResult:
    destination: Path
    weight_files: list
    num_tensors: int
    weights_placement: str  # "hard-linked", "copied" or "hard-linked and copied"
    has_processor: bool
    warnings: list = field(default_factory=list)


# -- reading the source ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def quiet_transformers():
    """Only errors from transformers' logger. Reading the official config (`model_type: qwen2_vl`, `torch_dtype`)
    or our own folders through transformers' generic machinery warns about things that are expected here."""
    from transformers.utils import logging

    previous = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(previous)


def load_source_config(source: Path):
    """The source's config as a `VambaConfig`, after checking that it describes a Vamba model."""
    from .configuration_vamba import VambaConfig

    path = source / "config.json"
    if not path.is_file():
        raise ConversionError(f"{source} has no config.json: it is not a checkpoint folder.")
    raw = json.loads(path.read_text(encoding="utf-8"))
    model_type = raw.get("model_type")
    if model_type not in ("qwen2_vl", "vamba"):
        raise ConversionError(
            f"{path}: unknown architecture, model_type {model_type!r}. Expected the official Vamba format "
            f"(model_type 'qwen2_vl' with a 'vision_mamba_mixer_config') or 'vamba'."
        )
    if "vision_mamba_mixer_config" not in raw:
        raise ConversionError(
            f"{path}: unknown architecture, model_type {model_type!r} without 'vision_mamba_mixer_config'. This is "
            f"a plain Qwen2-VL checkpoint, not Vamba: load it with transformers' Qwen2VLForConditionalGeneration."
        )
    try:
        with quiet_transformers():
            config = VambaConfig.from_pretrained(source)
    except ValueError as error:
        raise ConversionError(f"{path}: {error}") from error
    config.architectures = ["VambaForConditionalGeneration"]
    return config


def find_weight_files(source: Path) -> tuple[list, Optional[dict]]:
    """The safetensors files of the checkpoint and, when sharded, the index's tensor -> file map."""
    index_path = source / WEIGHTS_INDEX
    if index_path.is_file():
        weight_map = json.loads(index_path.read_text(encoding="utf-8")).get("weight_map")
        if not weight_map:
            raise ConversionError(f"{index_path} has no 'weight_map'.")
        files = sorted(set(weight_map.values()))
        absent = [name for name in files if not (source / name).is_file()]
        if absent:
            raise ConversionError(
                f"{index_path} names shard file(s) that are missing from {source}: {', '.join(absent)}. "
                f"Download them (e.g. `huggingface-cli download` again) and convert again."
            )
        return files, weight_map
    if (source / SINGLE_WEIGHTS).is_file():
        return [SINGLE_WEIGHTS], None
    if any(source.glob("*.bin")):
        raise ConversionError(f"{source} holds PyTorch .bin weights; only safetensors checkpoints are supported.")
    raise ConversionError(f"{source} has neither {SINGLE_WEIGHTS} nor {WEIGHTS_INDEX}.")


def read_safetensors_header(path: Path) -> dict:
    """Tensor name -> {"dtype", "shape", "data_offsets"} from a safetensors file, reading only its header."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{path} is not a safetensors file (shorter than 8 bytes).")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > _MAX_HEADER_BYTES:
            raise ConversionError(f"{path} is not a safetensors file (header length {header_size}).")
        try:
            header = json.loads(f.read(header_size))
        except ValueError as error:
            raise ConversionError(f"{path} is not a safetensors file (unreadable header: {error}).") from error
    header.pop("__metadata__", None)
    data_end = max((info["data_offsets"][1] for info in header.values()), default=0)
    if path.stat().st_size < 8 + header_size + data_end:
        raise ConversionError(f"{path} is truncated: its header describes {8 + header_size + data_end} bytes but "
                              f"the file has {path.stat().st_size}. Download it again.")
    return header


def read_checkpoint_shapes(source: Path, files: list, weight_map: Optional[dict]) -> dict:
    """Tensor name -> shape over all weight files, checking the index (if any) against the shards' headers."""
    shapes = {}
    for name in files:
        for tensor, info in read_safetensors_header(source / name).items():
            if tensor in shapes:
                raise ConversionError(f"Tensor {tensor} is stored twice (second copy in {name}).")
            if weight_map is not None and weight_map.get(tensor) != name:
                raise ConversionError(f"{WEIGHTS_INDEX} puts {tensor} in {weight_map.get(tensor)}, but it is in "
                                      f"{name}.")
            shapes[tensor] = tuple(info["shape"])
    if weight_map is not None:
        unstored = sorted(set(weight_map) - set(shapes))
        if unstored:
            raise ConversionError(_listing(f"{WEIGHTS_INDEX} lists tensor(s) that no shard holds", unstored))
    return shapes


def expected_shapes(config) -> dict:
    """Tensor name -> shape that `VambaForConditionalGeneration(config)` loads (built on the meta device)."""
    import torch

    from .modeling_vamba import VambaForConditionalGeneration

    with torch.device("meta"):
        model = VambaForConditionalGeneration(config)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _listing(title: str, names: list) -> str:
    shown = names[:_MAX_LISTED_NAMES]
    more = f"\n  ... and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return f"{title} ({len(names)}):\n  " + "\n  ".join(shown) + more


def check_tensors(found: dict, expected: dict) -> None:
    """Raise a `ConversionError` naming every missing, unexpected and wrongly shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong_shape = [
        f"{name}: checkpoint {list(found[name])}, config expects {list(expected[name])}"
        for name in sorted(set(found) & set(expected))
        if found[name] != expected[name]
    ]
    problems = [
        _listing(title, names)
        for title, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                             ("tensors with a wrong shape", wrong_shape))
        if names
    ]
    if problems:
        raise ConversionError("The weights do not match config.json.\n" + "\n".join(problems))


def _has_tokenizer(source: Path) -> bool:
    return any(all((source / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS)


def _has_image_processor(source: Path) -> bool:
    if (source / IMAGE_PROCESSOR_FILE).is_file():
        return True
    processor_file = source / PROCESSOR_FILE
    return processor_file.is_file() and "image_processor" in json.loads(processor_file.read_text(encoding="utf-8"))


def load_source_processor(source: Path):
    """A `VambaProcessor` from the source's tokenizer and image-processor files, with Vamba's chat template, or
    None with the reason when the files are not there."""
    if not _has_tokenizer(source):
        return None, "no tokenizer files (tokenizer.json, or vocab.json + merges.txt)"
    if not _has_image_processor(source):
        return None, f"no image processor settings ({IMAGE_PROCESSOR_FILE})"
    from transformers import AutoImageProcessor, AutoTokenizer

    from .processing_vamba import VAMBA_CHAT_TEMPLATE, VambaProcessor

    with quiet_transformers():
        tokenizer = AutoTokenizer.from_pretrained(source)
        image_processor = AutoImageProcessor.from_pretrained(source)
    if tokenizer.convert_tokens_to_ids(IM_END_TOKEN) in (None, tokenizer.unk_token_id):
        raise ConversionError(f"The tokenizer in {source} has no {IM_END_TOKEN} token: it is not Qwen2-VL's.")
    # The source's own template (Qwen2-VL's) would insert <|image_pad|>/<|video_pad|> runs Vamba never reads.
    tokenizer.chat_template = VAMBA_CHAT_TEMPLATE
    processor = VambaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=VAMBA_CHAT_TEMPLATE)
    return processor, None


def build_generation_config(source: Path, config, tokenizer):
    """The source's generation config (or one derived from the config), stopping at `<|im_end|>` when the
    tokenizer is known: the chat template ends every turn with it."""
    from transformers import GenerationConfig

    if (source / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(source)
    else:
        generation_config = GenerationConfig.from_model_config(config)
    if tokenizer is not None:
        generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END_TOKEN)
        if tokenizer.pad_token_id is not None:
            generation_config.pad_token_id = tokenizer.pad_token_id
    # Otherwise transformers may rebuild it from the model config at generate time, dropping the stop token.
    generation_config._from_model_config = False
    return generation_config


def download_source(repo_id: str, log: Callable[[str], None] = print) -> Path:
    """The official checkpoint's files from the Hub (config, weights, tokenizer, processor), in the Hub cache.

    Converting from the cache hard-links the weights, so no second copy of them is made.
    """
    from huggingface_hub import snapshot_download

    log(f"Downloading {repo_id} from the Hugging Face Hub (or reusing the local cache)...")
    return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.jinja"]))


# -- writing the destination -----------------------------------------------------------------------------------


def place_file(source_file: Path, destination_file: Path) -> str:
    """Hard-link the file (same filesystem), else copy it byte for byte. Returns which was done."""
    source_file = source_file.resolve()  # a Hub cache snapshot holds symlinks to blobs
    try:
        os.link(source_file, destination_file)
        return "hard-linked"
    except OSError:
        shutil.copyfile(source_file, destination_file)
        return "copied"


def copy_remote_code(destination: Path) -> None:
    package_dir = Path(__file__).resolve().parent
    for name in REMOTE_CODE_FILES:
        source_file = (package_dir / name).resolve()
        if not source_file.is_file():
            raise ConversionError(f"The vamba_hf package is incomplete: {source_file} is missing.")
        shutil.copyfile(source_file, destination / name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def publish(staging: Path, destination: Path, force: bool) -> None:
    """Move the finished staging folder to `destination` by rename; with `force`, an existing destination is moved
    aside first and deleted only once the new folder is in place."""
    if not (destination.exists() or destination.is_symlink()):
        os.rename(staging, destination)
        return
    if not force:
        raise FileExistsError(f"{destination} already exists; pass --force (force=True) to replace it.")
    aside = destination.with_name(f".{destination.name}.old-{uuid.uuid4().hex[:8]}")
    os.rename(destination, aside)
    try:
        os.rename(staging, destination)
    except OSError:
        os.rename(aside, destination)
        raise
    _remove(aside)


def _check_paths(source: Path, destination: Path, force: bool) -> None:
    if not source.is_dir():
        raise ConversionError(f"Source folder {source} does not exist.")
    if destination.resolve() == source.resolve() or source.resolve() in destination.resolve().parents:
        raise ConversionError(f"The destination {destination} must be outside the source folder {source}.")
    if (destination.exists() or destination.is_symlink()) and not force:
        raise FileExistsError(f"{destination} already exists; pass --force (force=True) to replace it.")


def _write_folder(staging: Path, source: Path, config, files: list, processor, base_model, license, repo_id) -> str:
    with quiet_transformers():
        config.save_pretrained(staging)
    tokenizer = processor.tokenizer if processor is not None else None
    build_generation_config(source, config, tokenizer).save_pretrained(staging)
    if processor is not None:
        processor.save_pretrained(staging)
    copy_remote_code(staging)  # last: the save_pretrained calls above may copy some of these files too
    placements = {place_file(source / name, staging / name) for name in files}
    if (source / WEIGHTS_INDEX).is_file():
        shutil.copyfile(source / WEIGHTS_INDEX, staging / WEIGHTS_INDEX)
    write_model_card(staging, config, base_model=base_model, license=license, repo_id=repo_id,
                     has_processor=processor is not None)
    return " and ".join(sorted(placements))


def convert_checkpoint(
    source,
    destination,
    *,
    force: bool = False,
    base_model: Optional[str] = None,
    license: Optional[str] = None,
    repo_id: Optional[str] = None,
    log: Callable[[str], None] = print,
) -> ConversionResult:
    """Convert the official-format checkpoint folder `source` into the Hub-ready folder `destination`.

    Everything is checked before anything is written; the folder is assembled beside `destination` and renamed
    into place at the end, so a failed run leaves no partial `destination`. `base_model`, `license` and `repo_id`
    go into the model card (see `vamba_hf.card.write_model_card` for their defaults).
    """
    source, destination = Path(source), Path(destination)
    _check_paths(source, destination, force)
    config = load_source_config(source)
    files, weight_map = find_weight_files(source)
    found = read_checkpoint_shapes(source, files, weight_map)
    check_tensors(found, expected_shapes(config))
    log(f"Checked {len(found)} tensors in {len(files)} file(s) against config.json: all match.")

    warnings = []
    processor, missing_reason = load_source_processor(source)
    if processor is None:
        warnings.append(f"{source} has {missing_reason}: writing a weights-only folder without a processor "
                        f"(AutoProcessor will not load it). Add the Qwen2-VL tokenizer and preprocessor files to "
                        f"the source and convert again to get one.")
        log(f"WARNING: {warnings[-1]}")

    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        placement = _write_folder(staging, source, config, files, processor, base_model, license, repo_id)
        publish(staging, destination, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"Wrote {destination} (weights {placement} from {source}).")
    return ConversionResult(destination, files, len(found), placement, processor is not None, warnings)
