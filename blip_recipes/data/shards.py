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
import time
import zlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from blip_recipes.config.sections import DataConfig
from blip_recipes.data._seeding import derive_seed, private_generator
from blip_recipes.data.captions import pre_caption
from blip_recipes.data.counters import SampleCounters
from blip_recipes.data.nodes import close_at_exit
from blip_recipes.data.remote import is_remote, local_path, open_shard, read_small
from blip_recipes.data.samples import (
    MAX_REPLACEMENTS,
    BadSampleError,
    IgnoreStopSignals,
    bad_count,
    bad_record,
    describe_bad,
)
from blip_recipes.data.transforms import BadImage, open_image
from blip_recipes.data.watchdog import POLL_S, LoaderError

logger = logging.getLogger("blip_recipes.data")

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{([^{}]*)\}")
#: Seconds a rank looks for a dead worker after its connection to the workers broke.
WORKER_EXIT_WAIT_S = 2.0


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


class ShardDamage(NamedTuple):
    """A part of a shard that could not be read: from byte ``start`` to the next intact member
    header at ``end`` (None: to the end of the file), and why."""

    start: int
    end: int | None
    reason: str

    def describe(self) -> str:
        where = f"byte {self.start}"
        rest = "the rest of the shard" if self.end is None else f"skipped to byte {self.end}"
        return f"{self.reason} at {where} ({rest})"


def _scanning_tarinfo(problems: list[tuple[int, Exception]], base: int) -> type[tarfile.TarInfo]:
    """A TarInfo class recording (offset + ``base``, error) of every header block that did not
    parse: tarfile skips them quietly (``ignore_zeros``) or, without it, ends the archive there
    without a word."""

    class Scanning(tarfile.TarInfo):
        @classmethod
        def fromtarfile(cls, tar):
            at = base + tar.offset
            try:
                return super().fromtarfile(tar)
            except tarfile.HeaderError as e:
                problems.append((at, e))
                raise

    return Scanning


def _header_damage(problems, start: int, end: int | None) -> ShardDamage | None:
    """The damage among the unparsed header blocks in ``[start, end)``, if any (blocks of zeros
    alone are padding, or the end-of-archive marker)."""
    bad = [(at, e) for at, e in problems if at >= start and (end is None or at < end)]
    zeros = [at for at, e in bad if isinstance(e, tarfile.EOFHeaderError)]
    padding = (tarfile.EOFHeaderError, tarfile.EmptyHeaderError)  # zero block, end of file
    broken = [(at, e) for at, e in bad if not isinstance(e, padding)]
    if broken:
        at, e = broken[0]
        if isinstance(e, tarfile.TruncatedHeaderError):
            return ShardDamage(at, None, "truncated (the file ends inside a member header)")
        return ShardDamage(at, end, f"damaged tar header ({e})")
    if end is not None:  # zero blocks between members: a zeroed region (or concatenated tars)
        return ShardDamage(start, end, "zeroed bytes between members") if zeros else None
    if len(zeros) < 2:  # the end-of-archive marker is two zero blocks
        return ShardDamage(start, None, "truncated (no end-of-archive marker)")
    return None


