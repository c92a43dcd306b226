"""The storage root's mark: is the storage this node writes to the one its store belongs to?

Nodes that share a store mount one storage root (NFS or similar). When the share is not mounted, the
mount point is an empty folder on the local disk, and a receiver that simply wrote there would
acknowledge instances that no other node can read, and that vanish from view when the share comes
back. So the root carries a mark, ``.petriage-storage``, holding an identity that the store keeps too
(setting ``storage-mark``, schema revision 0003):

- at start, a node makes the mark if the root has none (the first node of a new store, or a store
  made before marks existed) and checks that the store knows it; a root whose mark is missing or
  not the store's is refused with a message that names the likely cause;
- while it runs, the receiver checks the mark (at most once a second) before it writes an instance,
  and a worker before it claims a job: a missing mark means the share is gone, so C-STORE is refused
  with a status the sender retries (0xA700) and no job is started.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

from node.errors import NodeError
from node.store import Store

MARK = ".petriage-storage"
SETTING = "storage-mark"


class StorageMarkError(NodeError):
    """The storage root is not the one this node's store belongs to (or cannot be marked)."""


class StorageMark:
    """The identity the root must hold; ``present()`` reads the mark at most every ``check_seconds``."""

    def __init__(self, root: Path, identity: str, check_seconds: float = 1.0):
        self.root, self.identity, self.check_seconds = Path(root), identity, check_seconds
        self._lock = threading.Lock()
        self._checked_at = -float("inf")
        self._present = False

    @property
    def path(self) -> Path:
        return self.root / MARK

    def present(self) -> bool:
        with self._lock:
            now = time.monotonic()
            if now - self._checked_at >= self.check_seconds:
                self._present = read_mark(self.root) == self.identity
                self._checked_at = now
            return self._present


def read_mark(root: Path) -> str | None:
    try:
        return (Path(root) / MARK).read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _write_new_mark(root: Path) -> None:
    """Create the mark with a fresh identity; the first writer wins (O_EXCL), others keep theirs."""
    try:
        fd = os.open(Path(root) / MARK, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    try:
        os.write(fd, f"{uuid.uuid4().hex}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    dir_fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def claim_storage(root: Path, store: Store) -> StorageMark:
    """The root's mark, made if missing, checked against the store's; StorageMarkError if they differ."""
    root = Path(root)
    try:
        if read_mark(root) is None:
            _write_new_mark(root)
    except OSError as exc:
        raise StorageMarkError(f"storage.root {root}: cannot write its mark {MARK}: {exc.strerror or exc}") from exc
    mine = read_mark(root)
    if mine is None:
        raise StorageMarkError(f"storage.root {root}: its mark {MARK} cannot be read")
    known = store.setting_once(SETTING, mine)
    if known != mine:
        raise StorageMarkError(
            f"storage.root {root} is not the storage of this store (its mark {mine[:8]}..., the store's "
            f"{known[:8]}...): is the shared storage mounted at {root} on this host? (A new, empty store for "
            f"old storage, or the reverse, is refused too.)")
    return StorageMark(root, mine)
