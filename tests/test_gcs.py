"""Real gcsfs against gcp-storage-emulator on loopback, through a fault proxy: transient faults are
retried (and counted), permanent ones stop at once naming the URI, and whole runs survive both."""

from __future__ import annotations

import json

import pytest

from storage import fs as sfs
from storage.errors import StorageError
from storage.retry import RETRY_COUNTER
from storage.seed_layout import synthesize_seed_layout
from storage.shards import DatasetError, open_dataset
from storage.synth import synthesize
from tests import gcs_emulator as _emulator
from tests.conftest import (
    TINY_SAMPLES,
    mlflow_history,
    run_cli,
    status_json,
    tiny_recipe,
    write_recipe,
)
from tests.gcs_emulator import Gcs

gcs_emulator, gcs = _emulator.gcs_emulator, _emulator.gcs  # fixtures

# A guard only: a permanent error must fail long before this (the report measures it).
FAIL_FAST_GUARD_S = 60


def test_503s_and_dropped_connections_are_retried_and_each_one_counted(gcs: Gcs):
    """Breaks if a transient fault surfaces as an error, or gcsfs retries behind the policy's back."""
    # (the emulator's multipart parser drops a trailing \r, so no payload ends in one)
    payloads = {gcs.uri(f"obj/{i}"): f"payload {i};".encode() * (100 + i) for i in range(40)}
    for uri, data in payloads.items():
        sfs.write_bytes(uri, data)
    before = RETRY_COUNTER["retries"]
    gcs.proxy.reset_counters()
    gcs.proxy.configure(fail_rate=0.2, drop_rate=0.1)
    got = {uri: sfs.read_bytes(uri) for uri in payloads}
    fs, _ = sfs.filesystem(gcs.uri())
    paths = [sfs.filesystem(u)[1] for u in payloads]
    ranged = sfs.cat_ranges(fs, paths, [10] * len(paths), [20] * len(paths))
    injected = gcs.proxy.counters.failed_503 + gcs.proxy.counters.dropped
    assert got == payloads and ranged == [d[10:20] for d in payloads.values()]
    # Every 503 is a counted retry (none hidden in gcsfs); aiohttp may re-send a request itself
    # when a pooled keep-alive connection turns out reset, so drops count at most once each.
    assert gcs.proxy.counters.failed_503 > 3 and gcs.proxy.counters.failed_503 <= RETRY_COUNTER[
        "retries"] - before <= injected


def test_a_403_fails_on_the_first_answer_naming_the_uri(gcs: Gcs):
    """Breaks if a permission error is retried, hidden as 'not found', or loses the URI."""
    sfs.write_bytes(gcs.uri("x"), b"x")
    before = RETRY_COUNTER["retries"]
    gcs.proxy.configure(forbid=True)
    gcs.proxy.reset_counters()
    for call in (lambda: sfs.read_bytes(gcs.uri("x")), lambda: sfs.exists(gcs.uri("x")),
                 lambda: open_dataset(gcs.uri("ds"))):
        with pytest.raises(StorageError) as err:
            call()
        assert "gs://" in str(err.value) and "403" in str(err.value)
    # no retries: gcsfs's info() asks up to three ways (object, then listings), each answered once
    assert RETRY_COUNTER["retries"] == before and gcs.proxy.counters.requests <= 3 * 3


def test_a_missing_bucket_is_named_as_such(gcs: Gcs):
    """Breaks if a typo in the bucket reads as 'the dataset is missing' without saying why."""
    with pytest.raises(DatasetError) as err:
        open_dataset("gs://no-such-bucket-here/data")
    msg = str(err.value)
    assert "gs://no-such-bucket-here/data" in msg and "bucket 'no-such-bucket-here' does not exist" in msg


