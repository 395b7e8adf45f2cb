"""How a batch's rows are laid out: the visual stream built from the vision tower's outputs, the text's
self-attention mask, and which visual tokens each text token may read.

Two layouts, one interface: `PaddedRows` (one conversation per row, at most one image or video each, left-padded
text, visual streams padded at the end) and `PackedRows` (training: several (video, conversation) pairs per row,
marked by position ids restarting at 0, each computed as if it ran alone). `layout.visual_stream(...)` returns one
`VisualStream`; `layout.self_mask(...)` the self-attention mask.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from .checks_vamba import tracing
from .configuration_vamba import VambaConfig
from .layers_vamba import attention_mask_for


NO_VISUAL_INPUT = ("A prompt holds a <|vision_start|> placeholder but no image or video was given: each "
                   "placeholder needs its visual input (the processor's chat template adds both).")
ONE_VISUAL_PER_ROW = ("A compiled or exported forward reads one image or video per row: each prompt needs exactly "
                      "one <|vision_start|><|vision_end|> placeholder.")
PACKED_UNTRACEABLE = ("Packed rows (position_ids restarting at 0 within a row) cannot be compiled or exported: run "
                      "the packed forward eagerly, or give one conversation per row.")


@dataclass
class VisualStream:
    """The visual tokens of a batch as one (b, n, hidden) tensor, with what the layers need to read it."""

    states: torch.Tensor
    # (b, 1, n) bool for all queries of a row, or (b, T, n) per text token (packed); None: every token everywhere
    keep: Optional[torch.Tensor]
    seq_idx: Optional[torch.Tensor]  # (b, n) packed rows: the video each token belongs to (Mamba-2 state resets)
    offsets: list[tuple[int, int]]  # each item's (row, first token) in the stream

    def has_visual(self) -> Optional[torch.Tensor]:
        """(b, 1, 1) or (b, T, 1) bool of the rows (text tokens) that read any visual token; None when all do."""
        if self.keep is None:
            return None
        has_visual = self.keep.any(-1)
        return None if not tracing() and bool(has_visual.all()) else has_visual[..., None]

    def positions(self, grid: torch.Tensor, merge: int, first_step: int = 0) -> torch.Tensor:
        """(3, b, n) (t, h, w) positions of each merged visual token, t from `first_step` (a video continued after
        its first steps, else 0) in each item; padding gets 0."""
        batch, longest = self.states.shape[:2]
        device = self.states.device
        positions = torch.zeros(3, batch, longest, dtype=torch.long, device=device)
        for (row, offset), (t, h, w) in zip(self.offsets, grid.tolist()):
            h, w = h // merge, w // merge
            thw = torch.stack(torch.meshgrid(torch.arange(first_step, first_step + t), torch.arange(h), torch.arange(w), indexing="ij"))
            positions[:, row, offset : offset + t * h * w] = thw.reshape(3, -1).to(device)
        return positions


def text_positions(attention_mask, past_length, length: int, batch_size: int, device) -> torch.Tensor:
    """(b, T) positions of the new tokens: the cumulative count of real tokens (left padding stays at 0); after the
    past ones without a 2D mask (a 4D mask says nothing of padding)."""
    if attention_mask is None or attention_mask.dim() == 4:
        return torch.arange(past_length, past_length + length, device=device).expand(batch_size, -1)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.clamp(min=0)[:, -length:]


class PaddedRows:
    """One conversation per row; a row holds one <|vision_start|> placeholder or none."""

    packed = False

    def __init__(self, config: VambaConfig):
        self.config = config

    def place(self, input_ids, batch_size: int, num_items: int) -> list[int]:
        """The row that reads each visual input, checking that the prompts and the inputs agree."""
        if input_ids is None:
            if num_items not in (0, batch_size):
                raise ValueError(f"{num_items} visual inputs for {batch_size} rows given as inputs_embeds: give "
                                 f"one visual input per row, or pass input_ids.")
            return list(range(num_items))
        if tracing():  # the rows cannot be read from the prompts' values: checked inside the traced graph
            return self.traced_rows(input_ids, batch_size, num_items)
        per_row = (input_ids == self.config.vision_start_token_id).sum(-1).tolist()
        if max(per_row, default=0) > 1:
            raise ValueError("A prompt holds more than one <|vision_start|>: Vamba reads one image or video per "
                             "prompt. Split the conversation, or sample one video from the clips.")
        rows = [row for row, count in enumerate(per_row) if count]
        if len(rows) != num_items:
            raise ValueError(f"The prompts hold {len(rows)} <|vision_start|> placeholder(s) but {num_items} "
                             f"image(s)/video(s) were given: each visual input needs exactly one "
                             f"<|vision_start|><|vision_end|> in its prompt (the processor's chat template adds it).")
        return rows

    def traced_rows(self, input_ids, batch_size: int, num_items: int) -> list[int]:
        """`place` in a traced graph: text-only prompts, or one visual input per row, in row order."""
        per_row = (input_ids == self.config.vision_start_token_id).sum(-1)
        if not num_items:
            torch._assert_async(~per_row.bool().any(), NO_VISUAL_INPUT)
            return []
        if num_items != batch_size:
            raise ValueError(f"{num_items} visual inputs for {batch_size} rows: a compiled or exported forward "
                             "reads one image or video per row (or none); run this batch eagerly.")
        torch._assert_async((per_row == 1).all(), ONE_VISUAL_PER_ROW)
        return list(range(batch_size))

    def visual_stream(self, items, input_ids, batch_size: int, dtype, device) -> VisualStream:
        """Pad the items into a (b, n, d) stream; rows without visual input get an empty (masked) stream. The stream
        is always a new tensor: the decoder layers update it in place."""
        rows = self.place(input_ids, batch_size, len(items))
        lengths = [0] * batch_size
        for row, item in zip(rows, items):
            lengths[row] = item.shape[0]
        longest = max(lengths)
        offsets = [(row, 0) for row in rows]
        if all(n == longest for n in lengths):
            return VisualStream(torch.stack(items).to(dtype), None, None, offsets)
        states = torch.zeros(batch_size, longest, self.config.hidden_size, dtype=dtype, device=device)
        for row, item in zip(rows, items):
            states[row, : item.shape[0]] = item
        keep = torch.arange(longest, device=device)[None] < torch.tensor(lengths, device=device)[:, None]
        return VisualStream(states, keep[:, None, :], None, offsets)

    @staticmethod
    def self_mask(attention_mask, past_length, length: int, dtype, implementation: str, device,
                  key_length: Optional[int] = None):
        """Causal self-attention to real tokens, in the implementation's format; None where causality is implied.
        `key_length`: the positions of a static cache's buffers (written up to past + length), else None."""
        padded = attention_mask is not None and (tracing() or not bool(attention_mask.all()))
        if implementation.startswith("flash"):
            return attention_mask if padded else None
        static = key_length is not None
        if not padded and not static and (length == 1 or (past_length == 0 and implementation != "eager")):
            return None  # plain causal: SDPA's is_causal, or one query that sees everything
        device = attention_mask.device if attention_mask is not None else device
        key_length = key_length if static else past_length + length
        query_pos = torch.arange(length, device=device)[:, None] + past_length
        keep = (torch.arange(key_length, device=device)[None] <= query_pos)[None]
        if padded:
            keys = attention_mask.bool()
            keep = keep & F.pad(keys, (0, key_length - keys.shape[1]))[:, None, :]  # unwritten static positions
        batch = attention_mask.shape[0] if attention_mask is not None else 1
        return attention_mask_for(keep.expand(batch, -1, -1), implementation, dtype)


