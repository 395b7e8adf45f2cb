"""Turn an official-format Vamba checkpoint folder into a Hub-ready folder the Auto classes load.

The official release (`TIGER-Lab/Vamba-Qwen2-VL-7B`) is a `model_type: "qwen2_vl"` folder with no `auto_map`.
`convert_checkpoint` writes our config (`model_type: "vamba"`, our `auto_map` only), the remote-code files, the
processor with Vamba's chat template, a generation config and a model card next to the *unchanged* weight files.
Weights are never loaded: only the safetensors headers are read, to check every tensor name, shape and dtype
against the config before anything is written.

Nothing outside the destination is touched: the folder is assembled in `.DST.partial-<pid>-<random>` beside it
and renamed into place. Convert records what it wrote in `CONVERT_RECORD` (every file's size and SHA-256): only a
folder whose files are exactly those of its record is ever replaced (`--force`) or removed (the work folders a
killed run left beside DST, once their process is gone). Every file read from the source must be a regular file
(a link only inside a Hub cache snapshot, into its blobs), and text files of bounded size.
"""

import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import signal
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from .card import write_model_card
from .source_files import (REMOTE_CODE_FILES, ConversionError, check_source_file, expected_shapes, is_hub_repo_id,
                           read_regular_file)
from .errors import VambaUserError, hub_error_message, is_network_error

SINGLE_WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
IMAGE_PROCESSOR_FILE = "preprocessor_config.json"
# transformers 5 saves the image processor's settings inside this file instead.
PROCESSOR_FILE = "processor_config.json"
# Either of these makes a loadable Qwen2 tokenizer (the fast one, or the slow BPE files).
TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))
# The tokenizer / processor files transformers reads and writes (4.57 to 5.x).
PROCESSOR_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "added_tokens.json",
    "special_tokens_map.json", "chat_template.jinja", "chat_template.json", IMAGE_PROCESSOR_FILE, PROCESSOR_FILE,
    "video_preprocessor_config.json",
)
# Every file of a converted folder but the weight shards.
HUB_FILES = frozenset({"config.json", "generation_config.json", "README.md", SINGLE_WEIGHTS, WEIGHTS_INDEX,
                       *REMOTE_CODE_FILES, *PROCESSOR_FILES})
# The small files convert (or its model card) may read from a source folder.
SOURCE_TEXT_FILES = ("config.json", "generation_config.json", "README.md", WEIGHTS_INDEX, *PROCESSOR_FILES)
# Config keys that make transformers fetch or run code named by the folder; a converted folder has only ours.
REMOTE_CODE_KEYS = ("auto_map", "custom_pipelines")
PICKLE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# What convert wrote into a folder: each file's size and SHA-256 (hidden: never uploaded, ignored by transformers).
CONVERT_RECORD = ".vamba-hf-convert.json"
CONVERT_RECORD_WRITER = "vamba-hf convert"
# Config, tokenizer and processor files are a few MB at most (Qwen2-VL's tokenizer.json: 7 MB).
HUB_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "README.md"]  # the card: its license
IM_END_TOKEN = "<|im_end|>"

# Bytes per element of each safetensors dtype; Vamba's weights are the floating-point ones.
SAFETENSORS_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
                           "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")

_MAX_HEADER_BYTES = 100 * 2**20  # real headers are kilobytes; a huge length means this is not safetensors
_MAX_LISTED_NAMES = 8
_WORK_FOLDER_TAGS = ("partial", "replaced")



class DestinationExistsError(ConversionError, FileExistsError):
    """The destination exists and --force was not given."""


@dataclass
class ConversionResult:
    destination: Path
    weight_files: list
    num_tensors: int
    weights_placement: str  # "hard-linked", "copied" or "hard-linked and copied"
    has_processor: bool
    warnings: list = field(default_factory=list)


