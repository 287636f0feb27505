"""Tar shards in the webdataset layout, streamed without extracting, with an exact resumable state.

A shard holds samples as consecutive members sharing a key: ``KEY.jpg|jpeg|png|webp`` and
``KEY.txt`` (the caption) or ``KEY.json`` (with a ``caption`` string or list), which is also the
layout of img2dataset's ``--output_format webdataset`` output. Shards are local paths or remote
URLs (``s3://``, ``gs://``, ``https://``, ``pipe:CMD``; see :mod:`.remote`). The dataset size
comes from ``sizes.json`` or img2dataset's ``NNNNN_stats.json`` beside them (:func:`shard_sizes`).

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

import hashlib
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
from blip_recipes.data.nodes import close_at_exit
from blip_recipes.data.remote import is_remote, local_path, open_shard, read_small
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
    """Shard files or URLs of a source: brace patterns expanded, local files checked to exist."""
    shards = [p for pattern in paths for p in expand_braces(pattern)]
    missing = [p for p in shards if not is_remote(p) and not os.path.exists(local_path(p))]
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

    ``path`` is a local file or a remote URL (:mod:`.remote`, read as a forward stream).
    ``offset`` must be a member header offset (0 or a previous ``next_offset``). A truncated or
    corrupt tail ends the shard with a warning; a remote shard that cannot be read raises
    :class:`~blip_recipes.data.remote.RemoteShardError`.
    """
    if is_remote(path):
        f, mode, base = open_shard(path, offset), "r|", offset  # stream offsets start at 0
    else:
        f, mode, base = open(local_path(path), "rb"), "r:", 0
        f.seek(offset)
    with f:
        try:
            tar = tarfile.open(fileobj=f, mode=mode)
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
                        yield key, files, start, base + info.offset
                    key, files, start = k, {}, base + info.offset
                files[ext] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError) as e:
            logger.warning("shard %s is damaged after offset %d: %s", path, start, e)
            return
        if key is not None:
            yield key, files, start, -1  # -1: end of shard


def shard_image_id(shard: str, key: str) -> int:
    """Image id of a shard sample: a stable 63-bit hash of ``"<shard basename>/<key>"`` (BLAKE2b,
    the same in every process and Python version, unlike the salted builtin ``hash``)."""
    text = f"{os.path.basename(shard)}/{key}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1


def decode_caption(files: dict) -> object:
    """Caption text (or list) of a shard sample from its ``txt`` member, else the ``caption``
    field of its ``json`` member (img2dataset's ``json`` is per-sample metadata: url, status,
    sizes... only its ``caption`` is used)."""
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
            images, captions, image_ids, bad = [], [], [], []
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


def _parent(url: str) -> tuple[str, str]:
    head, sep, name = url.rpartition("/")
    return (head + sep, name)


def shard_sizes(shards: list[str]) -> tuple[dict[str, int], list[str]]:
    """Samples per shard from the files beside the shards: ``sizes.json`` (open_clip's
    ``{"shard-00000.tar": 1000, ...}``), else img2dataset's ``NNNNN_stats.json`` (``successes``).

    Returns ``({shard: size}, [shards of unknown size])``; ``pipe:`` shards are always unknown.
    """
    from concurrent.futures import ThreadPoolExecutor

    folders: dict[str, dict | None] = {}

    def sizes_file(folder: str) -> dict | None:
        if folder not in folders:
            raw = read_small(folder + "sizes.json")
            folders[folder] = json.loads(raw) if raw is not None else None
        return folders[folder]

    def one(shard: str) -> int | None:
        if shard.startswith("pipe:"):
            return None
        folder, name = _parent(shard)
        table = sizes_file(folder)
        if isinstance(table, dict) and name in table:
            return int(table[name])
        stem = name[: -len(".tar")] if name.endswith(".tar") else name
        raw = read_small(f"{folder}{stem}_stats.json")
        if raw is None:
            return None
        stats = json.loads(raw)
        return int(stats["successes"]) if isinstance(stats, dict) and "successes" in stats else None

    for folder in {_parent(s)[0] for s in shards if not s.startswith("pipe:")}:
        sizes_file(folder)
    remote = any(is_remote(s) for s in shards)
    with ThreadPoolExecutor(16 if remote else 1) as pool:
        found = list(pool.map(one, shards))
    known = {s: n for s, n in zip(shards, found) if n is not None}
    return known, [s for s, n in zip(shards, found) if n is None]


def dataset_size(shards: list[str]) -> int | None:
    """Total samples of the shards (see :func:`shard_sizes`); None if any shard's size is unknown."""
    known, unknown = shard_sizes(shards)
    return None if unknown else sum(known.values())


class ShardLoader(SampleCounters):
    """Infinite, resumable iterator over tar shards; the same surface as :class:`TrainLoader`.

    ``num_samples`` and ``steps_per_epoch`` (``num_samples // global batch``) come from
    ``sizes.json`` or img2dataset's ``*_stats.json`` beside the shards (:func:`shard_sizes`);
    both are None when some shard's size is unknown (then ``training.steps_per_epoch`` is needed).
    """

    def __init__(self, data_cfg: DataConfig, ctx) -> None:
        self.cfg, self.ctx = data_cfg, ctx
        self.shards = [p for s in data_cfg.sources for p in list_shards(s.paths)]
        self.num_samples = dataset_size(self.shards)
        global_batch = ctx.batch_size * ctx.world_size
        self.steps_per_epoch = (
            None if self.num_samples is None else self.num_samples // global_batch
        )
        self.streams_per_rank = max(1, data_cfg.num_workers)
        self.states: dict[int, dict] = {}
        self.consumed = 0
        self._init_counters()
        self._iterator = None
        close_at_exit(self)
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

    def close(self) -> None:
        """Stop the worker processes (a later ``next()`` starts them again). Also done at
        interpreter exit: the workers ignore SIGTERM, which ``multiprocessing`` would wait on."""
        if self._iterator is not None:
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            self._iterator = None

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
        self.close()


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
    "dataset_size",
    "decode_caption",
    "expand_braces",
    "iter_tar_samples",
    "list_shards",
    "shard_image_id",
    "shard_sizes",
    "write_shard",
]
