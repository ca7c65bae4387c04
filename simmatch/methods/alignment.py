"""Distribution alignment of the weak-view predictions: SimMatch's and ReMixMatch's.

Both scale p by a target marginal over a running estimate of the model's marginal. They are
two options because the published methods differ in every detail (see each class); the
running statistics are averaged over ranks before they are stored, so every rank aligns the
same way.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from simmatch import distributed as dist


def resize_fifo(rows: torch.Tensor, ptr: int, filled: int, new_len: int,
                fill: torch.Tensor | None = None) -> tuple[torch.Tensor, int, int]:
    """A ring buffer of `rows` (next write at `ptr`, `filled` rows written) at another length:
    the newest min(filled, new_len) rows kept in order of age, the free rows zero (or `fill`).

    Returns (rows, ptr, filled) of the new buffer; with `new_len` equal it is the buffer itself.
    """
    old_len = rows.shape[0]
    if new_len == old_len:
        return rows.clone(), ptr, filled
    filled = min(filled, old_len)
    ages = [(ptr - filled + i) % old_len for i in range(filled)]  # oldest first
    kept = ages[-new_len:] if new_len < filled else ages
    out = torch.zeros((new_len,) + tuple(rows.shape[1:]), dtype=rows.dtype)
    if fill is not None:
        out[:] = fill
    if kept:
        out[: len(kept)] = rows[kept]
    return out, len(kept) % new_len, len(kept)


class DistributionAlignment(nn.Module):
    """SimMatch's DA (`method.da_target=uniform`): p <- normalize(p / p_model), p_model the
    mean of the last `length` global batch means (256 in the authors' code), the queue
    zero-initialised and this step's batch mean written BEFORE it is used."""

    def __init__(self, num_classes: int, length: int = 256):
        super().__init__()
        self.register_buffer("queue", torch.zeros(length, num_classes))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A queue saved at another length (an elastic resume under train.scale=per_gpu, where
        the length follows the global batch): its newest means, in order (elastic.resize_fifo)."""
        key = prefix + "queue"
        if key in state_dict and state_dict[key].shape[0] != self.queue.shape[0]:
            rows, ptr, count = resize_fifo(state_dict[key].cpu(), int(state_dict[prefix + "ptr"]),
                                           int(state_dict[prefix + "count"]), self.queue.shape[0])
            state_dict[key] = rows
            state_dict[prefix + "ptr"] = torch.tensor(ptr)
            state_dict[prefix + "count"] = torch.tensor(count)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def forward(self, probs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        probs = probs.float()
        mean = dist.all_reduce_mean(probs.mean(dim=0))
        length = self.queue.shape[0]
        self.queue.index_copy_(0, self.ptr.view(1), mean.view(1, -1))
        self.ptr.copy_((self.ptr + 1) % length)
        self.count.copy_(torch.clamp(self.count + 1, max=length))
        # Rows not yet written are zero: the sum over all rows divided by the filled count
        # (the authors divide by the mean over all 256 rows: the same after normalisation).
        p_model = self.queue.sum(dim=0) / self.count.clamp(min=1)
        aligned = probs / p_model.clamp(min=1e-12)
        return aligned / aligned.sum(dim=1, keepdim=True)


class ReMixMatchAlignment(nn.Module):
    """ReMixMatch's DA and sharpening (`method.da_target=labeled`), as its code does it
    (google-research/remixmatch: `guess_label`, `libml/layers.py` PMovingAverage and PData):

    - p_model: mean of a `length`-entry (128) buffer of batch-mean predictions, every entry
      initialised uniform; this step's mean enters AFTER it is used (FIFO);
    - p_data: the labeled-label marginal, a running average (decay 0.999) of the labeled
      batches' one-hot labels initialised uniform, also updated after use;
    - p <- normalize(p * (1e-6 + p_data) / (1e-6 + p_model)), then sharpened:
      p <- normalize(p ** (1 / T)), T = 0.5.
    """

    def __init__(self, num_classes: int, length: int = 128, temperature: float = 0.5,
                 data_decay: float = 0.999):
        super().__init__()
        self.temperature, self.data_decay = temperature, data_decay
        self.register_buffer("p_model", torch.full((length, num_classes), 1.0 / num_classes))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("p_data", torch.full((num_classes,), 1.0 / num_classes))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A buffer saved at another length: its newest entries in order, the rest uniform as
        at the start (every entry counts, as in their code)."""
        key = prefix + "p_model"
        if key in state_dict and state_dict[key].shape[0] != self.p_model.shape[0]:
            saved = state_dict[key].cpu()
            rows, ptr, _ = resize_fifo(saved, int(state_dict[prefix + "ptr"]), saved.shape[0],
                                       self.p_model.shape[0], fill=torch.full_like(saved[0], 1.0 / saved.shape[1]))
            state_dict[key] = rows
            state_dict[prefix + "ptr"] = torch.tensor(ptr)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def forward(self, probs: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if labels is None:
            raise ValueError("ReMixMatch's alignment needs the labeled batch's labels")
        probs = probs.float()
        p_model = self.p_model.mean(dim=0)
        p_model = p_model / p_model.sum()
        p_data = self.p_data / self.p_data.sum()
        weighted = probs * ((1e-6 + p_data) / (1e-6 + p_model))
        weighted = weighted / weighted.sum(dim=1, keepdim=True)
        target = weighted.pow(1.0 / self.temperature)
        target = target / target.sum(dim=1, keepdim=True)
        # update after use, with the global batch means (one all-reduce for both)
        c = probs.shape[1]
        onehot = F.one_hot(labels.long(), c).float()
        means = dist.all_reduce_mean(torch.cat([probs.mean(dim=0), onehot.mean(dim=0)]))
        self.p_model.index_copy_(0, self.ptr.view(1), means[:c].view(1, -1))
        self.ptr.copy_((self.ptr + 1) % self.p_model.shape[0])
        self.p_data.mul_(self.data_decay).add_(means[c:], alpha=1.0 - self.data_decay)
        return target