class PackedRows:
    """Several (video, conversation) pairs per row, computed exactly as if each pair ran alone.

    Where each pair starts is marked by `position_ids` (b, T) restarting at 0, as transformers' padding-free
    collators do (`DataCollatorWithFlattening`); e.g. two pairs of 5 and 3 tokens: `[[0, 1, 2, 3, 4, 0, 1, 2]]`. A
    segment's text attends causally to itself only, reads only its own video in cross-attention, and its video's
    Mamba-2 state starts from zero. A row may hold several placeholders (one per segment); the visual inputs are the
    videos of row 0 in order, then those of row 1, and so on; segments without a placeholder are text-only. Rows may
    be padded at the end (with `attention_mask` 0 there). Packed forwards keep no cache and need
    `attn_implementation` "sdpa" or "eager". `segments` (b, T): the index of the packed segment of each text token
    (-1 before a row's first one)."""

    packed = True

    def __init__(self, config: VambaConfig, segments: torch.Tensor):
        self.config, self.segments = config, segments

    @classmethod
    def detect(cls, config, position_ids, attention_mask, batch_size: int, past_length: int) -> Optional["PackedRows"]:
        """The packed layout when some row holds several segments, else None. A segment starts at each real token
        whose position id is 0 (transformers' padding-free convention); only a forward without a filled cache is
        checked."""
        if position_ids is None or position_ids.dim() != 2 or past_length > 0:
            return None
        starts = (position_ids == 0).expand(batch_size, -1)
        if attention_mask is not None:
            starts = starts & attention_mask.bool()
        if tracing():  # a traced graph cannot choose the layout by the positions' values
            torch._assert_async(starts.sum(-1).max() < 2, PACKED_UNTRACEABLE)
            return None
        if int(starts.sum(-1).max()) < 2:
            return None
        return cls(config, starts.long().cumsum(-1) - 1)

    def place(self, input_ids, batch_size: int, num_items: int) -> list[tuple[int, int]]:
        """(row, segment) of each visual input: the k-th input goes to the k-th <|vision_start|> in reading order."""
        if input_ids is None:
            if num_items:
                raise ValueError("Packed rows with visual inputs need input_ids: their <|vision_start|> tokens say "
                                 "which segment reads which video.")
            return []
        rows, columns = (input_ids == self.config.vision_start_token_id).nonzero(as_tuple=True)
        placements = list(zip(rows.tolist(), self.segments[rows, columns].tolist()))
        if len(set(placements)) != len(placements):
            raise ValueError("A packed segment holds more than one <|vision_start|>: each conversation of a packed "
                             "row reads one image or video.")
        if len(placements) != num_items:
            raise ValueError(f"The packed rows hold {len(placements)} <|vision_start|> placeholder(s) but {num_items} "
                             f"image(s)/video(s) were given: give the videos of each row in order, one per "
                             f"placeholder, rows one after the other.")
        return placements

    def visual_stream(self, items, input_ids, batch_size: int, dtype, device) -> VisualStream:
        """Each row's videos one after the other; a text segment reads its own video only, and each video's Mamba-2
        state starts from zero (seq_idx: the video's index in its row; padding continues the last, the scan being
        causal)."""
        placements = self.place(input_ids, batch_size, len(items))
        offsets, row_lengths = [], [0] * batch_size
        for item, (row, _) in zip(items, placements):
            offsets.append((row, row_lengths[row]))
            row_lengths[row] += item.shape[0]
        longest = max(row_lengths)
        states = torch.zeros(batch_size, longest, self.config.hidden_size, dtype=dtype, device=device)
        reader = torch.full((batch_size, longest), -1, dtype=torch.long, device=device)  # segment reading each token
        seq_idx = torch.zeros(batch_size, longest, dtype=torch.long, device=device)
        videos_in_row = [0] * batch_size
        for item, (row, segment), (_, offset) in zip(items, placements, offsets):
            end = offset + item.shape[0]
            states[row, offset:end] = item
            reader[row, offset:end] = segment
            seq_idx[row, offset:] = videos_in_row[row]
            videos_in_row[row] += 1
        keep = (self.segments[:, :, None] == reader[:, None, :]) & (reader >= 0)[:, None, :]
        return VisualStream(states, keep, seq_idx, offsets)

    def self_mask(self, attention_mask, past_length: int, length: int, dtype, implementation: str, device,
                  key_length: Optional[int] = None):
        """Causal self-attention inside each packed segment, to real tokens only (packed forwards keep no cache, so
        `key_length` is None)."""
        causal = torch.ones(length, length, dtype=torch.bool, device=self.segments.device).tril()
        keep = causal & (self.segments[:, :, None] == self.segments[:, None, :])
        if attention_mask is not None:
            keep = keep & attention_mask.bool()[:, None, :]
        return attention_mask_for(keep, implementation, dtype)
