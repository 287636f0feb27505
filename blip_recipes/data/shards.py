"""Tar shards in the webdataset layout, streamed without extracting, with an exact resumable state.

A shard holds samples as consecutive members sharing a key: ``KEY.jpg|jpeg|png|webp`` and
``KEY.txt`` (the caption) or ``KEY.json`` (with a ``caption`` string or list).

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

import io
import json
import logging
import os
import random
import re
import tarfile
import zlib
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blip_recipes.config.sections import DataConfig
from blip_recipes.data._seeding import derive_seed, private_generator
from blip_recipes.data.captions import pre_caption
from blip_recipes.data.loader import IgnoreStopSignals, SampleCounters, bad_record
from blip_recipes.data.transforms import BadImage, open_image

logger = logging.getLogger("blip_recipes.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """Expand ``{00000..00127}`` ranges (zero padding kept) and ``{a,b}`` lists.

    Example:
        >>> expand_braces("s-{000..002}.tar")
        ['s-000.tar', 's-001.tar', 's-002.tar']
    """
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    if ".." in body:
        lo, hi = body.split("..", 1)
        width = len(lo) if lo.startswith("0") else 0
        options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        options = body.split(",")
    head, tail = pattern[: m.start()], pattern[m.end() :]
    return [out for opt in options for out in expand_braces(head + opt + tail)]


def list_shards(paths: list[str]) -> list[str]:
    """Shard files of a source: brace patterns expanded, existence checked."""
    shards = [p for pattern in paths for p in expand_braces(pattern)]
    missing = [p for p in shards if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} shard(s) not found, e.g. {missing[:3]}")
    if not shards:
        raise ValueError("no shards listed")
    return shards


def _split_key(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    dot = base.find(".")
    if dot < 0:
        return name, ""
    return name[: len(name) - len(base) + dot], base[dot + 1 :].lower()


def iter_tar_samples(path: str, offset: int = 0) -> Iterator[tuple[str, dict, int, int]]:
    """Yield ``(key, {ext: bytes}, start_offset, next_offset)`` for each sample from ``offset``.

    ``offset`` must be a member header offset (0 or a previous ``next_offset``). A truncated or
    corrupt tail ends the shard with a warning.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
        except tarfile.ReadError as e:
            if offset == 0:
                logger.warning("cannot read shard %s: %s", path, e)
            return
        key, files, start = None, {}, offset
        try:
            for info in tar:
                if not info.isfile():
                    continue
                k, ext = _split_key(info.name)
                if k != key:
                    if key is not None:
                        yield key, files, start, info.offset
                    key, files, start = k, {}, info.offset
                files[ext] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError) as e:
            logger.warning("shard %s is damaged after offset %d: %s", path, start, e)
            return
        if key is not None:
            yield key, files, start, -1  # -1: end of shard


def decode_caption(files: dict) -> object:
    """Caption text (or list) of a shard sample from its ``txt`` or ``json`` member."""
    if "txt" in files:
        return files["txt"].decode("utf-8", errors="replace")
    if "json" in files:
        meta = json.loads(files["json"])
        return meta.get("caption", "") if isinstance(meta, dict) else ""
    return ""


class _Stream:
    """One stream's deterministic walk over its shards (see the module docstring)."""

    def __init__(self, shards, seed, stream, num_streams, buffer, state=None):
        self.shards, self.seed = shards, seed
        self.stream, self.num_streams, self.buffer = stream, num_streams, max(1, buffer)
        self.state = state or {
            "epoch": 0,
            "shard": 0,
            "offset": 0,
            "ordinal": 0,
            "window": 0,
            "taken": 0,
        }

    def _plan(self, epoch: int) -> tuple[list[str], int, int]:
        rng = np.random.Generator(np.random.PCG64(derive_seed(self.seed, epoch, 0x5A4D)))
        order = [self.shards[i] for i in rng.permutation(len(self.shards))]
        if len(order) >= self.num_streams:
            return order[self.stream :: self.num_streams], 1, 0
        return order, self.num_streams, self.stream

    def _read(self, epoch, shard, offset, ordinal):
        """Samples of this stream from a position; yields (sample, position after it)."""
        shards, modulo, residue = self._plan(epoch)
        while shard < len(shards):
            path = shards[shard]
            for key, files, _start, nxt in iter_tar_samples(path, offset):
                pos = (shard, nxt, ordinal + 1) if nxt >= 0 else (shard + 1, 0, ordinal + 1)
                if ordinal % modulo == residue:
                    yield (os.path.basename(path), key, files), pos
                ordinal += 1
            shard, offset = shard + 1, 0

    def __iter__(self):
        """Yield ``(epoch, (shard name, key, files))`` forever, updating ``self.state``."""
        empty_epochs = 0
        while True:
            st = self.state
            window, after = [], None
            for sample, pos in self._read(st["epoch"], st["shard"], st["offset"], st["ordinal"]):
                window.append(sample)
                after = pos
                if len(window) == self.buffer:
                    break
            if not window:  # epoch done
                empty_epochs = empty_epochs + 1 if st["ordinal"] == 0 else 0
                if empty_epochs > 1:
                    raise RuntimeError(f"shard stream {self.stream} has no readable samples")
                self.state = dict(st, epoch=st["epoch"] + 1, shard=0, offset=0, ordinal=0, window=0)
                self.state["taken"] = 0
                continue
            rng = random.Random(derive_seed(self.seed, st["epoch"], self.stream, st["window"]))
            rng.shuffle(window)
            for i in range(st["taken"], len(window)):
                self.state = dict(st, taken=i + 1)
                yield st["epoch"], window[i]
            shard, offset, ordinal = after
            self.state = dict(
                epoch=st["epoch"], shard=shard, offset=offset, ordinal=ordinal,
                window=st["window"] + 1, taken=0,
            )  # fmt: skip


