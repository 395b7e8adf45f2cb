"""Vamba configuration: Qwen2-VL text fields, a vision-tower sub-config and a Mamba-2 mixer sub-config.

Reads both our own `config.json` (`model_type: "vamba"`) and the official checkpoint's
(`model_type: "qwen2_vl"` with `vision_mamba_mixer_config`, nested configs saved as diffs, either
`rope_scaling` spelling).
"""

import math

from transformers import PretrainedConfig

# Keys every PretrainedConfig may carry in a saved file; they are never "unknown".
_GENERIC_KEYS = frozenset(PretrainedConfig().to_dict()) | {
    "model_type",
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "architectures",
    "auto_map",
    "torch_dtype",
    "dtype",
    "attn_implementation",
    "_attn_implementation_autoset",
    "output_attentions",
    "_commit_hash",
    "_from_model_config",
}


# Where the Auto classes find Vamba's remote code; both names of the vision-to-text Auto class are listed
# (`AutoModelForVision2Seq` in transformers 4.x, `AutoModelForImageTextToText` in 4.x and 5.x).
AUTO_MAP = {
    "AutoConfig": "configuration_vamba.VambaConfig",
    "AutoModel": "modeling_vamba.VambaModel",
    "AutoModelForVision2Seq": "modeling_vamba.VambaForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_vamba.VambaForConditionalGeneration",
    "AutoProcessor": "processing_vamba.VambaProcessor",
}


def _reject_unknown(kind: str, given: dict, known) -> None:
    unknown = sorted(set(given) - set(known) - _GENERIC_KEYS)
    if unknown:
        raise ValueError(
            f"Unknown key(s) in the {kind}: {unknown}. Known keys: {sorted(known)}. "
            f"Remove them from config.json, or check for a misspelling."
        )


class _FieldsConfig(PretrainedConfig):
    """A sub-config made of a fixed set of fields (`_fields`); unknown keys are an error, and it saves only those."""

    _fields = {}
    _init_fields = {}
    _aliases = {}  # other spellings found in saved configs -> our field

    def __init__(self, **kwargs):
        for alias, name in self._aliases.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if name in kwargs and kwargs[name] != value:
                    raise ValueError(f"{self.base_config_key} gives {alias}={value!r} and {name}={kwargs[name]!r}; "
                                     f"they name the same setting and must agree.")
                kwargs[name] = value
        known = {**self._fields, **self._init_fields}
        _reject_unknown(self.base_config_key, kwargs, known)
        values = {name: kwargs.pop(name, default) for name, default in known.items()}
        kwargs.pop("model_type", None)
        super().__init__(**kwargs)
        for name, value in values.items():
            setattr(self, name, value)

    def to_dict(self):
        fields = {name: getattr(self, name) for name in self._fields}
        return {"model_type": self.model_type, "transformers_version": self.transformers_version, **fields}


class VambaVisionConfig(_FieldsConfig):
    """The Qwen2-VL vision tower (ViT with 2-D rotary, 2x2 patch merger). Defaults are Qwen2-VL-7B's."""

    model_type = "vamba_vision"
    base_config_key = "vision_config"
    _fields = dict(
        depth=32,
        embed_dim=1280,
        hidden_size=3584,
        num_heads=16,
        mlp_ratio=4,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        hidden_act="quick_gelu",
    )
    # Qwen2-VL's Hub configs write these (transformers <= 4.44 kept them as extra attributes).
    _aliases = {"in_chans": "in_channels", "spatial_patch_size": "patch_size"}

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.embed_dim % self.num_heads:
            raise ValueError(
                f"vision_config.embed_dim ({self.embed_dim}) must be divisible by vision_config.num_heads "
                f"({self.num_heads})."
            )


def _json_float(value) -> float:
    """A float from config JSON: a number, a string such as "inf", or transformers 5's {"__float__": "Infinity"}."""
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    return float(value)


class VambaMambaConfig(_FieldsConfig):
    """The Mamba-2 mixer that runs over the visual stream in every decoder layer (key names as in the
    official checkpoint's `vision_mamba_mixer_config`)."""

    model_type = "vamba_mamba"
    base_config_key = "vision_mamba_mixer_config"
    _fields = dict(
        enable=True,
        hidden_dim=3584,
        d_state=128,
        d_conv=4,
        expand=2,
        headdim=64,
        ngroups=1,
        chunk_size=256,
        rmsnorm=True,
        norm_before_gate=False,
        D_has_hdim=False,
        bias=False,
        conv_bias=True,
        dt_limit=(0.0, float("inf")),
        norm_type="rmsnorm",
        residual_in_fp32=False,
        use_mem_eff_path=False,
    )
    # Initialisation-only settings of Mamba-2; accepted so that configs written by mamba-ssm load.
    _init_fields = dict(A_init_range=(1.0, 16.0), dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, d_ssm=None)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dt_limit = tuple(_json_float(x) for x in self.dt_limit)
        if self.d_ssm not in (None, self.d_inner):
            raise ValueError(f"vision_mamba_mixer_config.d_ssm={self.d_ssm} is not supported; it must equal "
                             f"expand * hidden_dim ({self.d_inner}) or be null.")
        if self.d_inner % self.headdim:
            raise ValueError(
                f"Mamba-2 head count is inconsistent: expand * hidden_dim = {self.d_inner} is not divisible by "
                f"headdim = {self.headdim}."
            )
        if self.nheads % self.ngroups:
            raise ValueError(f"Mamba-2 nheads ({self.nheads}) must be divisible by ngroups ({self.ngroups}).")
        if not self.rmsnorm or self.norm_type != "rmsnorm":
            raise ValueError("Only the gated RMSNorm Mamba-2 variant (rmsnorm: true, norm_type: rmsnorm) is supported.")

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_dim

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    def to_dict(self):
        # JSON has no infinity: transformers 4 writes a bare `Infinity`, 5 an object only 5 reads. "inf" loads in both.
        return {**super().to_dict(), "dt_limit": [x if math.isfinite(x) else str(x) for x in self.dt_limit]}


