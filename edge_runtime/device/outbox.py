"""The controller's rollout outbox: SQLite in WAL mode, rows deleted only once the server acknowledges.

Each decision is one committed row, so a crash loses at most the decision being written. Rows are
sealed into batches whose packed bytes are stored, so a batch resent after a reconnect or a restart
is byte-identical and the collector can drop the copy by (epoch, seq).
"""

from __future__ import annotations

import logging
import secrets
import sqlite3
import time
from pathlib import Path

import numpy as np

from edge_runtime.rollouts import COLUMNS, MAX_ROWS, Batch, pack

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY AUTOINCREMENT, batch INTEGER, added REAL, time REAL, obs BLOB, mask BLOB, action INTEGER,
    log_prob REAL, override INTEGER, reward REAL, source INTEGER, policy_version INTEGER);
CREATE INDEX IF NOT EXISTS rows_batch ON rows(batch);
CREATE TABLE IF NOT EXISTS batches (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, created REAL, sent REAL, payload BLOB);
"""


CHECKPOINT_ROWS = 64  # rows between checkpoints: each row writes whole pages to the WAL, so it stays under 1 MiB


class Outbox:
    def __init__(self, path: Path, device: str, batch_rows: int = 256, flush_seconds: float = 5.0,
                 resend_seconds: float = 10.0, max_rows: int = 1_000_000):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against a process crash
        # A controller's state partition is small: SQLite's own checkpoints (every 1,000 pages, inside whichever
        # insert crosses the mark, with an fsync) leave a 4 MiB WAL on disk and a slow decision now and then.
        # :meth:`seal` checkpoints instead, outside the decisions, and truncates the WAL; a 512 KiB page cache
        # keeps the daemon lean.
        self.db.execute("PRAGMA wal_autocheckpoint=0")
        self.db.execute("PRAGMA cache_size=-512")
        self._since_checkpoint = 0
        self.db.executescript(SCHEMA)
        self.device = device
        self.batch_rows = min(batch_rows, MAX_ROWS)
        self.flush_seconds = flush_seconds
        self.resend_seconds = resend_seconds
        self.max_rows = max_rows
        self.epoch = self._epoch()
        # Counters kept in memory: the decision loop reads them every iteration, COUNT(*) is O(rows)
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name='rows'").fetchone()
        self._recorded = int(row[0]) if row else 0
        self._pending = int(self.db.execute("SELECT COUNT(*) FROM rows").fetchone()[0])
        self._unbatched, self._oldest = self.db.execute(
            "SELECT COUNT(*), MIN(added) FROM rows WHERE batch IS NULL").fetchone()

    def _epoch(self) -> int:
        row = self.db.execute("SELECT value FROM meta WHERE key='epoch'").fetchone()
        if row:
            return int(row[0])
        epoch = secrets.randbits(63)
        self.db.execute("INSERT INTO meta VALUES ('epoch', ?)", (str(epoch),))
        return epoch

    def add(self, t: float, obs: np.ndarray, mask: np.ndarray, action: int, log_prob: float, override: bool,
            reward: float, source: int, policy_version: int) -> int:
        cursor = self.db.execute(
            "INSERT INTO rows (added, time, obs, mask, action, log_prob, override, reward, source, policy_version) "
            "VALUES (?,?,?,?,?,?,?,?,?,?)",
            (time.time(), t, obs.astype(np.float32).tobytes(), mask.astype(bool).tobytes(), action, log_prob,
             int(override), reward, source, policy_version))
        self._recorded = int(cursor.lastrowid or 0)
        self._since_checkpoint += 1
        self._pending += 1
        self._unbatched += 1
        if self._oldest is None:
            self._oldest = time.time()
        return self._recorded

    def recorded(self) -> int:
        """Decisions ever recorded in this epoch (the AUTOINCREMENT id: deletions do not lower it)."""
        return self._recorded

    def pending_rows(self) -> int:
        """Rows not yet acknowledged."""
        return self._pending

    def _refresh_oldest(self) -> None:
        self._oldest = self.db.execute("SELECT MIN(added) FROM rows WHERE batch IS NULL").fetchone()[0]

    def seal(self, force: bool = False) -> int:
        """Pack unbatched rows into batches when enough are waiting or the oldest is old; returns batches made.
        Every ``CHECKPOINT_ROWS`` rows it also moves the WAL into the database and truncates it."""
        if self._since_checkpoint >= CHECKPOINT_ROWS:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._since_checkpoint = 0
        made = 0
        while self._unbatched and (force or self._unbatched >= self.batch_rows
                                   or time.time() - self._oldest >= self.flush_seconds):
            self._unbatched -= self._seal_one()
            self._refresh_oldest()
            made += 1
        return made

    def _seal_one(self) -> int:
        """The oldest unbatched rows (at most batch_rows) become one stored batch; returns its row count."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            seq = int(self.db.execute("INSERT INTO batches (created, sent, payload) VALUES (?, NULL, x'')",
                                      (time.time(),)).lastrowid or 0)
            rows = self.db.execute(
                "SELECT id, time, obs, mask, action, log_prob, override, reward, source, policy_version FROM rows "
                "WHERE batch IS NULL ORDER BY id LIMIT ?", (self.batch_rows,)).fetchall()
            columns = {
                "decision": np.array([r[0] for r in rows], dtype=np.int64),
                "time": np.array([r[1] for r in rows], dtype=np.float64),
                "obs": np.frombuffer(b"".join(r[2] for r in rows), dtype=np.float32).reshape(len(rows), -1),
                "mask": np.frombuffer(b"".join(r[3] for r in rows), dtype=bool).reshape(len(rows), -1),
            }
            for k, name in enumerate(("action", "log_prob", "override", "reward", "source", "policy_version"), 4):
                columns[name] = np.array([r[k] for r in rows], dtype=COLUMNS[name][0])
            payload = pack(Batch(self.device, self.epoch, seq, columns))
            self.db.execute("UPDATE batches SET payload=? WHERE seq=?", (payload, seq))
            # the rows taken are exactly the unbatched ones up to the last id taken
            self.db.execute("UPDATE rows SET batch=? WHERE batch IS NULL AND id <= ?", (seq, rows[-1][0]))
            self.db.execute("COMMIT")
        except BaseException:
            self.rollback()
            raise
        return len(rows)

    def due(self, limit: int = 16) -> list[tuple[int, bytes]]:
        """Batches never sent or unacknowledged for ``resend_seconds``; marks them sent now."""
        now = time.time()
        rows = self.db.execute("SELECT seq, payload FROM batches WHERE sent IS NULL OR sent < ? ORDER BY seq LIMIT ?",
                               (now - self.resend_seconds, limit)).fetchall()
        if rows:
            self.db.executemany("UPDATE batches SET sent=? WHERE seq=?", [(now, seq) for seq, _ in rows])
        return [(int(seq), bytes(payload)) for seq, payload in rows]

    def resend_all(self) -> None:
        """After a reconnect: everything unacknowledged goes out again at once."""
        self.db.execute("UPDATE batches SET sent=NULL")

    def ack(self, epoch: int, seq: int) -> bool:
        return epoch == self.epoch and self._delete_batch(seq) > 0

    def _delete_batch(self, seq: int) -> int:
        """Delete a batch and its rows; returns the rows deleted (0: no such batch)."""
        self.db.execute("BEGIN IMMEDIATE")
        try:
            rows = self.db.execute("DELETE FROM rows WHERE batch=?", (seq,)).rowcount
            self.db.execute("DELETE FROM batches WHERE seq=?", (seq,))
            self.db.execute("COMMIT")
        except BaseException:  # a full disk fails the delete too: leave no transaction open behind it
            self.rollback()
            raise
        self._pending -= rows
        return rows

    def enforce_cap(self) -> int:
        """Drop the oldest rows, whole batches first, beyond ``max_rows`` (a controller offline for weeks must not
        fill its disk); returns the rows dropped."""
        dropped = 0
        while self._pending > self.max_rows:
            oldest = self.db.execute("SELECT MIN(seq) FROM batches").fetchone()[0]
            if oldest is not None:
                gone = self._delete_batch(oldest)
            else:
                gone = self.db.execute("DELETE FROM rows WHERE id IN (SELECT id FROM rows WHERE batch IS NULL "
                                       "ORDER BY id LIMIT ?)", (self._pending - self.max_rows,)).rowcount
                self._pending -= gone
                self._unbatched -= gone
                self._refresh_oldest()
            if not gone:
                break
            dropped += gone
        if dropped:
            log.warning("outbox over %d rows: dropped the %d oldest", self.max_rows, dropped)
        return dropped

    def rollback(self) -> None:
        """End a failed transaction (SQLite may already have ended it itself, as on a full disk)."""
        if self.db.in_transaction:
            self.db.execute("ROLLBACK")

    def close(self) -> None:
        self.db.close()
