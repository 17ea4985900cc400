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


class Outbox:
    def __init__(self, path: Path, device: str, batch_rows: int = 256, flush_seconds: float = 5.0,
                 resend_seconds: float = 10.0, max_rows: int = 1_000_000):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable against a process crash
        self.db.executescript(SCHEMA)
        self.device = device
        self.batch_rows = min(batch_rows, MAX_ROWS)
        self.flush_seconds = flush_seconds
        self.resend_seconds = resend_seconds
        self.max_rows = max_rows
        self.epoch = self._epoch()
        self.dropped = 0

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
        return int(cursor.lastrowid or 0)

    def recorded(self) -> int:
        """Decisions ever recorded in this epoch (the AUTOINCREMENT counter survives deletions)."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name='rows'").fetchone()
        return int(row[0]) if row else 0

    def pending_rows(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM rows").fetchone()[0])

    def seal(self, force: bool = False) -> int:
        """Pack unbatched rows into batches when enough are waiting or the oldest is old; returns batches made."""
        made = 0
        while True:
            count, oldest = self.db.execute("SELECT COUNT(*), MIN(added) FROM rows WHERE batch IS NULL").fetchone()
            if not count or (count < self.batch_rows and not force and time.time() - oldest < self.flush_seconds):
                return made
            self._seal_one()
            made += 1

    def _seal_one(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            ids = [r[0] for r in self.db.execute("SELECT id FROM rows WHERE batch IS NULL ORDER BY id LIMIT ?",
                                                 (self.batch_rows,))]
            seq = int(self.db.execute("INSERT INTO batches (created, sent, payload) VALUES (?, NULL, x'')",
                                      (time.time(),)).lastrowid or 0)
            rows = self.db.execute(
                "SELECT id, time, obs, mask, action, log_prob, override, reward, source, policy_version FROM rows "
                f"WHERE id IN ({','.join('?' * len(ids))}) ORDER BY id", ids).fetchall()
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
            self.db.execute(f"UPDATE rows SET batch=? WHERE id IN ({','.join('?' * len(ids))})", [seq, *ids])
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

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
        if epoch != self.epoch:
            return False
        self.db.execute("BEGIN IMMEDIATE")
        self.db.execute("DELETE FROM rows WHERE batch=?", (seq,))
        deleted = self.db.execute("DELETE FROM batches WHERE seq=?", (seq,)).rowcount
        self.db.execute("COMMIT")
        return deleted > 0

    def enforce_cap(self) -> int:
        """Drop the oldest rows beyond ``max_rows`` (a controller offline for weeks must not fill its disk)."""
        excess = self.pending_rows() - self.max_rows
        if excess <= 0:
            return 0
        self.db.execute("DELETE FROM rows WHERE id IN (SELECT id FROM rows WHERE batch IS NULL ORDER BY id LIMIT ?)",
                        (excess,))
        self.dropped += excess
        log.warning("outbox over %d rows: dropped the %d oldest", self.max_rows, excess)
        return excess

    def close(self) -> None:
        self.db.close()
