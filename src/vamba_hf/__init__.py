"""vamba-hf: Vamba, the hybrid Mamba-2 / Transformer video LMM, as a native transformers architecture."""

from .configuration_vamba import VambaConfig, VambaMambaConfig, VambaVisionConfig
from .modeling_vamba import VambaForConditionalGeneration, VambaModel, VambaPreTrainedModel

__all__ = [
    "VambaConfig",
    "VambaMambaConfig",
    "VambaVisionConfig",
    "VambaForConditionalGeneration",
    "VambaModel",
    "VambaPreTrainedModel",
]
__version__ = "0.1.0"
