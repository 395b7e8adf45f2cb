"""Loading a Vamba model quantized, by name: `--quantize int8` and the like, mapped to transformers' own
quantization configs (torchao, bitsandbytes), with what each needs (a package, a GPU) checked before any weight is
read, in one line naming the fix.

Vamba itself declares what stays in full precision (`VambaPreTrainedModel._keep_in_fp32_modules`), so none of
these configs needs a skip list; transformers keeps `lm_head` unquantized by default.
"""

import importlib.util
from pathlib import Path

# torch is imported where it is used: the CLI builds its options from this module before torch is imported.

# name -> what it is, where it runs
QUANTIZATIONS = {
    "int8": "int8 weights, one scale per output channel (torchao Int8WeightOnlyConfig); CPU and GPU",
    "int4": "int4 weights in groups of 128 (torchao Int4WeightOnlyConfig, tinygemm layout); CUDA GPUs, bfloat16",
    "float8": "float8 weights and activations, one scale per row (torchao Float8DynamicActivationFloat8WeightConfig); "
              "CUDA GPUs of compute capability 8.9+ (Ada, Hopper, Blackwell)",
    "bnb-int8": "bitsandbytes LLM.int8() weights; CUDA GPUs",
    "bnb-nf4": "bitsandbytes 4-bit NF4 weights, bfloat16 compute; CUDA GPUs",
}
PACKAGES = {"int8": "torchao", "int4": "torchao", "float8": "torchao", "bnb-int8": "bitsandbytes",
            "bnb-nf4": "bitsandbytes"}
FLOAT8_MIN_CAPABILITY = (8, 9)


def choices_help() -> str:
    """The --quantize choices, each with what it is and where it runs."""
    return "; ".join(f"{name}: {what}" for name, what in QUANTIZATIONS.items())


def check_supported(name: str, device) -> None:
    """A one-line error when quantization `name` cannot run here: its package is missing, or it needs a GPU that
    `device` is not."""
    if name not in QUANTIZATIONS:
        raise ValueError(f"--quantize {name}: unknown; choose one of {', '.join(QUANTIZATIONS)}.")
    package = PACKAGES[name]
    if importlib.util.find_spec(package) is None:
        raise ImportError(f"--quantize {name} needs {package}, which is not installed: pip install {package}")
    if name == "int8":
        return
    import torch

    if device.type != "cuda":
        raise ValueError(f"--quantize {name} runs on CUDA GPUs only ({QUANTIZATIONS[name]}); this run is on "
                         f"{device.type}: use --quantize int8 there, or --device cuda on a machine with a GPU.")
    capability = torch.cuda.get_device_capability(device)
    if name == "float8" and capability < FLOAT8_MIN_CAPABILITY:
        raise ValueError(f"--quantize float8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell);"
                         f" {torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]}: use --quantize "
                         f"int8 or int4 on it.")


def quantization_config(name: str, device, dtype=None):
    """transformers' quantization config for `--quantize name` on `device`, for a model loaded in `dtype`, after
    `check_supported`. `dtype` None: bfloat16."""
    import torch

    check_supported(name, device)
    if name == "int4" and dtype not in (None, torch.bfloat16):
        raise ValueError(f"--quantize int4 computes in bfloat16 (its CUDA kernel's only dtype), not "
                         f"{str(dtype).removeprefix('torch.')}: drop --dtype, or pass --dtype bfloat16.")
    from transformers import BitsAndBytesConfig, TorchAoConfig

    if name == "bnb-int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if name == "bnb-nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)
    try:
        from torchao.quantization import (Float8DynamicActivationFloat8WeightConfig, Int4WeightOnlyConfig,
                                          Int8WeightOnlyConfig, PerRow)
    except ImportError as error:  # an install too old for these configs, or broken
        raise ImportError(f"--quantize {name} needs torchao >= 0.18 ({error}): pip install -U torchao") from error

    if name == "int8":
        return TorchAoConfig(Int8WeightOnlyConfig())
    if name == "int4":
        return TorchAoConfig(Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))
    return TorchAoConfig(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


def save_quantized(source, destination, name: str, device: str = "auto", log=print) -> Path:
    """The converted folder `source` saved with its weights quantized (`name`) into the new folder `destination`:
    the weights as transformers serializes them (safetensors), the source's processor and generation files, the
    remote code, and a model card that states the precision. Nothing existing is overwritten: the folder is written
    beside `destination` and renamed into place at the end."""
    import shutil
    import tempfile

    from .convert import quiet_transformers
    from .inference import check_model_folder, resolve_device
    from .modeling_vamba import VambaForConditionalGeneration

    source, destination = Path(source), Path(destination).expanduser().absolute()
    check_model_folder(str(source), str(source))
    if destination.exists() or destination.is_symlink():
        raise ValueError(f"{destination} exists: give a new folder to write the quantized model to.")
    target = resolve_device(device)
    config = quantization_config(name, target)
    placement = {"device_map": str(target)} if target.type == "cuda" else {}
    log(f"Loading {source} with {QUANTIZATIONS[name]} on {target}...")
    with quiet_transformers():
        # The checkpoint's own dtype for what stays unquantized (and for the scales).
        model = VambaForConditionalGeneration.from_pretrained(source, dtype="auto", quantization_config=config,
                                                              **placement)
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        _write_quantized_folder(model, source, staging, name)
        staging.rename(destination)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log(f"Wrote {destination}: {QUANTIZATIONS[name]}.")
    return destination


def _write_quantized_folder(model, source: Path, staging: Path, name: str) -> None:
    import shutil

    from huggingface_hub.repocard import metadata_load

    from .card import write_model_card
    from .convert import PROCESSOR_FILES, copy_remote_code

    try:
        model.save_pretrained(staging)
    except ValueError as error:
        if "not serializable" not in str(error):
            raise
        import transformers

        raise ValueError(f"transformers {transformers.__version__} cannot save {QUANTIZATIONS[name]} as "
                         f"safetensors; transformers 5 can: pip install -U 'transformers>=5.1'") from error
    for file_name in (*PROCESSOR_FILES, "generation_config.json"):
        if (source / file_name).is_file():
            shutil.copyfile(source / file_name, staging / file_name)
    copy_remote_code(staging)
    card = (metadata_load(source / "README.md") if (source / "README.md").is_file() else None) or {}
    has_processor = any((source / file_name).is_file() for file_name in ("tokenizer.json", "vocab.json"))
    write_model_card(staging, model.config, base_model=card.get("base_model"), license=card.get("license"),
                     has_processor=has_processor,
                     precision=f"{QUANTIZATIONS[name]}, saved by `vamba-hf quantize`; loading it needs "
                               f"{PACKAGES[name]} (`pip install {PACKAGES[name]}`)")
