"""Requests a read costs, counted at the GCS emulator: the manifest and the index (which carries
every shard's footer and the shared indexes, storage/shards/footers.py), then one ranged read per
run of wanted row groups; datasets written before the footers rode in the index still read the
same values (a footer per shard, once); damaged copies are a DatasetError saying what to do."""

from __future__ import annotations

import io
import threading

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from storage import fs as sfs
from storage.shards import DatasetError, open_dataset
from storage.shards import fetch as sfetch
from storage.shards.fetch import ShardReader, group_range
from storage.shards.footers import COPIES_KEY
from storage.synth import synthesize
from tests import gcs_emulator as _emulator
from tests.gcs_emulator import Gcs
from workers.chunks import chunk_pieces, read_chunk

gcs_emulator, gcs = _emulator.gcs_emulator, _emulator.gcs  # fixtures

N = 96
ROWS_PER_SHARD = 32  # 3 shards
ROWS_PER_GROUP = 8


@pytest.fixture(autouse=True)
def _no_disk_cache(monkeypatch):
    # Every read reaches the store: the counts are of requests, not of cache misses.
    monkeypatch.setenv("ORCHESTRATOR_CACHE", "off")


def _synth(uri: str) -> dict:
    return synthesize(uri, N, seed=4, image_size=32, rows_per_shard=ROWS_PER_SHARD, rows_per_group=ROWS_PER_GROUP,
                      workers=1)


def _as_written_before(uri: str) -> None:
    """Make the dataset what this code wrote before the copies: an index without them (the same
    table, the same write call) and a manifest without "footers"."""
    index_uri = sfs.join(uri, "index.parquet")
    table = pq.read_table(pa.BufferReader(sfs.read_bytes(index_uri)))
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    sfs.write_bytes(index_uri, buf.getvalue())
    manifest = sfs.read_json(sfs.join(uri, "manifest.json"))
    del manifest["footers"]
    sfs.write_json(sfs.join(uri, "manifest.json"), manifest)


def _gets(gcs: Gcs) -> dict[str, int]:
    """GETs at the emulator by object: manifest, index, shared index, shard files, shared parts."""
    out = {"manifest": 0, "index": 0, "shared_index": 0, "shards": 0, "shared_parts": 0, "other": 0}
    for p in gcs.proxy.counters.paths:
        if not p.startswith("GET "):
            out["other"] += 1
        elif "manifest.json" in p:
            out["manifest"] += 1
        elif "shared%2Fbg%2Findex.parquet" in p:
            out["shared_index"] += 1
        elif "index.parquet" in p:
            out["index"] += 1
        elif "shards%2Fshard-" in p:
            out["shards"] += 1
        elif "shared%2Fbg%2Fpart-" in p:
            out["shared_parts"] += 1
        else:
            out["other"] += 1
    return out


def test_a_whole_read_costs_manifest_index_and_one_range_per_shard(gcs: Gcs):
    """Breaks if a footer is fetched per shard again, the manifest costs more than one GET, the
    shared index is fetched beside the index, or a shard's contiguous row groups take two ranges."""
    uri = gcs.uri("ds")
    m = _synth(uri)
    parts = len(m["shared"]["bg"]["files"])
    assert len(m["shards"]) == 3 and m["footers"]["files"] == 3 + parts + 1  # shards, bg parts, the bg index
    gcs.proxy.reset_counters()
    ds = open_dataset(uri)
    rows = ds.read_samples(np.arange(N))
    assert rows["sample_id"].tolist() == list(range(N))
    assert _gets(gcs) == {"manifest": 1, "index": 1, "shared_index": 0, "shards": 3, "shared_parts": parts,
                          "other": 0}
    assert ds.reader.stats.requests == 3
    assert ds.requests() == len(gcs.proxy.counters.paths)  # what benchmarks report is what the store saw


