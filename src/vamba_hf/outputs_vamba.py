"""What Vamba's forward shares with transformers' contracts: the cache argument's name on each line, the keywords it
accepts, its output classes, and the recording of the layers' outputs (transformers' `capture_outputs` where the
installed line has it)."""

import functools
from dataclasses import dataclass, fields
from typing import Optional

import torch
import transformers
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling, CausalLMOutputWithPast

from .checks_vamba import tracing

try:  # transformers >= 5.2: hooks record the layers' outputs that a model's `_can_record_outputs` declares
    from transformers.utils.output_capturing import OutputRecorder, capture_outputs
except ImportError:  # 4.57 and early 5.x: the text model collects them itself
    OutputRecorder = capture_outputs = None

# transformers 5.24 renamed the cache argument of `forward` and the cache field of model outputs from
# `past_key_values` to `cache`; `generate` passes and reads it under the new name only.
CACHE_NAME = "cache" if "cache" in {f.name for f in fields(CausalLMOutputWithPast)} else "past_key_values"

# Keywords of transformers' forward contracts that Vamba accepts and does not need: `cache_position` (4.x generate;
# Vamba's positions follow the cache length and the attention mask).
IGNORED_KEYWORDS = frozenset({"cache_position"})
# transformers 5 returns the vision encoder's output (BaseModelOutputWithPooling) from get_image/video_features,
# transformers 4 the per-item features.
FEATURES_AS_OUTPUT = int(transformers.__version__.split(".")[0]) >= 5


def records_outputs(forward):
    """VambaModel.forward's hidden states and self-attention weights, recorded by transformers' `capture_outputs`
    where the installed line has it (its hooks on the decoder layers; `output_hidden_states` may then also select
    layers by index), else collected by the text model; the output is a tuple for return_dict=False."""
    if capture_outputs is not None:
        recorded = capture_outputs(forward)

        @functools.wraps(forward)
        def with_config_defaults(self, *args, **kwargs):
            # capture_outputs reads a flag passed as None as off; the forward reads it from the config.
            for flag in ("output_hidden_states", "output_attentions"):
                if kwargs.get(flag) is None:
                    kwargs[flag] = getattr(self.config, flag)
            return recorded(self, *args, **kwargs)

        return with_config_defaults

    @functools.wraps(forward)
    def collected(self, *args, return_dict: Optional[bool] = None, **kwargs):
        result = forward(self, *args, **kwargs)
        return result if self._returns_dict(return_dict) else result.to_tuple()

    return collected


def cache_argument(past_key_values, cache):
    """The cache a forward was given, under either name (both at once is ambiguous)."""
    if past_key_values is not None and cache is not None:
        raise ValueError("The cache was given twice, as `past_key_values` and as `cache`: pass it once (`cache` on "
                         "transformers >= 5.24, `past_key_values` before).")
    return cache if cache is not None else past_key_values


def check_keywords(forward_name: str, kwargs: dict):
    """A keyword no contract defines is a mistake (a misspelling, or an argument of another model): name it."""
    unknown = sorted(set(kwargs) - IGNORED_KEYWORDS)
    if unknown:
        raise TypeError(f"{forward_name}() got unexpected keyword argument(s) {unknown}: Vamba's forward takes "
                        f"transformers' VLM inputs (input_ids, attention_mask, position_ids, {CACHE_NAME}, "
                        f"inputs_embeds, pixel_values(_videos), image/video_grid_thw, visual_embeds, labels, ...).")


def check_cache_position(cache_position, past_length) -> None:
    """Vamba's positions follow its cache, so `cache_position` is not needed; one that starts elsewhere than the
    cache's end means the caller keeps a cache this forward does not continue (transformers' exportable static-cache
    wrappers pass their own StaticCache at every step, which Vamba, whose cache also holds the cross-attention K/V,
    never fills): refused, rather than a step that silently forgets the prompt."""
    if cache_position is None or tracing() or not isinstance(past_length, int):
        return
    positions = torch.as_tensor(cache_position).reshape(-1)
    if positions.numel() and int(positions[0]) != past_length:
        raise ValueError(f"cache_position starts at {int(positions[0])} but the cache holds {past_length} positions: "
                         f"pass the cache the previous call returned ({CACHE_NAME}=outputs.{CACHE_NAME}), or no "
                         f"cache_position.")


@dataclass
class VambaModelOutputWithPast(BaseModelOutputWithPast):
    """BaseModelOutputWithPast plus each layer's cross-attention weights (when `output_attentions`) and, as Qwen2-VL
    returns them on transformers 5, the vision tower's output for the images or videos (a BaseModelOutputWithPooling,
    see `get_video_features`; when `output_hidden_states` or `output_attentions`)."""

    cross_attentions: Optional[tuple[torch.FloatTensor, ...]] = None
    image_outputs: Optional[BaseModelOutputWithPooling] = None
    video_outputs: Optional[BaseModelOutputWithPooling] = None


@dataclass
class VambaCausalLMOutputWithPast(CausalLMOutputWithPast):
    """CausalLMOutputWithPast plus the fields VambaModelOutputWithPast adds."""

    cross_attentions: Optional[tuple[torch.FloatTensor, ...]] = None
    image_outputs: Optional[BaseModelOutputWithPooling] = None
    video_outputs: Optional[BaseModelOutputWithPooling] = None
