"""The PyTorch scan as it was before the loop over chunks and the whole-segment decay were removed (commit b27c763),
kept to check that the current one computes the same outputs."""

import torch
import torch.nn.functional as F

from vamba_hf.mamba2_torch_vamba import segment_sum


def ssd_scan_before(x, dt, A, B, C, chunk_size, initial_state=None, seq_idx=None):
    """ssd_scan_torch at b27c763: the states carried across chunks in a Python loop, every chunk's decay at once."""
    batch, length, heads, _ = x.shape
    groups, state_dim = B.shape[-2:]
    pad = (-length) % chunk_size
    x, dt, B, C = (F.pad(t.float(), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    if seq_idx is not None:
        seq_idx = F.pad(seq_idx, (0, pad), value=int(seq_idx.max()))
    chunks = (length + pad) // chunk_size

    def to_chunks(t):
        return t.reshape(batch, chunks, chunk_size, *t.shape[2:])

    B = to_chunks(B).repeat_interleave(heads // groups, dim=3)  # (b, c, L, h, n)
    C = to_chunks(C).repeat_interleave(heads // groups, dim=3)
    x_dt = to_chunks(x * dt[..., None])  # (b, c, L, h, p)
    a_dt = to_chunks(dt * A.float()).permute(0, 3, 1, 2)  # (b, h, c, L)
    a_cumsum = torch.cumsum(a_dt, dim=-1)

    decay = torch.exp(segment_sum(a_dt))  # (b, h, c, L, L)
    decay_to_end = torch.exp(a_cumsum[..., -1:] - a_cumsum)  # (b, h, c, L)
    decay_from_start = torch.exp(a_cumsum)
    if seq_idx is not None:
        ids = to_chunks(seq_idx)  # (b, c, L)
        decay = decay * (ids[:, None, :, :, None] == ids[:, None, :, None, :])
        decay_to_end = decay_to_end * (ids == ids[..., -1:])[:, None]
        chunk_first_id = torch.cat([torch.zeros_like(ids[:, :1, -1]), ids[:, :-1, -1]], dim=1)  # id carried in
        decay_from_start = decay_from_start * (ids == chunk_first_id[..., None])[:, None]
        carry_kept = chunk_first_id == ids[..., -1]  # (b, c): the carried state survives the whole chunk

    y_inside = torch.einsum("bclhn,bcshn,bhcls,bcshp->bclhp", C, B, decay, x_dt)
    chunk_states = torch.einsum("bclhn,bhcl,bclhp->bchpn", B, decay_to_end, x_dt)

    state = x.new_zeros(batch, heads, x.shape[-1], state_dim) if initial_state is None else initial_state.float()
    chunk_decay = torch.exp(a_cumsum[..., -1])  # (b, h, c)
    states_in = []
    for c in range(chunks):
        states_in.append(state)
        carried = state * chunk_decay[:, :, c, None, None]
        if seq_idx is not None:
            carried = carried * carry_kept[:, c, None, None, None]
        state = carried + chunk_states[:, c]
    states_in = torch.stack(states_in, dim=1)  # (b, c, h, p, n)
    y_carried = torch.einsum("bclhn,bchpn,bhcl->bclhp", C, states_in, decay_from_start)

    y = (y_inside + y_carried).reshape(batch, chunks * chunk_size, heads, -1)[:, :length]
    return y, state
