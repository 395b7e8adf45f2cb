"""Vamba: Qwen2-VL whose visual tokens skip self-attention.

Text tokens run through decoder layers of self-attention + cross-attention + MLP; visual tokens (the Qwen2-VL
vision tower's output) run through one Mamba-2 block per layer and are read by the text as cross-attention keys
and values. The modules follow the paper's figure: `vision_vamba` (vision tower) -> `mamba2_vamba` (Mamba-2 on the
visual stream) -> `decoder_vamba` (decoder layer, the text model's layer loop) -> this module (the model as named
stages) -> `generation_vamba` (generate's hooks, the CUDA-graph decoding step); `streams_vamba` lays out a batch's
rows, `cache_vamba` keeps what decoding needs.
"""

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.modeling_utils import PreTrainedModel
from transformers.utils import logging

from .cache_vamba import VambaCache, VambaStaticCache, holds_tokens
from .checks_vamba import (check_attention_mask, check_finite_logits, check_input_ids, check_inputs_embeds,
                           check_labels, check_position_ids, check_visual_embeds, check_visual_pixels)
from .configuration_vamba import VambaConfig
from .decoder_vamba import CrossAttentionInputs, MultimodalRotary, VambaDecoderLayer, VambaTextModel
from .generation_vamba import VambaGenerationMixin
from .layers_vamba import VambaRMSNorm, attention_mask_for, custom_self_mask, share_compile_state
# transformers 4.x copies into its module cache only the modules this file imports, not the ones they import: the
# Mamba-2 op tables' modules are named here for that.
from .mamba2_torch_vamba import ssd_scan_torch  # noqa: F401
from .mamba2_triton_vamba import TRITON_ERROR  # noqa: F401
from .mamba2_vamba import Mamba2, missing_kernels_warning
from .outputs_vamba import (CACHE_NAME, FEATURES_AS_OUTPUT, OutputRecorder, VambaCausalLMOutputWithPast,
                            VambaModelOutputWithPast, cache_argument, capture_outputs, check_cache_position,
                            check_keywords, records_outputs)
from .streams_vamba import PackedRows, PaddedRows, VisualStream, text_positions
from .video_state_vamba import (VideoState, check_state_for, encode_visual_state, extend_visual_state,
                                fill_cross_store, rows_reading_state)
from .vision_vamba import TowerRecord, VambaVisionTower

logger = logging.get_logger(__name__)

# What one chunk of `VambaProcessor.video_chunks` holds.
VIDEO_CHUNK_KEYS = ("pixel_values_videos", "video_grid_thw", "video_metadata", "remaining_frames")