def iter_tar_samples(
    path: str, offset: int = 0, on_damage: Callable[[ShardDamage], None] | None = None
) -> Iterator[tuple[str, dict, int, int]]:
    """Yield ``(key, {ext: bytes}, start_offset, next_offset)`` for each sample from ``offset``.

    ``path`` is a local file or a remote URL (:mod:`.remote`, read as a forward stream).
    ``offset`` must be a member header offset (0 or a previous ``next_offset``). A damaged
    header is skipped up to the next intact member header; a truncated file ends the shard.
    Each damaged part is passed to ``on_damage`` (default: a warning); a sample with members on
    both sides of one comes out incomplete (a bad sample downstream). A remote shard that
    cannot be read raises :class:`~blip_recipes.data.remote.RemoteShardError`.
    """
    if on_damage is None:

        def on_damage(damage: ShardDamage) -> None:
            logger.warning("shard %s: %s", path, damage.describe())

    size = None
    if is_remote(path):
        f, mode, base = open_shard(path, offset), "r|", offset  # stream offsets start at 0
    else:
        f, mode, base = open(local_path(path), "rb"), "r:", 0
        size = os.fstat(f.fileno()).st_size
        f.seek(offset)
    problems: list[tuple[int, Exception]] = []
    with f:
        try:
            tar = tarfile.open(
                fileobj=f, mode=mode, ignore_zeros=True, tarinfo=_scanning_tarinfo(problems, base)
            )
        except tarfile.ReadError as e:
            on_damage(ShardDamage(offset, None, f"not a readable tar file ({e})"))
            return
        key, files, start = None, {}, offset
        expected = offset  # where the next member header should start
        try:
            for info in tar:
                at = base + info.offset
                if at != expected and (damage := _header_damage(problems, expected, at)):
                    on_damage(damage)
                expected = base + tar.offset
                if not info.isfile():
                    continue
                k, ext = _split_key(info.name)
                if k != key:
                    if key is not None:
                        yield key, files, start, at
                    key, files, start = k, {}, at
                files[ext] = tar.extractfile(info).read()
        except (tarfile.TarError, OSError) as e:
            on_damage(ShardDamage(start, None, f"truncated or unreadable ({e})"))
            return
        damage = _header_damage(problems, expected, None)
        if damage is not None and size is not None and expected > size:
            damage = ShardDamage(start, None, "truncated (the file ends inside a member)")
        if damage is not None:
            on_damage(damage)
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
        self.sizes, unknown = shard_sizes(self.shards)
        self.num_samples = None if unknown else sum(self.sizes.values())
        global_batch = ctx.batch_size * ctx.world_size
        self.steps_per_epoch = (
            None if self.num_samples is None else self.num_samples // global_batch
        )
        self.streams_per_rank = max(1, data_cfg.num_workers)
        self.states: dict[int, dict] = {}
        self.consumed = 0
        self._init_counters()
        self._iterator = None
        self._failed = False  # the watchdog found a dead or stuck worker
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

    def _start(self):
        nw = self.cfg.num_workers
        dataset = ShardBatches(
            self.shards,
            self.ctx,
            self.cfg.shuffle_buffer,
            self.streams_per_rank,
            dict(self.states),
            self.consumed % self.streams_per_rank,
            self.sizes,
        )
        iterator = iter(
            DataLoader(
                dataset,
                batch_size=None,
                num_workers=nw,
                prefetch_factor=self.cfg.prefetch_factor if nw > 0 else None,
                pin_memory=self.cfg.pin_memory and torch.cuda.is_available(),
                worker_init_fn=IgnoreStopSignals() if nw > 0 else None,
                generator=private_generator(),
                timeout=POLL_S if nw > 0 else 0,  # each wait is one watchdog check
            )
        )
        if getattr(iterator, "_worker_pids_set", False):
            # torch's SIGCHLD handler would raise wherever the rank is (mid-step, mid-save);
            # the watchdog reports a dead worker at the rank's next wait for a batch instead.
            from torch.utils.data._utils.signal_handling import _remove_worker_pids

            _remove_worker_pids(id(iterator))
            iterator._worker_pids_set = False
        return iterator

    def _next_batch(self) -> dict:
        """The next batch from the DataLoader; with workers, each wait of ``POLL_S`` runs the
        watchdog's checks (:mod:`.watchdog`)."""
        if self._iterator is None:
            self._iterator = self._start()
        if self.cfg.num_workers == 0:
            return next(self._iterator)
        watchdog = self._watchdog()
        while True:
            try:
                return next(self._iterator)
            except (RuntimeError, EOFError, ConnectionError) as e:  # EOF: killed mid-send
                if isinstance(e, LoaderError):
                    raise
                timed_out = str(e).startswith("DataLoader timed out")
                broken = isinstance(e, (EOFError, ConnectionError))
                # A worker killed while it hands over a batch breaks the connection a moment
                # before the kernel reports its exit: look for the dead worker for a while.
                deadline = time.monotonic() + (WORKER_EXIT_WAIT_S if broken else 0)
                while True:
                    try:
                        watchdog.check(list(getattr(self._iterator, "_workers", [])))
                    except LoaderError as error:
                        self._failed = True
                        raise error from None
                    if time.monotonic() >= deadline:
                        break
                    time.sleep(0.05)
                if broken:
                    self._failed = True
                    raise LoaderError(
                        f"rank {watchdog.rank}: the data loader's worker connection broke "
                        f"({type(e).__name__}: {e}) and no worker exited"
                    ) from e
                if not timed_out:
                    raise

    def __next__(self) -> dict:
        batch = self._next_batch()
        if "_raise" in batch:
            raise batch["_raise"]
        self.states[int(batch.pop("_stream"))] = batch.pop("_state")
        batch.pop("_epoch")
        bad, records = batch.pop("_bad"), batch.pop("_bad_samples")
        self.consumed += 1
        self._count_batch(bad, records)
        return batch

    def close(self) -> None:
        """Stop the worker processes (a later ``next()`` starts them again). Also done at
        interpreter exit: the workers ignore SIGTERM, which ``multiprocessing`` would wait on,
        so one that is still alive after the DataLoader's shutdown gets SIGKILL (at once when the
        watchdog found a dead or stuck worker)."""
        if self._iterator is not None:
            workers = list(getattr(self._iterator, "_workers", []))
            if self._failed:
                for worker in workers:
                    if worker.is_alive():
                        worker.kill()
            shutdown = getattr(self._iterator, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            for worker in workers:
                if worker.is_alive():
                    worker.kill()
                    worker.join(timeout=5)
            self._iterator = None
            self._failed = False

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
