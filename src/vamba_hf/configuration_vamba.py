"""Vamba configuration: Qwen2-VL text fields, a vision-tower sub-config and a Mamba-2 mixer sub-config.

Reads both our own `config.json` (`model_type: "vamba"`) and the official checkpoint's
(`model_type: "qwen2_vl"` with `vision_mamba_mixer_config`, nested configs saved as diffs, either
`rope_scaling` spelling).

Every Vamba field is checked for type and range at construction; a bad value raises `VambaConfigError` (a
`ValueError`) naming the field, the value and what it must be. Keys that are not Vamba's are kept as
attributes and saved, as `PretrainedConfig` does. A near-miss of a Vamba key given to the constructor is a
misspelling, an error naming the intended key; in a saved config being loaded it is an attribute the config
carried when it was saved (e.g. `norm_eps`, set by transformers' test helpers): it loads, with a warning.
"""

import contextlib
import contextvars
import difflib
import inspect
import math
from collections import namedtuple

from transformers import GenerationConfig, PretrainedConfig
from transformers.activations import ACT2FN
from transformers.utils import logging

logger = logging.get_logger(__name__)


class VambaConfigError(ValueError):
    """A config key or value that Vamba cannot use; the message names the field, the value and the fix."""


# Transformers 4.x `PretrainedConfig` keys that 5.x no longer has: configs saved by 4.x still carry them.
_TRANSFORMERS_4_KEYS = {
    "add_cross_attention", "cross_attention_hidden_size", "decoder_start_token_id", "finetuning_task", "is_decoder",
    "prefix", "pruned_heads", "sep_token_id", "task_specific_params", "tf_legacy_loss", "tie_encoder_decoder",
    "tokenizer_class", "torchscript", "use_bfloat16",
}
# Keys that any PretrainedConfig accepts or writes: never a misspelling of a Vamba key, never a Vamba field.
_GENERIC_KEYS = frozenset(PretrainedConfig().to_dict()) | frozenset(GenerationConfig().to_dict()) | {
    "model_type",
    "transformers_version",
    "_name_or_path",
    "name_or_path",
    "architectures",
    "auto_map",
    "torch_dtype",
    "dtype",
    "num_labels",
    "attn_implementation",
    "experts_implementation",
    "_attn_implementation_autoset",
    "output_attentions",
    "_commit_hash",
    "_from_model_config",
} | _TRANSFORMERS_4_KEYS
# How close (difflib ratio) an unknown key must be to a Vamba key to count as its misspelling.
_NEAR_MISS_CUTOFF = 0.8
_MAX_VALUE_REPR = 80
_MAX_LABELS = 100_000


# Where the Auto classes find Vamba's remote code; both names of the vision-to-text Auto class are listed
# (`AutoModelForVision2Seq` in transformers 4.x, `AutoModelForImageTextToText` in 4.x and 5.x).
AUTO_MAP = {
    "AutoConfig": "configuration_vamba.VambaConfig",
    "AutoModel": "modeling_vamba.VambaModel",
    "AutoModelForVision2Seq": "modeling_vamba.VambaForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_vamba.VambaForConditionalGeneration",
    "AutoProcessor": "processing_vamba.VambaProcessor",
}


def _short_repr(value) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_VALUE_REPR else text[: _MAX_VALUE_REPR - 3] + "..."


def _invalid(name: str, value, requirement: str) -> VambaConfigError:
    return VambaConfigError(f"{name}={_short_repr(value)} is invalid: set it to {requirement}.")


# -- value rules ---------------------------------------------------------------------------------------------

Rule = namedtuple("Rule", ["requirement", "check"])


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_token_id(value) -> bool:
    return _is_int(value) and value >= 0


POSITIVE_INT = Rule("an integer >= 1", lambda v: _is_int(v) and v >= 1)
NON_NEGATIVE_INT = Rule("an integer >= 0", lambda v: _is_int(v) and v >= 0)
POSITIVE_NUMBER = Rule("a finite number > 0", lambda v: _is_number(v) and v > 0)
NON_NEGATIVE_NUMBER = Rule("a finite number >= 0", lambda v: _is_number(v) and v >= 0)
PROBABILITY = Rule("a number from 0 to 1", lambda v: _is_number(v) and 0 <= v <= 1)
BOOLEAN = Rule("true or false", lambda v: isinstance(v, bool))
TOKEN_ID = Rule("a token id (an integer >= 0)", _is_token_id)
OPTIONAL_TOKEN_ID = Rule("null or a token id (an integer >= 0)", lambda v: v is None or _is_token_id(v))
OPTIONAL_TOKEN_IDS = Rule(
    "null, a token id (an integer >= 0) or a non-empty list of token ids",
    lambda v: v is None or _is_token_id(v) or (isinstance(v, (list, tuple)) and bool(v) and all(map(_is_token_id, v))),
)
ACTIVATION = Rule('the name of an activation function transformers knows (e.g. "silu", "quick_gelu")',
                  lambda v: isinstance(v, str) and v in ACT2FN)


