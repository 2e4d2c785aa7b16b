"""A local MLflow store (sqlite) that survives the machine: a copy of the run in run storage.

In local mode MLflow's sqlite file stays on the machine's own disk (SQLite's locking is not to be
trusted on network filesystems such as a Drive mount, and a VM that dies mid-write can leave a
synced file torn). What survives the VM is a copy of the run's records (its experiment, run,
params, tags and every metric point), taken with SQLite's online backup API, so it is a
consistent snapshot even while other processes write, and written into run storage beside the
checkpoints (`mlflow-store.db.gz`, with `mlflow-store.json` saying what it holds).

The chief worker writes the copy right after each checkpoint's metrics reach MLflow
(`workers/train/checkpointer.py`, `Checkpointer.save`), so the copy holds every point up to the checkpoint
just committed. A copy that lags one checkpoint (the VM died between the commit and the copy)
loses nothing either: each checkpoint carries its own pending points and the resume re-sends
them (deduplicated), as it always did after a cut.

On a fresh machine `orchestrator run` calls `restore` before it resumes: with no local store the
copy becomes the store; a local store that lacks the run, or holds fewer of its points than the
copy, gets the run's rows from the copy (other runs in it are left as they are). The MLflow run
then continues under the same id with its whole history. A tracking server (http://...) needs
none of this.
"""

from __future__ import annotations

import gzip
import logging
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from storage import fs

log = logging.getLogger(__name__)

COPY_DB = "mlflow-store.db.gz"  # in the run's directory in run storage (gzip: ~1 MB of mostly empty schema -> ~50 KB)
COPY_JSON = "mlflow-store.json"  # what the copy holds: run id, experiment, counts, MLflow schema
SQLITE_PREFIX = "sqlite:///"
BUSY_TIMEOUT_S = 30.0


def sqlite_path(tracking_uri: str | None) -> str | None:
    """The database file of a sqlite:/// tracking URI; None for a server or anything else."""
    if not tracking_uri or not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    path = tracking_uri[len(SQLITE_PREFIX):].split("?", 1)[0]
    return os.path.abspath(path)


def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT_S)
    return sqlite3.connect(path, timeout=BUSY_TIMEOUT_S)