def test_pack_reads_zips_from_a_bucket_and_verify_checks_the_result_there(gcs: Gcs, tmp_path):
    """Breaks if pack or verify only work on local paths (zips on GCS are read by range)."""
    synthesize_seed_layout(gcs.uri("raw"), 30, seed=2, image_size=32, as_zip=True, workers=1)
    res = run_cli("data", "pack", gcs.uri("raw"), gcs.uri("packed"), "--rows-per-shard", "16", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    res = run_cli("data", "verify", gcs.uri("packed"), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["samples"], out["shards"], out["bad"], out["checksums_ok"]) == (30, 2, [], 30)


def test_pack_reads_a_bucket_of_zips_in_few_requests_to_the_same_dataset_as_from_disk(gcs: Gcs, tmp_path):
    """Breaks if a remote zip's members go back to being read one small read at a time (this pack
    took 2,892 requests that way, 178 with the members fetched by range after each part read the zip's
    directory, 127 reading only the members' ranges the plan's listing located: storage/zip_ranges.py), if
    the fetched ranges change a byte of what is packed, or if a damaged member in a remote zip is
    not named as a bad sample."""
    import zipfile

    from storage.pack import pack

    local = tmp_path / "raw"
    synthesize_seed_layout(str(local), 120, seed=3, image_size=32, as_zip=True, workers=1)
    for f in local.rglob("*"):
        if f.is_file():
            sfs.write_bytes(gcs.uri("raw", str(f.relative_to(local))), f.read_bytes())
    gcs.proxy.reset_counters()
    remote = pack(gcs.uri("raw"), gcs.uri("packed"), workers=1, rows_per_shard=32, rows_per_group=8)
    requests = gcs.proxy.counters.requests
    on_disk = pack(str(local), str(tmp_path / "packed"), workers=1, rows_per_shard=32, rows_per_group=8)
    assert remote.packed == on_disk.packed == 120
    got, want = open_dataset(gcs.uri("packed")), open_dataset(str(tmp_path / "packed"))
    for column in ("sample_id", "shard", "row_group", "checksum"):
        assert got.index.column(column).to_pylist() == want.index.column(column).to_pylist(), column
    # The listing (a zip's directory read once), then one request a zip for each of the 4 parts and
    # the backgrounds' part, and the writes.
    assert requests <= 150, f"{requests} requests to pack 120 samples from zips"
    # One member's stored bytes flipped in the bucket's copy: a bad sample, named by its zip path.
    archive = local / "fg_bg_mask.zip"
    with zipfile.ZipFile(archive) as zf:
        info = zf.infolist()[7]
    data = bytearray(archive.read_bytes())
    data[info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 20] ^= 0xFF
    sfs.write_bytes(gcs.uri("raw", "fg_bg_mask.zip"), bytes(data))
    res = pack(gcs.uri("raw"), gcs.uri("again"), workers=1, rows_per_shard=32, rows_per_group=8, skip_bad=True)
    assert res.packed == 119 and len(res.skipped) == 1 and "CRC" in res.skipped[0]["reason"]
    assert f"zip://{info.filename}::gs://{gcs.bucket}/raw/fg_bg_mask.zip" in res.skipped[0]["path"]


def test_a_run_through_transient_faults_completes_and_reports_its_retries(gcs: Gcs, tmp_path):
    """Breaks if 503s or resets during a run kill it, lose samples, or go unreported."""
    uri = gcs.uri("tiny")
    synthesize(uri, TINY_SAMPLES, seed=0, image_size=64, rows_per_group=32, rows_per_shard=128, workers=1)
    # The run makes only ~10 requests (footers ride in the index), so the draws restart at a seed
    # whose first 16 hold seven faults, spread over them: the driver's reads and the worker's both
    # meet some. With six attempts a read still fails for good only at 0.25**6 = 0.02 %.
    gcs.proxy.configure(fail_rate=0.2, drop_rate=0.05, seed=4)
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", tiny_recipe(uri)), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    st = status_json(tmp_path)
    assert st["state"] == "completed" and all(c["times_trained"] == 1 for c in st["chunk_log"])
    retries = mlflow_history(tmp_path, st["mlflow_run_id"], "perf/storage_retries")
    injected = gcs.proxy.counters.failed_503 + gcs.proxy.counters.dropped
    assert injected > 0 and 0 < retries[-1][1] <= injected


def test_a_permanent_error_stops_the_run_naming_the_uri(gcs: Gcs, tmp_path):
    """Breaks if a 403 on the dataset is retried for minutes or the error hides the URI."""
    uri = gcs.uri("tiny")
    synthesize(uri, TINY_SAMPLES, seed=0, image_size=64, rows_per_group=32, rows_per_shard=128, workers=1)
    gcs.proxy.configure(forbid=True)
    # run_cli's timeout is a hang guard, not a speed claim: retrying a 403 for minutes would trip it.
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", tiny_recipe(uri)), cwd=tmp_path, timeout=FAIL_FAST_GUARD_S)
    assert res.returncode == 1
    (line,) = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert uri in line and "403" in line