# A config field: its default and the rule (type and range) its value must pass; None: checked with the other fields
# in the config's `_validate`. Each config's fields are one table of these; its defaults and rules come from it.
Field = namedtuple("Field", ["default", "rule"])


def _defaults_of(fields: dict) -> dict:
    return {name: field.default for name, field in fields.items()}


def _rules_of(fields: dict) -> dict:
    return {name: field.rule for name, field in fields.items() if field.rule is not None}


def _check_rules(prefix: str, config, rules: dict) -> None:
    for name, rule in rules.items():
        value = getattr(config, name)
        if not rule.check(value):
            raise _invalid(prefix + name, value, rule.requirement)


def _number_pair(name: str, value, requirement: str) -> tuple:
    """Two floats from config JSON, where each may be a number, a string such as "inf", or transformers 5's
    {"__float__": "Infinity"}."""
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _invalid(name, value, requirement)
    try:
        pair = tuple(_json_float(x) for x in value)
    except (TypeError, ValueError):
        raise _invalid(name, value, requirement) from None
    if any(math.isnan(x) for x in pair):
        raise _invalid(name, value, requirement)
    return pair


def _json_float(value) -> float:
    if isinstance(value, dict) and set(value) == {"__float__"}:
        value = value["__float__"]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return float(value)


# -- keys ----------------------------------------------------------------------------------------------------


def _check_key_types(kind: str, given: dict) -> None:
    not_strings = [key for key in given if not isinstance(key, str)]
    if not_strings:
        raise VambaConfigError(f"The {kind} has non-string key(s) {_short_repr(not_strings)}: config keys are names.")


def _is_settable_attribute(cls, key: str) -> bool:
    """Whether an instance attribute `key` can be set without replacing something `cls` defines: the class has
    no attribute of that name, or it is a property with a setter."""
    attribute = inspect.getattr_static(cls, key, None)
    return attribute is None or (isinstance(attribute, property) and attribute.fset is not None)


# The key names of the saved config being loaded (by `from_dict` or `from_json_file`, sub-configs' keys included).
_SAVED_KEYS = contextvars.ContextVar("vamba_saved_config_keys", default=frozenset())


def _key_names(config_dict: dict) -> frozenset:
    """The keys of a config dict and of the dicts it holds (its sub-configs)."""
    names = set(config_dict)
    for value in config_dict.values():
        if isinstance(value, dict):
            names |= set(value)
    return frozenset(name for name in names if isinstance(name, str))


@contextlib.contextmanager
def _loading_saved(config_dict):
    """Within it, the keys of `config_dict` count as saved attributes, not as keyword arguments a user typed."""
    if not isinstance(config_dict, dict):
        yield
        return
    token = _SAVED_KEYS.set(_SAVED_KEYS.get() | _key_names(config_dict))
    try:
        yield
    finally:
        _SAVED_KEYS.reset(token)


def _split_saved(keys) -> tuple:
    """(keys of the saved config being loaded, keys given otherwise), each sorted."""
    saved = _SAVED_KEYS.get()
    return sorted(key for key in keys if key in saved), sorted(key for key in keys if key not in saved)


def _warn_kept(kind: str, keys: list, why: str) -> None:
    if keys:
        logger.warning(f"The saved {kind} carries {keys}, {why}: kept as extra attribute(s), which Vamba does not "
                       f"read.")


