"""vamba-hf: Vamba, the hybrid Mamba-2 / Transformer video LMM, as a native transformers architecture."""

from .configuration_vamba import VambaConfig, VambaMambaConfig, VambaVisionConfig
from .modeling_vamba import VambaForConditionalGeneration, VambaModel, VambaPreTrainedModel
from .processing_vamba import VambaProcessor, VideoFrames, load_video


def _register_auto_classes():
    """`import vamba_hf` makes the Auto classes know model_type "vamba" without remote code (the Hub files, which
    are the same modules, leave registration to transformers' trust_remote_code loader)."""
    import transformers

    transformers.AutoConfig.register("vamba", VambaConfig, exist_ok=True)
    transformers.AutoModel.register(VambaConfig, VambaModel, exist_ok=True)
    for auto_name in ("AutoModelForImageTextToText", "AutoModelForVision2Seq"):  # the second is gone in transformers 5
        if hasattr(transformers, auto_name):
            getattr(transformers, auto_name).register(VambaConfig, VambaForConditionalGeneration, exist_ok=True)
    transformers.AutoProcessor.register(VambaConfig, VambaProcessor, exist_ok=True)


_register_auto_classes()

__all__ = [
    "VambaConfig",
    "VambaMambaConfig",
    "VambaVisionConfig",
    "VambaForConditionalGeneration",
    "VambaModel",
    "VambaPreTrainedModel",
    "VambaProcessor",
    "VideoFrames",
    "load_video",
]
__version__ = "0.1.0"
