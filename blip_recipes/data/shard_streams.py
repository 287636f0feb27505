"""Shards read as deterministic, resumable streams, batched in the loader's workers.

**Streams.** Each rank runs ``max(1, num_workers)`` streams; there are ``S = world_size x streams``
in all. Every epoch the shard list is permuted by ``(seed, epoch)``; with at least ``S`` shards,
stream ``s`` reads shards ``s, s + S, ...`` of that list, otherwise every stream reads all shards
and keeps every ``S``-th sample (slower, but every sample is still seen exactly once per epoch).
A stream shuffles in windows of ``data.shuffle_buffer`` samples (a permutation drawn from ``(seed,
epoch, stream, window)``), and makes whole batches from its own samples; the loader interleaves
the streams of a rank (worker ``w`` gives batches ``w, w + nw, ...``). A stream moves to the next
epoch when its shards are done, so streams of different sizes drift apart by part of an epoch.

**State.** A stream's position is ``(epoch, shard, byte offset, ordinal)`` of the first sample of
its current window plus how many of the window's samples it has used; resuming re-reads at most
one window. The state is per rank (``rank`` and per-stream entries): save it per rank. Resuming
with the same world size and workers continues bitwise; with other numbers, each stream restarts
at the beginning of the earliest saved epoch (samples of that epoch may be seen again).
Augmentation seeds come from ``(seed, epoch, crc32(shard name / key))``, independent of layout.
"""

from __future__ import annotations

import os
import random
import zlib
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from blip_recipes.data._seeding import derive_seed
from blip_recipes.data.captions import pre_caption
from blip_recipes.data.samples import (
    MAX_REPLACEMENTS,
    BadSampleError,
    bad_count,
    bad_record,
    describe_bad,
)
from blip_recipes.data.tar_format import (
    IMAGE_EXTENSIONS,
    ShardDamage,
    decode_caption,
    iter_tar_samples,
    shard_image_id,
)
from blip_recipes.data.transforms import BadImage, open_image
from blip_recipes.data.watchdog import LoaderError


class LostSamples(NamedTuple):
    """Samples of a damaged shard that could not be read at all (see :func:`iter_tar_samples`):
    ``count`` of them for this stream, from the shard's size in ``sizes.json`` less the samples
    that were read (1 when the size is unknown)."""

    shard: str
    reason: str
    count: int


def _share(first: int, count: int, modulo: int, residue: int) -> int:
    """How many of the ordinals ``first ... first + count - 1`` are ``residue`` modulo ``modulo``."""
    return (first + count - 1 - residue) // modulo - (first - 1 - residue) // modulo


_START = {"shard": 0, "offset": 0, "ordinal": 0, "in_shard": 0, "damage": ""}


