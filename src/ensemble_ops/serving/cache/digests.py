"""SHA-256 digests of model files, remembered so a large file is hashed once.

Hashing a 30 GB GGUF takes tens of seconds; its digest is kept by resolved path, size and
modification time, in memory and in a small JSON file that later starts read. A file that
changes gets a new size or mtime, so a stale digest is never used.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import structlog

from ensemble_ops.serving.paths import cache_home

__all__ = ["DigestStore", "default_digest_file"]

_log = structlog.get_logger("ensemble_ops.cache")


def default_digest_file() -> Path:
    """``$XDG_CACHE_HOME/ensemble-ops/digests.json`` (``~/.cache`` without it)."""
    return cache_home() / "digests.json"


class DigestStore:
    """Digests by (path, size, mtime); thread-safe, since loads run in worker threads.

    The file is a convenience: when it cannot be read or written (a read-only root file
    system) the digests live in memory only, and that is logged once.
    """

    def __init__(self, file: Path | None) -> None:
        self._file = file
        self._lock = threading.Lock()
        self._entries: dict[str, dict[str, Any]] | None = None  # read on first use
        self._warned = False

    def digest(self, path: Path) -> str:
        """The file's SHA-256 (hex); blocking, run it in a worker thread."""
        resolved = path.resolve()
        before = resolved.stat()
        stamp = {"size": before.st_size, "mtime_ns": before.st_mtime_ns}
        with self._lock:
            entries = self._load()
            known = entries.get(str(resolved))
            if known is not None and {k: known.get(k) for k in stamp} == stamp:
                return str(known["sha256"])
        with resolved.open("rb") as file:
            sha256 = hashlib.file_digest(file, "sha256").hexdigest()
        after = resolved.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            return sha256  # written to while hashed: correct for these bytes, not remembered
        with self._lock:
            entries = self._load()
            for gone in [name for name in entries if not Path(name).exists()]:
                del entries[gone]  # files deleted since: the store stays small
            entries[str(resolved)] = {**stamp, "sha256": sha256}
            self._save(entries)
        return sha256

    def _load(self) -> dict[str, dict[str, Any]]:
        if self._entries is None:
            self._entries = {}
            data: object = {}
            if self._file is not None:
                try:
                    data = json.loads(self._file.read_text(encoding="utf-8"))
                except FileNotFoundError:
                    pass
                except (OSError, ValueError) as err:
                    self._warn(err)
            if isinstance(data, dict):
                self._entries = {k: v for k, v in data.items() if isinstance(v, dict)}
        return self._entries

    def _save(self, entries: dict[str, dict[str, Any]]) -> None:
        if self._file is None:
            return
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            # Write then rename: replicas sharing the file never read half of one.
            fd, name = tempfile.mkstemp(dir=self._file.parent, prefix=".digests-")
            temp = Path(name)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump(entries, out, indent=1, sort_keys=True)
                temp.replace(self._file)
            finally:
                temp.unlink(missing_ok=True)
        except OSError as err:
            self._warn(err)

    def _warn(self, err: Exception) -> None:
        if not self._warned:
            self._warned = True
            _log.warning(
                "cache.digest_file_unusable",
                file=str(self._file),
                error=str(err),
                consequence="model digests are kept in memory only",
            )