class VambaPreTrainedModel(PreTrainedModel):
    config_class = VambaConfig
    config: VambaConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VambaDecoderLayer", "VambaVisionBlock"]
    _skip_keys_device_placement = [CACHE_NAME]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flash_attn_2 = True
    _supports_attention_backend = True
    # The decoding step with a static cache, the text forward and a forward on `visual_embeds` (one per row) compile
    # and export without graph breaks (tests/test_compile_export.py). A forward with pixels lays out frame groups and
    # items by the grid's values on the host, as Qwen2-VL's does: it breaks the graph there, and exports as the
    # vision tower per frame size plus the forward on its output.
    _can_compile_fullgraph = True
    # transformers 5 takes the config's plan only for a model that is its own base model; Vamba's base_model_prefix
    # names its text model (the checkpoint's `model.*`), so the model class carries it too.
    _tp_plan = VambaConfig.base_model_tp_plan
    # Never quantized (transformers' quantizers skip these names, whatever skip list the user gives) and upcast to
    # fp32 where transformers upcasts: the Mamba-2 convolution, which the scan reads as a raw (d, k) weight, and the
    # SSM parameters, which it reads in fp32. Every other Linear is called as a module, so any quantized weight works.
    _keep_in_fp32_modules = ["conv1d", "A_log", "D", "dt_bias"]
    # A decoder layer returns (text, visual, self-attention weights, cross-attention weights). The cross-attention
    # weights stay the text model's to collect: one entry per layer, None for a layer without visual input, where
    # the hooks would record nothing.
    _can_record_outputs = None if capture_outputs is None else {
        "hidden_states": VambaDecoderLayer,
        "attentions": OutputRecorder(VambaDecoderLayer, index=2),
    }

    def post_init(self):
        # Without Mamba-2 blocks (vision_mamba_mixer_config.enable=False) none of those exists, and transformers
        # refuses a name it cannot find.
        if not self.config.vision_mamba_mixer_config.enable:
            self._keep_in_fp32_modules = []
        super().post_init()
        share_compile_state(self)
        # transformers 5.1 gathers the plan anew in post_init, from the config only for a model that is its own base
        # model and from children that carry one: Vamba's plan names its own modules, so it is kept as declared.
        if not self._tp_plan:
            self._tp_plan = dict(type(self)._tp_plan)

    @torch.no_grad()
    def _init_weights(self, module):
        std = self.config.initializer_range

        def fill(param, fn, *args, **kwargs):
            # Loaded weights are never touched (transformers 5 flags them on the tensor).
            if param is not None and not getattr(param, "_is_hf_initialized", False):
                fn(param, *args, **kwargs)

        if isinstance(module, (nn.Linear, nn.Conv3d)):
            fill(module.weight, nn.init.normal_, std=std)
            fill(module.bias, nn.init.zeros_)
        elif isinstance(module, nn.Embedding):
            fill(module.weight, nn.init.normal_, std=std)
        elif isinstance(module, (nn.LayerNorm, VambaRMSNorm)):
            fill(module.weight, nn.init.ones_)
            fill(getattr(module, "bias", None), nn.init.zeros_)
        elif isinstance(module, Mamba2):
            self._init_mamba(module, fill)
        elif isinstance(module, VambaDecoderLayer) and hasattr(module, "alpha"):
            fill(module.alpha, nn.init.constant_, 0.5)

    @staticmethod
    def _init_mamba(module: Mamba2, fill):
        cfg = module.config
        fill(module.conv1d.weight, nn.init.kaiming_uniform_, a=math.sqrt(5))
        fill(module.conv1d.bias, nn.init.zeros_)
        fill(module.D, nn.init.ones_)
        fill(module.norm.weight, nn.init.ones_)
        # A = -exp(A_log) spread over A_init_range, dt initialised log-uniformly in [dt_min, dt_max].
        low, high = cfg.A_init_range
        fill(module.A_log, lambda p: p.copy_(torch.linspace(math.log(low), math.log(high), p.numel())))

        def dt_bias(p):
            dt = torch.exp(torch.linspace(math.log(cfg.dt_min), math.log(cfg.dt_max), p.numel()))
            dt = dt.clamp(min=cfg.dt_init_floor)
            p.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus

        fill(module.dt_bias, dt_bias)

    @property
    def mamba_backend(self) -> str:
        """Which Mamba-2 implementation runs on the model's current device: "mamba-ssm", "triton" (our kernels) or
        "torch"."""
        mixers = [m for m in self.modules() if isinstance(m, Mamba2)]
        return mixers[0].backend(self.device) if mixers else "none"

    if not hasattr(PreTrainedModel, "activation_checkpointing_enable"):  # transformers 4.x and early 5.x

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None, **kwargs):
            """Checkpoint every decoder layer and vision block, non-reentrant by default as in later transformers
            (the reentrant default gives no gradient to a layer whose inputs need none: LoRA on frozen embeddings,
            or Mamba-2 blocks behind a frozen vision tower). Other arguments (the Trainer's `every_n_layers` in
            early 5.x) go to transformers unchanged."""
            gradient_checkpointing_kwargs = {"use_reentrant": False, **(gradient_checkpointing_kwargs or {})}
            super().gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)


