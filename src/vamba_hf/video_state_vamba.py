"""A video encoded once: everything it contributes to any answer, kept to answer many questions and to grow.

The visual stream never reads the text, so what a video gives an answer is each layer's cross-attention K/V (and
their mask), computed once. Mamba-2 is a recurrence and the vision tower attends within one temporal step, so a
video of N + M frames is the video of N frames continued with M more from each layer's carried state (SSM state
and last convolution inputs). `VideoState` holds both; `encode_visual_state` and `extend_visual_state` build them
(the model's `encode_video`, `encode_image` and `extend_video` call these).
"""

import hashlib
import json
import os
import secrets
import stat
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from .cache_vamba import stored_kv
from .checks_vamba import check_visual_pixels
from .mamba2_vamba import MambaCarry
from .streams_vamba import PaddedRows

STATE_FORMAT_VERSION = 2
STATE_FORMAT = "vamba-video-state"
STATE_KINDS = ("video", "image")
# The compute dtypes a model may encode in (the state's "dtype").
STATE_DTYPES = ("float32", "bfloat16", "float16", "float64")
# Elements of each weight on the visual path that the model fingerprint hashes (evenly spaced).
FINGERPRINT_SAMPLES = 1024
TOKEN_DIM = 2  # of the K/V (b, kv_heads, n, d), their scales (b, kv_heads, n, 1) and the mask (b, 1, n)

# The config fields a state depends on (besides the vision and Mamba-2 sub-configs): what shapes the visual stream,
# the cross-attention K/V and their storage.
STATE_CONFIG_FIELDS = (
    "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
    "rope_theta", "mrope_section", "cross_attn_use_position_embeddings", "cross_attn_use_layer_norm",
    "cross_kv_cache_dtype",
)