class _Stream:
    """One stream's deterministic walk over its shards (see the module docstring).

    A position is ``{"shard", "offset", "ordinal", "in_shard", "damage"}``: the shard (in the
    epoch's plan) and byte offset of the next sample, the samples read so far in the epoch and
    in that shard, and what was found damaged in that shard so far (empty if nothing). At the end
    of a damaged shard the stream yields a :class:`LostSamples` before its last sample; it takes
    no place in a shuffle window, and a resumed window that was already read once does not
    yield it again.
    """

    def __init__(self, shards, seed, stream, num_streams, buffer, state=None, sizes=None):
        self.shards, self.seed, self.sizes = shards, seed, sizes or {}
        self.stream, self.num_streams, self.buffer = stream, num_streams, max(1, buffer)
        self.state = {"epoch": 0, **_START, "window": 0, "taken": 0, **(state or {})}

    def _plan(self, epoch: int) -> tuple[list[str], int, int]:
        rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, epoch, 0x5A4D)))
        order = [self.shards[i] for i in rng.permutation(len(self.shards))]
        if len(order) >= self.num_streams:
            return order[self.stream :: self.num_streams], 1, 0
        return order, self.num_streams, self.stream

    def _lost(self, path: str, damage: str, seen: int, ordinal: int, modulo: int, residue: int):
        """The :class:`LostSamples` of a damaged shard of which ``seen`` samples were read."""
        size = self.sizes.get(path)
        if size is None:
            total = 1
            reason = f"{damage}; an unknown number of samples lost (no sizes.json), counted as 1"
        else:
            total = size - seen
            reason = f"{damage}; {total} of its {size} samples (sizes.json) could not be read"
        mine = _share(ordinal, total, modulo, residue) if total > 0 else 0
        if mine:
            yield LostSamples(os.path.basename(path), reason, mine), None

    def _read(self, epoch: int, position: dict):
        """This stream's items from ``position`` on: ``(sample, position after it)`` and
        ``(LostSamples, None)``."""
        shards, modulo, residue = self._plan(epoch)
        pos = {k: position.get(k, v) for k, v in _START.items()}
        while pos["shard"] < len(shards):
            path = shards[pos["shard"]]
            found: list[ShardDamage] = []
            ended = False
            for key, files, _start, nxt in iter_tar_samples(path, pos["offset"], found.append):
                damage = pos["damage"] or (found[0].describe() if found else "")
                ordinal, seen = pos["ordinal"], pos["in_shard"] + 1
                if nxt >= 0:
                    after = dict(shard=pos["shard"], offset=nxt, ordinal=ordinal + 1,
                                 in_shard=seen, damage=damage)  # fmt: skip
                else:
                    ended = True
                    after = dict(_START, shard=pos["shard"] + 1, ordinal=ordinal + 1)
                    if damage:
                        yield from self._lost(path, damage, seen, ordinal + 1, modulo, residue)
                if ordinal % modulo == residue:
                    yield (os.path.basename(path), key, files), after
                pos = after
            if not ended:  # nothing read in this pass (damaged at its start)
                damage = pos["damage"] or (found[0].describe() if found else "")
                if damage:
                    yield from self._lost(
                        path, damage, pos["in_shard"], pos["ordinal"], modulo, residue
                    )
                pos = dict(_START, shard=pos["shard"] + 1, ordinal=pos["ordinal"])

    def __iter__(self):
        """Yield ``(epoch, (shard name, key, files))`` and ``(epoch, LostSamples)`` forever,
        updating ``self.state``."""
        empty_epochs = 0
        while True:
            st = self.state
            window, after = [], None
            counted = st["taken"] > 0  # this window was read before: its losses were yielded
            for item, pos in self._read(st["epoch"], st):
                if pos is None:
                    if not counted:
                        yield st["epoch"], item
                    continue
                window.append(item)
                after = pos
                if len(window) == self.buffer:
                    break
            else:  # the epoch's shards are done: a damaged tail is not read again
                if after is not None:
                    after = dict(after, shard=len(self._plan(st["epoch"])[0]), offset=0)
            if not window:  # epoch done
                empty_epochs = empty_epochs + 1 if st["ordinal"] == 0 else 0
                if empty_epochs > 1:
                    raise LoaderError(
                        f"shard stream {self.stream} read no sample in two epochs over its "
                        f"{len(self._plan(st['epoch'])[0])} shard(s) (all empty or damaged?)"
                    )
                self.state = dict(epoch=st["epoch"] + 1, **_START, window=0, taken=0)
                continue
            rng = random.Random(derive_seed(self.seed, st["epoch"], self.stream, st["window"]))
            rng.shuffle(window)
            for i in range(st["taken"], len(window)):
                self.state = dict(st, taken=i + 1)
                yield st["epoch"], window[i]
            self.state = dict(epoch=st["epoch"], **after, window=st["window"] + 1, taken=0)


