"""A KV cache that grows in place: no copy per decoding step, and a crop that copies nothing.

transformers' ``DynamicLayer`` appends with ``torch.cat`` (the whole cache is copied every step)
and crops to a strided view (the next append copies it again). Together with
:mod:`flash.cpu.gqa_attention` this took a 5-token verification of the default model at a 515-token
context from 52.8 to 47.0 ms (``research/verify_cost.py``); a one-token step did not measurably
change, although torch.profiler had attributed ~7 ms of it to ``cat``. Here each layer keeps a
buffer with spare room, writes new keys/values into it and hands attention a view of the filled
part (gpt-fast's static cache, but attention never sees the unused tail, so no mask over padding
is needed).
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

#: Extra positions allocated beyond what is needed, so a growing sequence rarely reallocates.
_HEADROOM = 256


def _filled_part(buffer: str, assigned: str) -> property:
    """A layer attribute that reads as a view of ``buffer``'s filled part once the buffer exists; what
    transformers assigns to it before then (an empty tensor, None) is kept under ``assigned``."""

    def get(layer) -> torch.Tensor | None:
        data = layer.__dict__.get(buffer)
        return layer.__dict__.get(assigned) if data is None else data[..., : layer._length, :]

    def set_(layer, value: torch.Tensor | None) -> None:
        layer.__dict__[assigned] = value

    return property(get, set_)


class InPlaceLayer(DynamicLayer):
    """One layer's keys/values in a preallocated buffer; ``keys``/``values`` view its filled part.

    The views are made when read, so a crop or a keep only moves the fill mark: a draft-tree step
    crops all 30 layers, and slicing 60 views there cost ~0.4 ms of a ~47 ms step. Attention gets
    its views from :meth:`update`.
    """

    keys = _filled_part("_key_buffer", "_keys")
    values = _filled_part("_value_buffer", "_values")

    def get_seq_length(self) -> int:
        return self._length if self.__dict__.get("_key_buffer") is not None else super().get_seq_length()

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._key_buffer = self._value_buffer = None
        self._length = 0

    def _ensure_room(self, key_states: torch.Tensor, value_states: torch.Tensor, needed: int) -> None:
        if self._key_buffer is not None and needed <= self._key_buffer.shape[-2]:
            return
        capacity = max(needed + _HEADROOM, 2 * needed)
        key_buffer = key_states.new_empty(*key_states.shape[:-2], capacity, key_states.shape[-1])
        value_buffer = value_states.new_empty(*value_states.shape[:-2], capacity, value_states.shape[-1])
        if self._length:
            key_buffer[..., : self._length, :] = self._key_buffer[..., : self._length, :]
            value_buffer[..., : self._length, :] = self._value_buffer[..., : self._length, :]
        self._key_buffer, self._value_buffer = key_buffer, value_buffer

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, end = self._length, self._length + key_states.shape[-2]
        self._ensure_room(key_states, value_states, end)
        self._key_buffer[..., start:end, :] = key_states
        self._value_buffer[..., start:end, :] = value_states
        self._length = end
        return self._key_buffer[..., :end, :], self._value_buffer[..., :end, :]

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last ``-tokens_to_remove`` positions (transformers 5's negative count)."""
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of positions to remove")
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self._length = max(0, self._length + tokens_to_remove)

    def keep(self, start: int, offsets: torch.Tensor | None) -> None:
        """Keep positions ``start + offsets`` (in that order) at ``start..``; drop the rest after ``start``
        (``offsets`` None: keep nothing after ``start``)."""
        if not self.is_initialized:
            return
        end = start
        if offsets is not None:
            end += offsets.numel()
            # The gather copies before the write, so overlapping source and destination are safe.
            self._key_buffer[..., start:end, :] = self._key_buffer[..., start + offsets, :]
            self._value_buffer[..., start:end, :] = self._value_buffer[..., start + offsets, :]
        self.crop(end - self._length)

    def reset(self) -> None:
        self._key_buffer = self._value_buffer = None
        self._length = 0
        super().reset()

    def _reindex_rows(self, pick) -> None:
        if self._key_buffer is None:
            return
        self._key_buffer, self._value_buffer = pick(self._key_buffer), pick(self._value_buffer)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._reindex_rows(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows ``indices`` (rows that finished leave a batched decode)."""
        # index_select, not t[indices]: the same copy, but advanced indexing took 15 vs 0.5 ms on a video
        # prompt's [8, 3, 1040, 64] layer buffer in isolation (torch 2.13, CPU).
        self._reindex_rows(lambda t: t.index_select(0, indices.to(t.device)))


def in_place_cache(config) -> DynamicCache:
    """A ``DynamicCache`` for ``config`` whose full-attention layers grow in place.

    Layers of other kinds (sliding windows, linear attention) keep transformers' own classes.
    """
    cache = DynamicCache(config=config)
    cache.layers = [InPlaceLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def keep_positions(cache: DynamicCache, start: int, offsets: list[int]) -> None:
    """Compact every layer of ``cache`` to positions ``[0, start) + (start + offsets)`` (a tree's
    accepted path; ``offsets`` increasing), in place for :class:`InPlaceLayer`, by re-slicing for
    transformers' own layers. Positions already where they belong are not copied."""
    # The accepted path often begins with the tree's first nodes: those stay, only the rest moves.
    first = next((i for i, offset in enumerate(offsets) if offset != i), len(offsets))
    start, moved = start + first, [offset - first for offset in offsets[first:]]
    index: dict[torch.device, torch.Tensor] = {}  # layers of a split model live on several devices
    for layer in cache.layers:
        if not layer.is_initialized:
            continue
        device = layer.device  # not layer.keys.device: that would slice a view per layer
        if moved and device not in index:
            index[device] = torch.tensor(moved, dtype=torch.long, device=device)
        if isinstance(layer, InPlaceLayer):
            layer.keep(start, index.get(device))
        else:
            rows = torch.arange(start, device=device)
            if moved:
                rows = torch.cat([rows, start + index[device]])
            layer.keys, layer.values = layer.keys[..., rows, :], layer.values[..., rows, :]
