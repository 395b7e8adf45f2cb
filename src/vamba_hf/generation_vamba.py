"""Vamba's generation: transformers' `GenerationMixin` with what a model whose visual input lives in a cache needs.

The visual inputs reach exactly the prefill; beams and `num_return_sequences` share each video's encoded state instead
of repeating its pixels; `cache_implementation="static"` becomes Vamba's static cache; and a decoding step (one new
token per row over a filled cache) runs as a CUDA graph (`cache_vamba.DecodeGraph`) where it computes exactly what
the eager forward does. Mixed into `VambaForConditionalGeneration`, whose model, head and cache helpers it calls.
"""

from dataclasses import replace
from typing import Optional

import torch
from transformers.cache_utils import StaticCache
from transformers.generation import GenerationMixin

from .cache_vamba import VambaCache, VambaStaticCache, holds_tokens
from .checks_vamba import check_attention_mask, check_generation_counts, check_input_ids, check_position_ids
from .outputs_vamba import CACHE_NAME, VambaCausalLMOutputWithPast
from .streams_vamba import PaddedRows, text_positions
from .video_state_vamba import VideoState, encode_visual_state


class VambaGenerationMixin(GenerationMixin):
    """`generate` and its hooks for VambaForConditionalGeneration, and the CUDA-graph decoding step."""

    _visual_input_names = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw", "visual_embeds",
                           "video_state")
    # Run the static decoding step (what DecodeGraph captures on CUDA) eagerly on other devices too: how the CPU
    # tests check the captured computation. Off by default: off CUDA the plain cache is as fast.
    static_decode_step_off_cuda = False
    _graph_capture_blocked: Optional[bool] = None  # see _has_layers_a_graph_cannot_capture

    # -- the decoding step as a CUDA graph ------------------------------------------------------------------------

    def _decodes_with_graph(self, input_ids, cache, use_cache, visual_inputs, labels, shift_labels,
                            output_hidden_states, output_attentions) -> bool:
        """Whether this forward is a decoding step that the static step (DecodeGraph) computes exactly."""
        if not self.config.decode_with_cuda_graph:  # switched off in the config
            return False
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] != 1:
            return False  # the captured shapes: one new token id per row
        if input_ids.device.type != "cuda" and not self.static_decode_step_off_cuda:  # graphs are CUDA's
            return False
        if type(cache) is not VambaCache or cache.get_seq_length() == 0 or use_cache is False:
            return False  # a step continues a filled cache, and extends it (a static cache's step is compiled)
        if any(x is not None for x in visual_inputs):  # a new visual input is a prefill
            return False
        if labels is not None or shift_labels is not None or torch.is_grad_enabled() or self.training:
            return False  # training: the graph keeps no autograd state
        if output_hidden_states or output_attentions:  # the step returns the logits only
            return False
        if (self.config._attn_implementation or "sdpa") != "sdpa":  # the static K/V buffers are read through SDPA
            return False
        if self._has_layers_a_graph_cannot_capture():
            return False
        # All layers on one device: a graph is captured on one device (device_map splits are not).
        return len(set((getattr(self, "hf_device_map", None) or {"": 0}).values())) == 1

    def _has_layers_a_graph_cannot_capture(self) -> bool:
        """bitsandbytes' 8-bit layers (LLM.int8()) synchronise with the host inside their matmul, which a CUDA graph's
        capture refuses: such a model decodes eagerly. Layers are quantized at loading, so this is read once."""
        if self._graph_capture_blocked is None:
            self._graph_capture_blocked = any(type(module).__name__ == "Linear8bitLt" for module in self.modules())
        return self._graph_capture_blocked

    def _graph_step(self, input_ids, attention_mask, position_ids, cache: VambaCache, return_dict):
        check_input_ids(input_ids, self.config.vocab_size)
        past_length = cache.get_seq_length()
        check_attention_mask(attention_mask, input_ids.shape[0], 1, past_length, check_values=False)
        check_position_ids(position_ids, input_ids.shape[0], 1)
        if position_ids is None:
            position_ids = text_positions(attention_mask, cache.get_seq_length(), 1, input_ids.shape[0],
                                          input_ids.device)
        graph = cache.decode_graph_for(self.decode_step, input_ids.shape[0])
        logits = graph.step(cache, input_ids, position_ids, attention_mask)
        result = VambaCausalLMOutputWithPast(logits=logits, **{CACHE_NAME: cache})
        return result if self._returns_dict(return_dict) else result.to_tuple()

    def decode_step(self, input_ids, position_ids, self_mask, cache: VambaCache) -> torch.Tensor:
        """The text stream's step for one new token per row, with every shape fixed (what DecodeGraph captures), over
        the cache's static step layers."""
        text = self.model.embed_tokens(input_ids)
        rotary = self.rotary(position_ids)
        cross = self._cross_inputs(None, None, rotary, cache, "sdpa", text.dtype)
        return self.lm_head(self.model(text, None, rotary, self_mask, cross, cache, "sdpa").last_hidden_state).float()

    # -- generation -----------------------------------------------------------------------------------------------

    def generate(self, inputs=None, *args, **kwargs):
        """transformers' generate, with the prompt's ids and attention mask checked first (transformers derives
        positions from the mask before any forward runs, where a wrong one fails deep inside, or passes silently)."""
        generation_config = kwargs.get("generation_config") or self.generation_config
        cache_implementation = kwargs.get("cache_implementation", generation_config.cache_implementation)
        # the last: 4.57 assisted decoding
        if cache_implementation not in (None, "static", "dynamic", "dynamic_full"):
            raise ValueError(f"cache_implementation={cache_implementation!r} is not supported: Vamba keeps its own "
                             f"cache (self-attention and cross-attention K/V). Leave cache_implementation unset, or "
                             f"pass 'static' (fixed-size buffers, for a compiled decoding step).")
        check_generation_counts(kwargs, generation_config)
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        if input_ids is not None:
            check_input_ids(input_ids, self.config.vocab_size)
            check_attention_mask(kwargs.get("attention_mask"), input_ids.shape[0], input_ids.shape[1], 0)
        return super().generate(inputs, *args, **kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """transformers' cache for generate; a static one becomes Vamba's before the first forward, so that every
        step (assisted decoding's too) continues the one object."""
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get(CACHE_NAME)
        if isinstance(cache, StaticCache) and not isinstance(cache, VambaStaticCache):
            model_kwargs[CACHE_NAME] = self._static_cache_for(cache)

    def prepare_inputs_for_generation(self, input_ids, inputs_embeds=None, **kwargs):
        """transformers' inputs, with the visual inputs given exactly to the prefill (the forward that fills an empty
        cache): the decoding steps read them from the cached cross-attention K/V. transformers 5 decides this by
        its own iteration count instead, which drops the pixels from an assistant model's prefill. (`inputs_embeds`
        is named: generate starts from embeddings only for a model whose signature shows it.)"""
        model_inputs = super().prepare_inputs_for_generation(input_ids, inputs_embeds=inputs_embeds, **kwargs)
        model_inputs.pop("cache_position", None)
        cache = model_inputs.get(CACHE_NAME)
        prefill = not isinstance(cache, (VambaCache, VambaStaticCache)) or not holds_tokens(cache)
        for name in self._visual_input_names:
            model_inputs.pop(name, None)
            if prefill and kwargs.get(name) is not None:
                model_inputs[name] = kwargs[name]
        return model_inputs

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None,
                                      **model_kwargs):
        """Beam search / num_return_sequences repeat each row. Pixels are not repeated: each distinct image or video
        is encoded once into a state whose K/V all the copies of its row read (`visual_embeds` are repeated with
        their rows: the repetition references the same tensors)."""
        if expand_size == 1:
            return input_ids, model_kwargs
        state = self._shared_state(input_ids, model_kwargs)
        embeds = model_kwargs.pop("visual_embeds", None)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )
        if embeds is not None:
            model_kwargs["visual_embeds"] = [e for e in embeds for _ in range(expand_size)]
        if state is not None:
            if state.row_entries is not None:
                state = replace(state, row_entries=state.row_entries.repeat_interleave(expand_size))
            model_kwargs["video_state"] = state
        return input_ids, model_kwargs

    def _shared_state(self, input_ids, model_kwargs: dict) -> Optional[VideoState]:
        """The video state of this generate call before its rows are repeated: the given one, or one encoded from
        the pixels (one entry per item, `row_entries` the item each prompt row reads, -1 for none)."""
        if model_kwargs.get("video_state") is not None:
            return model_kwargs.pop("video_state")
        for kind, pixels_name, grid_name in (("image", "pixel_values", "image_grid_thw"),
                                             ("video", "pixel_values_videos", "video_grid_thw")):
            pixels, grid = model_kwargs.get(pixels_name), model_kwargs.get(grid_name)
            if pixels is None or grid is None or model_kwargs.get("visual_embeds") is not None:
                continue
            # Prompts given as inputs_embeds come with an empty input_ids: one visual input per row, in order.
            ids = input_ids if input_ids is not None and input_ids.shape[1] else None
            batch_size = (input_ids if input_ids is not None else model_kwargs["inputs_embeds"]).shape[0]
            rows = PaddedRows(self.config).place(ids, batch_size, grid.shape[0])
            model_kwargs.pop(pixels_name), model_kwargs.pop(grid_name)
            state = encode_visual_state(self, kind, pixels, grid)
            entries = torch.full((batch_size,), -1, dtype=torch.long)
            entries[rows] = torch.arange(len(rows))
            return replace(state, row_entries=entries.to(pixels.device))
        return None