def _check_keys(kind: str, cls, given: dict, known) -> None:
    """Raise for unknown keys that look like a misspelling of a known one or that would replace something of the
    config class itself (a method, a class setting); other unknown keys are left to `PretrainedConfig`, which
    keeps them as attributes. A near-miss that the saved config being loaded carries loads, with a warning."""
    _check_key_types(kind, given)
    shadowing = sorted(key for key in set(given) - set(known) - _GENERIC_KEYS
                       if key.startswith("__") or not _is_settable_attribute(cls, key))
    if shadowing:
        raise VambaConfigError(f"Key(s) {_short_repr(shadowing)} in the {kind} would replace the config class's own "
                               f"attribute(s) of that name; rename or remove them in config.json.")
    near_misses = {}
    for key in sorted(set(given) - set(known) - _GENERIC_KEYS):
        close = difflib.get_close_matches(key, list(known), n=1, cutoff=_NEAR_MISS_CUTOFF)
        if close:
            near_misses[key] = close[0]
    saved, misspelled = _split_saved(near_misses)
    if misspelled:
        meant = ", ".join(repr(near_misses[key]) for key in misspelled)
        raise VambaConfigError(f"Unknown key(s) in the {kind}: {misspelled}; did you mean {meant}? Fix the "
                               f"spelling in config.json.")
    _warn_kept(kind, saved, "near-miss(es) of " + ", ".join(sorted({repr(near_misses[key]) for key in saved})))


class _LoadsWhatItSaved:
    """`from_dict` and `from_json_file` load the keys of a saved config as saved attributes (see `_check_keys`)."""

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        with _loading_saved(config_dict):
            return super().from_dict(config_dict, **kwargs)

    @classmethod
    def from_json_file(cls, json_file):
        config_dict = cls._dict_from_json_file(json_file)
        with _loading_saved(config_dict):
            return cls(**config_dict)


def _check_generic_values(kind: str, given: dict) -> None:
    """The standard PretrainedConfig keys whose bad values transformers would only trip over deep inside."""
    import torch

    for key in ("dtype", "torch_dtype"):
        value = given.get(key)
        dtype = getattr(torch, value, None) if isinstance(value, str) else value
        if value is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise _invalid(f"{kind}.{key}", value, 'null or a floating-point torch dtype name such as "bfloat16"')
    architectures = given.get("architectures")
    if architectures is not None and not (
        isinstance(architectures, list) and all(isinstance(name, str) for name in architectures)
    ):
        raise _invalid(f"{kind}.architectures", architectures, 'null or a list of class names')
    for key in ("id2label", "label2id", "auto_map"):
        if given.get(key) is not None and not isinstance(given[key], dict):
            raise _invalid(f"{kind}.{key}", given[key], "null or a JSON object")
    id2label = given.get("id2label") or {}
    if not all(_is_int(label_id) or (isinstance(label_id, str) and label_id.isdigit()) for label_id in id2label):
        raise _invalid(f"{kind}.id2label", id2label, "an object whose keys are label ids (integers)")
    num_labels = given.get("num_labels", 0)
    if not (_is_int(num_labels) and 0 <= num_labels <= _MAX_LABELS):
        # transformers builds one id2label entry per label: a huge count would hang here.
        raise _invalid(f"{kind}.num_labels", num_labels, f"an integer from 0 to {_MAX_LABELS}")


def _take_derived(cls, given: dict) -> dict:
    """The keys that name a read-only property of `cls` (a value derived from fields, e.g. `head_dim`), taken out
    of `given` to be compared with the derived value once the config is built."""
    derived = [key for key in given
               if isinstance(getattr(cls, key, None), property) and getattr(cls, key).fset is None]
    return {key: given.pop(key) for key in derived}


def _check_derived(prefix: str, config, given: dict) -> None:
    for key, value in given.items():
        actual = getattr(config, key)
        if value != actual:
            raise VambaConfigError(f"{prefix}{key}={_short_repr(value)} disagrees with the value the other fields give "
                                   f"({actual!r}): remove {prefix}{key} or make the fields agree.")


# -- sub-configs ---------------------------------------------------------------------------------------------


