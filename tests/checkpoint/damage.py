"""Ways to damage a saved checkpoint folder, and what verification must say about each."""

from __future__ import annotations

from pathlib import Path


def _largest_shard(step_dir: Path) -> Path:
    return max(step_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)


def truncate_shard(step_dir: Path) -> None:
    shard = _largest_shard(step_dir)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def delete_shard(step_dir: Path) -> None:
    _largest_shard(step_dir).unlink()


def truncate_metadata(step_dir: Path) -> None:
    meta = step_dir / ".metadata"
    data = meta.read_bytes()
    meta.write_bytes(data[: len(data) // 2])


def flip_bytes(step_dir: Path) -> None:
    """Invert 4 bytes in the middle of the largest shard: same size, different contents."""
    shard = _largest_shard(step_dir)
    data = bytearray(shard.read_bytes())
    middle = len(data) // 2
    for i in range(middle, middle + 4):
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))


def truncate_manifest(step_dir: Path) -> None:
    manifest = step_dir / "checksums.json"
    manifest.write_text(manifest.read_text()[:40])


#: name -> (damage function, fragments the verification report must contain)
DAMAGE = {
    "truncated_shard": (truncate_shard, [".distcp: size mismatch", "truncated"]),
    "deleted_shard": (delete_shard, [".distcp: missing"]),
    "truncated_metadata": (truncate_metadata, [".metadata: size mismatch", "unreadable metadata"]),
    "flipped_bytes": (flip_bytes, [".distcp: hash mismatch", "contents changed"]),
}
