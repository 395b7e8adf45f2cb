"""vamba-hf: Vamba, the hybrid Mamba-2 / Transformer video LMM, as a native transformers architecture.

Importing the package is cheap (torch and transformers load on first use). The first use of any of the names below
(`vamba_hf.VambaConfig`, `from vamba_hf import VambaForConditionalGeneration`, ...) also registers the Auto classes
for model_type "vamba", so a converted folder then loads without remote code; `register_auto_classes()` does it
explicitly.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "VambaConfig": "configuration_vamba",
    "VambaMambaConfig": "configuration_vamba",
    "VambaVisionConfig": "configuration_vamba",
    "VambaForConditionalGeneration": "modeling_vamba",
    "VambaModel": "modeling_vamba",
    "VambaPreTrainedModel": "modeling_vamba",
    "VambaProcessor": "processing_vamba",
    "VambaVideoProcessor": "video_processing_vamba",
    "VideoFrames": "processing_vamba",
    "load_video": "processing_vamba",
    "FrameStream": "video_vamba",
    "stream_video": "video_vamba",
    "VideoState": "video_state_vamba",
    "load_video_state": "video_state_vamba",
}
__all__ = [*_EXPORTS, "register_auto_classes"]
_registered = False


def register_auto_classes() -> None:
    """Make the Auto classes know model_type "vamba" without remote code (the Hub files, which are the same
    modules, leave registration to transformers' trust_remote_code loader)."""
    global _registered
    if _registered:
        return
    import transformers

    from .configuration_vamba import VambaConfig
    from .modeling_vamba import VambaForConditionalGeneration, VambaModel
    from .processing_vamba import VambaProcessor

    transformers.AutoConfig.register("vamba", VambaConfig, exist_ok=True)
    transformers.AutoModel.register(VambaConfig, VambaModel, exist_ok=True)
    for auto_name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):  # the second is gone in transformers 5
        if hasattr(transformers, auto_name):
            getattr(transformers, auto_name).register(VambaConfig, VambaForConditionalGeneration, exist_ok=True)
    transformers.AutoProcessor.register(VambaConfig, VambaProcessor, exist_ok=True)
    _registered = True


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_EXPORTS])
