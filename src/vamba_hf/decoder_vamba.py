"""The decoder layer and the text model.

Each layer: causal self-attention over the text, cross-attention from the text to the visual stream (the states that
enter the layer), the MLP on the text, and Mamba-2 on the visual stream. `VambaTextModel.forward` holds the one loop
over the layers that prefill, eager decoding and the CUDA-graph step all run.
"""

from dataclasses import dataclass, fields
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from .cache_vamba import LayerCache
from .configuration_vamba import VambaConfig
from .layers_vamba import (
    FusedOnCuda,
    VambaRMSNorm,
    VambaTextMLP,
    apply_rotary,
    attention_interface,
    sdpa_backends,
)
from .mamba2_vamba import MambaCarry, VambaVisionMixer

Rotary = tuple[torch.Tensor, torch.Tensor]


class MultimodalRotary(nn.Module):
    """M-RoPE of Qwen2-VL: the rotary frequencies are split in (t, h, w) sections, each turned by its own
    position row. Text tokens carry the same index in all three rows. A scaled RoPE type of `rope_parameters`
    (linear, dynamic, yarn, longrope, llama3) takes its frequencies and attention factor from transformers' RoPE
    init functions, as Qwen2-VL's rotary does; dynamic and longrope follow the longest position of each call."""

    def __init__(self, config: VambaConfig):
        super().__init__()
        settings = {"rope_theta": config.rope_theta, "mrope_section": config.mrope_section,
                    **(getattr(config, "rope_parameters", None) or {})}
        self.head_dim, self.theta = config.head_dim, settings["rope_theta"]
        self.sections = list(settings["mrope_section"])
        self.rope_type = settings.get("rope_type", "default")
        self.scaling = None if self.rope_type in ("default", "mrope") else ScaledFrequencies(config, settings)

    def forward(self, positions: torch.Tensor) -> Rotary:
        """positions (b, l) for text or (3, b, l) for (t, h, w) -> cos, sin of shape (b, 1, l, head_dim)."""
        device = positions.device
        if self.scaling is None:
            exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim
            inv_freq, attention_factor = 1.0 / (self.theta**exponents), 1.0
        else:
            inv_freq, attention_factor = self.scaling(positions)
        if positions.dim() == 2:
            angles = positions[..., None].float() * inv_freq
        else:
            per_section = positions[..., None].float() * inv_freq  # (3, b, l, head_dim/2)
            angles = torch.cat([part[i] for i, part in enumerate(per_section.split(self.sections, dim=-1))], dim=-1)
        angles = torch.cat([angles, angles], dim=-1)[:, None]
        if attention_factor == 1.0:
            return angles.cos(), angles.sin()
        return angles.cos() * attention_factor, angles.sin() * attention_factor


class ScaledFrequencies:
    """The inverse frequencies and attention factor of a scaled RoPE type, from transformers' init functions (kept
    per device and length, not as buffers, which meta-device loading would leave empty)."""

    def __init__(self, config: VambaConfig, settings: dict):
        self.rope_type = settings["rope_type"]
        self.init = ROPE_INIT_FUNCTIONS[self.rope_type]
        self.settings = rope_init_config(config, settings)
        self.max_positions = config.max_position_embeddings
        # longrope switches to its long factors past the pretraining length
        self.original_max_positions = settings.get("original_max_position_embeddings", self.max_positions)
        self.cached: dict = {}

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        seq_len = None
        if self.rope_type in ("dynamic", "longrope"):  # as transformers' dynamic_rope_update: by the longest position
            longest = int(positions.max()) + 1
            limit = self.max_positions if self.rope_type == "dynamic" else self.original_max_positions
            seq_len = longest if longest > limit else None
        key = (positions.device, seq_len)
        if key not in self.cached:
            inv_freq, attention_factor = self.init(self.settings, positions.device, seq_len=seq_len)
            self.cached[key] = (inv_freq.float().to(positions.device), float(attention_factor))
        return self.cached[key]