def test_a_chunk_in_pieces_costs_one_range_per_shard_of_each_piece(gcs: Gcs):
    """Breaks if pieces read together fetch footers or the shared index, or a piece's row groups
    in one shard take more than one range."""
    uri = gcs.uri("ds")
    m = _synth(uri)
    piece_bytes = 2 * m["shards"][0]["bytes"] // 3
    ds = open_dataset(uri)
    ids = np.arange(N)
    pieces = chunk_pieces(ds, ids, piece_bytes)
    assert len(pieces) > 3  # pieces that end inside shards
    ranges = sum(len(np.unique(ds.index_values("shard", ids[p]))) for p in pieces)
    gcs.proxy.reset_counters()
    rows = read_chunk(ds, ids, piece_bytes=piece_bytes, in_flight=3)
    assert rows["sample_id"].tolist() == list(range(N))
    got = _gets(gcs)
    assert got["shards"] == ranges and got["shared_index"] == 0 and got["manifest"] == got["index"] == 0, got


def test_a_slice_reads_its_row_groups_and_no_others(gcs: Gcs, monkeypatch):
    """Breaks if a rank's slice costs a footer per shard, or reads row groups it does not need
    beyond a small gap (with no gap allowed: exactly its row groups' bytes)."""
    uri = gcs.uri("ds")
    _synth(uri)
    ds = open_dataset(uri)
    # shard 0 groups 1-2 (adjacent; group 3 not wanted), shard 2 groups 0 and 2 (a gap of one group)
    ids = np.array([*range(8, 24), 64, 70, 80, 87])
    wanted = set(zip(ds.index_values("shard", ids).tolist(), ds.index_values("row_group", ids).tolist(), strict=True))
    assert wanted == {(0, 1), (0, 2), (2, 0), (2, 2)}
    exact = sum(b - a for a, b in (group_range(ds.reader.footers([s])[s], g) for s, g in wanted))
    gap_start, gap_end = group_range(ds.reader.footers([2])[2], 1)
    monkeypatch.setattr(sfetch, "MERGE_GAP_BYTES", 0)
    gcs.proxy.reset_counters()
    ds.read_samples(ids, columns=("sample_id", "fg_bg"))
    assert _gets(gcs)["shards"] == 3  # shard 0 one range, shard 2 two
    assert ds.reader.stats.bytes_fetched == exact
    monkeypatch.setattr(sfetch, "MERGE_GAP_BYTES", gap_end - gap_start)  # a small gap is read rather than split
    ds = open_dataset(uri)
    gcs.proxy.reset_counters()
    rows = ds.read_samples(ids, columns=("sample_id", "fg_bg"))
    assert rows["sample_id"].tolist() == ids.tolist()
    assert _gets(gcs)["shards"] == 2
    assert exact < ds.reader.stats.bytes_fetched <= exact + gap_end - gap_start


def test_a_dataset_written_before_the_copies_reads_the_same_values_a_footer_per_shard(gcs: Gcs):
    """Breaks if a dataset without footer copies stops reading, reads other values, or costs more
    than one footer per file."""
    uri = gcs.uri("ds")
    m = _synth(uri)
    parts = len(m["shared"]["bg"]["files"])
    new = open_dataset(uri).read_samples(np.arange(N))
    _as_written_before(uri)
    gcs.proxy.reset_counters()
    ds = open_dataset(uri)
    old = ds.read_samples(np.arange(N))
    assert set(old) == set(new)
    for c in new:
        same = np.array_equal(old[c], new[c]) if isinstance(new[c], np.ndarray) else old[c] == new[c]
        assert same, c
    # the manifest, the index, the shared index; a footer and a range per shard and per bg part
    assert _gets(gcs) == {"manifest": 1, "index": 1, "shared_index": 1, "shards": 3 + 3, "shared_parts": 2 * parts,
                          "other": 0}
    assert ds.requests() == len(gcs.proxy.counters.paths)


