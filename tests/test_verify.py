"""`data verify`: every sample's checksum, decodability and size, every shard's sha256, and counts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from storage.shards import ShardWriter, open_dataset
from storage.synth import make_sample, synthesize
from storage.verify import verify
from tests.conftest import run_cli

N = 48


@pytest.fixture
def dataset(tmp_path) -> str:
    uri = str(tmp_path / "ds")
    synthesize(uri, N, seed=1, image_size=40, rows_per_shard=16, rows_per_group=4, workers=1)
    return uri


def test_a_sound_dataset_verifies_every_sample(dataset, tmp_path):
    """Breaks if verify misses samples or shards, or reports problems that are not there."""
    res = run_cli("data", "verify", dataset, "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (out["samples"], out["shards"], out["bad"]) == (N, 3, [])
    assert out["checksums_ok"] == out["ok"] == N


def test_a_flipped_byte_is_named_by_sample_and_shard(dataset, tmp_path):
    """Breaks if a damaged image in a shard passes verify, or the report does not say which one."""
    ds = open_dataset(dataset)
    victim = 21
    img = ds.read_samples([victim])["fg_bg"][0]
    shard = Path(dataset) / ds.manifest["shards"][ds.index.column("shard").to_numpy()[ds.positions([victim])[0]]][
        "file"]
    data = bytearray(shard.read_bytes())
    at = data.find(img) + len(img) // 2
    data[at] ^= 0x55
    shard.write_bytes(bytes(data))
    res = run_cli("data", "verify", dataset, "--json", cwd=tmp_path)
    assert res.returncode == 1
    out = json.loads(res.stdout)
    name = str(shard.relative_to(dataset))
    assert {"sample": str(victim), "shard": name} in [{"sample": b["sample"], "shard": b["shard"]} for b in out["bad"]]
    assert any(b["sample"] == str(victim) and "checksum" in b["reason"] for b in out["bad"])
    assert any(b["sample"] is None and b["shard"] == name and "sha256" in b["reason"] for b in out["bad"])
    assert out["checksums_ok"] == N - 1


def test_an_image_that_does_not_decode_is_named(tmp_path):
    """Breaks if verify trusts checksums alone: bytes packed as they were can still be garbage."""
    uri = str(tmp_path / "ds")
    with ShardWriter(uri, rows_per_shard=8, rows_per_group=4) as w:
        for sid in range(10):
            s = make_sample(0, sid, 32)
            row = {k: s[k] for k in ("fg_bg", "bg", "mask", "depth")}
            if sid == 6:
                row["mask"] = b"\x89PNG\r\n\x1a\n but then nothing"
            w.add({"sample_id": sid, **row})
        w.close()
    out = verify(uri, workers=1)
    assert [(b["sample"], b["shard"]) for b in out["bad"]] == [("6", "shards/shard-00000.parquet")]
    assert "does not decode" in out["bad"][0]["reason"] and out["checksums_ok"] == 10 and out["ok"] == 9


def test_a_missing_shard_and_a_missing_dataset_are_reported(dataset, tmp_path):
    """Breaks if verify crashes on a missing shard or calls a non-dataset fine."""
    (Path(dataset) / "shards" / "shard-00001.parquet").unlink()
    out = verify(dataset, workers=2)
    assert {"sample": None, "shard": "shards/shard-00001.parquet", "reason": "shard file missing"} in out["bad"]
    assert out["ok"] == N - 16
    res = run_cli("data", "verify", str(tmp_path / "nothing"), "--json", cwd=tmp_path)
    assert res.returncode == 1 and "manifest.json missing" in json.loads(res.stdout)["bad"][0]["reason"]


def test_a_manifest_missing_keys_is_one_clear_error_not_a_traceback(dataset, tmp_path):
    """Breaks if `data verify` on a manifest without "shards" (or "num_samples") ends in a KeyError
    traceback instead of exit 1 and one line naming the manifest and the fix."""
    manifest = Path(dataset) / "manifest.json"
    good = json.loads(manifest.read_text())
    for key in ("shards", "num_samples"):
        manifest.write_text(json.dumps({k: v for k, v in good.items() if k != key}))
        res = run_cli("data", "verify", dataset, "--json", cwd=tmp_path)
        assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
        [bad] = json.loads(res.stdout)["bad"]
        assert bad["reason"].startswith(f"{manifest}: keys ['{key}'] "
                                        "missing") and "re-pack" in bad["reason"] and "\n" not in bad["reason"]
        res = run_cli("data", "verify", dataset, cwd=tmp_path)
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert f"{manifest}: keys ['{key}'] missing" in res.stderr


def test_declared_columns_are_verified_per_codec(tmp_path):
    """Breaks if verify only knows the mask_depth columns: a raw_u8 class map that does not decode,
    or decodes at another size than indexed, must be named by sample and shard."""
    from storage import codec
    from storage.columns import Column

    uri = str(tmp_path / "seg")
    columns = (Column("image", "image"), Column("seg", "raw_u8"), Column("label", "int64"))
    with ShardWriter(uri, rows_per_shard=4, rows_per_group=2, columns=columns, task="segmentation") as w:
        for sid in range(8):
            s = make_sample(0, sid, 32)
            seg = s["mask"] // 255 * 3  # class ids 0/3
            if sid == 2:
                seg = b"\x89PNG\r\n\x1a\n but then nothing"
            elif sid == 5:
                seg = codec.encode_raw(seg[:16], codec.LAYOUT_PLAIN, codec.CODEC_LZ4)  # 16x32, indexed 32x32
            w.add({"sample_id": sid, "image": s["fg_bg"], "seg": seg, "label": sid % 2, "height": 32, "width": 32})
        w.close()
    out = verify(uri, workers=2)
    assert [(b["sample"], b["shard"]) for b in out["bad"]] == [("2", "shards/shard-00000.parquet"),
                                                               ("5", "shards/shard-00001.parquet")]
    assert "'seg' does not decode" in out["bad"][0]["reason"]
    assert "'seg' is 16x32, the index says 32x32" in out["bad"][1]["reason"]
    assert out["checksums_ok"] == 8 and out["ok"] == 6