def rope_init_config(config: VambaConfig, settings: dict) -> PretrainedConfig:
    """A bare transformers config with what its RoPE init functions read: the sizes, and the RoPE settings as
    `rope_parameters` (transformers 5) or `rope_scaling` + `rope_theta` (4)."""
    adapter = PretrainedConfig()
    adapter.hidden_size, adapter.num_attention_heads = config.hidden_size, config.num_attention_heads
    adapter.head_dim, adapter.max_position_embeddings = config.head_dim, config.max_position_embeddings
    rope = {k: v for k, v in settings.items() if k != "mrope_section"}
    if hasattr(PretrainedConfig, "standardize_rope_params"):
        adapter.rope_parameters = rope
    else:
        adapter.rope_scaling, adapter.rope_theta = rope, rope["rope_theta"]
    return adapter


@dataclass
class CrossAttentionInputs:
    """What every layer's cross-attention needs besides its own weights (the same for all layers)."""

    mask: Optional[torch.Tensor] = None  # in the attention implementation's format; None attends everywhere
    # (b, 1, 1) bool, or (b, T, 1) for packed rows: when some rows (segments) of the batch have no visual input
    has_visual: Optional[torch.Tensor] = None
    text_rotary: Optional[Rotary] = None
    visual_rotary: Optional[Rotary] = None
    seq_idx: Optional[torch.Tensor] = None  # packed rows: which video each visual token belongs to
    padded: bool = False

    def to(self, device) -> "CrossAttentionInputs":
        """Moved by accelerate's hooks when the layers of a `device_map` sit on several devices."""

        def move(value):
            if isinstance(value, torch.Tensor):
                return value.to(device)
            return tuple(move(v) for v in value) if isinstance(value, tuple) else value

        return CrossAttentionInputs(**{f.name: move(getattr(self, f.name)) for f in fields(self)})

    def implementation(self, configured: str) -> str:
        # flash-attn's varlen path cannot mask keys of another length than the queries: SDPA handles padding.
        return "sdpa" if self.padded and configured.startswith("flash") else configured


