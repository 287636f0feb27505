"""Per-rank logging: rank 0 on the console, other ranks only errors there, every rank a file;
known harmless warnings filtered. Each case runs in a fresh interpreter (logging is global)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import logging, sys, warnings
    from blip_recipes.metrics.run_logging import attach_rank_log_file, configure_logging
    rank = int(sys.argv[1])
    configure_logging(rank)
    path = attach_rank_log_file(sys.argv[2], rank)
    log = logging.getLogger("blip_pretrain")
    log.info("hello from %d", rank)
    log.error("trouble on %d", rank)
    warnings.warn("a python warning", UserWarning)
    print("path", path)
    """
)


def _run(rank, tmp_path):
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, str(rank), str(tmp_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


def test_rank0_console_and_file(tmp_path):
    proc = _run(0, tmp_path)
    assert "hello from 0" in proc.stderr and "trouble on 0" in proc.stderr
    assert "a python warning" in proc.stderr
    text = (tmp_path / "logs" / "rank0.log").read_text()
    assert "[rank0] blip_pretrain INFO hello from 0" in text and "a python warning" in text


def test_other_ranks_write_their_file_and_only_errors_to_the_console(tmp_path):
    proc = _run(3, tmp_path)
    assert "hello from 3" not in proc.stderr and "a python warning" not in proc.stderr
    assert "[rank3] blip_pretrain ERROR trouble on 3" in proc.stderr
    text = (tmp_path / "logs" / "rank3.log").read_text()
    assert "hello from 3" in text and "trouble on 3" in text and "a python warning" in text
    assert not (tmp_path / "logs" / "rank0.log").exists()