class VambaModel(VambaPreTrainedModel):
    """Vision tower + decoder, without the LM head. Returns the text's last hidden states.

    Its forward runs named stages: the text embeddings, the row layout (padded or packed), the cache, the visual
    stream (vision tower -> one stream), positions and masks, the cross-attention inputs, then the text model's
    layer loop."""

    def __init__(self, config: VambaConfig):
        super().__init__(config)
        self._build(config)
        self._warned_no_kernels = False
        self.post_init()

    def _build(self, config: VambaConfig):
        self.visual = VambaVisionTower(config.vision_config, config.vision_max_frames)
        self.model = VambaTextModel(config)
        self.rotary = MultimodalRotary(config)

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def freeze_vision_tower(self, frozen: bool = True) -> "VambaModel":
        """Train without (frozen=True) or with the vision tower: sets requires_grad on its parameters. Returns the
        model. The Mamba-2 blocks of the visual stream belong to the decoder layers and stay trainable."""
        self.visual.requires_grad_(not frozen)
        return self

    # -- stage: the vision tower ----------------------------------------------------------------------------------

    def encode_visual(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                      record: Optional[TowerRecord] = None) -> list[torch.Tensor]:
        """The vision tower's output, one (tokens, hidden) tensor per image/video (`record`: see TowerRecord)."""
        pixel_values = pixel_values.to(self.visual.patch_embed.proj.weight.dtype)
        return self.visual(pixel_values, grid_thw, record)

    def get_video_features(self, pixel_values_videos: torch.Tensor, video_grid_thw: Optional[torch.Tensor] = None,
                           output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                           return_dict: Optional[bool] = None):
        """The vision tower's encoding of the videos, as Qwen2-VL's: on transformers 5 a BaseModelOutputWithPooling
        (`pooler_output`: one (tokens, hidden) tensor per video, what the decoder layers read before any Mamba-2
        block; `last_hidden_state`: every patch before the merger; the blocks' `hidden_states` / `attentions` when
        asked), a tuple for return_dict=False; on transformers 4 the tuple of per-video tensors, unless return_dict
        is set."""
        return self._visual_features("video", pixel_values_videos, video_grid_thw, output_hidden_states,
                                     output_attentions, return_dict)

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None,
                           output_hidden_states: Optional[bool] = None, output_attentions: Optional[bool] = None,
                           return_dict: Optional[bool] = None):
        """`get_video_features` for images (one temporal step each)."""
        return self._visual_features("image", pixel_values, image_grid_thw, output_hidden_states, output_attentions,
                                     return_dict)

    def _visual_features(self, kind: str, pixels, grid, output_hidden_states, output_attentions, return_dict):
        check_visual_pixels(self.config, kind, pixels, grid)
        output_attentions, output_hidden_states, _ = self._output_flags(output_attentions, output_hidden_states,
                                                                        None)
        if return_dict is None and not FEATURES_AS_OUTPUT:
            return tuple(self.encode_visual(pixels, grid))
        record = TowerRecord.asking(len(self.visual.blocks), output_hidden_states, output_attentions)
        output = record.output(self.encode_visual(pixels, grid, record))
        return output if self._returns_dict(return_dict) else output.to_tuple()

    def _visual_items(self, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, visual_embeds,
                      record: Optional[TowerRecord] = None):
        """(features per item, their grid or None, "image" / "video" or None) of the one visual input kind given;
        `record` keeps the vision tower's states."""
        if visual_embeds is not None:
            check_visual_embeds(visual_embeds, self.config.hidden_size)
            return list(visual_embeds), None, None
        pairs = (("image", pixel_values, image_grid_thw), ("video", pixel_values_videos, video_grid_thw))
        given = [(kind, pixels, grid) for kind, pixels, grid in pairs if pixels is not None]
        for kind, pixels, grid in given:
            check_visual_pixels(self.config, kind, pixels, grid)
        if len(given) == 2:
            raise ValueError("One batch mixes images and videos: the prompts mark both with the same "
                             "<|vision_start|><|vision_end|> pair, so their rows are ambiguous. Run images and "
                             "videos in separate batches.")
        if not given:
            return [], None, None
        kind, pixels, grid = given[0]
        return self.encode_visual(pixels, grid, record), grid, kind

    def _check_kernels(self, device):
        message = missing_kernels_warning(device)
        if message and not self._warned_no_kernels:
            self._warned_no_kernels = True
            logger.warning(message)

    # -- a video encoded once: video_state_vamba -----------------------------------------------------------------

    def encode_video(self, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor, sampling=None,
                     reserve_frames: int = 0) -> VideoState:
        """Encode one video once (vision tower, every Mamba-2 block, every layer's cross-attention K/V) for any
        number of questions: `generate(**text_inputs, video_state=state)`. `sampling`: how its frames were taken
        (the processor's `video_metadata` entry or a `VideoSampling`), kept with the state. `reserve_frames`: room
        to extend it by that many frames without reallocating its K/V."""
        return encode_visual_state(self, "video", pixel_values_videos, video_grid_thw, sampling, reserve_frames)

    def encode_image(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VideoState:
        """`encode_video` for one image."""
        return encode_visual_state(self, "image", pixel_values, image_grid_thw)

    def extend_video(self, state: VideoState, pixel_values_videos: torch.Tensor, video_grid_thw: torch.Tensor,
                     sampling=None) -> VideoState:
        """`state` with more frames after its own (whole temporal patches of the same size), at a cost that grows
        with the new frames only. `state` stays valid."""
        return extend_visual_state(self, state, pixel_values_videos, video_grid_thw, sampling)

    def encode_video_chunks(self, chunks) -> VideoState:
        """`encode_video` of one video given as consecutive chunks of frames (`processor.video_chunks`): each chunk
        is encoded as it comes and continues the state of the chunks before it (`extend_video`), so that the next
        chunk decodes while this one is on the device. The first chunk's `remaining_frames` reserves room for the
        rest. Equal to `encode_video` of the whole video up to rounding (the Mamba-2 scans restart at each chunk
        from the carried state)."""
        state = None
        for chunk in chunks:
            unknown = sorted(set(chunk.keys()) - set(VIDEO_CHUNK_KEYS))
            if unknown:
                raise ValueError(f"a video chunk holds unknown key(s) {', '.join(unknown)}; a chunk holds "
                                 f"{', '.join(VIDEO_CHUNK_KEYS)} (what processor.video_chunks yields).")
            pixels, grid = chunk["pixel_values_videos"], chunk["video_grid_thw"]
            metadata = chunk.get("video_metadata")
            sampling = metadata[0] if metadata else None
            if state is None:
                state = self.encode_video(pixels, grid, sampling, reserve_frames=int(chunk.get("remaining_frames", 0)))
            else:
                state = self.extend_video(state, pixels, grid, sampling)
        if state is None:
            raise ValueError("encode_video_chunks got no chunk: give the chunks of a video with at least 2 frames "
                             "(processor.video_chunks(video)).")
        return state

    def _read_state(self, state: VideoState, input_ids, batch_size: int, cache: VambaCache, visual_inputs: dict,
                    dtype, device):
        """Fill the cache's cross store from `state` (for the prompt's rows with a placeholder)."""
        if any(value is not None for value in visual_inputs.values()):
            raise ValueError("Pass video_state or pixels / visual_embeds, not both: the state already holds the "
                             "encoded video.")
        check_state_for(self, state, dtype, device)
        entries, has_visual = rows_reading_state(state, input_ids, batch_size, self.config.vision_start_token_id,
                                                 device)
        fill_cross_store(cache, state, entries, has_visual)

    # -- stages: layout, cache, visual stream, cross-attention inputs ---------------------------------------------

    def _layout(self, position_ids, attention_mask, batch_size: int, past_length, implementation: str):
        if attention_mask is not None and attention_mask.dim() == 4:  # the caller's mask says who attends to whom
            if implementation.startswith("flash"):
                raise ValueError("A 4D attention_mask needs attn_implementation='sdpa' or 'eager': flash-attention "
                                 "takes a (batch, length) padding mask only.")
            return PaddedRows(self.config)
        if isinstance(past_length, torch.Tensor):  # a static cache's decoding step, traced
            return PaddedRows(self.config)
        packed = PackedRows.detect(self.config, position_ids, attention_mask, batch_size, past_length)
        if packed is None:
            return PaddedRows(self.config)
        if implementation.startswith("flash"):
            raise ValueError("Packed rows (position_ids restarting at 0) need attn_implementation='sdpa' or "
                             "'eager'; flash-attention's variable-length path is not wired for them yet.")
        return packed

    def _cache_for(self, past_key_values, use_cache: Optional[bool]) -> Optional[VambaCache]:
        """The VambaCache this forward fills (None: no cache), back in its plain form."""
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if use_cache and self.training and any(layer.gradient_checkpointing for layer in self.model.layers):
            # The checkpointed layers run twice: the second run would append to the cache again.
            logger.warning_once("use_cache=True is incompatible with gradient checkpointing: running without cache.")
            use_cache = False
        if not use_cache:
            return None
        cache = past_key_values
        if isinstance(cache, VambaStaticCache):
            return cache
        if isinstance(cache, StaticCache):
            return self._static_cache_for(cache)
        if not isinstance(cache, VambaCache):
            # An empty DynamicCache is what generate starts with; any other cache would be ignored silently.
            if cache is not None and (type(cache) is not DynamicCache or cache.get_seq_length() > 0):
                raise ValueError(f"{CACHE_NAME} must be a VambaCache (the one a previous call returned) or None, got "
                                 f"{type(cache).__name__}: Vamba's cache also holds the cross-attention K/V.")
            cache = VambaCache()
        cache.release_decode_graph()
        return cache

    def _static_cache_for(self, cache: StaticCache) -> VambaStaticCache:
        """A VambaStaticCache of the size of transformers' empty StaticCache `cache` (what generate builds for
        cache_implementation="static")."""
        if holds_tokens(cache):
            raise ValueError(f"{CACHE_NAME} is a filled {type(cache).__name__}: Vamba's cache also holds the "
                             f"cross-attention K/V; pass the VambaStaticCache a previous call returned.")
        static = VambaStaticCache(self.config, cache.layers[0].max_cache_len)
        if getattr(self, "_cache", None) is cache:  # transformers 4.x keeps generate's cache for its next call
            self._cache = static
        return static

    def _visual_stream(self, layout, input_ids, batch_size: int, prefill: bool, visual_inputs: dict, dtype,
                       device, record: Optional[TowerRecord] = None):
        """The visual stream of this forward, the grid it came from, and with `record` the vision tower's output
        as {"image" or "video": BaseModelOutputWithPooling}. The prompts' placeholders are checked against the
        visual inputs at prefill; a decoding step without visual inputs reads the cache instead."""
        items, grid, kind = self._visual_items(**visual_inputs, record=record)
        if not items:
            if prefill:  # a prompt's placeholders need visual inputs
                layout.place(input_ids, batch_size, 0)
            return None, None, {}
        self._check_kernels(device)
        stream = layout.visual_stream(items, input_ids, batch_size, dtype, device)
        encoded = {kind: record.output(list(items))} if record is not None and kind is not None else {}
        items.clear()  # the stream holds its own copy: free the vision tower's output early
        return stream, grid, encoded

    def _cross_inputs(self, stream: Optional[VisualStream], grid, text_rotary, cache, implementation: str,
                      dtype) -> CrossAttentionInputs:
        """Cross-attention mask, rows with visual input, and rotary: from the visual stream at prefill, from the
        cache's cross store while decoding. Writes nothing."""
        use_rotary = self.config.cross_attn_use_position_embeddings
        cross = CrossAttentionInputs(text_rotary=text_rotary if use_rotary else None)
        mask_format = "sdpa" if implementation.startswith("flash") else implementation
        if stream is not None:
            cross.mask = None if stream.keep is None else attention_mask_for(stream.keep, mask_format, dtype)
            cross.has_visual, cross.seq_idx = stream.has_visual(), stream.seq_idx
            if use_rotary and grid is None:
                raise ValueError("cross_attn_use_position_embeddings needs the visual grid: pass pixels with "
                                 "their grid_thw rather than visual_embeds.")
            cross.visual_rotary = self.visual_rotary(stream, grid)
        elif cache is not None and not cache.cross.is_empty:
            cross.mask, cross.has_visual = cache.cross.mask(mask_format, dtype), cache.cross.has_visual
        cross.padded = cross.mask is not None
        return cross

    def visual_rotary(self, stream: VisualStream, grid: torch.Tensor, first_step: int = 0) -> Optional[tuple]:
        """The cross-attention rotary of the visual stream's tokens of grid `grid` (t from `first_step`: frames
        after a video state's own), when the config uses it (else None)."""
        if not self.config.cross_attn_use_position_embeddings:
            return None
        return self.rotary(stream.positions(grid, self.config.vision_config.spatial_merge_size, first_step))

    # -- forward --------------------------------------------------------------------------------------------------

    @staticmethod
    def _cache_extent(cache) -> tuple:
        """(the positions `cache` holds, the key length of its self-attention buffers when they are static, else
        None). The positions are a 0-d tensor while a static cache's step is traced, else an int."""
        if cache is None:
            return 0, None
        if isinstance(cache, VambaStaticCache):
            return (cache.written() if cache.filled else 0), cache.max_cache_len
        return cache.get_seq_length(), None

    def _implementation(self, output_attentions: bool) -> str:
        """The attention implementation of this call: eager when the attention weights are asked for (only it
        computes them), else the configured one."""
        return "eager" if output_attentions else (self.config._attn_implementation or "sdpa")

    def _output_flags(self, output_attentions, output_hidden_states, return_dict) -> tuple[bool, bool, bool]:
        config = self.config
        return (
            bool(config.output_attentions if output_attentions is None else output_attentions),
            bool(config.output_hidden_states if output_hidden_states is None else output_hidden_states),
            self._returns_dict(return_dict),
        )

    def _returns_dict(self, return_dict: Optional[bool]) -> bool:
        return bool(self.config.return_dict if return_dict is None else return_dict)

    def _text_embeddings(self, input_ids, inputs_embeds) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids and inputs_embeds.")
        if inputs_embeds is not None:
            check_inputs_embeds(inputs_embeds, self.config.hidden_size)
            return inputs_embeds
        check_input_ids(input_ids, self.config.vocab_size)
        return self.model.embed_tokens(input_ids)

    def _tower_record(self, output_hidden_states: bool, output_attentions: bool) -> Optional[TowerRecord]:
        """What the vision tower keeps for the outputs: its states only when the layers' are asked for (kept
        otherwise, they would hold every patch of a long video until the forward returns)."""
        if not (output_hidden_states or output_attentions):
            return None
        return TowerRecord.asking(len(self.visual.blocks), output_hidden_states, output_attentions)

    @staticmethod
    def _self_mask(layout, attention_mask, past_length, length, key_length, dtype, implementation, device):
        """The text's self-attention mask: a caller's 4-D mask as given, else built from the rows' layout."""
        if attention_mask is not None and attention_mask.dim() == 4:
            return custom_self_mask(attention_mask, implementation, dtype)
        return layout.self_mask(attention_mask, past_length, length, dtype, implementation, device, key_length)

    @records_outputs
    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[VambaCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.LongTensor] = None,
        visual_embeds: Optional[list[torch.Tensor]] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        cache: Optional[VambaCache] = None,
        video_state: Optional[VideoState] = None,
        **kwargs,
    ):
        r"""Text `input_ids` (b, T) with `<|vision_start|><|vision_end|>` where each image or video goes, and the
        visual inputs in the order of those placeholders: `pixel_values_videos` + `video_grid_thw` (or the image
        pair) as the processor returns them, or `visual_embeds`, one (tokens, hidden) tensor per item. The cache is
        `cache` (transformers >= 5.24) or `past_key_values`. `output_attentions` returns each layer's self-attention
        weights as `attentions` and its cross-attention weights (None for a layer without visual input) as
        `cross_attentions`, computed with eager attention.

        Packed rows (training, several (video, conversation) pairs in one row, marked by `position_ids` restarting at
        0): see `streams_vamba.PackedRows`.

        `video_state` (a `VideoState` from `encode_video` / `encode_image`) instead of visual inputs: every row whose
        prompt holds the placeholder reads the encoded video, sharing its K/V; nothing visual is computed.
        """
        check_keywords(type(self).__name__ + ".forward", kwargs)
        past_key_values = cache_argument(past_key_values, cache)
        output_attentions, output_hidden_states, _ = self._output_flags(output_attentions, output_hidden_states,
                                                                        None)
        inputs_embeds = self._text_embeddings(input_ids, inputs_embeds)
        (batch_size, length), dtype, device = inputs_embeds.shape[:2], inputs_embeds.dtype, inputs_embeds.device
        implementation = self._implementation(output_attentions)
        cache = self._cache_for(past_key_values, use_cache)
        past_length, key_length = self._cache_extent(cache)
        check_cache_position(kwargs.get("cache_position"), past_length)
        prefill = not holds_tokens(cache)
        check_attention_mask(attention_mask, batch_size, length, past_length, key_length=key_length)
        check_position_ids(position_ids, batch_size, length)
        layout = self._layout(position_ids, attention_mask, batch_size, past_length, implementation)
        if layout.packed:  # packed forwards keep no cache
            cache = None

        visual_inputs = dict(pixel_values=pixel_values, image_grid_thw=image_grid_thw, visual_embeds=visual_embeds,
                             pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw)
        kept_cache = cache
        if video_state is not None:
            if layout.packed:
                raise ValueError("video_state is read by one conversation per row; packed rows take pixels.")
            cache = cache if cache is not None else VambaCache()  # the layers read the K/V from a cross store
            self._read_state(video_state, input_ids, batch_size, cache, visual_inputs, dtype, device)
            stream, grid, encoded = None, None, {}
        else:
            record = self._tower_record(output_hidden_states, output_attentions)
            stream, grid, encoded = self._visual_stream(layout, input_ids, batch_size, prefill, visual_inputs, dtype,
                                                        device, record)
        if position_ids is None:
            position_ids = text_positions(attention_mask, past_length, length, batch_size, device)
        text_rotary = self.rotary(position_ids)
        self_mask = self._self_mask(layout, attention_mask, past_length, length, key_length, dtype, implementation,
                                    device)
        cross = self._cross_inputs(stream, grid, text_rotary, cache, implementation, dtype)
        if cache is not None and stream is not None:  # decoding reads the cross-attention masks of the prefill
            cache.cross.set_masks(stream.keep, cross.has_visual)

        out = self.model(inputs_embeds, None if stream is None else stream.states, text_rotary, self_mask, cross,
                         cache, implementation, output_hidden_states and capture_outputs is None, output_attentions)
        return VambaModelOutputWithPast(
            last_hidden_state=out.last_hidden_state, hidden_states=out.hidden_states, attentions=out.attentions,
            cross_attentions=out.cross_attentions, image_outputs=encoded.get("image"),
            video_outputs=encoded.get("video"), **{CACHE_NAME: kept_cache},
        )