class VambaAttention(nn.Module):
    """GQA attention; `is_cross` selects text->visual cross-attention (no causal mask) over self-attention."""

    def __init__(self, config: VambaConfig, layer_idx: int, is_cross: bool):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.num_key_value_groups = self.num_heads // self.num_kv_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = not is_cross
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        # One kernel instead of six at CUDA inference (see VambaRMSNorm); the head size stays static.
        self.fused_rotary = FusedOnCuda(apply_rotary, dynamic=None, inference_only=True)

    def _heads(self, x: torch.Tensor, proj: nn.Linear) -> torch.Tensor:
        return proj(x).view(*x.shape[:2], -1, self.head_dim).transpose(1, 2)

    def queries(self, x: torch.Tensor, rotary: Optional[Rotary] = None) -> torch.Tensor:
        q = self._heads(x, self.q_proj)
        return q if rotary is None else self.fused_rotary(q, *rotary)

    def keys_values(self, x: torch.Tensor, rotary: Optional[Rotary] = None) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self._heads(x, self.k_proj), self._heads(x, self.v_proj)
        return (k if rotary is None else self.fused_rotary(k, *rotary)), v

    def attend(self, q, k, v, mask, implementation: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The projected output (b, T, hidden) and, for "eager", the attention weights (b, heads, T, keys)."""
        dropout = self.config.attention_dropout if self.training else 0.0
        weights = None
        # A per-query mask (packed rows) cannot follow the folded queries of cross_sdpa.
        if not self.is_causal and implementation == "sdpa" and (mask is None or mask.shape[-2] == 1):
            out = self.cross_sdpa(q, k, v, mask, dropout)
        else:
            # flash-attn takes a (b, k) padding mask together with its own causal flag; the others one or the other.
            causal = self.is_causal and q.shape[2] > 1 and (mask is None or implementation.startswith("flash"))
            with sdpa_backends():
                out, weights = attention_interface(implementation)(
                    self, q, k, v, mask, scaling=self.scaling, dropout=dropout, is_causal=causal
                )
        return self.o_proj(out.reshape(*out.shape[:2], -1)), weights

    def cross_sdpa(self, q, k, v, mask, dropout: float) -> torch.Tensor:
        """Cross-attention through one SDPA call on the stored K/V heads, never repeated to num_heads (which would
        move num_key_value_groups times the visual K/V bytes, at every decoding step). With no causal mask, the
        query heads that share a K/V head are just more queries: (b, h, T, d) -> (b, h_kv, groups*T, d).
        Returns (b, T, h, d)."""
        batch, heads, length, dim = q.shape
        # the K/V heads at hand: fewer than num_kv_heads on each rank of a tensor-parallel run
        folded = q.reshape(batch, k.shape[1], self.num_key_value_groups * length, dim)
        with sdpa_backends():
            out = F.scaled_dot_product_attention(folded, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scaling)
        return out.reshape(batch, heads, length, dim).transpose(1, 2)


def alpha_balance(attended: torch.Tensor, read: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """a * self-attention + (1 - a) * cross-attention, with the learned alpha clamped to [0, 1]."""
    alpha = alpha.clamp(0, 1).to(read.dtype)
    return alpha * attended + (1 - alpha) * read


class VambaDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: VambaConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.input_layernorm = VambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = VambaAttention(config, layer_idx, is_cross=False)
        self.cross_attn = VambaAttention(config, layer_idx, is_cross=True)
        if config.use_alpha_balancing:
            self.alpha = nn.Parameter(torch.empty(1))
            # One kernel instead of five in each layer of a decoding step at CUDA inference (see VambaRMSNorm).
            self.fused_alpha_balance = FusedOnCuda(alpha_balance, dynamic=None, inference_only=True)
        self.post_attention_layernorm = VambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = VambaTextMLP(config)
        if config.vision_mamba_mixer_config.enable:
            self.vision_mixer = VambaVisionMixer(config)

    def forward(self, text: torch.Tensor, visual: Optional[torch.Tensor], text_rotary: Rotary,
                self_mask: Optional[torch.Tensor], cross: CrossAttentionInputs, cache: Optional[LayerCache] = None,
                update_visual: bool = True, implementation: str = "sdpa"):
        """-> (text, visual, self-attention weights, cross-attention weights), a tuple as activation checkpointing
        needs. `update_visual` False skips the Mamba-2 block (the last layer's output would be read by no one);
        `implementation` is the attention implementation of this call ("eager" also returns the weights)."""
        x = self.input_layernorm(text)
        q = self.self_attn.queries(x, text_rotary)
        k, v = self.self_attn.keys_values(x, text_rotary)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        attended, self_weights = self.self_attn.attend(q, k, v, self_mask, implementation)

        cross_kv = None
        if visual is not None:
            # Without autograd the stream (the model's own copy) is updated in place; never in training, where a
            # reentrant checkpoint runs this forward without grad and must keep its saved input.
            in_place = not torch.is_grad_enabled() and not self.training
            visual, cross_kv, _ = self.visual_step(visual, cross.visual_rotary, seq_idx=cross.seq_idx,
                                                   mix=update_visual, in_place=in_place)
            if cache is not None:
                cache.cross.store(self.layer_idx, *cross_kv, self.config.cross_kv_cache_dtype)
        attended, cross_weights = self.read_visual(x, attended, cross_kv, cross, cache, implementation)
        text = text + attended
        text = text + self.mlp(self.post_attention_layernorm(text))
        return text, visual, self_weights, cross_weights

    def visual_step(self, visual: torch.Tensor, rotary: Optional[Rotary] = None, carry: Optional[MambaCarry] = None,
                    continued: bool = False, seq_idx: Optional[torch.Tensor] = None, mix: bool = True,
                    in_place: bool = True):
        """The layer's visual half, on the visual stream `visual` (b, n, hidden) that enters it: this layer's
        cross-attention K/V (b, kv_heads, n, d) and, with `mix`, the stream that enters the next layer (the
        Mamba-2 block). -> (next stream or None, (key, value), carry or None). `continued`: a stream that may be
        continued later, in place, from `carry` (the end of the stream it continues; None: a stream's start), with
        the carry at its end. `in_place` updates `visual` (no second stream held; no autograd); `seq_idx` (b, n):
        packed rows, whose Mamba-2 state resets between videos."""
        if self.config.cross_attn_use_layer_norm:
            visual = self.input_layernorm(visual)
        cross_kv = self.cross_attn.keys_values(visual, rotary)
        if not mix:
            return None, cross_kv, None
        if not self.config.vision_mamba_mixer_config.enable:
            return visual, cross_kv, None
        if not continued:
            return self.vision_mixer(visual, seq_idx, in_place=in_place), cross_kv, None
        visual, carry = self.vision_mixer.continue_stream(visual, carry)
        return visual, cross_kv, carry

    def carry_shapes(self, rows: int) -> dict:
        """The shapes of the Mamba-2 carry ("ssm_state", "conv_inputs") that `visual_step` hands on for `rows`
        streams; empty without the block."""
        if not self.config.vision_mamba_mixer_config.enable:
            return {}
        mixer = self.vision_mixer.mixer
        return {"ssm_state": (rows, mixer.nheads, mixer.config.headdim, mixer.config.d_state),
                "conv_inputs": (rows, mixer.config.d_conv - 1, mixer.conv1d.weight.shape[0])}

    def read_visual(self, x, attended, cross_kv, cross: CrossAttentionInputs, cache: Optional[LayerCache],
                    implementation: str):
        """Mix the cross-attention read into the self-attention output `attended`: of `cross_kv`, this forward's
        visual stream's K/V, or while decoding of the K/V the cache's cross store holds for this layer."""
        implementation = cross.implementation(implementation)
        if cross_kv is None and (cache is None or not cache.cross.holds(self.layer_idx)):
            return attended, None
        q = self.cross_attn.queries(x, cross.text_rotary)
        if cross_kv is not None:
            read, weights = self.cross_attn.attend(q, *cross_kv, cross.mask, implementation)
        else:
            # SDPA's queries may be folded (rows sharing a video read it in one call); eager returns per-row weights
            attend = partial(self.cross_attn.attend, implementation=implementation)
            read, weights = cache.cross.attend(self.layer_idx, q, cross.mask, attend, fold=implementation == "sdpa")
        if self.config.use_alpha_balancing:
            mixed = self.fused_alpha_balance(attended, read, self.alpha)
        else:
            mixed = attended + read
        # Rows without visual input take the text-only path, exactly as when they run alone.
        return (mixed if cross.has_visual is None else torch.where(cross.has_visual, mixed, attended)), weights


@dataclass
class TextModelOutput:
    last_hidden_state: torch.Tensor
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None
    attentions: Optional[tuple[torch.Tensor, ...]] = None
    cross_attentions: Optional[tuple[Optional[torch.Tensor], ...]] = None


class VambaTextModel(nn.Module):
    """Token embedding, the decoder layers, and the final norm (checkpoint prefix `model.`)."""

    def __init__(self, config: VambaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList([VambaDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = VambaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def visual_steps(self, visual: torch.Tensor, rotary: Optional[Rotary], carries: list):
        """Every layer's visual step on the stream `visual` (updated in place), each Mamba-2 block continuing from
        its carry in `carries`: yields each layer's (cross-attention K/V, carry at the stream's end), in order."""
        last = len(self.layers) - 1
        for i, (layer, carry) in enumerate(zip(self.layers, carries)):
            visual, cross_kv, carry = layer.visual_step(visual, rotary, carry, continued=True, mix=i < last)
            yield cross_kv, carry

    def carry_shapes(self, rows: int) -> list[dict]:
        """Per layer, the shapes of the carry that `visual_steps` yields for `rows` streams (empty: none; the last
        layer's stream is read by no one)."""
        last = len(self.layers) - 1
        return [layer.carry_shapes(rows) if i < last else {} for i, layer in enumerate(self.layers)]

    def forward(self, text: torch.Tensor, visual: Optional[torch.Tensor], text_rotary: Rotary,
                self_mask: Optional[torch.Tensor], cross: CrossAttentionInputs, cache: Optional[LayerCache],
                implementation: str, output_hidden_states: bool = False,
                output_attentions: bool = False) -> TextModelOutput:
        """Run the text embeddings `text` (b, T, hidden) and the visual stream through every layer."""
        hidden_states, attentions, cross_attentions = [], [], []
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            if output_hidden_states:
                hidden_states.append(text)
            text, visual, self_weights, cross_weights = layer(
                text, visual, text_rotary, self_mask, cross, cache=cache, update_visual=i < last,
                implementation=implementation,
            )
            if output_attentions:
                attentions.append(self_weights)
                cross_attentions.append(cross_weights)
        text = self.norm(text)
        if output_hidden_states:
            hidden_states.append(text)
        return TextModelOutput(
            last_hidden_state=text,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            attentions=tuple(attentions) if output_attentions else None,
            cross_attentions=tuple(cross_attentions) if output_attentions else None,
        )