class ShardBatches(IterableDataset):
    """A rank's batches from its shard streams (worker ``w`` plays stream ``(w + rotate) % nw``).

    A bad sample is skipped (and named); more than ``MAX_REPLACEMENTS`` bad samples in a row,
    as for map-style sources, stop the run with :class:`BadSampleError`. A :class:`LoaderError`
    is sent to the rank as ``{"_raise": error}``.
    """

    def __init__(self, shards, ctx, buffer, streams_per_rank, states, rotate, sizes=None):
        self.shards, self.ctx, self.buffer = shards, ctx, buffer
        self.streams_per_rank, self.states, self.rotate = streams_per_rank, states, rotate
        self.sizes = sizes or {}

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        local = (worker + self.rotate) % self.streams_per_rank
        local_ids = [local] if info else list(range(self.streams_per_rank))
        if info is None and self.streams_per_rank > 1:
            raise RuntimeError("shard streams need one worker per stream")
        try:
            yield from self._batches(local, local_ids[0])
        except LoaderError as e:
            yield {"_raise": e}

    def _batches(self, local: int, local_id: int):
        ctx = self.ctx
        stream_id = ctx.rank * self.streams_per_rank + local_id
        num_streams = ctx.world_size * self.streams_per_rank
        stream = _Stream(
            self.shards, ctx.seed, stream_id, num_streams, self.buffer, self.states.get(local),
            self.sizes,
        )  # fmt: skip
        samples = iter(stream)
        in_a_row = 0
        while True:
            images, captions, image_ids, bad = [], [], [], []
            while len(images) < ctx.batch_size:
                epoch, item = next(samples)
                if isinstance(item, LostSamples):
                    bad.append({"sample": item.shard, "reason": item.reason, "source": "shards",
                                "epoch": epoch, "count": item.count})  # fmt: skip
                    continue
                shard, key, files = item
                origin = f"{shard}/{key}"
                rng = random.Random(derive_seed(ctx.seed, epoch, zlib.crc32(origin.encode())))
                try:
                    image = self._image(files, origin, rng)
                    try:
                        caption = pre_caption(_pick(decode_caption(files), rng), ctx.max_words)
                    except (ValueError, UnicodeError) as e:
                        raise BadImage(f"bad caption: {e}") from e
                    if not caption:
                        raise BadImage("empty caption after cleaning")
                except (BadImage, ValueError, UnicodeError) as e:
                    bad.append(bad_record(e, origin, "shards", epoch))
                    in_a_row += 1
                    if in_a_row > MAX_REPLACEMENTS:
                        raise BadSampleError(
                            f"rank {ctx.rank}: {in_a_row} shard samples in a row were bad "
                            f"(stream {stream_id}); last: {describe_bad(bad[-1])}"
                        ) from None
                    continue
                in_a_row = 0
                images.append(image)
                captions.append(caption)
                image_ids.append(shard_image_id(shard, key))
            ids, mask = ctx.tokenizer(captions)
            yield {
                "images": torch.stack(images),
                "input_ids": ids,
                "attention_mask": mask,
                "image_ids": torch.tensor(image_ids, dtype=torch.int64),
                "_stream": local,
                "_state": dict(stream.state),
                "_epoch": stream.state["epoch"],
                "_bad": bad_count(bad),
                "_bad_samples": bad,
            }

    def _image(self, files, origin, rng):
        ext = next((e for e in IMAGE_EXTENSIONS if e in files), None)
        if ext is None:
            raise BadImage(f"{origin}: no image member ({', '.join(sorted(files))})")
        try:
            return self.ctx.transform(open_image(files[ext]), rng)
        except BadImage as e:
            error = BadImage(f"{origin}.{ext}: {e}")
            error.origin, error.reason = f"{origin}.{ext}", str(e)
            raise error from e


def _pick(caption, rng):
    if isinstance(caption, list):
        return rng.choice(caption) if caption else ""
    return caption if isinstance(caption, str) else ""


__all__ = ["LostSamples", "ShardBatches"]
