"""Loading a Vamba model quantized, by name: `--quantize int8` and the like, mapped to transformers' own
quantization configs (torchao, bitsandbytes), with what each needs (a package, a GPU) checked before any weight is
read, in one line naming the fix.

Vamba itself declares what stays in full precision (`VambaPreTrainedModel._keep_in_fp32_modules`), so none of
these configs needs a skip list; transformers keeps `lm_head` unquantized by default.
"""

import importlib.util

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