class _FieldsConfig(_LoadsWhatItSaved, PretrainedConfig):
    """A sub-config made of a fixed set of fields: `_field_table` (saved) and `_init_field_table`
    (initialisation-only settings), whose defaults (`_fields`, `_init_fields`) and rules (`_rules`) are derived from
    them. Unknown keys are kept and saved like `PretrainedConfig`'s extra attributes, unless they look like a
    misspelling of a field."""

    _field_table = {}
    _init_field_table = {}
    _fields, _init_fields, _rules = {}, {}, {}
    _aliases = {}  # other spellings found in saved configs -> our field

    def __init__(self, **kwargs):
        for alias, name in self._aliases.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if name in kwargs and kwargs[name] != value:
                    raise VambaConfigError(f"{self.base_config_key} gives {alias}={value!r} and {name}="
                                           f"{kwargs[name]!r}; they name the same setting and must agree: keep one.")
                kwargs[name] = value
        known = {**self._fields, **self._init_fields}
        derived = _take_derived(type(self), kwargs)
        _check_keys(self.base_config_key, type(self), kwargs, known)
        _check_generic_values(self.base_config_key, kwargs)
        values = {name: kwargs.pop(name, default) for name, default in known.items()}
        kwargs.pop("model_type", None)
        super().__init__(**kwargs)
        for name, value in values.items():
            setattr(self, name, value)
        _check_rules(f"{self.base_config_key}.", self, self._rules)
        self._validate()
        _check_derived(f"{self.base_config_key}.", self, derived)

    def _validate(self) -> None:
        """Checks across fields, once each field has passed its rule."""

    def to_dict(self):
        output = super().to_dict()
        known = {**self._fields, **self._init_fields}
        kept = {key: value for key, value in output.items() if key in known or key not in _GENERIC_KEYS}
        return {"model_type": self.model_type, "transformers_version": output.get("transformers_version"), **kept}