def test_footers_are_fetched_once_when_pieces_ask_together(tmp_path, monkeypatch):
    """Breaks if concurrent readers of a dataset without copies fetch the same footer twice."""
    uri = str(tmp_path / "ds")
    _synth(uri)
    _as_written_before(uri)
    ds = open_dataset(uri)
    footer_reads: list[int] = []
    real = ShardReader.cat_ranges
    barrier = threading.Barrier(3)

    def spy(self, ranges):
        footer_reads.extend(s for s, _, end in ranges if end == int(self.shards[s]["bytes"]))
        return real(self, ranges)

    monkeypatch.setattr(ShardReader, "cat_ranges", spy)

    def read(ids):
        barrier.wait()
        ds.read_samples(ids, columns=("sample_id", "fg_bg"))

    threads = [threading.Thread(target=read, args=(np.arange(k, N, 3),)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(footer_reads) == [0, 1, 2]


def _damage_copies(uri: str, blob_of) -> str:
    """Rewrite index.parquet with its copies replaced by blob_of(copies) (None: dropped)."""
    index_uri = sfs.join(uri, "index.parquet")
    data = sfs.read_bytes(index_uri)
    table = pq.read_table(pa.BufferReader(data))
    blob = blob_of(pq.read_metadata(pa.BufferReader(data)).metadata[COPIES_KEY.encode()])
    buf = io.BytesIO()
    with pq.ParquetWriter(buf, table.schema, compression="zstd") as w:
        w.write_table(table)
        if blob is not None:
            w.add_key_value_metadata({COPIES_KEY: blob})
    sfs.write_bytes(index_uri, buf.getvalue())
    return index_uri


@pytest.mark.parametrize("damage", ["flipped", "missing"])
def test_damaged_footer_copies_name_the_index_and_what_to_do(tmp_path, damage):
    """Breaks if footer copies that differ from the manifest's seal are trusted, or the error
    hides the index's URI or the fix."""
    uri = str(tmp_path / "ds")
    _synth(uri)
    flip = (lambda b: b[:100] + bytes([b[100] ^ 1]) + b[101:]) if damage == "flipped" else (lambda b: None)
    index_uri = _damage_copies(uri, flip)
    with pytest.raises(DatasetError) as err:
        open_dataset(uri)
    msg = str(err.value)
    assert index_uri in msg and "re-pack" in msg and '"footers"' in msg and "manifest.json" in msg
    assert ("differ" if damage == "flipped" else "missing") in msg and "\n" not in msg
    # what the message says to do works: without the manifest's entry the shards' own footers are read
    manifest = sfs.read_json(sfs.join(uri, "manifest.json"))
    del manifest["footers"]
    sfs.write_json(sfs.join(uri, "manifest.json"), manifest)
    assert open_dataset(uri).read_samples([5, 90])["sample_id"].tolist() == [5, 90]


def test_a_malformed_footers_entry_is_a_manifest_error(tmp_path):
    """Breaks if a broken "footers" entry in the manifest surfaces as a KeyError or TypeError."""
    uri = str(tmp_path / "ds")
    m = _synth(uri)
    for broken in ("x", {**m["footers"], "sha256": 3}, {k: v for k, v in m["footers"].items() if k != "bytes"}):
        sfs.write_json(sfs.join(uri, "manifest.json"), {**m, "footers": broken})
        with pytest.raises(DatasetError) as err:
            open_dataset(uri)
        assert "manifest.json" in str(err.value) and "footers" in str(err.value)


def test_a_footer_copy_that_does_not_end_its_shard_is_refused(tmp_path):
    """Breaks if a copy sealed by the manifest but describing another file is parsed and used."""
    uri = str(tmp_path / "ds")
    m = _synth(uri)
    manifest = {**m, "shards": [{**m["shards"][0], "bytes": m["shards"][0]["bytes"] + 1}, *m["shards"][1:]]}
    sfs.write_json(sfs.join(uri, "manifest.json"), manifest)
    with pytest.raises(Exception) as err:
        open_dataset(uri).read_samples([1])
    assert "shard-00000.parquet" in str(err.value) and "re-pack" in str(err.value)


def test_opening_and_reading_a_dataset_does_not_import_pandas(tmp_path):
    """Breaks if the reader goes back to pyarrow calls that import pandas on first use
    (ChunkedArray.to_numpy, pa.array of numpy): 0.2-0.3 s before a worker's first batch."""
    import os
    import subprocess
    import sys

    from storage.synth import synthesize

    uri = str(tmp_path / "ds")
    synthesize(uri, 40, seed=3, image_size=32, rows_per_group=8, workers=1)
    code = ("import sys, numpy as np\nfrom storage.shards import open_dataset\n"
            f"ds = open_dataset({uri!r})\nids = np.sort(ds.sample_ids)[::3]\n"
            "ds.index_values('shard', ids); ds.read_samples(ids)\nprint('pandas' in sys.modules)\n"
            "from orchestrator.process_exit import leave; leave(0)")  # no teardown for pyarrow's pools to abort in
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(tmp_path),
                          env={**os.environ, "ORCHESTRATOR_CACHE": "off"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