class ShardBatches(IterableDataset):
    """A rank's batches from its shard streams (worker ``w`` plays stream ``(w + rotate) % nw``)."""

    def __init__(self, shards, ctx, buffer, streams_per_rank, states, rotate):
        self.shards, self.ctx, self.buffer = shards, ctx, buffer
        self.streams_per_rank, self.states, self.rotate = streams_per_rank, states, rotate

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info else 0
        local = (worker + self.rotate) % self.streams_per_rank
        local_ids = [local] if info else list(range(self.streams_per_rank))
        if info is None and self.streams_per_rank > 1:
            raise RuntimeError("shard streams need one worker per stream")
        ctx = self.ctx
        stream_id = ctx.rank * self.streams_per_rank + local_ids[0]
        num_streams = ctx.world_size * self.streams_per_rank
        stream = _Stream(
            self.shards, ctx.seed, stream_id, num_streams, self.buffer, self.states.get(local)
        )
        samples = iter(stream)
        while True:
            images, captions, bad = [], [], []
            while len(images) < ctx.batch_size:
                epoch, (shard, key, files) = next(samples)
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
                    continue
                images.append(image)
                captions.append(caption)
            ids, mask = ctx.tokenizer(captions)
            yield {
                "images": torch.stack(images),
                "input_ids": ids,
                "attention_mask": mask,
                "_stream": local,
                "_state": dict(stream.state),
                "_epoch": stream.state["epoch"],
                "_bad": len(bad),
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


class ShardLoader(SampleCounters):
    """Infinite, resumable iterator over tar shards; the same surface as :class:`TrainLoader`
    except ``steps_per_epoch`` (None: streamed data has no known length)."""

    steps_per_epoch = None

    def __init__(self, data_cfg: DataConfig, ctx) -> None:
        self.cfg, self.ctx = data_cfg, ctx
        self.shards = [p for s in data_cfg.sources for p in list_shards(s.paths)]
        self.streams_per_rank = max(1, data_cfg.num_workers)
        self.states: dict[int, dict] = {}
        self.consumed = 0
        self._init_counters()
        self._iterator = None
        if len(self.shards) < ctx.world_size * self.streams_per_rank:
            logger.warning(
                "%d shards for %d streams (world size x workers): every stream reads every shard",
                len(self.shards),
                ctx.world_size * self.streams_per_rank,
            )

    @property
    def epoch(self) -> int:
        return min((s["epoch"] for s in self.states.values()), default=0)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            nw = self.cfg.num_workers
            dataset = ShardBatches(
                self.shards,
                self.ctx,
                self.cfg.shuffle_buffer,
                self.streams_per_rank,
                dict(self.states),
                self.consumed % self.streams_per_rank,
            )
            self._iterator = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=nw,
                    prefetch_factor=self.cfg.prefetch_factor if nw > 0 else None,
                    pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                    worker_init_fn=IgnoreStopSignals() if nw > 0 else None,
                    generator=private_generator(),
                )
            )
        batch = next(self._iterator)
        self.states[int(batch.pop("_stream"))] = batch.pop("_state")
        batch.pop("_epoch")
        bad, records = batch.pop("_bad"), batch.pop("_bad_samples")
        self.consumed += 1
        self._count_batch(bad, records)
        return batch

    def stats(self) -> dict:
        """Per-rank counters: samples delivered, bad samples replaced, epoch."""
        return {**self._counter_stats(), "epoch": self.epoch}

    def state_dict(self) -> dict:
        """This rank's stream positions (per rank: save under a rank-specific key)."""
        return {
            "kind": "shards",
            "rank": self.ctx.rank,
            "world_size": self.ctx.world_size,
            "streams_per_rank": self.streams_per_rank,
            "consumed": self.consumed,
            "streams": {str(k): dict(v) for k, v in self.states.items()},
            "samples": self.samples,
            "bad_samples": self.bad_samples,
        }

    def load_state_dict(self, state: dict) -> None:
        same = (
            int(state["world_size"]) == self.ctx.world_size
            and int(state["streams_per_rank"]) == self.streams_per_rank
            and int(state["rank"]) == self.ctx.rank
        )
        streams = {int(k): dict(v) for k, v in state["streams"].items()}
        if same:
            self.states, self.consumed = streams, int(state["consumed"])
        else:
            epoch = min((s["epoch"] for s in streams.values()), default=0)
            logger.warning(
                "shard loader layout changed (world size x workers); restarting every stream at "
                "the beginning of epoch %d",
                epoch,
            )
            fresh = dict(shard=0, offset=0, ordinal=0, window=0, taken=0, epoch=epoch)
            self.states = {i: dict(fresh) for i in range(self.streams_per_rank)}
            self.consumed = 0
        self.samples = int(state.get("samples", 0))
        self.bad_samples = int(state.get("bad_samples", 0))
        self._iterator = None


def write_shard(path: str, samples: list[tuple[str, bytes, str, str]]) -> None:
    """Write ``(key, image bytes, image extension, caption)`` samples to ``path`` atomically
    (a temporary file renamed at the end, so a shard is never half-written)."""
    tmp = f"{path}.tmp{os.getpid()}"
    with tarfile.open(tmp, "w") as tar:
        for key, data, ext, caption in samples:
            for name, payload in (
                (f"{key}.{ext}", data),
                (f"{key}.txt", caption.encode("utf-8")),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                info.mtime = 0
                tar.addfile(info, io.BytesIO(payload))
    os.replace(tmp, path)


__all__ = [
    "ShardLoader",
    "decode_caption",
    "expand_braces",
    "iter_tar_samples",
    "list_shards",
    "write_shard",
]
