"""Many short strings kept compactly: zlib-compressed blocks in one byte buffer.

Python keeps a ``str`` in about 50 bytes of overhead plus its text, and a list adds a pointer
per item, so a million annotation records as Python objects cost hundreds of MiB in every loader
process. :class:`PackedStrings` stores them as ``block_size`` strings per zlib block (joined by
newlines) in one ``bytes`` buffer with an int64 offset per block: about a third of the UTF-8 text
for captions and file paths, a few bytes per string of index, and a pickle of about the same size
(what loader workers receive). Reading string ``i`` decompresses its block (tens of microseconds,
small next to decoding an image); the last block read is cached for sequential access.
"""

from __future__ import annotations

import zlib

import numpy as np

#: Strings per compressed block: larger blocks compress better and read slower.
BLOCK_SIZE = 64


class PackedStrings:
    """An immutable sequence of strings without newlines, stored compressed.

    Build with :meth:`from_iterable` (or ``append`` then ``finish``); read with ``packed[i]``.

    Args:
        block_size: strings per compressed block.
    """

    def __init__(self, block_size: int = BLOCK_SIZE) -> None:
        self.block_size = block_size
        self._pending: list[str] = []
        self._blocks: list[bytes] = []
        self._length = 0
        self._buffer = b""
        self._block_offsets = np.zeros(1, dtype=np.int64)
        self._cache: tuple[int, list[str]] | None = None

    @classmethod
    def from_iterable(cls, strings, block_size: int = BLOCK_SIZE) -> PackedStrings:
        packed = cls(block_size)
        for s in strings:
            packed.append(s)
        return packed.finish()

    def append(self, s: str) -> None:
        """Add one string (it must not contain a newline; JSON text never does)."""
        if "\n" in s:
            raise ValueError(f"PackedStrings cannot hold a newline: {s[:80]!r}")
        self._pending.append(s)
        self._length += 1
        if len(self._pending) == self.block_size:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._blocks.append(zlib.compress("\n".join(self._pending).encode("utf-8"), 6))
            self._pending = []

    def finish(self) -> PackedStrings:
        """Seal the buffer (no more ``append``); returns ``self``."""
        self._flush()
        sizes = [len(b) for b in self._blocks]
        self._block_offsets = np.cumsum([0, *sizes], dtype=np.int64)
        self._buffer = b"".join(self._blocks)
        self._blocks = []
        return self

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> str:
        if not 0 <= index < self._length:
            raise IndexError(f"index {index} out of range for {self._length} strings")
        block, within = divmod(index, self.block_size)
        if self._cache is None or self._cache[0] != block:
            start, end = self._block_offsets[block], self._block_offsets[block + 1]
            text = zlib.decompress(self._buffer[start:end]).decode("utf-8")
            self._cache = (block, text.split("\n"))
        return self._cache[1][within]

    @property
    def nbytes(self) -> int:
        """Bytes held: the compressed buffer and the block offsets."""
        return len(self._buffer) + self._block_offsets.nbytes

    def __getstate__(self) -> dict:
        if self._pending or self._blocks:
            raise RuntimeError("PackedStrings: call finish() before pickling")
        return {
            "block_size": self.block_size,
            "length": self._length,
            "buffer": self._buffer,
            "block_offsets": self._block_offsets,
        }

    def __setstate__(self, state: dict) -> None:
        self.block_size = state["block_size"]
        self._length = state["length"]
        self._buffer = state["buffer"]
        self._block_offsets = state["block_offsets"]
        self._pending, self._blocks, self._cache = [], [], None
