"""Packing: several prepared examples per training row, best-fit decreasing.

Chat examples are short and their lengths long-tailed, so padding each batch
to its longest example spends much of every step on pad tokens. Packing
fills rows of ``capacity`` tokens with whole examples instead (an example is
never split: a cut-off answer would teach the model to stop mid-sentence).

A packed row carries ``seq_lengths``, the lengths of its examples in order.
TRL's collator in padding-free mode turns them into position ids that
restart at every example, and transformers derives from those a
block-causal attention mask, so examples in one row never attend to each
other (``tests/test_packing.py`` checks the loss matches the unpacked one).

Pure Python: this runs inside a Ray Data ``map_batches`` on batches of a few
thousand rows, where per-call overhead matters more than vectorisation.
"""

from __future__ import annotations

import bisect
from typing import Any, Sequence

from ray_qlora.data.templating import IGNORE_INDEX

__all__ = ["best_fit_bins", "pack_examples", "packing_efficiency", "padding_efficiency"]


def best_fit_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Group example indices into bins of at most ``capacity`` tokens.

    Best-fit decreasing: longest first (ties by index, so the result depends
    on the input alone), each into the open bin it fills most tightly, else
    a new bin. Open bins sit in a list sorted by (room left, bin number), so
    finding the tightest fit is a bisect, not a scan over every bin.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be at least 1, got {capacity}")
    for i, n in enumerate(lengths):
        if n < 1:
            raise ValueError(f"example {i} is empty (length {n}); an empty example cannot be packed")
        if n > capacity:
            raise ValueError(f"example {i} has length {n}, longer than the packing capacity {capacity}")
    if not lengths:
        return []
    # sorted() is stable, so equal lengths keep their index order.
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    shortest = min(lengths)
    bins: list[list[int]] = []
    open_bins: list[tuple[int, int]] = []  # (room left, bin number), ascending
    for i in order:
        n = lengths[i]
        # (n, -1) sorts before every (n, bin) entry: the first entry with room >= n.
        k = bisect.bisect_left(open_bins, (n, -1))
        if k == len(open_bins):
            b, room = len(bins), capacity
            bins.append([i])
        else:
            room, b = open_bins.pop(k)
            bins[b].append(i)
        room -= n
        # A bin with less room than the shortest example is closed for good;
        # dropping it keeps the list (and each insertion's memmove) short.
        if room >= shortest:
            bisect.insort(open_bins, (room, b))
    return bins


def _as_list(seq: Any) -> list[int]:
    """A plain list from a list or a numpy array (what Ray Data batches hold)."""
    return seq.tolist() if hasattr(seq, "tolist") else list(seq)


def pack_examples(input_ids: Sequence[Sequence[int]], labels: Sequence[Sequence[int]],
                  capacity: int) -> dict[str, list]:
    """Pack examples into rows of at most ``capacity`` tokens (see ``best_fit_bins``).

    Returns the columns of the packed rows: ``input_ids``, ``labels``,
    ``seq_lengths`` (example lengths in row order, what TRL's padding-free
    collator restarts positions from), ``num_tokens``, ``num_label_tokens``
    and ``num_examples``.

    The first label of every example becomes -100. Unpacked it is never
    scored anyway (labels shift by one, nothing precedes the first token);
    packed, it would be scored as a prediction from the previous example's
    last token, which is noise, not something to learn.
    """
    if len(input_ids) != len(labels):
        raise ValueError(f"{len(input_ids)} input_ids rows but {len(labels)} labels rows")
    ids = [_as_list(x) for x in input_ids]
    labs = [_as_list(x) for x in labels]
    for i, (x, y) in enumerate(zip(ids, labs)):
        if len(x) != len(y):
            raise ValueError(f"example {i}: {len(x)} input_ids but {len(y)} labels")
    out: dict[str, list] = {k: [] for k in
                            ("input_ids", "labels", "seq_lengths", "num_tokens", "num_label_tokens", "num_examples")}
    for members in best_fit_bins([len(x) for x in ids], capacity):
        row_ids: list[int] = []
        row_labels: list[int] = []
        for i in members:
            row_ids.extend(ids[i])
            row_labels.append(IGNORE_INDEX)
            row_labels.extend(labs[i][1:])
        out["input_ids"].append(row_ids)
        out["labels"].append(row_labels)
        out["seq_lengths"].append([len(ids[i]) for i in members])
        out["num_tokens"].append(len(row_ids))
        out["num_label_tokens"].append(sum(1 for t in row_labels if t != IGNORE_INDEX))
        out["num_examples"].append(len(members))
    return out


def packing_efficiency(num_tokens: int, num_rows: int, capacity: int) -> float:
    """Share of the packed rows' token slots that hold real tokens (0.0 for no rows)."""
    return num_tokens / (num_rows * capacity) if num_rows else 0.0


def padding_efficiency(lengths: Sequence[int], batch_size: int) -> float:
    """The same share without packing: consecutive batches, each padded to its longest.

    The baseline packing is judged against; 0.0 for no examples.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    slots = sum(len(lengths[s:s + batch_size]) * max(lengths[s:s + batch_size])
                for s in range(0, len(lengths), batch_size))
    return sum(lengths) / slots if slots else 0.0
