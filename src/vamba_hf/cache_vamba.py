"""The cache and the decoding step.

One cache object: the text's self-attention K/V (a transformers `DynamicCache`) plus a `CrossStore` with every
layer's cross-attention K/V (optionally float8 with per-token scales) and the masks that go with them, computed once
at prefill. Decoding touches no visual state but these. `DecodeGraph` runs one decoding step over static buffers
(the cache's layers while it lives: `StepLayer`s), captured as a CUDA graph. `VambaStaticCache` is what
`cache_implementation="static"` gives: fixed-size self-attention buffers that a compiled decoding step writes in
place.
"""

import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional, Protocol

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, StaticCache, StaticLayer

from .checks_vamba import tracing
from .layers_vamba import attention_mask_for


class LayerCache(Protocol):
    """What a decoder layer reads and writes while it runs: its self-attention K/V and the cross store."""

    cross: "CrossStore"

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this step's K/V (b, kv_heads, T, d) to layer `layer_idx`; return all of them."""


def quantize_per_token(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, h, n, d) -> x in `dtype` (a float8 type) and the scale (b, h, n, 1), in x's dtype, that restores it. One
    scale per token and head: a scale shared along the tokens lets one outlier token flush all others to zero."""
    amax = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = (amax / torch.finfo(dtype).max).to(x.dtype)
    return (x / scale).to(dtype), scale


@dataclass
class CrossStore:
    """Each layer's cross-attention K/V for decoding, with the masks that belong to them: `keep` (b, 1, n) bool, the
    visual tokens each row may read (None: all), and `has_visual` (b, 1, 1) bool, the rows that have any (None:
    all).

    With `rows` (b,) set, the K/V hold one entry per distinct video and row i reads entry `rows[i]`: several
    questions about one video, and the beams of one prompt, share one copy. Row operations (beam reorder,
    repetition) then move the row index and the masks, never the K/V. `row_group` g > 1: rows i*g .. i*g+g-1 read
    entry i (the beams of several videos), which cross-attention reads by folding each group's queries together."""

    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    scales: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # only for 8-bit K/V
    keep: Optional[torch.Tensor] = None
    has_visual: Optional[torch.Tensor] = None
    rows: Optional[torch.Tensor] = None
    row_group: int = 1
    _masks: dict = field(default_factory=dict, repr=False)  # `keep` in each attention implementation's format

    @property
    def is_empty(self) -> bool:
        return not self.kv

    def store(self, layer_idx: int, key: torch.Tensor, value: torch.Tensor, storage: Optional[str] = None):
        """Keep one layer's K/V in `storage` (a torch dtype name; None keeps them as they are). A float8 storage keeps
        one scale per (row, head, token)."""
        kv, scales = stored_kv(key, value, storage)
        self.rows, self.row_group = None, 1  # K/V of the prefill's rows, one per row
        self.kv[layer_idx] = kv
        if scales is None:
            self.scales.pop(layer_idx, None)
        else:
            self.scales[layer_idx] = scales

    def share(self, kv: dict, scales: dict, rows: torch.Tensor, keep: Optional[torch.Tensor],
              has_visual: Optional[torch.Tensor]):
        """Read K/V kept elsewhere (a video state's): one entry per distinct video, row i reading entry rows[i].
        The tensors are referenced, not copied."""
        self.kv, self.scales = dict(kv), dict(scales)
        self.set_masks(keep, has_visual)
        self._set_rows(rows)

    def _set_rows(self, rows: torch.Tensor):
        self.rows, self.row_group = rows, self._group_of(rows)

    def _group_of(self, rows: torch.Tensor) -> int:
        """g when rows i*g .. i*g+g-1 read entry i and share their masks (every row reads a video), else 1."""
        entries = next(iter(self.kv.values()))[0].shape[0] if self.kv else 1
        if entries == 1 or self.has_visual is not None or rows.numel() % entries:
            return 1
        group = rows.numel() // entries
        grouped = torch.arange(entries).repeat_interleave(group)
        return group if torch.equal(rows.cpu(), grouped) else 1

    def keeps_row_groups(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Whether the row operation `fn` leaves `row_group` as it is (a captured step folds the rows by it)."""
        return self.rows is None or self.row_group == 1 or self._group_of(fn(self.rows)) == self.row_group

    def holds(self, layer_idx: int) -> bool:
        return layer_idx in self.kv

    def attend(self, layer_idx: int, queries: torch.Tensor, mask: Optional[torch.Tensor], attend: Callable,
               fold: bool = False):
        """Cross-attention of `queries` (b, h, T, d) over layer `layer_idx`'s K/V for each row: `attend(q, k, v,
        mask)` -> (out (rows, queries, hidden), weights). With `fold` (an attention without per-row weights), the
        rows of a `row_group` read their entry in one call, their queries folded together, no K/V gathered."""
        group = self.row_group if fold else 1
        kv = self.read(layer_idx, per_entry=group > 1)
        if group == 1:
            return attend(queries, *kv, mask)
        read, weights = attend(fold_rows(queries, group), *kv, None if mask is None else mask[::group])
        return read.reshape(queries.shape[0], queries.shape[2], -1), weights

    def read(self, layer_idx: int, per_entry: bool = False) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """A layer's K/V for each row (b, ...), or with `per_entry` as stored, one per entry (rows grouped by
        `row_group`)."""
        kv, scales = self.kv.get(layer_idx), self.scales.get(layer_idx)
        if kv is not None and scales is not None:
            kv = tuple(x.to(scale.dtype) * scale for x, scale in zip(kv, scales))
        if kv is None or self.rows is None or per_entry:
            return kv
        return tuple(self._per_row(x) for x in kv)

    def _per_row(self, x: torch.Tensor) -> torch.Tensor:
        """Entry rows[i] of x at row i: a view when all rows read one entry, else gathered for this step only."""
        if x.shape[0] == 1:
            return x.expand(self.rows.shape[0], *x.shape[1:])
        return x.index_select(0, self.rows)

    def set_masks(self, keep: Optional[torch.Tensor], has_visual: Optional[torch.Tensor]):
        self.keep, self.has_visual, self._masks = keep, has_visual, {}

    def mask(self, implementation: str, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """`keep` as the cross-attention mask of `implementation`, formatted once per store (at every step of a
        compiled one)."""
        if self.keep is None:
            return None
        if tracing():  # a compiled step that filled the memo would guard on what it holds: recompiled once
            return attention_mask_for(self.keep, implementation, dtype)
        if (implementation, dtype) not in self._masks:
            self._masks[implementation, dtype] = attention_mask_for(self.keep, implementation, dtype)
        return self._masks[implementation, dtype]

    def map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor], in_place: bool = False):
        """Apply a row operation to every tensor with a row dimension (the row index instead of shared K/V);
        `in_place` keeps their addresses (a captured graph reads them)."""
        if in_place:
            per_row = [self.rows] if self.rows is not None else [
                t for kv in (*self.kv.values(), *self.scales.values()) for t in kv]
            masks = [t for t in (self.keep, self.has_visual, *self._masks.values()) if t is not None]
            for t in per_row + masks:
                t.copy_(fn(t))
            return
        if self.rows is None:
            self.kv = {i: (fn(k), fn(v)) for i, (k, v) in self.kv.items()}
            self.scales = {i: (fn(k), fn(v)) for i, (k, v) in self.scales.items()}
        self.set_masks(None if self.keep is None else fn(self.keep),
                       None if self.has_visual is None else fn(self.has_visual))
        if self.rows is not None:
            self._set_rows(fn(self.rows))


def fold_rows(q: torch.Tensor, group: int) -> torch.Tensor:
    """(b, h, T, d) queries -> (b / group, h, group * T, d): each group of consecutive rows as one row (with no causal
    mask, more rows reading the same keys are just more queries)."""
    batch, heads, length, dim = q.shape
    return q.view(batch // group, group, heads, length, dim).transpose(1, 2).reshape(batch // group, heads,
                                                                                     group * length, dim)


def stored_kv(key: torch.Tensor, value: torch.Tensor, storage: Optional[str]):
    """(key, value) in `storage` (a torch dtype name; None: as they are) and, for a narrower float8 storage, their
    per-token scales (else None)."""
    dtype = key.dtype if storage is None else getattr(torch, storage)
    if dtype.itemsize >= key.dtype.itemsize:
        return (key.to(dtype), value.to(dtype)), None
    (key, key_scale), (value, value_scale) = quantize_per_token(key, dtype), quantize_per_token(value, dtype)
    return (key, value), (key_scale, value_scale)


class StepLayer(DynamicLayer):
    """One layer's self-attention K/V while a `DecodeGraph` runs the decoding steps: `keys` and `values` are static
    buffers (b, kv_heads, capacity, d) whose first `length` positions are held. A step writes its K/V at the
    position `index` (a device tensor the graph sets) in place, as a captured graph needs, and returns the whole
    buffers (the step's mask hides the positions not held)."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int, index: torch.Tensor):
        super().__init__()
        self.length, self.index = keys.shape[-2], index
        self.keys = keys.new_zeros(*keys.shape[:2], capacity, keys.shape[-1])
        self.values = values.new_zeros(*values.shape[:2], capacity, values.shape[-1])
        self.keys[:, :, : self.length] = keys
        self.values[:, :, : self.length] = values
        self.is_initialized = True

    def update(self, key: torch.Tensor, value: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        self.keys.index_copy_(2, self.index, key)
        self.values.index_copy_(2, self.index, value)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def map_rows_in_place(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        for buffer in (self.keys, self.values):  # in place: a captured graph reads these addresses
            buffer.copy_(fn(buffer))

    def released(self) -> DynamicLayer:
        """A plain layer holding copies of the `length` positions (the buffers are freed with this layer)."""
        layer = DynamicLayer()
        layer.update(self.keys[:, :, : self.length], self.values[:, :, : self.length])
        return layer


class VambaCache(DynamicCache):
    """Self-attention K/V per layer (DynamicCache) and the `cross` store. While a `DecodeGraph` runs the decoding
    steps, the layers are its `StepLayer`s (static buffers); `release_decode_graph` turns them back into plain
    layers. Either way `get_seq_length` is the positions the layers hold."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cross = CrossStore()
        self.decode_graph: Optional["DecodeGraph"] = None

    def decode_graph_for(self, step: Callable, batch_size: int) -> "DecodeGraph":
        if self.decode_graph is not None and not self.decode_graph.fits(batch_size, self.get_seq_length()):
            self.release_decode_graph()
        if self.decode_graph is None:
            keys = self.layers[0].keys
            self.decode_graph = DecodeGraph(step, self.get_seq_length(), batch_size, keys.device)
            self.layers = [StepLayer(layer.keys, layer.values, self.decode_graph.capacity, self.decode_graph.index)
                           for layer in self.layers]
        return self.decode_graph

    def release_decode_graph(self):
        """Back to the plain cache (before any step the graph does not cover: a prompt, a crop, a new batch)."""
        if self.decode_graph is not None:
            self.layers = [layer.released() for layer in self.layers]
            self.decode_graph = None

    def _map_rows(self, fn: Callable[[torch.Tensor], torch.Tensor], keeps_batch_size: bool):
        """A row operation (beam reorder, selection, repetition) on every tensor with a batch dimension. A graph's
        buffers are reordered in place (the graph reads their addresses); a new batch size releases the graph."""
        if self.decode_graph is not None and not (keeps_batch_size and self.cross.keeps_row_groups(fn)):
            self.release_decode_graph()
        if self.decode_graph is not None:
            for layer in self.layers:
                layer.map_rows_in_place(fn)
            self.decode_graph.map_rows_in_place(fn)
            self.cross.map_rows(fn, in_place=True)
            return
        for layer in self.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys, layer.values = fn(layer.keys), fn(layer.values)
        self.cross.map_rows(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        self._map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)), keeps_batch_size=True)

    def batch_repeat_interleave(self, repeats: int):
        self._map_rows(lambda t: t.repeat_interleave(repeats, dim=0), keeps_batch_size=False)

    def batch_select_indices(self, indices: torch.Tensor):
        self._map_rows(lambda t: t[indices], keeps_batch_size=False)

    def crop(self, max_length: int):
        self.release_decode_graph()
        super().crop(max_length)


# transformers 4 crops a cache to a length, 5 by the number of positions to drop.
CROP_TAKES_LENGTH = "max_length" in inspect.signature(Cache.crop).parameters


class VambaStaticCache(StaticCache):
    """transformers' static cache with Vamba's `cross` store: each layer's self-attention K/V in a buffer of
    `max_cache_len` positions (allocated at the first write), written at `position`, a 0-d tensor on the device so
    that a compiled step reads where to write without recompiling. `seen` counts the same on the host for eager
    callers (generate's input slicing, the prefill checks), read back from `position` after a compiled step. Built
    from the empty `StaticCache` that generate passes to the prefill."""

    def __init__(self, config, max_cache_len: int):
        Cache.__init__(self, layers=[StaticLayer(max_cache_len=max_cache_len)
                                     for _ in range(config.num_hidden_layers)])
        self.cross = CrossStore()
        self.position: Optional[torch.Tensor] = None
        self._seen: Optional[int] = 0  # None: counted by `position` only, since a compiled step
        self.filled = False  # a bool, not `seen`: a compiled step guards on it without recompiling at every step

    @property
    def max_cache_len(self) -> int:
        return self.layers[0].max_cache_len

    @property
    def seen(self) -> int:
        if self._seen is None:
            self._seen = int(self.position)
        return self._seen

    @seen.setter
    def seen(self, value: int):
        self._seen = value

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def written(self) -> torch.Tensor | int:
        """The positions held: the device counter while a compiled forward traces (reading `seen` there would
        recompile at every step), else `seen`."""
        return self.position if tracing() and self.position is not None else self.seen

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if self.position is None:
            self.position = torch.zeros((), dtype=torch.long, device=key.device)
            if not tracing():  # a compiled step writes it in place: CUDA graphs need its address fixed
                torch._dynamo.mark_static_address(self.position)
        if layer.keys is None:
            # transformers allocates the buffers (and marks their addresses static for CUDA graphs); it takes the
            # value states too from 5.0 on.
            takes_values = len(inspect.signature(layer.lazy_initialization).parameters) > 1
            layer.lazy_initialization(*((key, value) if takes_values else (key,)))
        index = torch.arange(key.shape[-2], device=key.device) + self.position
        layer.keys.index_copy_(2, index, key)
        layer.values.index_copy_(2, index, value)
        if layer_idx == len(self.layers) - 1:  # every layer wrote this forward's positions
            self.position.add_(key.shape[-2])
            # A compiled step that read the host count would guard on its value: recompiled at every step.
            self._seen = None if tracing() else self.seen + key.shape[-2]
            self.filled = True
        return layer.keys, layer.values

    def reset(self):
        for layer in self.layers:
            if getattr(layer, "keys", None) is not None:
                layer.keys.zero_()
                layer.values.zero_()
        if self.position is not None:
            self.position.zero_()
        self.seen, self.filled = 0, False
        self.cross = CrossStore()

    def crop(self, length: int):
        """transformers' crop: to `length` positions (4.x; a negative one removes that many), or removing -`length`
        (5.x)."""
        kept = length if CROP_TAKES_LENGTH and length >= 0 else self.seen + length
        removed = self.seen - kept
        if removed > 0:
            self.position.sub_(removed)
            self.seen -= removed
            self.filled = self.seen > 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self.layers:
            if getattr(layer, "keys", None) is not None:
                layer.keys.copy_(layer.keys.index_select(0, beam_idx.to(layer.keys.device)))
                layer.values.copy_(layer.values.index_select(0, beam_idx.to(layer.values.device)))
        self.cross.map_rows(lambda t: t.index_select(0, beam_idx.to(t.device)))


def holds_tokens(cache) -> bool:
    """Whether `cache` holds positions already (this forward continues it), read so that a compiled decoding step
    does not recompile at every step."""
    if cache is None:
        return False
    if isinstance(cache, VambaStaticCache):
        return cache.filled
    return cache.get_seq_length() > 0


class DecodeGraph:
    """One decoding step of the text stream (one new token per row) captured as a CUDA graph and replayed at every
    step. Eagerly, a step is ~60 small kernels per layer whose launches cost the CPU more time than their work
    costs the GPU (BENCHMARKS.md); replayed, the GPU runs them back to back.

    `step(input_ids, position_ids, self_mask, cache)` is the model's decoding step, over the cache whose layers are
    `StepLayer`s of `capacity` positions: their `update` writes the step's self-attention K/V at `index` (static
    shapes, as a graph needs). The graph holds the step's inputs and mask; the cache owns the graph and the graph
    keeps no reference to the cache, so a finished generation's memory (the cross K/V above all) is freed as soon as
    its cache is dropped. Off CUDA the same static step runs eagerly."""

    headroom = 256  # decoding positions allocated beyond the prompt; the graph is rebuilt larger when they run out

    def __init__(self, step: Callable, length: int, batch_size: int, device: torch.device):
        """A step for a cache holding `length` positions."""
        self.step_fn = step
        self.capacity = -(-(length + self.headroom) // self.headroom) * self.headroom
        self.input_ids = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.positions = torch.zeros(batch_size, 1, dtype=torch.long, device=device)
        self.keep = torch.zeros(batch_size, self.capacity, dtype=torch.bool, device=device)
        self.index = torch.zeros(1, dtype=torch.long, device=device)
        self.graph, self.logits = None, None

    def fits(self, batch_size: int, length: int) -> bool:
        return self.input_ids.shape[0] == batch_size and length < self.capacity

    def step(self, cache: VambaCache, input_ids, position_ids, attention_mask) -> torch.Tensor:
        """The next-token logits (b, 1, vocab) of `input_ids` (b, 1); `attention_mask` (b, length + 1) or None."""
        length = cache.get_seq_length()
        self.input_ids.copy_(input_ids)
        self.positions.copy_(position_ids)
        if attention_mask is None:
            self.keep[:, : length + 1] = True
        else:
            self.keep[:, : attention_mask.shape[1]].copy_(attention_mask.bool())
        self.index.fill_(length)
        if self.input_ids.is_cuda:
            if self.graph is None:
                self._capture(cache)
            self.graph.replay()
        else:
            self.logits = self._run(cache)
        for layer in cache.layers:
            layer.length += 1
        return self.logits.clone()  # the graph overwrites its output at the next replay

    def _run(self, cache: VambaCache) -> torch.Tensor:
        return self.step_fn(self.input_ids, self.positions, self.keep[:, None, None, :], cache)

    def _capture(self, cache: VambaCache):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capture: allocator and kernel selection settle first
            self._run(cache)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run(cache)

    def map_rows_in_place(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.keep.copy_(fn(self.keep))  # in place: the graph reads its address