class VambaForConditionalGeneration(VambaModel, VambaGenerationMixin):
    """Vamba with its LM head: what `AutoModelForVision2Seq` / `AutoModelForImageTextToText` load.

    It inherits from VambaModel rather than holding one: the official checkpoint's keys are `visual.*`, `model.*`
    (the text model) and `lm_head.weight` at the top level (VAMBA_SPEC.md §2), which is the state dict of a
    VambaModel with a head beside it. Composition would nest them under a prefix and need a key map on every load
    and save."""

    def _build(self, config: VambaConfig):
        super()._build(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        past_key_values: Optional[VambaCache] = None,
        inputs_embeds: Optional[torch.FloatTensor] = None,
        labels: Optional[torch.LongTensor] = None,
        pixel_values: Optional[torch.Tensor] = None,
        image_grid_thw: Optional[torch.LongTensor] = None,
        pixel_values_videos: Optional[torch.Tensor] = None,
        video_grid_thw: Optional[torch.LongTensor] = None,
        visual_embeds: Optional[list[torch.Tensor]] = None,
        use_cache: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        output_hidden_states: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: Optional[torch.Tensor] = None,
        shift_labels: Optional[torch.LongTensor] = None,
        cache: Optional[VambaCache] = None,
        video_state: Optional[VideoState] = None,
        **kwargs,
    ):
        r"""VambaModel's inputs (packed rows included, see its forward), plus:

        labels (b, T): the token each position should be followed by is `labels[:, i + 1]`, as in every transformers
            causal LM (the model shifts them); -100 is ignored. The loss is a cross-entropy in fp32, averaged over the
            supervised tokens, or summed and divided by `num_items_in_batch` when the Trainer passes it (gradient
            accumulation). In a packed row a segment's last token is scored against the next segment's first label,
            which is -100 when each segment starts with its (unsupervised) prompt.
        shift_labels (b, T): targets already shifted (`shift_labels[:, i]` follows position i), as sequence-parallel
            training passes them; the loss takes them over `labels` when both are given.
        logits_to_keep: an int k computes the logits of the last k positions only (0: all), a 1-D tensor those of the
            given positions; with `labels`, the loss covers the kept positions.
        """
        check_keywords(type(self).__name__ + ".forward", kwargs)
        past_key_values = cache_argument(past_key_values, cache)
        visual_inputs = (pixel_values, pixel_values_videos, visual_embeds, video_state)
        if self._decodes_with_graph(input_ids, past_key_values, use_cache, visual_inputs, labels, shift_labels,
                                    output_hidden_states, output_attentions):
            return self._graph_step(input_ids, attention_mask, position_ids, past_key_values, return_dict)
        prefill = not holds_tokens(past_key_values)
        outputs = super().forward(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw,
            visual_embeds=visual_embeds, use_cache=use_cache, output_attentions=output_attentions,
            output_hidden_states=output_hidden_states, return_dict=True, video_state=video_state, **kwargs,
        )
        logits, loss = self._logits_and_loss(outputs.last_hidden_state, prefill, logits_to_keep, labels, shift_labels,
                                             num_items_in_batch)
        result = VambaCausalLMOutputWithPast(
            loss=loss, logits=logits, hidden_states=outputs.hidden_states, attentions=outputs.attentions,
            cross_attentions=outputs.cross_attentions, image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs, **{CACHE_NAME: getattr(outputs, CACHE_NAME)},
        )
        return result if self._returns_dict(return_dict) else result.to_tuple()

    def _logits_and_loss(self, hidden, prefill: bool, logits_to_keep, labels, shift_labels, num_items_in_batch):
        """fp32 logits of the kept positions of `hidden` (b, T, d), and the loss when targets are given."""
        for name, targets in (("labels", labels), ("shift_labels", shift_labels)):
            check_labels(name, targets, *hidden.shape[:2])
        kept = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden[:, kept]).float()
        if prefill and not self.training:
            check_finite_logits(logits)  # before generate turns NaN logits into token 0 again and again, silently
        return logits, self.next_token_loss(logits, labels, kept, num_items_in_batch, shift_labels)

    def next_token_loss(self, logits, labels=None, kept=slice(None), num_items_in_batch=None, shift_labels=None):
        """transformers' causal-LM loss on `logits` (b, k, V), the logits of positions `kept`: against `labels`
        (b, T) shifted by one, or against `shift_labels` (b, T) as given, which win when both come (as transformers'
        loss takes them: the Trainer passes both under context parallelism). None without targets."""
        if labels is None and shift_labels is None:
            return None
        if shift_labels is None:
            shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
        return self.loss_function(logits=logits, labels=None, vocab_size=logits.shape[-1],
                                  shift_labels=shift_labels[:, kept].contiguous(),
                                  num_items_in_batch=num_items_in_batch)


VambaModel.register_for_auto_class("AutoModel")
VambaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
