"""`vamba-hf quantize`: a converted folder saved with its weights quantized (the names and configs are
`quantization`'s; loading and the device are `inference`'s)."""

from pathlib import Path

from .quantization import PACKAGES, QUANTIZATIONS, quantization_config


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
