"""Selective chunk preload: only the row groups a rank needs, all at once, through a bounded local
cache, every sample checked; a transfer that fails its checksum is fetched once more, a shard
that fails twice stops the read naming it."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from storage import fs as sfs
from storage.cache import ByteCache
from storage.errors import ShardFetchError
from storage.retry import RETRY_COUNTER
from storage.shards import DatasetError, ShardWriter, open_dataset
from storage.synth import synthesize
from tests import gcs_emulator as _emulator
from tests.gcs_emulator import Gcs

gcs_emulator, gcs = _emulator.gcs_emulator, _emulator.gcs  # fixtures

N = 96
ROWS_PER_GROUP = 8


def _synth(uri: str) -> None:
    synthesize(uri, N, seed=3, image_size=32, rows_per_shard=32, rows_per_group=ROWS_PER_GROUP, workers=1)


def _shard_reads(gcs: Gcs) -> list[str]:
    return [p for p in gcs.proxy.counters.paths if "shards%2Fshard-" in p]


@pytest.fixture
def on_gcs(gcs: Gcs, monkeypatch) -> tuple[Gcs, str, dict]:
    uri = gcs.uri("ds")
    _synth(uri)
    local = str(Path(os.environ["ORCHESTRATOR_CACHE_DIR"]).parent / "local-copy")
    _synth(local)
    expected = open_dataset(local).read_samples(np.arange(N))  # before the cache is on: it is content-addressed
    monkeypatch.setenv("ORCHESTRATOR_CACHE", "on")
    gcs.proxy.reset_counters()
    return gcs, uri, expected


def test_a_chunk_is_fetched_as_one_batch_of_ranged_reads_of_its_row_groups(on_gcs):
    """Breaks if preload reads whole shards, one request per sample, or footers on every call."""
    gcs, uri, expected = on_gcs
    ds = open_dataset(uri)
    gcs.proxy.reset_counters()
    # groups 0-1 of shard 0 (adjacent: one range) and group 2 of shard 2
    ids = [3, 12, 9, 70, 68]
    rows = ds.read_samples(ids)
    assert rows["sample_id"].tolist() == ids
    assert [rows["fg_bg"][i] for i in range(len(ids))] == [expected["fg_bg"][i] for i in ids]
    reads = _shard_reads(gcs)
    # the footers came with the index (storage/shards/footers.py): one range per run of adjacent row
    # groups, nothing else (a dataset without them: tests/test_shard_requests.py)
    assert len(reads) == 2
    assert ds.reader.stats.groups_fetched == 3
    gcs.proxy.reset_counters()
    ds.read_samples([71, 1])  # same shards, row groups already cached: no footer, no data request
    assert _shard_reads(gcs) == []


def test_a_restarted_worker_reads_its_chunk_from_the_local_cache(on_gcs):
    """Breaks if a worker that comes back on the same machine downloads its chunk again."""
    gcs, uri, expected = on_gcs
    chunk = np.arange(10, 60, 3)
    open_dataset(uri).read_samples(chunk)
    gcs.proxy.reset_counters()
    restarted = open_dataset(uri)  # a new process would open the dataset afresh like this
    rows = restarted.read_samples(chunk)
    assert _shard_reads(gcs) == []
    assert rows["depth"] == [expected["depth"][i] for i in chunk]
    assert restarted.reader.stats.groups_from_cache > 0 and restarted.reader.stats.groups_fetched == 0


def test_a_transfer_corrupted_in_flight_is_fetched_once_more(on_gcs):
    """Breaks if a flipped bit in a download reaches training, or costs more than one re-fetch."""
    gcs, uri, expected = on_gcs
    ds = open_dataset(uri)
    ds.reader.footers([0])
    gcs.proxy.configure(corrupt_gets=1, corrupt_match="shards%2Fshard-00000")
    whole_group = list(range(ROWS_PER_GROUP))  # the flipped byte then lands in a sample that is checked
    rows = ds.read_samples(whole_group)
    assert gcs.proxy.counters.corrupted == 1 and ds.reader.stats.refetches == 1
    assert rows["fg_bg"] == [expected["fg_bg"][i] for i in whole_group]


def test_transient_faults_during_preload_are_retried_and_counted(on_gcs):
    """Breaks if a 503 or a dropped connection loses samples, or retries go uncounted."""
    gcs, uri, expected = on_gcs
    ds = open_dataset(uri)
    before = RETRY_COUNTER["retries"]
    gcs.proxy.configure(fail_rate=0.25, drop_rate=0.15)
    rows = ds.read_samples(np.arange(N))
    injected = gcs.proxy.counters.failed_503 + gcs.proxy.counters.dropped
    # every 503 is one counted retry (none hidden in gcsfs); aiohttp may itself re-send on a reset pooled connection
    assert gcs.proxy.counters.failed_503 > 0 and gcs.proxy.counters.failed_503 <= RETRY_COUNTER[
        "retries"] - before <= injected
    assert rows["bg"] == expected["bg"]


def test_a_permanent_error_during_preload_names_the_shard_at_once(on_gcs):
    """Breaks if a 403 is retried (minutes lost) or the error does not name the shard."""
    gcs, uri, _ = on_gcs
    ds = open_dataset(uri)
    before = RETRY_COUNTER["retries"]
    gcs.proxy.configure(forbid=True)
    gcs.proxy.reset_counters()
    with pytest.raises(ShardFetchError) as err:
        ds.read_samples([5, 40])
    assert isinstance(err.value, DatasetError)  # the worker reports it to the driver as a data failure
    assert f"{uri}/shards/shard-0000" in str(err.value) and "403" in str(err.value)
    assert RETRY_COUNTER["retries"] == before and gcs.proxy.counters.requests == gcs.proxy.counters.forbidden <= 2


# -- local ---------------------------------------------------------------------------------------


@pytest.fixture
def local(tmp_path) -> str:
    uri = str(tmp_path / "ds")
    _synth(uri)
    return uri


def _flip_image_byte(uri: str, sample_id: int) -> str:
    ds = open_dataset(uri)
    img = ds.read_samples([sample_id])["fg_bg"][0]
    shard = ds.manifest["shards"][int(ds.index.column("shard").to_numpy()[ds.positions([sample_id])[0]])]["file"]
    path = Path(uri) / shard
    data = bytearray(path.read_bytes())
    data[data.find(img) + len(img) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return sfs.join(uri, shard)


def test_a_shard_damaged_at_the_source_stops_the_read_naming_it(local):
    """Breaks if a damaged shard trains silently, or fails without saying which shard to fix."""
    shard_uri = _flip_image_byte(local, 45)
    ds = open_dataset(local)
    with pytest.raises(DatasetError) as err:
        ds.read_samples([10, 45])
    msg = str(err.value)
    assert shard_uri in msg and "sample 45" in msg
    assert "again after a re-fetch" in msg and "orchestrator data verify" in msg
    assert ds.reader.stats.refetches == 1


def test_a_damaged_cache_entry_costs_one_refetch_not_bad_data(local, tmp_path, monkeypatch):
    """Breaks if bytes from the cache are trusted without their checksums."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE", "on")
    monkeypatch.setenv("ORCHESTRATOR_CACHE_DIR", str(tmp_path / "cache"))
    group = list(range(2 * ROWS_PER_GROUP, 3 * ROWS_PER_GROUP))  # all of it: the flip lands in a checked sample
    good = open_dataset(local).read_samples(group)
    entries = [p for p in (tmp_path / "cache").iterdir() if not p.name.endswith("footer")]
    assert len(entries) == 1
    data = bytearray(entries[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    entries[0].write_bytes(bytes(data))
    ds = open_dataset(local)
    assert ds.read_samples(group)["fg_bg"] == good["fg_bg"]
    assert ds.reader.stats.refetches == 1
    again = open_dataset(local)
    assert again.read_samples(group)["fg_bg"] == good["fg_bg"] and again.reader.stats.refetches == 0  # healed on disk


def test_the_cache_stays_within_its_budget_dropping_the_least_recently_used(tmp_path):
    """Breaks if the cache grows without bound, or evicts what was just used."""
    root = tmp_path / "c"
    cache = ByteCache(str(root), max_bytes=10_000)
    for i in range(4):
        cache.put(f"k{i}", bytes(2_000))
        os.utime(root / f"k{i}", (i, i))  # used long ago, in this order
    assert cache.get("k0") is not None  # used again just now
    cache.put("k4", bytes(2_000))
    cache.put("k5", bytes(2_000))  # 12 000 bytes: over budget
    on_disk = sorted(p.name for p in root.iterdir())
    assert on_disk == ["k0", "k3", "k4", "k5"]
    assert cache.total_bytes == sum((root / n).stat().st_size for n in on_disk) <= 10_000


def test_preload_keeps_order_and_repeats_across_shards(local):
    """Breaks if results come back grouped by shard or row group, or repeats are collapsed."""
    ds = open_dataset(local)
    ids = [95, 0, 33, 0, 64, 95, 31]
    rows = ds.read_samples(ids)
    assert rows["sample_id"].tolist() == ids
    assert rows["fg_bg"][1] == rows["fg_bg"][3] and rows["fg_bg"][0] == rows["fg_bg"][5]


def test_declared_columns_preload_through_the_cache_and_heal_like_mask_depth(tmp_path, monkeypatch):
    """Breaks if preload or its checksum check only knows the mask_depth columns: a dataset of an
    image and an int64 label must fetch only its row groups, come back from the cache, and have a
    damaged cache entry re-fetched rather than trusted."""
    from storage.columns import Column
    from storage.synth import make_sample

    uri = str(tmp_path / "cls")
    columns = (Column("image", "image"), Column("label", "int64"))
    with ShardWriter(uri, rows_per_shard=16, rows_per_group=4, columns=columns, task="classification") as w:
        for sid in range(40):
            w.add({"sample_id": sid, "image": make_sample(3, sid, 32)["fg_bg"], "label": sid % 5})
        w.close()
    monkeypatch.setenv("ORCHESTRATOR_CACHE", "on")
    monkeypatch.setenv("ORCHESTRATOR_CACHE_DIR", str(tmp_path / "cache"))
    group = [20, 21, 22, 23]  # shard 1, row group 1: one whole group, so a flipped byte hits a checked sample
    ds = open_dataset(uri)
    good = ds.read_samples([*group, 2])
    assert good["label"].tolist() == [0, 1, 2, 3, 2] and ds.reader.stats.groups_fetched == 2
    again = open_dataset(uri)
    assert again.read_samples(group)["image"] == good["image"][:4]
    assert again.reader.stats.groups_from_cache == 1 and again.reader.stats.groups_fetched == 0
    shard1 = ds.manifest["shards"][1]["sha256"][:32]
    [entry] = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(shard1) and not p.name.endswith("footer")]
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    healed = open_dataset(uri)
    rows = healed.read_samples(group)
    assert rows["image"] == good["image"][:4] and rows["label"].tolist() == [0, 1, 2, 3]
    assert healed.reader.stats.refetches == 1
