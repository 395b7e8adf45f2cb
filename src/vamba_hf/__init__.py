"""vamba-hf: Vamba, the hybrid Mamba-2 / Transformer video LMM, as a native transformers architecture."""

from .configuration_vamba import VambaConfig, VambaMambaConfig, VambaVisionConfig
from .modeling_vamba import VambaForConditionalGeneration, VambaModel, VambaPreTrainedModel
from .processing_vamba import VambaProcessor, VideoFrames, load_video

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