@dataclass
class TensorInfo:
    dtype: str
    shape: tuple
    file: str


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


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`; a ConversionError naming the file when it is not a regular file of bounded size,
    not valid JSON or not an object."""
    try:
        value = json.loads(read_regular_file(path).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as error:
        raise ConversionError(f"{path} is not valid JSON ({error}); fix or replace the file.") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path} holds a JSON {type(value).__name__}, not an object; fix or replace the file.")
    return value


def check_source_files(source: Path, weight_files: tuple = (SINGLE_WEIGHTS,)) -> None:
    """`check_source_file` for every file of `source` that convert may read: config, card, index and processor
    files (bounded in size), and `weight_files`."""
    for name in SOURCE_TEXT_FILES:
        if os.path.lexists(source / name):
            check_source_file(source / name)
    for name in weight_files:
        if os.path.lexists(source / name):
            check_source_file(source / name, max_bytes=None)


def _without_remote_code_keys(value):
    """`value` (parsed JSON) with every `auto_map` / `custom_pipelines` entry removed, at any depth."""
    if isinstance(value, dict):
        return {key: _without_remote_code_keys(item) for key, item in value.items() if key not in REMOTE_CODE_KEYS}
    if isinstance(value, list):
        return [_without_remote_code_keys(item) for item in value]
    return value


def load_source_config(source: Path):
    """The source's config as a `VambaConfig`, after checking that it describes a Vamba model. The source's own
    `auto_map` is dropped: the converted folder maps only to our remote code."""
    from .configuration_vamba import AUTO_MAP, VambaConfig

    path = source / "config.json"
    if not path.is_file():
        raise ConversionError(f"{source} has no config.json: it is not a checkpoint folder.")
    raw = read_json_object(path)
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
    if "quantization_config" in raw:
        raise ConversionError(f"{path} describes a quantized checkpoint (quantization_config); convert supports the "
                              f"unquantized floating-point weights only.")
    try:
        with quiet_transformers():
            # Built as from keyword arguments, not loaded as a saved config: a near-miss of a Vamba key in the
            # source is a misspelling to fix before it is written into the converted folder.
            config = VambaConfig(**_without_remote_code_keys(raw))
    except ValueError as error:
        raise ConversionError(f"{path}: {error}") from None
    except (TypeError, AttributeError, KeyError) as error:
        raise ConversionError(f"{path}: transformers cannot read this config ({type(error).__name__}: {error}); "
                              f"fix the value it names.") from None
    config.architectures = ["VambaForConditionalGeneration"]
    config.auto_map = dict(AUTO_MAP)
    return config


def is_plain_file_name(name) -> bool:
    """A name of a file directly inside a folder: no separators, no `..`, not absolute, not hidden."""
    return (isinstance(name, str) and name == os.path.basename(name) and "\\" not in name and "\0" not in name
            and not name.startswith(".") and not os.path.isabs(name))


def read_weight_index(index_path: Path) -> dict:
    """The tensor -> shard map of a safetensors index, every shard a plain `.safetensors` file name."""
    weight_map = read_json_object(index_path).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ConversionError(f"{index_path} has no 'weight_map' object naming the shard of each tensor.")
    for tensor, shard in weight_map.items():
        if not (is_plain_file_name(shard) and shard.endswith(".safetensors")):
            raise ConversionError(f"{index_path} puts {tensor} in {shard!r}: a shard must be a plain .safetensors "
                                  f"file name inside the checkpoint folder (no folders, '..' or absolute paths).")
    return weight_map


def find_weight_files(source: Path) -> tuple[list, Optional[dict]]:
    """The safetensors files of the checkpoint and, when sharded, the index's tensor -> file map. Pickled
    PyTorch weights are refused, never opened."""
    index_path = source / WEIGHTS_INDEX
    if index_path.is_file():
        weight_map = read_weight_index(index_path)
        files = sorted(set(weight_map.values()))
        check_source_files(source, tuple(files))
        absent = [name for name in files if not (source / name).is_file()]
        if absent:
            raise ConversionError(
                f"{index_path} names shard file(s) that are missing from {source}: {', '.join(absent)}. "
                f"Download them (e.g. `huggingface-cli download` again) and convert again."
            )
        return files, weight_map
    if (source / SINGLE_WEIGHTS).is_file():
        return [SINGLE_WEIGHTS], None
    pickled = sorted({path.name for pattern in PICKLE_WEIGHT_PATTERNS for path in source.glob(pattern)})
    if pickled:
        raise ConversionError(f"{source} holds pickled PyTorch weights ({', '.join(pickled[:3])}), which convert "
                              f"never opens (unpickling can run code); only safetensors checkpoints are supported: "
                              f"get the model.safetensors files of the checkpoint.")
    raise ConversionError(f"{source} has neither {SINGLE_WEIGHTS} nor {WEIGHTS_INDEX}.")


def _not_safetensors(path: Path, why: str) -> ConversionError:
    return ConversionError(f"{path} is not a valid safetensors file ({why}); download it again.")


def _check_tensor_entry(path: Path, name, info) -> tuple:
    """(dtype, shape, (begin, end)) of one header entry, after checking its types and its byte size."""
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise _not_safetensors(path, f"header entry {name!r} lacks dtype, shape or data_offsets")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if dtype not in SAFETENSORS_DTYPE_SIZES:
        raise _not_safetensors(path, f"tensor {name} has the unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise _not_safetensors(path, f"tensor {name} has the shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2
            and all(isinstance(n, int) and not isinstance(n, bool) for n in offsets) and 0 <= offsets[0] <= offsets[1]):
        raise _not_safetensors(path, f"tensor {name} has the data_offsets {offsets!r}")
    if offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPE_SIZES[dtype]:
        raise _not_safetensors(path, f"tensor {name}: {dtype} {shape} does not fill data_offsets {offsets}")
    return dtype, tuple(shape), tuple(offsets)


def read_safetensors_header(path: Path) -> dict:
    """Tensor name -> {"dtype", "shape", "data_offsets"} from a safetensors file, reading only its header, after
    checking the header's structure, that the tensors tile the data exactly, and the file's length."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _not_safetensors(path, "shorter than 8 bytes")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > _MAX_HEADER_BYTES:
            raise _not_safetensors(path, f"header length {header_size}")
        try:
            header = json.loads(f.read(header_size).decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise _not_safetensors(path, f"unreadable header: {error}") from None
    if not isinstance(header, dict):
        raise _not_safetensors(path, "the header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise _not_safetensors(path, "__metadata__ is not an object of strings")
    spans = sorted(_check_tensor_entry(path, name, info)[2] for name, info in header.items())
    position = 0
    for begin, end in spans:
        if begin != position:
            raise _not_safetensors(path, f"the tensor data has a gap or an overlap at byte {position}")
        position = end
    expected_size, size = 8 + header_size + position, path.stat().st_size
    if size < expected_size:
        raise ConversionError(f"{path} is truncated: its header describes {expected_size} bytes but the file has "
                              f"{size}. Download it again.")
    if size > expected_size:
        raise _not_safetensors(path, f"{size - expected_size} bytes follow the tensor data")
    return header


def read_checkpoint_tensors(source: Path, files: list, weight_map: Optional[dict]) -> dict:
    """Tensor name -> TensorInfo over all weight files, checking the index (if any) against the shards' headers."""
    tensors = {}
    for name in files:
        for tensor, info in read_safetensors_header(source / name).items():
            if tensor in tensors:
                raise ConversionError(f"Tensor {tensor} is stored twice (in {tensors[tensor].file} and {name}).")
            if weight_map is not None and weight_map.get(tensor) != name:
                raise ConversionError(f"{WEIGHTS_INDEX} puts {tensor} in {weight_map.get(tensor)}, but it is in "
                                      f"{name}.")
            tensors[tensor] = TensorInfo(info["dtype"], tuple(info["shape"]), name)
    if weight_map is not None:
        unstored = sorted(set(weight_map) - set(tensors))
        if unstored:
            raise ConversionError(_listing(f"{WEIGHTS_INDEX} lists tensor(s) that no shard holds", unstored) + ".")
    return tensors


def _listing(title: str, names: list) -> str:
    shown = names[:_MAX_LISTED_NAMES]
    more = f"; ... and {len(names) - len(shown)} more" if len(names) > len(shown) else ""
    return f"{title} ({len(names)}): " + "; ".join(shown) + more


def check_tensors(found: dict, expected: dict) -> None:
    """Raise a `ConversionError` naming every missing, unexpected, wrongly shaped and non-floating-point tensor
    of `found` (name -> TensorInfo) against `expected` (name -> shape)."""
    shapes = {name: info.shape for name, info in found.items()}
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    wrong_shape = [
        f"{name}: checkpoint {list(shapes[name])}, config expects {list(expected[name])}"
        for name in sorted(set(shapes) & set(expected))
        if shapes[name] != expected[name]
    ]
    not_float = [f"{name}: {info.dtype}" for name, info in sorted(found.items()) if info.dtype not in FLOAT_DTYPES]
    problems = [
        _listing(title, names)
        for title, names in (("missing tensors", missing), ("unexpected tensors", unexpected),
                             ("tensors with a wrong shape", wrong_shape),
                             (f"tensors not stored as floating point {', '.join(FLOAT_DTYPES)}", not_float))
        if names
    ]
    if problems:
        raise ConversionError("The weights do not match config.json: " + " | ".join(problems) + ".")


def _has_tokenizer(source: Path) -> bool:
    return any(all((source / name).is_file() for name in names) for names in TOKENIZER_FILE_SETS)


def _has_image_processor(source: Path) -> bool:
    if (source / IMAGE_PROCESSOR_FILE).is_file():
        return True
    processor_file = source / PROCESSOR_FILE
    return processor_file.is_file() and "image_processor" in read_json_object(processor_file)


def _copy_processor_sources(source: Path, scratch: Path) -> None:
    """The source's tokenizer / image-processor files (and config.json, which the Auto classes may consult) in
    `scratch`, with every remote-code pointer removed, so loading them can never reach code the source names."""
    scratch.mkdir()
    for name in (*PROCESSOR_FILES, "config.json"):
        if not (source / name).is_file():
            continue
        if name.endswith(".json"):
            cleaned = _without_remote_code_keys(read_json_object(source / name))
            (scratch / name).write_text(json.dumps(cleaned, ensure_ascii=False), encoding="utf-8")
        else:
            place_file(source / name, scratch / name)


def load_source_processor(source: Path, scratch: Path):
    """A `VambaProcessor` from the source's tokenizer and image-processor files, with Vamba's chat template, or
    None with the reason when the files are not there. `scratch` (created, left for the caller to remove) holds
    the cleaned copies the processor is read from."""
    if not _has_tokenizer(source):
        return None, "no tokenizer files (tokenizer.json, or vocab.json + merges.txt)"
    if not _has_image_processor(source):
        return None, f"no image processor settings ({IMAGE_PROCESSOR_FILE})"
    from transformers import AutoImageProcessor, AutoTokenizer

    from .processing_vamba import VAMBA_CHAT_TEMPLATE, VambaProcessor

    _copy_processor_sources(source, scratch)
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(scratch, trust_remote_code=False)
            image_processor = AutoImageProcessor.from_pretrained(scratch, trust_remote_code=False)
    except Exception as error:  # tokenizers and transformers raise many types for bad files; all are reported
        raise ConversionError(f"The tokenizer / image processor files in {source} cannot be loaded "
                              f"({type(error).__name__}: {error}); fix or replace them (they are Qwen2-VL's).") \
            from None
    if tokenizer.convert_tokens_to_ids(IM_END_TOKEN) in (None, tokenizer.unk_token_id):
        raise ConversionError(f"The tokenizer in {source} has no {IM_END_TOKEN} token: it is not Qwen2-VL's.")
    # The source's own template (Qwen2-VL's) would insert <|image_pad|>/<|video_pad|> runs Vamba never reads.
    tokenizer.chat_template = VAMBA_CHAT_TEMPLATE
    processor = VambaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=VAMBA_CHAT_TEMPLATE)
    return processor, None


def _weights_only_warning(source: Path, missing_reason: str) -> str:
    official = read_json_object(source / "config.json").get("model_type") == "qwen2_vl"
    weights = "official-format Vamba weights" if official else "Vamba weights"
    return (f"{source} holds {weights} but {missing_reason}: writing a weights-only folder without a processor "
            f"(AutoProcessor will not load it). To get one, copy the Qwen2-VL tokenizer and preprocessor files (e.g. "
            f"from Qwen/Qwen2-VL-7B-Instruct) into {source} and convert again.")


def build_generation_config(source: Path, config, tokenizer):
    """The source's generation config (or one derived from the config), stopping at `<|im_end|>` when the
    tokenizer is known: the chat template ends every turn with it. Checked as strictly as saving it will be."""
    from transformers import GenerationConfig

    path = source / "generation_config.json"
    try:
        with quiet_transformers():
            if path.is_file():
                generation_config = GenerationConfig.from_dict(_without_remote_code_keys(read_json_object(path)))
            else:
                generation_config = GenerationConfig.from_model_config(config)
            if tokenizer is not None:
                generation_config.eos_token_id = tokenizer.convert_tokens_to_ids(IM_END_TOKEN)
                if tokenizer.pad_token_id is not None:
                    generation_config.pad_token_id = tokenizer.pad_token_id
            generation_config.validate(strict=True)
    except (TypeError, ValueError) as error:
        if isinstance(error, VambaUserError):
            raise
        where = path if path.is_file() else f"the generation settings of {source / 'config.json'}"
        raise ConversionError(f"{where}: {error}") from None
    # Otherwise transformers may rebuild it from the model config at generate time, dropping the stop token.
    generation_config._from_model_config = False
    return generation_config


# -- where the source is ---------------------------------------------------------------------------------------


def local_source_folder(source) -> Optional[Path]:
    """The folder `source` names when it exists; None when `source` can only be a Hub repo id. Anything that
    exists locally is taken as local (a file is an error, never a repo id); a missing path that is not of the
    repo-id form is an error that says it does not exist."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConversionError(f"{source} is a file, not a folder: give the checkpoint folder (the one holding "
                              f"config.json and the weights).")
    if path.is_symlink():
        raise ConversionError(f"{source} is a symbolic link to {os.readlink(path)}, which does not exist.")
    if isinstance(source, Path) or not is_hub_repo_id(str(source)):
        hint = "" if "/" in str(source) else (" (a Hub repo id has the form namespace/name, e.g. "
                                              "TIGER-Lab/Vamba-Qwen2-VL-7B)")
        raise ConversionError(f"Source folder {source} does not exist{hint}.")
    return None


def _download_failure(repo_id: str, error: Exception) -> Optional[ConversionError]:
    message = hub_error_message(error, f"Downloading {repo_id} from the Hugging Face Hub failed")
    if message is None:
        return None
    return ConversionError(f"{message} (Or download the checkpoint elsewhere and convert the local folder.)")


def _hub_is_reachable(repo_id: str) -> bool:
    """Whether the Hub answers about `repo_id` within HF_HUB_ETAG_TIMEOUT seconds (snapshot_download's own first
    request has no timeout, so an unanswering network would hang it). A missing, gated or forbidden repo raises."""
    from huggingface_hub import HfApi, constants

    try:
        HfApi().model_info(repo_id, timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except Exception as error:
        if is_network_error(error):
            return False
        failure = _download_failure(repo_id, error)
        if failure is None:
            raise
        raise failure from None
    return True


def download_source(repo_id: str, log: Callable[[str], None] = print) -> Path:
    """The official checkpoint's files from the Hub (config, weights, tokenizer, processor), in the Hub cache; an
    existing local path of that name is returned as it is, never taken for a repo id. When the Hub cannot be
    reached (or HF_HUB_OFFLINE is set), only the local cache is used.

    Converting from the cache hard-links the weights, so no second copy of them is made.
    """
    local = local_source_folder(repo_id)
    if local is not None:
        return local
    from huggingface_hub import constants, snapshot_download

    cache_only = constants.HF_HUB_OFFLINE or not _hub_is_reachable(repo_id)
    log(f"No local folder {repo_id}: " + ("looking for it in the local Hub cache (the Hub cannot be reached)..."
                                          if cache_only else "downloading it from the Hugging Face Hub..."))
    options = {"local_files_only": True} if cache_only else {}
    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_DOWNLOAD_PATTERNS, **options))
    except Exception as error:
        failure = _download_failure(repo_id, error)
        if failure is None:
            raise
        raise failure from None


def resolve_source(source, log: Callable[[str], None] = print) -> Path:
    """The checkpoint folder `source` names: a local folder, or a Hub repo id (namespace/name) downloaded into the
    Hub cache when no such local path exists."""
    local = local_source_folder(source)
    return local if local is not None else download_source(str(source), log)


# -- the destination -------------------------------------------------------------------------------------------


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def write_convert_record(folder: Path) -> None:
    """Record every file of `folder` (name, size, SHA-256) in `CONVERT_RECORD`: the proof, later, that the folder
    holds what convert wrote and nothing else."""
    files = {path.name: {"size": path.stat().st_size, "sha256": _sha256_of(path)} for path in sorted(folder.iterdir())}
    record = {"written_by": CONVERT_RECORD_WRITER, "files": files}
    (folder / CONVERT_RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def _recorded_files(folder: Path) -> dict:
    """name -> {"size", "sha256"} from the folder's convert record; ConversionError saying why when there is none."""
    path = folder / CONVERT_RECORD
    if path.is_symlink() or not path.is_file():
        raise ConversionError(f"it has no {CONVERT_RECORD}, the record convert writes of its files")
    try:
        record = read_json_object(path)
    except (OSError, ConversionError):
        raise ConversionError(f"its {CONVERT_RECORD} is unreadable") from None
    files = record.get("files")
    if record.get("written_by") != CONVERT_RECORD_WRITER or not isinstance(files, dict) or not all(
            isinstance(facts, dict) for facts in files.values()):
        raise ConversionError(f"its {CONVERT_RECORD} is not one convert wrote")
    return files


def why_not_convert_output(folder: Path) -> Optional[str]:
    """None when `folder` is empty or holds exactly the files convert recorded writing there (`CONVERT_RECORD`),
    each unchanged since (size and SHA-256); otherwise why it is not, e.g. a model saved or fine-tuned into it."""
    entries = set(os.listdir(folder))
    if not entries:
        return None
    try:
        files = _recorded_files(folder)
    except ConversionError as error:
        return str(error)
    extra, missing = sorted(entries - set(files) - {CONVERT_RECORD}), sorted(set(files) - entries)
    if extra:
        return f"it holds {', '.join(extra[:5])}{' ...' if len(extra) > 5 else ''}, which convert did not write"
    if missing:
        return f"{', '.join(missing[:5])} of its record {'is' if len(missing) == 1 else 'are'} missing"
    paths = {name: folder / name for name in sorted(files)}
    for name, path in paths.items():  # the sizes first: they are cheap
        if path.is_symlink() or not path.is_file() or path.stat().st_size != files[name].get("size"):
            return f"{name} is not the file convert wrote"
    for name, path in paths.items():
        if _sha256_of(path) != files[name].get("sha256"):
            return f"{name} changed since convert wrote it"
    return None


def _overlap_message(source: Path, destination: Path) -> Optional[str]:
    source_real, destination_real = source.resolve(), destination.resolve()
    if destination_real == source_real:
        return f"The destination {destination} is the source folder {source}: choose another destination."
    if source_real in destination_real.parents:
        return (f"The destination {destination} is inside the source folder {source}: choose a destination outside "
                f"the source folder.")
    if destination_real in source_real.parents:
        return (f"The source folder {source} is inside the destination {destination}: choose a destination that "
                f"does not contain the source.")
    return None


def check_paths(source: Path, destination: Path, force: bool) -> None:
    """Refuse a destination that overlaps the source (either way, through links too), that is a link or a file,
    or that exists without `force`. `force` replaces only an empty folder or a previous convert output."""
    overlap = _overlap_message(source, destination)
    if overlap:
        raise ConversionError(overlap)
    if destination.is_symlink():
        raise ConversionError(f"The destination {destination} is a symbolic link: give the path of a real folder.")
    if not destination.exists():
        return
    if not destination.is_dir():
        raise ConversionError(f"The destination {destination} is a file, not a folder: remove it or choose another "
                              f"destination.")
    if not force:
        raise DestinationExistsError(f"{destination} already exists; pass --force (force=True) to replace it.")
    reason = why_not_convert_output(destination)
    if reason:
        raise ConversionError(
            f"--force replaces only an empty folder or one written by vamba-hf convert and unchanged since (the "
            f"files its {CONVERT_RECORD} lists, nothing else); {destination} is not one ({reason}): remove it "
            f"yourself or choose another destination."
        )


def _work_folder_pattern(destination: Path) -> re.Pattern:
    tags = "|".join(_WORK_FOLDER_TAGS)
    return re.compile(rf"^\.{re.escape(destination.name)}\.({tags})-(\d+)-[0-9a-f]+$")


def _work_folder(destination: Path, tag: str) -> Path:
    return destination.with_name(f".{destination.name}.{tag}-{os.getpid()}-{secrets.token_hex(4)}")


def _process_is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_work_folders(destination: Path, log: Callable[[str], None]) -> None:
    """Remove the work folders of `destination` that a killed convert left beside it (their process is gone, and
    they hold exactly the files convert recorded writing); a replaced previous output whose successor never arrived
    is put back instead. Any other folder of such a name is left as it is, with a message."""
    if not destination.parent.is_dir():
        return
    pattern = _work_folder_pattern(destination)
    for entry in sorted(destination.parent.iterdir()):
        match = pattern.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir() or _process_is_alive(int(match.group(2))):
            continue
        reason = why_not_convert_output(entry)
        if reason:
            log(f"Left {entry} as it is: it is named like a folder of an interrupted convert, but {reason}. Remove it "
                f"yourself if it holds nothing of yours.")
        elif match.group(1) == "replaced" and not (destination.exists() or destination.is_symlink()):
            os.rename(entry, destination)
            log(f"Restored {destination} from {entry.name}, left by an interrupted convert.")
        else:
            shutil.rmtree(entry)
            log(f"Removed {entry}, left by an interrupted convert (process {match.group(2)}).")


def _make_parents(folder: Path) -> list:
    """Create `folder` and its missing ancestors (mode from the umask); returns those created, deepest last."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir()
    return list(reversed(missing))


def _remove_created(folders: list) -> None:
    for path in reversed(folders):
        with contextlib.suppress(OSError):
            path.rmdir()  # only if still empty


@contextlib.contextmanager
def _termination_as_interrupt():
    """While the folder is written, SIGTERM and SIGHUP raise KeyboardInterrupt so that the cleanup runs (only where
    they still have their default action, and only in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_DFL:
            previous[sig] = signal.signal(sig, interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


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
        # A fresh file, so that its mode follows the umask, not that of a copy save_pretrained may have made.
        (destination / name).unlink(missing_ok=True)
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
    check_paths(staging, destination, force)  # again: the destination may have changed while the folder was written
    aside = _work_folder(destination, "replaced")
    os.rename(destination, aside)
    try:
        os.rename(staging, destination)
    except BaseException:  # an interrupt may also land just after the rename
        if not destination.exists():
            os.rename(aside, destination)
        raise
    _remove(aside)


def _save_processor(processor, staging: Path) -> None:
    """The processor's files in `staging`: saved to a scratch folder, then moved over when they are processor
    files (remote code comes from `copy_remote_code`), with our AutoProcessor as the only `auto_map`."""
    from .configuration_vamba import AUTO_MAP

    scratch = staging / ".processor"
    processor.save_pretrained(scratch)
    for path in sorted(scratch.iterdir()):
        if path.suffix == ".py":
            continue
        if path.name not in PROCESSOR_FILES:
            raise ConversionError(f"transformers saved the processor file {path.name}, which vamba-hf does not know; "
                                  f"please report this with your transformers version.")
        if path.suffix == ".json":
            saved = read_json_object(path)
            cleaned = _without_remote_code_keys(saved)
            if "auto_map" in saved:
                cleaned["auto_map"] = {"AutoProcessor": AUTO_MAP["AutoProcessor"]}
            if cleaned != saved:
                path.write_text(json.dumps(cleaned, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        os.replace(path, staging / path.name)
    shutil.rmtree(scratch)


def _write_index(staging: Path, weight_map: dict, tensors: dict) -> None:
    total = sum(math.prod(info.shape) * SAFETENSORS_DTYPE_SIZES[info.dtype] for info in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (staging / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def check_hub_folder(folder: Path, weight_files: list) -> None:
    """Every file in `folder` is one a converted folder holds (our own invariant, checked before publishing)."""
    extra = sorted(set(os.listdir(folder)) - HUB_FILES - set(weight_files))
    if extra:
        raise ConversionError(f"Internal error: the converted folder would hold unexpected files {extra}; please "
                              f"report this.")


def _writing(destination: Path, step, *args):
    """`step(*args)`, with a filesystem failure (permissions, a full disk) reported as the destination's."""
    try:
        return step(*args)
    except VambaUserError:
        raise
    except OSError as error:
        raise ConversionError(f"Could not write {destination}: {error}.") from error


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
    """Convert the official-format checkpoint `source` (a folder, or a Hub repo id namespace/name when no such
    local path exists) into the Hub-ready folder `destination`.

    Everything is checked before anything is written; the folder is assembled beside `destination` and renamed
    into place at the end, so a failed or interrupted run leaves no partial `destination` (a killed one leaves a
    `.DST.partial-*` folder that the next run removes once it holds exactly what its record lists). With `force`,
    only an empty folder or a previous convert output, unchanged since (`CONVERT_RECORD`), is replaced. `base_model`, `license` and `repo_id` go into the model card (see
    `vamba_hf.card.write_model_card` for their defaults). Raises `ConversionError` (a `VambaUserError`) with a
    one-line message for anything the user can fix.
    """
    source = resolve_source(source, log)
    check_source_files(source)
    # Absolute but with links unresolved: "." and ".." get a name, and a link stays visible to `check_paths`.
    destination = Path(os.path.abspath(Path(destination).expanduser()))
    remove_stale_work_folders(destination, log)
    check_paths(source, destination, force)
    config = load_source_config(source)
    files, weight_map = find_weight_files(source)
    tensors = read_checkpoint_tensors(source, files, weight_map)
    check_tensors(tensors, expected_shapes(config))
    log(f"Checked {len(tensors)} tensors in {len(files)} file(s) against config.json: all match.")

    created = _writing(destination, _make_parents, destination.parent)
    staging = _work_folder(destination, "partial")
    warnings = []
    try:
        with _termination_as_interrupt():
            _writing(destination, staging.mkdir)
            processor, missing_reason = _writing(destination, load_source_processor, source, staging / ".source")
            shutil.rmtree(staging / ".source", ignore_errors=True)
            if processor is None:
                warnings.append(_weights_only_warning(source, missing_reason))
                log(f"WARNING: {warnings[-1]}")
            placement = _writing(destination, _write_folder, staging, source, config, files, weight_map, tensors,
                                 processor, dict(base_model=base_model, license=license, repo_id=repo_id))
            _writing(destination, publish, staging, destination, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_created(created)
        raise
    log(f"Wrote {destination} (weights {placement} from {source}).")
    return ConversionResult(destination, files, len(tensors), placement, processor is not None, warnings)


def _write_folder(staging: Path, source: Path, config, files: list, weight_map: Optional[dict], tensors: dict,
                  processor, card_options: dict) -> str:
    with quiet_transformers():
        config.save_pretrained(staging)
    tokenizer = processor.tokenizer if processor is not None else None
    build_generation_config(source, config, tokenizer).save_pretrained(staging)
    if processor is not None:
        _save_processor(processor, staging)
    copy_remote_code(staging)  # last: the save_pretrained calls above may copy some of these files too
    placements = {place_file(source / name, staging / name) for name in files}
    if weight_map is not None:
        _write_index(staging, weight_map, tensors)
    write_model_card(staging, config, has_processor=processor is not None, **card_options)
    check_hub_folder(staging, files)
    write_convert_record(staging)
    return " and ".join(sorted(placements))