class VambaConfig(PretrainedConfig):
    r"""Configuration of a Vamba model. Defaults reproduce `TIGER-Lab/Vamba-Qwen2-VL-7B`.

    Text decoder fields are Qwen2-VL's (kept at the top level, as in the official checkpoint). Vamba's own:

    - `use_alpha_balancing`: mix self- and cross-attention as `a*s + (1-a)*c` with a learned `alpha` per layer.
    - `cross_attn_use_position_embeddings`: rotate cross-attention queries at text positions and keys at the
      visual (t, h, w) positions.
    - `cross_attn_use_layer_norm`: normalise the visual stream with the layer's `input_layernorm` before
      cross-attention (the normalised stream replaces it).
    - `vision_config`: the vision tower; `vision_mamba_mixer_config`: the Mamba-2 block of the visual stream.
    - `mamba_max_tokens`: longest visual segment one Mamba-2 kernel call sees; longer streams are scanned in
      segments that carry the state across (same result, bounded kernel sizes and activations: 2**14 tokens keep
      the block's activations under 1 GiB at no measured cost in speed, BENCHMARKS.md).
    - `vision_max_frames`: temporal steps encoded by the vision tower at once (bounded activations).
    - `decode_with_cuda_graph`: on CUDA, run each decoding step (one new token per row) as a captured CUDA graph
      (same result; it removes the per-kernel launch cost that dominates a decoding step at batch 1).
    - `cross_kv_cache_dtype`: how the cache keeps each layer's cross-attention K/V for decoding: null (the model's
      dtype) or "float8_e4m3fn" (half the memory, one scale per token and head; BENCHMARKS.md gives the accuracy cost).
    """

    model_type = "vamba"
    sub_configs = {"vision_config": VambaVisionConfig, "vision_mamba_mixer_config": VambaMambaConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    _text_fields = dict(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=0.02,
        rms_norm_eps=1e-6,
        use_cache=True,
        rope_theta=1000000.0,
        mrope_section=(16, 24, 24),
        attention_dropout=0.0,
        use_alpha_balancing=True,
        cross_attn_use_position_embeddings=False,
        cross_attn_use_layer_norm=False,
        distill_coeff=0.0,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        image_token_id=151655,
        video_token_id=151656,
        mamba_max_tokens=2**14,
        vision_max_frames=64,
        cross_kv_cache_dtype=None,
        decode_with_cuda_graph=True,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    # Qwen2 fields the official checkpoint carries that do not change Vamba's function.
    _ignored_fields = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "rope_parameters",
                       "text_config")

    def __init__(self, vision_config=None, vision_mamba_mixer_config=None, **kwargs):
        rope = kwargs.pop("rope_scaling", None) or kwargs.pop("rope_parameters", None) or {}
        if "mrope_section" in rope:
            kwargs.setdefault("mrope_section", rope["mrope_section"])
        if "rope_theta" in rope:
            kwargs.setdefault("rope_theta", rope["rope_theta"])
        _reject_unknown("Vamba config", kwargs, {**self._text_fields, **dict.fromkeys(self._ignored_fields)})
        for name in self._ignored_fields:
            kwargs.pop(name, None)
        values = {name: kwargs.pop(name, default) for name, default in self._text_fields.items()}
        kwargs.pop("model_type", None)
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        super().__init__(**kwargs)
        # Set after the base class, which has its own defaults for some of these (e.g. tie_word_embeddings).
        for name, value in values.items():
            setattr(self, name, value)
        self.mrope_section = [int(x) for x in self.mrope_section]
        self.vision_config = self._sub_config(VambaVisionConfig, vision_config)
        self.vision_mamba_mixer_config = self._sub_config(VambaMambaConfig, vision_mamba_mixer_config)
        self._validate()

    @staticmethod
    def _sub_config(cls, value):
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, PretrainedConfig):
            value = value.to_diff_dict()
        return cls(**value)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def _validate(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads})."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads})."
            )
        if len(self.mrope_section) != 3 or sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(
                f"mrope_section {self.mrope_section} must have three entries summing to head_dim/2 = "
                f"{self.head_dim // 2} (head_dim = hidden_size / num_attention_heads)."
            )
        if self.vision_config.hidden_size != self.hidden_size:
            raise ValueError(
                f"vision_config.hidden_size ({self.vision_config.hidden_size}) must equal the text hidden_size "
                f"({self.hidden_size}): the vision tower's output is the visual stream."
            )
        if self.vision_mamba_mixer_config.hidden_dim != self.hidden_size:
            raise ValueError(
                f"vision_mamba_mixer_config.hidden_dim ({self.vision_mamba_mixer_config.hidden_dim}) must equal "
                f"hidden_size ({self.hidden_size})."
            )
        if self.mamba_max_tokens < 1 or self.vision_max_frames < 1:
            raise ValueError("mamba_max_tokens and vision_max_frames must be positive.")
        if self.cross_kv_cache_dtype not in (None, "bfloat16", "float16", "float32", "float8_e4m3fn"):
            raise ValueError(f"cross_kv_cache_dtype={self.cross_kv_cache_dtype!r}: use null (the model's dtype), "
                             f"\"bfloat16\", \"float16\", \"float32\" or \"float8_e4m3fn\".")

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["vision_mamba_mixer_config"] = self.vision_mamba_mixer_config.to_dict()
        output["mrope_section"] = list(self.mrope_section)
        return output


VambaConfig.register_for_auto_class()