class VambaVisionConfig(_FieldsConfig):
    """The Qwen2-VL vision tower (ViT with 2-D rotary, 2x2 patch merger). Defaults are Qwen2-VL-7B's."""

    model_type = "vamba_vision"
    base_config_key = "vision_config"
    _field_table = dict(
        depth=Field(32, POSITIVE_INT),
        embed_dim=Field(1280, POSITIVE_INT),
        hidden_size=Field(3584, POSITIVE_INT),
        num_heads=Field(16, POSITIVE_INT),
        mlp_ratio=Field(4, POSITIVE_NUMBER),
        patch_size=Field(14, POSITIVE_INT),
        spatial_merge_size=Field(2, POSITIVE_INT),
        temporal_patch_size=Field(2, POSITIVE_INT),
        in_channels=Field(3, POSITIVE_INT),
        hidden_act=Field("quick_gelu", ACTIVATION),
    )
    _fields, _rules = _defaults_of(_field_table), _rules_of(_field_table)
    # Qwen2-VL's Hub configs write these (transformers <= 4.44 kept them as extra attributes).
    _aliases = {"in_chans": "in_channels", "spatial_patch_size": "patch_size"}

    # transformers 5 gives config classes that define no __init__ a generic one, which would skip the checks.
    def __init__(self, **kwargs):
        super().__init__(**kwargs)

    def _validate(self) -> None:
        if self.embed_dim % self.num_heads:
            raise VambaConfigError(
                f"vision_config.embed_dim ({self.embed_dim}) must be divisible by vision_config.num_heads "
                f"({self.num_heads}): change one of them."
            )
        if (self.embed_dim // self.num_heads) % 4:
            raise VambaConfigError(
                f"vision_config head size embed_dim / num_heads = {self.embed_dim // self.num_heads} must be a "
                f"multiple of 4 (the 2-D rotary splits it into row and column halves): change embed_dim or num_heads."
            )
        if int(self.embed_dim * self.mlp_ratio) < 1:
            raise _invalid("vision_config.mlp_ratio", self.mlp_ratio, "a ratio giving an MLP width of at least 1")


class VambaMambaConfig(_FieldsConfig):
    """The Mamba-2 mixer that runs over the visual stream in every decoder layer (key names as in the
    official checkpoint's `vision_mamba_mixer_config`)."""

    model_type = "vamba_mamba"
    base_config_key = "vision_mamba_mixer_config"
    _field_table = dict(
        enable=Field(True, BOOLEAN),
        hidden_dim=Field(3584, POSITIVE_INT),
        d_state=Field(128, POSITIVE_INT),
        d_conv=Field(4, POSITIVE_INT),
        expand=Field(2, POSITIVE_INT),
        headdim=Field(64, POSITIVE_INT),
        ngroups=Field(1, POSITIVE_INT),
        chunk_size=Field(256, POSITIVE_INT),
        rmsnorm=Field(True, BOOLEAN),
        norm_before_gate=Field(False, BOOLEAN),
        D_has_hdim=Field(False, BOOLEAN),
        bias=Field(False, BOOLEAN),
        conv_bias=Field(True, BOOLEAN),
        dt_limit=Field((0.0, float("inf")), None),
        norm_type=Field("rmsnorm", None),
        residual_in_fp32=Field(False, BOOLEAN),
        use_mem_eff_path=Field(False, BOOLEAN),
    )
    # Initialisation-only settings of Mamba-2; accepted so that configs written by mamba-ssm load.
    _init_field_table = dict(
        A_init_range=Field((1.0, 16.0), None),
        dt_min=Field(0.001, POSITIVE_NUMBER),
        dt_max=Field(0.1, POSITIVE_NUMBER),
        dt_init_floor=Field(1e-4, NON_NEGATIVE_NUMBER),
        d_ssm=Field(None, Rule("null or an integer >= 1", lambda v: v is None or (_is_int(v) and v >= 1))),
    )
    _fields, _init_fields = _defaults_of(_field_table), _defaults_of(_init_field_table)
    _rules = _rules_of({**_field_table, **_init_field_table})

    def __init__(self, **kwargs):  # see VambaVisionConfig.__init__
        super().__init__(**kwargs)

    def _validate(self) -> None:
        prefix = "vision_mamba_mixer_config."
        self.dt_limit = _number_pair(prefix + "dt_limit", self.dt_limit, '[low, high] with 0 <= low <= high (high '
                                                                          'may be "inf")')
        if not 0 <= self.dt_limit[0] <= self.dt_limit[1]:
            raise _invalid(prefix + "dt_limit", list(self.dt_limit), '[low, high] with 0 <= low <= high')
        self.A_init_range = _number_pair(prefix + "A_init_range", self.A_init_range, "[low, high] with 0 < low <= "
                                                                                      "high, both finite")
        low, high = self.A_init_range
        if not (0 < low <= high and math.isfinite(high)):
            raise _invalid(prefix + "A_init_range", list(self.A_init_range), "[low, high] with 0 < low <= high")
        if self.dt_min > self.dt_max:
            raise VambaConfigError(f"{prefix}dt_min ({self.dt_min}) must not exceed {prefix}dt_max ({self.dt_max}).")
        if self.d_ssm not in (None, self.d_inner):
            raise VambaConfigError(f"{prefix}d_ssm={self.d_ssm} is not supported; it must equal expand * hidden_dim "
                                   f"({self.d_inner}) or be null.")
        if self.d_inner % self.headdim:
            raise VambaConfigError(
                f"Mamba-2 head count is inconsistent: expand * hidden_dim = {self.d_inner} is not divisible by "
                f"headdim = {self.headdim}; change {prefix}headdim."
            )
        if self.nheads % self.ngroups:
            raise VambaConfigError(f"Mamba-2 nheads ({self.nheads}) must be divisible by {prefix}ngroups "
                                   f"({self.ngroups}).")
        if self.rmsnorm is not True or self.norm_type != "rmsnorm":
            raise VambaConfigError(f"{prefix}rmsnorm={self.rmsnorm!r}, norm_type={_short_repr(self.norm_type)}: only "
                                   f"the gated RMSNorm Mamba-2 variant (rmsnorm: true, norm_type: \"rmsnorm\") is "
                                   f"supported.")

    @property
    def d_inner(self) -> int:
        return self.expand * self.hidden_dim

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    def to_dict(self):
        # JSON has no infinity: transformers 4 writes a bare `Infinity`, 5 an object only 5 reads. "inf" loads in both.
        return {
            **super().to_dict(),
            "dt_limit": [x if math.isfinite(x) else str(x) for x in self.dt_limit],
            "A_init_range": list(self.A_init_range),
        }


# -- the model config ----------------------------------------------------------------------------------------


# The RoPE types Qwen2-VL's rotary takes ("mrope": M-RoPE without scaling, the official checkpoint's spelling).
ROPE_TYPES = ("default", "mrope", "linear", "dynamic", "yarn", "longrope", "llama3")
# Tensor parallelism as Qwen2-VL's text model has it, for Vamba's decoder layers (cross-attention like
# self-attention): heads split over the ranks, the MLP's hidden units too. Names are the model's own (the text model
# is `model`, beside `visual`); the vision tower and the Mamba-2 blocks stay whole on every rank.
TENSOR_PARALLEL_PLAN = {
    f"model.layers.*.{attention}.{projection}": style
    for attention in ("self_attn", "cross_attn")
    for projection, style in (("q_proj", "colwise"), ("k_proj", "colwise"), ("v_proj", "colwise"),
                              ("o_proj", "rowwise"))
} | {"model.layers.*.mlp.gate_proj": "colwise", "model.layers.*.mlp.up_proj": "colwise",
     "model.layers.*.mlp.down_proj": "rowwise"}


class VambaConfig(_LoadsWhatItSaved, PretrainedConfig):
    r"""Configuration of a Vamba model. Defaults reproduce `TIGER-Lab/Vamba-Qwen2-VL-7B`.

    Text decoder fields are Qwen2-VL's (kept at the top level, as in the official checkpoint). Vamba's own:

    - `use_alpha_balancing`: mix self- and cross-attention as `a*s + (1-a)*c` with a learned `alpha` per layer.
    - `cross_attn_use_position_embeddings`: rotate cross-attention queries at text positions and keys at the
      visual (t, h, w) positions.
    - `cross_attn_use_layer_norm`: normalise the visual stream with the layer's `input_layernorm` before
      cross-attention (the normalised stream replaces it).
    - `vision_config`: the vision tower; `vision_mamba_mixer_config`: the Mamba-2 block of the visual stream.
    - `mamba_max_tokens`: longest visual segment one Mamba-2 kernel call sees; longer streams are scanned in
      segments that carry the state across (same result, bounded kernel sizes and activations; BENCHMARKS.md
      measures the default's memory and speed).
    - `vision_max_frames`: temporal steps encoded by the vision tower at once (bounded activations).
    - `decode_with_cuda_graph`: on CUDA, run each decoding step (one new token per row) as a captured CUDA graph
      (same result; it removes the per-kernel launch cost that dominates a decoding step at batch 1).
    - `cross_kv_cache_dtype`: how the cache keeps each layer's cross-attention K/V for decoding: null (the model's
      dtype) or "float8_e4m3fn" (half the memory, one scale per token and head; BENCHMARKS.md gives the accuracy cost).

    `attn_implementation` (and a later `config._attn_implementation = ...`) applies to the vision tower and the
    mixer sub-configs too, or per sub-config when given as a dict keyed by "" / "vision_config" / ...
    """

    base_model_tp_plan = TENSOR_PARALLEL_PLAN

    model_type = "vamba"
    sub_configs = {"vision_config": VambaVisionConfig, "vision_mamba_mixer_config": VambaMambaConfig}
    keys_to_ignore_at_inference = ["past_key_values"]

    _field_table = dict(
        vocab_size=Field(152064, POSITIVE_INT),
        hidden_size=Field(3584, POSITIVE_INT),
        intermediate_size=Field(18944, POSITIVE_INT),
        num_hidden_layers=Field(28, POSITIVE_INT),
        num_attention_heads=Field(28, POSITIVE_INT),
        num_key_value_heads=Field(4, POSITIVE_INT),
        hidden_act=Field("silu", ACTIVATION),
        max_position_embeddings=Field(32768, POSITIVE_INT),
        initializer_range=Field(0.02, NON_NEGATIVE_NUMBER),
        rms_norm_eps=Field(1e-6, POSITIVE_NUMBER),
        use_cache=Field(True, BOOLEAN),
        rope_theta=Field(1000000.0, POSITIVE_NUMBER),
        mrope_section=Field((16, 24, 24), None),
        attention_dropout=Field(0.0, PROBABILITY),
        use_alpha_balancing=Field(True, BOOLEAN),
        cross_attn_use_position_embeddings=Field(False, BOOLEAN),
        cross_attn_use_layer_norm=Field(False, BOOLEAN),
        distill_coeff=Field(0.0, NON_NEGATIVE_NUMBER),
        vision_start_token_id=Field(151652, TOKEN_ID),
        vision_end_token_id=Field(151653, TOKEN_ID),
        image_token_id=Field(151655, TOKEN_ID),
        video_token_id=Field(151656, TOKEN_ID),
        mamba_max_tokens=Field(2**14, POSITIVE_INT),
        vision_max_frames=Field(64, POSITIVE_INT),
        cross_kv_cache_dtype=Field(None, None),
        decode_with_cuda_graph=Field(True, BOOLEAN),
        tie_word_embeddings=Field(False, BOOLEAN),
        bos_token_id=Field(None, OPTIONAL_TOKEN_ID),
        eos_token_id=Field(None, OPTIONAL_TOKEN_IDS),
        pad_token_id=Field(None, OPTIONAL_TOKEN_ID),
    )
    _text_fields, _rules = _defaults_of(_field_table), _rules_of(_field_table)
    _cross_kv_cache_dtypes = (None, "bfloat16", "float16", "float32", "float8_e4m3fn")
    # Qwen2 fields the official checkpoint carries that do not change Vamba's function.
    _ignored_fields = ("sliding_window", "use_sliding_window", "max_window_layers", "layer_types", "rope_parameters",
                       "text_config")

    def __init__(self, vision_config=None, vision_mamba_mixer_config=None, **kwargs):
        self._refuse_other_architectures(kwargs.get("model_type"), vision_mamba_mixer_config)
        derived = _take_derived(type(self), kwargs)
        rope_parameters = self._take_rope_settings(kwargs)
        _check_keys("Vamba config", type(self), kwargs, self._known_keys())
        self._refuse_misplaced_keys(kwargs)
        _check_generic_values("config", kwargs)
        for name in self._ignored_fields:
            kwargs.pop(name, None)
        values = {name: kwargs.pop(name, default) for name, default in self._text_fields.items()}
        kwargs.pop("model_type", None)
        # Applied once the sub-configs exist, so that the setter reaches them.
        attn_implementation = kwargs.pop("attn_implementation", None)
        kwargs["auto_map"] = {**AUTO_MAP, **(kwargs.get("auto_map") or {})}
        super().__init__(**kwargs)
        # Set after the base class, which has its own defaults for some of these (e.g. tie_word_embeddings).
        for name, value in values.items():
            setattr(self, name, value)
        self.rope_parameters = rope_parameters
        self.vision_config = self._sub_config("vision_config", VambaVisionConfig, vision_config)
        self.vision_mamba_mixer_config = self._sub_config("vision_mamba_mixer_config", VambaMambaConfig,
                                                          vision_mamba_mixer_config)
        if attn_implementation is not None:
            self._attn_implementation = attn_implementation
        self._validate()
        _check_derived("", self, derived)

    def __setattr__(self, key, value):
        super().__setattr__(key, value)
        # A model resolves its attention implementation onto this attribute directly (not through the recursive
        # setter); sub-configs with no choice of their own follow it, as their modules are not separate models.
        if key == "_attn_implementation_internal":
            for sub_key in self.sub_configs:
                sub_config = self.__dict__.get(sub_key)
                if sub_config is not None and sub_config._attn_implementation is None:
                    sub_config._attn_implementation_internal = value

    @staticmethod
    def _refuse_other_architectures(model_type, vision_mamba_mixer_config) -> None:
        """A saved config names its architecture: ours, or the official release's qwen2_vl with a Mamba mixer."""
        if model_type == "qwen2_vl" and vision_mamba_mixer_config is None:
            raise VambaConfigError("This is a plain Qwen2-VL config (model_type 'qwen2_vl' without "
                                   "'vision_mamba_mixer_config'), not Vamba: load it with transformers' "
                                   "Qwen2VLForConditionalGeneration.")
        if model_type not in (None, "vamba", "qwen2_vl"):
            raise VambaConfigError(f"model_type={_short_repr(model_type)}: this is not a Vamba config (model_type "
                                   f"'vamba', or the official release's 'qwen2_vl' with 'vision_mamba_mixer_config').")

    @classmethod
    def _known_keys(cls) -> set:
        return {*cls._text_fields, *cls.sub_configs, *cls._ignored_fields, "rope_scaling"}

    @staticmethod
    def _take_rope_settings(kwargs: dict) -> dict:
        """Read `mrope_section` / `rope_theta` from either spelling of the rotary settings (popped from kwargs), and
        return the rest as `rope_parameters`: the RoPE type ("default" for M-RoPE as is) and its scaling settings,
        which the model's rotary applies as Qwen2-VL's does. A type Qwen2-VL does not take is refused."""
        kept = {}
        for key in ("rope_scaling", "rope_parameters"):
            rope = kwargs.pop(key, None)
            if rope is None:
                continue
            if not isinstance(rope, dict):
                raise _invalid(key, rope, 'a JSON object such as {"type": "mrope", "mrope_section": [16, 24, 24]}')
            for name in ("mrope_section", "rope_theta"):
                if name in rope:
                    kwargs.setdefault(name, rope[name])
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            if rope_type not in ROPE_TYPES:
                raise _invalid(f"{key}.rope_type", rope_type, f"one of {', '.join(ROPE_TYPES)} (the RoPE types of "
                                                              f"Qwen2-VL; 'mrope' is 'default')")
            settings = {k: v for k, v in rope.items() if k not in ("type", "rope_type", "mrope_section", "rope_theta")}
            kept = {**kept, **settings, "rope_type": "default" if rope_type == "mrope" else rope_type}
        return kept or {"rope_type": "default"}

    def _refuse_misplaced_keys(self, kwargs: dict) -> None:
        for sub_key, sub_class in self.sub_configs.items():
            sub_only = {*sub_class._fields, *sub_class._init_fields} - set(self._text_fields) - _GENERIC_KEYS
            saved, misplaced = _split_saved(set(kwargs) & sub_only)
            if misplaced:
                raise VambaConfigError(f"{misplaced}: {sub_key} setting(s) given at the top level of the Vamba "
                                       f"config; move them into {sub_key}.")
            _warn_kept("Vamba config", saved, f"{sub_key} setting(s) at its top level")

    @staticmethod
    def _sub_config(key: str, cls, value):
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, PretrainedConfig):
            value = value.to_diff_dict()
        if not isinstance(value, dict):
            raise _invalid(key, value, f"a JSON object of {key} settings (or null for the defaults)")
        _check_key_types(key, value)
        return cls(**value)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def _validate(self):
        _check_rules("", self, self._rules)
        self._validate_mrope_section()
        # The embedding pads with pad_token_id, and prompts mark the visual input with the vision start/end tokens.
        for name in ("pad_token_id", "vision_start_token_id", "vision_end_token_id"):
            value = getattr(self, name)
            if value is not None and value >= self.vocab_size:
                raise _invalid(name, value, f"a token id below vocab_size ({self.vocab_size})")
        if self.hidden_size % self.num_attention_heads:
            raise VambaConfigError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}): change one of them."
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise VambaConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of num_key_value_heads "
                f"({self.num_key_value_heads}): change one of them."
            )
        if self.head_dim % 2 or sum(self.mrope_section) != self.head_dim // 2:
            raise VambaConfigError(
                f"mrope_section {self.mrope_section} must have three entries summing to head_dim/2 = "
                f"{self.head_dim / 2:g} (head_dim = hidden_size / num_attention_heads, which must be even)."
            )
        if self.vision_config.hidden_size != self.hidden_size:
            raise VambaConfigError(
                f"vision_config.hidden_size ({self.vision_config.hidden_size}) must equal the text hidden_size "
                f"({self.hidden_size}): the vision tower's output is the visual stream."
            )
        if self.vision_mamba_mixer_config.hidden_dim != self.hidden_size:
            raise VambaConfigError(
                f"vision_mamba_mixer_config.hidden_dim ({self.vision_mamba_mixer_config.hidden_dim}) must equal "
                f"hidden_size ({self.hidden_size})."
            )
        if self.cross_kv_cache_dtype not in self._cross_kv_cache_dtypes:
            raise VambaConfigError(f"cross_kv_cache_dtype={_short_repr(self.cross_kv_cache_dtype)}: use null (the "
                                   f"model's dtype), \"bfloat16\", \"float16\", \"float32\" or \"float8_e4m3fn\".")

    def _validate_mrope_section(self):
        section = self.mrope_section
        if not (isinstance(section, (list, tuple)) and len(section) == 3 and all(map(NON_NEGATIVE_INT.check, section))):
            raise _invalid("mrope_section", section, "three integers >= 0 summing to head_dim/2, e.g. [16, 24, 24]")
        self.mrope_section = list(section)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        if not isinstance(config_dict, dict):
            raise VambaConfigError(f"A Vamba config is an object of settings, not a {type(config_dict).__name__}.")
        return super().from_dict(config_dict, **kwargs)

    @classmethod
    def _dict_from_json_file(cls, json_file):
        config_dict = super()._dict_from_json_file(json_file)
        if not isinstance(config_dict, dict):
            raise VambaConfigError(f"{json_file} holds a JSON {type(config_dict).__name__}, not an object of config "
                                   f"settings.")
        return config_dict

    def to_dict(self):
        output = super().to_dict()
        output["vision_config"] = self.vision_config.to_dict()
        output["vision_mamba_mixer_config"] = self.vision_mamba_mixer_config.to_dict()
        output["mrope_section"] = list(self.mrope_section)
        return output


VambaConfig.register_for_auto_class()