def _tables(con: sqlite3.Connection, schema: str = "main") -> dict[str, list[str]]:
    names = [r[0] for r in con.execute(
        f"SELECT name FROM {schema}.sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
    return {n: [r[1] for r in con.execute(f"PRAGMA {schema}.table_info('{n}')")] for n in names}


def _schema_version(con: sqlite3.Connection, schema: str = "main") -> str | None:
    try:
        row = con.execute(f"SELECT version_num FROM {schema}.alembic_version").fetchone()
    except sqlite3.Error:
        return None
    return row[0] if row else None


def _counts(con: sqlite3.Connection, run_id: str, schema: str = "main") -> dict[str, int]:
    """How much of the run a store holds: 0 runs when it lacks the run."""
    out = {}
    for table in ("runs", "metrics", "tags"):
        try:
            out[table] = int(con.execute(f"SELECT COUNT(*) FROM {schema}.{table} WHERE run_uuid = ?",
                                         (run_id,)).fetchone()[0])
        except sqlite3.Error:  # not an MLflow store (yet)
            out[table] = 0
    return out


def save_copy(tracking_uri: str, run_id: str, run_dir: str) -> dict[str, Any] | None:
    """Write the run's records from the local sqlite store into run storage; None (nothing to
    do) for a tracking server. The copy holds only this run and its experiment, so its size
    follows the run's history, not everything else the local store has seen."""
    db = sqlite_path(tracking_uri)
    if db is None or not os.path.exists(db):
        return None
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="orch-mlflow-") as tmp:
        path = os.path.join(tmp, "copy.db")
        src, dst = _connect(db, readonly=True), _connect(path)
        try:
            src.backup(dst)  # one consistent snapshot, whatever other writers are doing
        finally:
            src.close()
        try:
            row = dst.execute("SELECT experiment_id FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()
            if row is None:
                raise LookupError(f"MLflow run {run_id} is not in {db}")
            exp_id = row[0]
            for table, cols in _tables(dst).items():
                if "run_uuid" in cols:
                    dst.execute(f"DELETE FROM {table} WHERE run_uuid != ?", (run_id,))
                elif table == "experiments" or table == "experiment_tags":
                    # The Default experiment (0) stays: MLflow expects it in a store it opens.
                    dst.execute(f"DELETE FROM {table} WHERE experiment_id NOT IN (0, ?)", (exp_id,))
                elif "experiment_id" in cols:
                    dst.execute(f"DELETE FROM {table} WHERE experiment_id != ?", (exp_id,))
            dst.commit()
            exp_name = dst.execute("SELECT name FROM experiments WHERE experiment_id = ?", (exp_id,)).fetchone()[0]
            info = {"run_id": run_id, "experiment_id": str(exp_id), "experiment": exp_name,
                    "schema": _schema_version(dst), **_counts(dst, run_id), "saved_at": time.time()}
            dst.execute("VACUUM")
        finally:
            dst.close()
        with open(path, "rb") as f:
            data = gzip.compress(f.read(), compresslevel=6)
    # The database first, then the note that describes it: a cut between the two leaves a
    # database at least as new as its note says.
    fs.write_bytes_durable(fs.join(run_dir, COPY_DB), data)
    info["bytes"] = len(data)
    fs.write_json(fs.join(run_dir, COPY_JSON), info, durable=True)
    log.debug("MLflow store copy of run %s: %d bytes in %.3f s", run_id, len(data), time.perf_counter() - t0)
    return info


@dataclass
class Restored:
    how: str  # "copied" (no local store), "merged" (the run's rows into an existing store)
    experiment_id: str  # the run's experiment in the local store (a merge may renumber it)
    metric_points: int
    seconds: float


def restore(tracking_uri: str, run_id: str, run_dir: str) -> Restored | None:
    """Bring the run's copy from run storage into the local sqlite store when the local one lacks
    the run or holds less of it. None when nothing was needed (or there is no copy)."""
    db = sqlite_path(tracking_uri)
    if db is None:
        return None
    info_uri = fs.join(run_dir, COPY_JSON)
    if not fs.exists(info_uri):
        return None
    info = fs.read_json(info_uri)
    if info.get("run_id") != run_id:
        log.warning("%s describes MLflow run %s, not this run's %s: not restored", info_uri, info.get("run_id"), run_id)
        return None
    if os.path.exists(db):
        con = _connect(db, readonly=True)
        try:
            have = _counts(con, run_id)
        finally:
            con.close()
        if have["runs"] and have["metrics"] >= int(info.get("metrics", 0)) and have["tags"] >= int(info.get("tags", 0)):
            return None  # this machine's store is as new as the copy, or newer
    t0 = time.perf_counter()
    data = gzip.decompress(fs.read_bytes(fs.join(run_dir, COPY_DB)))
    os.makedirs(os.path.dirname(db) or ".", exist_ok=True)
    if not os.path.exists(db):
        tmp = f"{db}.restore-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, db)  # a store appears whole or not at all
        con = _connect(db, readonly=True)
        try:
            exp_id = str(con.execute("SELECT experiment_id FROM runs WHERE run_uuid = ?", (run_id,)).fetchone()[0])
            points = _counts(con, run_id)["metrics"]
        finally:
            con.close()
        return Restored("copied", exp_id, points, time.perf_counter() - t0)
    with tempfile.TemporaryDirectory(prefix="orch-mlflow-") as tmp:
        copy = os.path.join(tmp, "copy.db")
        with open(copy, "wb") as f:
            f.write(data)
        exp_id, points = _merge(db, copy, run_id)
    return Restored("merged", exp_id, points, time.perf_counter() - t0)


def _merge(db: str, copy: str, run_id: str) -> tuple[str, int]:
    """Replace the run's rows in `db` with the copy's, in one transaction; the run's experiment
    is matched by name (made if absent, renumbered if its id is taken by another experiment)."""
    con = _connect(db)
    try:
        con.execute("ATTACH DATABASE ? AS c", (copy,))
        mine, theirs = _schema_version(con, "main"), _schema_version(con, "c")
        if mine != theirs:
            raise RuntimeError(f"{db} is at MLflow schema {mine}, the run's copy at {theirs}; "
                               "install the MLflow version the run used (constraints.txt), or move the local store "
                               "away")
        local, copied = _tables(con, "main"), _tables(con, "c")
        con.execute("BEGIN IMMEDIATE")
        old_exp, name = con.execute(
            "SELECT e.experiment_id, e.name FROM c.runs r JOIN c.experiments e ON e.experiment_id = r.experiment_id "
            "WHERE r.run_uuid = ?", (run_id,)).fetchone()
        row = con.execute("SELECT experiment_id FROM main.experiments WHERE name = ?", (name,)).fetchone()
        if row is not None:
            exp_id = row[0]
        else:
            cols = [c for c in local["experiments"] if c in copied["experiments"]]
            taken = con.execute("SELECT 1 FROM main.experiments WHERE experiment_id = ?", (old_exp,)).fetchone()
            if taken:
                cols = [c for c in cols if c != "experiment_id"]  # a new id from the local sequence
            names = ", ".join(cols)
            cur = con.execute(f"INSERT INTO main.experiments ({names}) SELECT {names} FROM c.experiments WHERE "
                              "experiment_id = ?", (old_exp,))
            exp_id = old_exp if not taken else cur.lastrowid
            con.execute("INSERT OR IGNORE INTO main.experiment_tags (key, value, experiment_id) "
                        "SELECT key, value, ? FROM c.experiment_tags WHERE experiment_id = ?", (exp_id, old_exp))
        for table, cols in copied.items():
            if "run_uuid" not in cols or table not in local:
                continue
            shared = ", ".join(c for c in local[table] if c in cols)
            con.execute(f"DELETE FROM main.{table} WHERE run_uuid = ?", (run_id,))
            con.execute(f"INSERT INTO main.{table} ({shared}) SELECT {shared} FROM c.{table} WHERE run_uuid = ?",
                        (run_id,))
        con.execute("UPDATE main.runs SET experiment_id = ? WHERE run_uuid = ?", (exp_id, run_id))
        con.commit()
        points = _counts(con, run_id)["metrics"]
    finally:
        con.close()
    return str(exp_id), points