@dataclass
class Growable:
    """A tensor along the token dimension with room to grow; `filled`: the tokens written, by whichever state
    extended it last. A state appends in place only when it ends where the buffer is filled (else it copies), so an
    older state stays valid, and so does a state extended twice in different ways."""

    buffer: torch.Tensor
    filled: int

    @classmethod
    def of(cls, tensor: torch.Tensor, room: int = 0) -> "Growable":
        """`tensor`, with room for `room` more tokens."""
        if room == 0:
            return cls(tensor, tensor.shape[TOKEN_DIM])
        shape = list(tensor.shape)
        shape[TOKEN_DIM] += room
        buffer = tensor.new_empty(shape)
        buffer.narrow(TOKEN_DIM, 0, tensor.shape[TOKEN_DIM]).copy_(tensor)
        return cls(buffer, tensor.shape[TOKEN_DIM])

    def view(self, length: int) -> torch.Tensor:
        return self.buffer.narrow(TOKEN_DIM, 0, length)

    def appended(self, length: int, new: torch.Tensor) -> "Growable":
        """This buffer with `new` written after its first `length` tokens: in place when there is room and nothing
        was written there yet, else in a new buffer half as large again (amortised cost: the new tokens). A new
        buffer holds the old one's copy while it is made: reserve room at encoding for a video that fills most of
        the device (`encode_video(reserve_frames=...)`)."""
        total = length + new.shape[TOKEN_DIM]
        if self.filled == length and total <= self.buffer.shape[TOKEN_DIM]:
            self.buffer.narrow(TOKEN_DIM, length, new.shape[TOKEN_DIM]).copy_(new)
            self.filled = total
            return self
        shape = list(self.buffer.shape)
        shape[TOKEN_DIM] = total + max(new.shape[TOKEN_DIM], total // 2)
        buffer = self.buffer.new_empty(shape)
        buffer.narrow(TOKEN_DIM, 0, length).copy_(self.view(length))
        buffer.narrow(TOKEN_DIM, length, new.shape[TOKEN_DIM]).copy_(new)
        return Growable(buffer, total)


@dataclass
class VideoState:
    """A video (or image) encoded for a model: each layer's cross-attention K/V in the cache's storage dtype
    (float8 with per-token scales when `config.cross_kv_cache_dtype` says so), the mask of the visual tokens each
    entry holds (None: all), each Mamba-2 block's carry (to extend the video), the grid so far (`grid_thw`, one row
    per entry, in patches) and how its frames were sampled (`sampling`, one dict per encode/extend call).

    Pass it to `model.generate(**text_inputs, video_state=state)` (or forward): every prompt row with a
    <|vision_start|><|vision_end|> placeholder reads it, and none of them copies its K/V (`vamba_hf.chat.
    question_inputs` tokenizes such a prompt from a question). `model.extend_video` adds
    frames; `save` / `load_video_state` keep it on disk; `to` moves it."""

    kind: str  # "video" or "image"
    keys: list[Growable]
    values: list[Growable]
    key_scales: Optional[list[Growable]]
    value_scales: Optional[list[Growable]]
    keep: Optional[Growable]
    carries: list[Optional[MambaCarry]]
    grid_thw: torch.Tensor
    length: int
    model_fingerprint: str
    dtype: torch.dtype  # the model's compute dtype when it encoded the video, which reads the K/V
    sampling: list = field(default_factory=list)
    # Internal (beams over pixels): the entry each row of a batch reads, -1 for rows without visual input.
    row_entries: Optional[torch.Tensor] = None

    @property
    def num_entries(self) -> int:
        return self.grid_thw.shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys[0].buffer.device

    def cross_kv(self) -> tuple[dict, dict]:
        """{layer: (key, value)} and {layer: (key scale, value scale)} as the cache's cross store keeps them."""
        kv = {i: (k.view(self.length), v.view(self.length)) for i, (k, v) in enumerate(zip(self.keys, self.values))}
        scales = {}
        if self.key_scales is not None:
            scales = {i: (k.view(self.length), v.view(self.length))
                      for i, (k, v) in enumerate(zip(self.key_scales, self.value_scales))}
        return kv, scales

    def mask(self) -> Optional[torch.Tensor]:
        return None if self.keep is None else self.keep.view(self.length)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor of the state by name (views of the visual tokens held, no spare room)."""
        named = {"grid_thw": self.grid_thw}
        groups = {"key": self.keys, "value": self.values, "key_scale": self.key_scales,
                  "value_scale": self.value_scales}
        for name, group in groups.items():
            for i, grown in enumerate(group or []):
                named[f"layers.{i}.{name}"] = grown.view(self.length)
        for i, carry in enumerate(self.carries):
            if carry is not None:
                named[f"layers.{i}.ssm_state"], named[f"layers.{i}.conv_inputs"] = carry.state, carry.conv_inputs
        if self.keep is not None:
            named["keep"] = self.keep.view(self.length)
        return named

    def nbytes(self) -> int:
        """Bytes of the state's data (without the spare room kept for growing)."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device) -> "VideoState":
        """The state on `device` (this state is unchanged): CPU memory between questions, the GPU while
        answering."""

        def move(grown):
            return None if grown is None else Growable.of(grown.view(self.length).to(device))

        def move_carry(carry):
            return None if carry is None else MambaCarry(carry.state.to(device), carry.conv_inputs.to(device), None)

        return replace(
            self, keys=[move(g) for g in self.keys], values=[move(g) for g in self.values],
            key_scales=None if self.key_scales is None else [move(g) for g in self.key_scales],
            value_scales=None if self.value_scales is None else [move(g) for g in self.value_scales],
            keep=move(self.keep), carries=[move_carry(c) for c in self.carries],
            row_entries=None if self.row_entries is None else self.row_entries.to(device),
        )

    def save(self, path) -> None:
        """Write the state to `path` (safetensors), with the model fingerprint, the sampling, the format and a digest
        of it all: written to a temporary file beside `path`, checked, then renamed over it (a failed write leaves
        `path` as it was and raises OSError)."""
        if self.row_entries is not None:
            raise ValueError("This state belongs to one generate call (beams over several videos); encode each video "
                             "with model.encode_video to save it.")
        metadata = {"format": STATE_FORMAT, "format_version": str(STATE_FORMAT_VERSION), "kind": self.kind,
                    "model_fingerprint": self.model_fingerprint,
                    "dtype": str(self.dtype).removeprefix("torch."), "sampling": json.dumps(self.sampling)}
        tensors = {name: t.contiguous() for name, t in self.tensors().items()}
        metadata["digest"] = state_digest(self.model_fingerprint, metadata, tensors)
        _write_replacing(str(path), tensors, metadata)


def _write_replacing(path: str, tensors: dict, metadata: dict) -> None:
    """safetensors `tensors` into a new file beside `path` (mode from the umask), flushed to the disk, then renamed
    to `path`; the new file is removed when anything fails."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    folder, name = os.path.split(os.path.abspath(path))
    temporary = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.partial")
    os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        try:
            save_file(tensors, temporary, metadata=metadata)
        except SafetensorError as error:  # safetensors reports a failed write (a full disk) as its own error
            raise OSError(f"Could not write the video state to {path}: {error}") from None
        with open(temporary, "rb+") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def state_digest(fingerprint: str, metadata: dict, tensors: dict) -> str:
    """A SHA-256 of a state's metadata and tensors (names, dtypes, shapes, bytes) keyed by the fingerprint of the
    model that encoded it: a changed byte, or another model's state given this model's fingerprint string, no longer
    matches the model that reads it."""
    digest = _metadata_digest(fingerprint, metadata)
    for name in sorted(tensors):
        _digest_tensor(digest, name, tensors[name])
    return digest.hexdigest()


def _metadata_digest(fingerprint: str, metadata: dict):
    digest = hashlib.sha256(fingerprint.encode())
    digest.update(json.dumps({key: value for key, value in metadata.items() if key != "digest"}, sort_keys=True)
                  .encode())
    return digest


def _digest_tensor(digest, name: str, tensor: torch.Tensor) -> None:
    tensor = tensor.detach().contiguous().cpu()
    digest.update(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().data)


# -- the model's identity ----------------------------------------------------------------------------------------


def _is_on_visual_path(name: str, config) -> bool:
    """Whether the parameter `name` of the model shapes a video's state: the vision tower, each layer's Mamba-2
    block, the cross-attention K/V projections (and norms) and, when it feeds them, the layer's input norm."""
    return (name.startswith("visual.") or ".vision_mixer." in name or ".cross_attn.k_" in name
            or ".cross_attn.v_" in name or (config.cross_attn_use_layer_norm and ".input_layernorm." in name))


def _visual_path_weights(model) -> list:
    return [param for name, param in model.named_parameters() if _is_on_visual_path(name, model.config)]


def _weights_sample(weights: list) -> bytes:
    """`FINGERPRINT_SAMPLES` evenly spaced elements of each weight (strided integer indexing: the same elements on
    every device) in float32, with their shapes, as bytes. The compute dtype is checked apart, with its own message."""
    shapes = json.dumps([list(param.shape) for param in weights]).encode()
    # dequantize(): a quantized weight (torchao's tensor subclasses) as the values it computes with; a plain tensor
    # as it is.
    samples = [param.detach().dequantize().reshape(-1)[:: max(1, param.numel() // FINGERPRINT_SAMPLES)]
               [:FINGERPRINT_SAMPLES] for param in weights]
    return shapes + torch.cat([sample.float().cpu() for sample in samples]).numpy().tobytes()  # any device each


def model_fingerprint(model) -> str:
    """A hash of what determines a state: the config fields that shape it (`STATE_CONFIG_FIELDS`, the vision and
    Mamba-2 sub-configs) and every weight on the visual path (vision tower, Mamba-2 blocks, cross-attention K/V),
    each by its shape, dtype and an evenly spaced sample of its values."""
    config = model.config
    described = {name: getattr(config, name) for name in STATE_CONFIG_FIELDS}
    described["vision_config"] = config.vision_config.to_dict()
    described["vision_mamba_mixer_config"] = config.vision_mamba_mixer_config.to_dict()
    described = json.dumps(described, sort_keys=True, default=str)
    weights = _visual_path_weights(model)
    # Kept on the model while the weights are unchanged (same storage, no in-place update since).
    key = (described, *((param.data_ptr(), param._version, param.device) for param in weights))
    cached = getattr(model, "_video_state_fingerprint", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    digest = hashlib.sha256(described.encode())
    digest.update(_weights_sample(weights))
    model._video_state_fingerprint = (key, digest.hexdigest()[:32])
    return model._video_state_fingerprint[1]


def _not_a_state(path, why: str) -> ValueError:
    return ValueError(f"{path} is not a Vamba video state ({why}); save one with state.save(path) or `vamba-hf chat "
                      f"--save-state`.")


def _check_metadata(path, metadata: dict, model) -> None:
    """The format, version, kind, dtype, sampling and fingerprint of a state file, against this vamba-hf and
    `model`."""
    if metadata.get("format") != STATE_FORMAT:
        raise _not_a_state(path, f"no '{STATE_FORMAT}' format in its metadata")
    version = metadata.get("format_version")
    if version != str(STATE_FORMAT_VERSION):
        raise ValueError(f"{path} is a video state of format version {version!r}, this vamba-hf reads version "
                         f"{STATE_FORMAT_VERSION}: encode the video again.")
    if metadata.get("kind") not in STATE_KINDS or metadata.get("dtype") not in STATE_DTYPES:
        raise _not_a_state(path, f"kind {metadata.get('kind')!r}, dtype {metadata.get('dtype')!r}")
    try:
        sampling = json.loads(metadata.get("sampling", ""))
    except ValueError:
        sampling = None
    if not (isinstance(sampling, list) and all(isinstance(entry, dict) for entry in sampling)):
        raise _not_a_state(path, "its sampling is not a list of records")
    expected = model_fingerprint(model)
    if metadata.get("model_fingerprint") != expected:
        raise ValueError(f"{path} was encoded by another model (fingerprint {metadata.get('model_fingerprint')!r}, "
                         f"this model's is {expected!r}): encode the video again with this model.")
    dtype = model.model.embed_tokens.weight.dtype
    if metadata["dtype"] != str(dtype).removeprefix("torch."):
        raise ValueError(f"{path} was encoded in {metadata['dtype']}, the model runs in {dtype}: encode it with the "
                         f"model in {dtype}.")


def _token_counts(path, grid_thw: torch.Tensor, config) -> list:
    """The visual tokens of each entry of a state's grid (one (t, h, w) row per entry, in patches)."""
    merge = config.vision_config.spatial_merge_size
    if not (grid_thw.dtype == torch.int64 and grid_thw.dim() == 2 and grid_thw.shape[1] == 3
            and 1 <= grid_thw.shape[0] and bool((grid_thw >= 1).all())):
        raise _not_a_state(path, f"grid_thw {grid_thw.dtype} {list(grid_thw.shape)} is not one (t, h, w) row of "
                                 f"positive int64 per entry")
    rows = grid_thw.tolist()
    if any(h % merge or w % merge for _, h, w in rows):
        raise _not_a_state(path, f"grid_thw {rows} is not in whole {merge}x{merge} merged patches")
    return [t * (h // merge) * (w // merge) for t, h, w in rows]


def expected_state_tensors(model, dtype: torch.dtype, entries: int, length: int, padded: bool) -> dict:
    """name -> (shape, allowed dtypes) of every tensor of a state of `model` (encoded in `dtype`) with `entries`
    entries of at most `length` visual tokens (`padded`: of different lengths, so with a keep mask)."""
    config = model.config
    storage = dtype if config.cross_kv_cache_dtype is None else getattr(torch, config.cross_kv_cache_dtype)
    scaled = storage.itemsize < dtype.itemsize
    kv_shape = (entries, config.num_key_value_heads, length, config.head_dim)
    expected = {"grid_thw": ((entries, 3), (torch.int64,))}
    for i, carry_shapes in enumerate(model.model.carry_shapes(entries)):
        for name in ("key", "value"):
            expected[f"layers.{i}.{name}"] = (kv_shape, (storage,))
            if scaled:
                expected[f"layers.{i}.{name}_scale"] = ((*kv_shape[:3], 1), (dtype,))
        if carry_shapes:
            expected[f"layers.{i}.ssm_state"] = (carry_shapes["ssm_state"], (torch.float32, dtype))
            expected[f"layers.{i}.conv_inputs"] = (carry_shapes["conv_inputs"], (dtype,))
    if padded:
        expected["keep"] = ((entries, 1, length), (torch.bool,))
    return expected


def _check_names(path, found, expected) -> None:
    missing, unknown = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or unknown:
        listed = "; ".join(f"{title}: {', '.join(map(repr, names[:4]))}{' ...' if len(names) > 4 else ''}"
                           for title, names in (("missing", missing), ("unexpected", unknown)) if names)
        raise _not_a_state(path, f"its tensors are not those of this model's states ({listed})")


def _check_tensor(path, name: str, tensor: torch.Tensor, shape: tuple, dtypes: tuple) -> None:
    if tuple(tensor.shape) != tuple(shape) or tensor.dtype not in dtypes:
        raise _not_a_state(path, f"{name} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, this "
                                 f"model's state has {'/'.join(str(d).removeprefix('torch.') for d in dtypes)} "
                                 f"{list(shape)} for its grid")
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor.to(torch.float32 if tensor.element_size() < 2
                                                                      else tensor.dtype)).all()):
        raise _not_a_state(path, f"{name} holds NaN or infinite values")


def _check_state_file(path) -> None:
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise _not_a_state(path, "not a regular file")


def load_video_state(path, model, device=None) -> VideoState:
    """The state saved at `path`, for `model`, on `device` (default: the CPU). A state is untrusted input: refused,
    in one line, unless every tensor's name, shape and dtype is what this model's state of its grid holds, all
    values are finite, its keep mask is the grid's, and its digest - keyed by this model's fingerprint - matches
    (another model's state, or a changed byte, does not)."""
    from safetensors import SafetensorError, safe_open

    _check_state_file(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            _check_metadata(path, metadata, model)
            tensors = _checked_tensors(path, file, metadata, model, device or "cpu")
    except SafetensorError as error:
        raise _not_a_state(path, f"not a safetensors file: {str(error).splitlines()[0][:200]}") from None
    return _state_from_tensors(tensors, metadata, model.config.num_hidden_layers)


def _checked_tensors(path, file, metadata: dict, model, device) -> dict:
    """Every tensor of an open state file, on `device`, checked one at a time against what this model's state of
    the file's grid holds, and the file's digest."""
    names = set(file.keys())
    if "grid_thw" not in names:
        raise _not_a_state(path, "it has no grid_thw")
    counts = _token_counts(path, file.get_tensor("grid_thw"), model.config)
    padded = len(set(counts)) > 1
    expected = expected_state_tensors(model, getattr(torch, metadata["dtype"]), len(counts), max(counts), padded)
    _check_names(path, names, expected)
    digest = _metadata_digest(model_fingerprint(model), metadata)
    tensors = {}
    for name in sorted(names):
        tensor = file.get_tensor(name)
        _check_tensor(path, name, tensor, *expected[name])
        _digest_tensor(digest, name, tensor)
        tensors[name] = tensor.to(device)
    if metadata.get("digest") != digest.hexdigest():
        raise ValueError(f"{path} does not hold what was saved for this model (its digest differs: changed since it "
                         f"was saved, or encoded by another model): encode the video again with this model.")
    if padded and not torch.equal(tensors["keep"].cpu(), _keep_of(counts)):
        raise _not_a_state(path, "its keep mask is not that of its grid")
    return tensors


def _keep_of(counts: list) -> torch.Tensor:
    return (torch.arange(max(counts))[None] < torch.tensor(counts)[:, None])[:, None, :]


def _state_from_tensors(tensors: dict, metadata: dict, num_layers: int) -> VideoState:
    def group(name):
        if f"layers.0.{name}" not in tensors:
            return None
        return [Growable.of(tensors[f"layers.{i}.{name}"]) for i in range(num_layers)]

    carries = [MambaCarry(tensors[f"layers.{i}.ssm_state"], tensors[f"layers.{i}.conv_inputs"], None)
               if f"layers.{i}.ssm_state" in tensors else None for i in range(num_layers)]
    keys = group("key")
    return VideoState(
        kind=metadata["kind"], keys=keys, values=group("value"), key_scales=group("key_scale"),
        value_scales=group("value_scale"), keep=Growable.of(tensors["keep"]) if "keep" in tensors else None,
        carries=carries, grid_thw=tensors["grid_thw"].cpu(), length=keys[0].filled,
        model_fingerprint=metadata["model_fingerprint"], dtype=getattr(torch, metadata["dtype"]),
        sampling=json.loads(metadata["sampling"]),
    )


# -- encoding ---------------------------------------------------------------------------------------------------


def _visual_stream(model, items: list, grid_thw: torch.Tensor, first_step: int = 0):
    """The encoded items as one (padded) visual stream in the model's dtype, and its cross-attention rotary (t
    counted from `first_step`: frames after a state's own)."""
    dtype, device = model.model.embed_tokens.weight.dtype, items[0].device
    stream = PaddedRows(model.config).visual_stream(items, None, len(items), dtype, device)
    items.clear()
    return stream, model.visual_rotary(stream, grid_thw, first_step)


def _run_visual_layers(model, visual: torch.Tensor, rotary, carries: list) -> tuple[list, list, list]:
    """Every layer's visual step on the stream `visual` (updated in place): each layer's cross-attention K/V (in
    the storage dtype) and scales, and each Mamba-2 block's carry at the stream's end."""
    kv, scales, carries_out = [], [], []
    for layer_kv, carry in model.model.visual_steps(visual, rotary, carries):
        layer_kv, layer_scales = stored_kv(*layer_kv, model.config.cross_kv_cache_dtype)
        kv.append(list(layer_kv))
        scales.append(None if layer_scales is None else list(layer_scales))
        carries_out.append(carry)
    return kv, scales, carries_out


def _growables(per_layer: list, which: int, room: int) -> Optional[list]:
    if per_layer[0] is None:
        return None
    grown = []
    for pair in per_layer:  # one layer at a time: a copy into a larger buffer frees the tensor it came from
        grown.append(Growable.of(pair[which], room))
        pair[which] = None
    return grown


@torch.no_grad()
def encode_visual_state(model, kind: str, pixels: Optional[torch.Tensor], grid_thw: Optional[torch.Tensor],
                        sampling=None, reserve_frames: int = 0) -> VideoState:
    """The state of the images or videos `pixels` (the processor's rows) with grid `grid_thw` (one row each);
    several make one entry each (padded at the end, as a batch is). `reserve_frames`: room for that many more
    frames of the same size, so that extending by them never reallocates."""
    check_visual_pixels(model.config, kind, pixels, grid_thw)
    room = _reserved_tokens(model, grid_thw, reserve_frames)
    stream, rotary = _visual_stream(model, model.encode_visual(pixels, grid_thw), grid_thw)
    kv, scales, carries = _run_visual_layers(model, stream.states, rotary, [None] * model.config.num_hidden_layers)
    return VideoState(
        kind=kind, keys=_growables(kv, 0, room), values=_growables(kv, 1, room),
        key_scales=_growables(scales, 0, room), value_scales=_growables(scales, 1, room),
        keep=None if stream.keep is None else Growable.of(stream.keep), carries=carries,
        grid_thw=grid_thw.detach().cpu().clone(), length=stream.states.shape[1],
        model_fingerprint=model_fingerprint(model), dtype=stream.states.dtype, sampling=[_sampling_record(sampling)],
    )


def _reserved_tokens(model, grid_thw: torch.Tensor, reserve_frames: int) -> int:
    if not isinstance(reserve_frames, int) or reserve_frames < 0:
        raise ValueError(f"reserve_frames={reserve_frames!r} is not valid: give a count of frames, 0 or more.")
    if reserve_frames and grid_thw.shape[0] != 1:
        raise ValueError("reserve_frames is room to extend one video: encode one video at a time.")
    temporal = model.config.vision_config.temporal_patch_size
    merge = model.config.vision_config.spatial_merge_size
    _, h, w = grid_thw[0].tolist()
    return -(-reserve_frames // temporal) * (h // merge) * (w // merge)


def _sampling_record(sampling) -> dict:
    """The frame sampling as JSON-able data: a `VideoSampling`, the processor's `video_metadata` entry, or a dict."""
    if sampling is None:
        return {}
    if hasattr(sampling, "__dataclass_fields__"):
        from dataclasses import asdict

        sampling = asdict(sampling)
    if not isinstance(sampling, dict):
        raise TypeError(f"sampling={type(sampling).__name__} is not valid: give a VideoSampling, the processor's "
                        f"video_metadata entry (a dict), or None.")
    return json.loads(json.dumps(sampling, default=str))


def check_extensible(state: VideoState, grid_thw: torch.Tensor) -> None:
    if not isinstance(state, VideoState):
        raise TypeError(f"extend_video needs the VideoState that encode_video returned, got {type(state).__name__}.")
    if state.kind != "video":
        raise ValueError(f"extend_video extends a video's state; this state is of an {state.kind}.")
    if state.num_entries != 1 or state.row_entries is not None:
        raise ValueError(f"extend_video extends the state of one video; this one holds {state.num_entries}.")
    if grid_thw.shape[0] != 1:
        raise ValueError(f"video_grid_thw holds {grid_thw.shape[0]} videos: extend a state with one video's new "
                         f"frames at a time.")
    (_, h, w), (_, old_h, old_w) = grid_thw[0].tolist(), state.grid_thw[0].tolist()
    if (h, w) != (old_h, old_w):
        raise ValueError(f"video_grid_thw has frames of {h}x{w} patches but the state's are {old_h}x{old_w}: the new "
                         f"frames must be resized as the first ones were (sample them with the same processor "
                         f"settings).")


@torch.no_grad()
def extend_visual_state(model, state: VideoState, pixels: torch.Tensor, grid_thw: torch.Tensor,
                        sampling=None) -> VideoState:
    """`state` with the video frames `pixels` (grid `grid_thw`, whole temporal patches) after its own: the vision
    tower runs on the new frames, each layer's Mamba-2 block continues from its carry, the new K/V are appended.
    `state` itself stays valid."""
    check_visual_pixels(model.config, "video", pixels, grid_thw)
    check_extensible(state, grid_thw)
    weight = model.model.embed_tokens.weight
    check_state_for(model, state, weight.dtype, weight.device)
    stream, rotary = _visual_stream(model, model.encode_visual(pixels, grid_thw), grid_thw, int(state.grid_thw[0, 0]))
    kv, scales, carries = _run_visual_layers(model, stream.states, rotary, state.carries)

    def append(grown: list, per_layer: list, which: int):
        if grown is None:
            return None
        return [g.appended(state.length, pair[which]) for g, pair in zip(grown, per_layer)]

    grid = state.grid_thw.clone()
    grid[0, 0] += int(grid_thw[0, 0])
    return replace(
        state, keys=append(state.keys, kv, 0), values=append(state.values, kv, 1),
        key_scales=append(state.key_scales, scales, 0), value_scales=append(state.value_scales, scales, 1),
        carries=carries, grid_thw=grid, length=state.length + stream.states.shape[1],
        sampling=[*state.sampling, _sampling_record(sampling)],
    )


# -- answering from a state --------------------------------------------------------------------------------------


def check_state_for(model, state: VideoState, dtype: torch.dtype, device: torch.device) -> None:
    """A one-line error unless `state` can be read by this forward of `model`."""
    if not isinstance(state, VideoState):
        raise TypeError(f"video_state must be a VideoState (model.encode_video's result), got {type(state).__name__}.")
    if len(state.keys) != model.config.num_hidden_layers:
        raise ValueError(f"video_state holds {len(state.keys)} layers, the model has "
                         f"{model.config.num_hidden_layers}: it was encoded by another model.")
    if state.model_fingerprint != model_fingerprint(model):
        raise ValueError("video_state was encoded by another model (its config or cross-attention weights differ): "
                         "encode the video again with this model.")
    if state.device != device:
        raise ValueError(f"video_state is on {state.device}, the model runs on {device}: pass "
                         f"state.to({str(device)!r}).")
    if state.dtype != dtype:
        raise ValueError(f"video_state was encoded in {state.dtype}, the model runs in {dtype}: encode it with the "
                         f"model in {dtype}.")


def rows_reading_state(state: VideoState, input_ids: Optional[torch.Tensor], batch_size: int,
                       vision_start_token_id: int, device) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(entry each row reads (b,), rows with visual input (b, 1, 1) bool or None for all). Every row whose prompt
    holds a <|vision_start|> placeholder reads the state (the entries given by `row_entries`, when set)."""
    if input_ids is None:
        placed = torch.ones(batch_size, dtype=torch.bool, device=device)
    else:
        per_row = (input_ids == vision_start_token_id).sum(-1)
        if int(per_row.max()) > 1:
            raise ValueError("A prompt holds more than one <|vision_start|>: Vamba reads one image or video per "
                             "prompt.")
        placed = per_row == 1
    if state.row_entries is None:
        if not bool(placed.any()):
            raise ValueError("video_state was given but no prompt holds a <|vision_start|><|vision_end|> placeholder: "
                             "build the prompt with the video in the conversation (the chat template adds it).")
        if state.num_entries != 1:
            raise ValueError(f"video_state holds {state.num_entries} videos; a batch reads one video's state.")
        entries = torch.zeros(batch_size, dtype=torch.long, device=device)
    else:
        entries = state.row_entries.to(device)
        if entries.shape[0] != batch_size or not torch.equal(entries >= 0, placed):
            raise ValueError("video_state's rows do not match the prompts' placeholders.")
        entries = entries.clamp(min=0)
    has_visual = None if bool(placed.all()) else placed[:, None, None]
    return entries, has_visual


def fill_cross_store(cache, state: VideoState, entries: torch.Tensor, has_visual: Optional[torch.Tensor]):
    """Point the cache's cross store at the state's K/V (shared, never copied), row i reading entry entries[i]."""
    kv, scales = state.cross_kv()
    mask = state.mask()
    keep = None if mask is None else mask.index_select(0, entries)
    if has_visual is not None:
        keep = has_visual[:, :, 0, None] & (keep if keep is not None else torch.ones(
            entries.shape[0], 1, state.length, dtype=torch.bool, device=entries.device))
    cache.cross.share(kv, scales, entries, keep, has_visual)
