"""Format /4 (shared columns): each distinct background stored once, shard rows holding its id;
bit-exact round trips, verify of every stored byte (the shared table's included), /2 datasets
still reading the same, and the decode path that crosses to the device at the DCT-scaled size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from storage import codec
from storage import fs as sfs
from storage.pack import PackError, pack
from storage.seed_layout import synthesize_seed_layout
from storage.shards import (
    CRC32_FORMAT,
    LEGACY_MASK_DEPTH_FORMAT,
    DatasetError,
    ShardWriter,
    open_dataset,
)
from storage.synth import synthesize
from storage.verify import verify
from tests.conftest import run_cli
from workers import data as wdata
from workers.tasks import mask_depth
from workers.tasks.mask_depth import ChunkSamples, prepare_batch

SIZE = 32


@pytest.fixture(autouse=True)
def _own_shard_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ORCHESTRATOR_CACHE_DIR", str(tmp_path / "shard-cache"))


def _bg(k: int, size: int = SIZE) -> bytes:
    """Background k: a noisy picture (JPEG of a few KB, as photographs are)."""
    rng = np.random.default_rng(1000 + k)
    return codec.encode_jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _sample(i: int, k: int, size: int = SIZE) -> dict:
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    fg_bg = np.clip(rng.uniform(40, 200, 3) + 40 * np.stack([yy, xx, yy * xx], axis=2), 0, 255).astype(np.uint8)
    mask = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < rng.uniform(0.05, 0.2)).astype(np.uint8) * 255
    depth = (rng.uniform(0, 0.5) + 0.5 * (1 - yy)).astype(np.float32)
    return {"sample_id": i, "fg_bg": codec.encode_jpeg(fg_bg), "bg": _bg(k, size), "mask": codec.encode_mask(mask),
            "depth": codec.encode_depth(depth), "bg_index": np.int32(k)}


def _write(uri: str, n: int, k: int, format: str | None = None, rows_per_shard: int = 16,
           rows_per_group: int = 4) -> dict:
    with ShardWriter(uri, rows_per_shard=rows_per_shard, rows_per_group=rows_per_group, format=format) as w:
        for i in range(n):
            w.add(_sample(i, i % k))
        return w.close({"source": "test"})


def _bytes(uri: str, files: list[dict]) -> int:
    return sum(len(sfs.read_bytes(sfs.join(uri, f["file"]))) for f in files)


# -- the size rule ---------------------------------------------------------------------------------


def test_each_background_is_stored_once_so_size_grows_with_backgrounds_not_samples(tmp_path):
    """Breaks if a row carries its background again: the shared table must grow with the number
    of distinct backgrounds K and not at all with the samples N; the shards by N times a row
    without its background."""
    sizes = {}
    for n, k in ((24, 2), (48, 2), (48, 8)):
        uri = str(tmp_path / f"n{n}k{k}")
        m = _write(uri, n, k)
        assert m["format"] == CRC32_FORMAT and m["shared"]["bg"]["num"] == k
        sizes[(n, k)] = (_bytes(uri, m["shared"]["bg"]["files"]), _bytes(uri, m["shards"]))
    bg_bytes = len(_bg(0))
    (t24, s24), (t48, s48), (t48k8, s48k8) = sizes[(24, 2)], sizes[(48, 2)], sizes[(48, 8)]
    assert t48 == t24  # twice the samples, the same two backgrounds: not one byte more
    assert t48k8 >= t24 + 6 * bg_bytes  # six more backgrounds: six more stored
    assert s48k8 == s48  # the rows hold ids whatever the background
    per_row = (s48 - s24) / 24
    assert per_row < bg_bytes  # a row is smaller than a background alone: it does not hold one
    legacy = str(tmp_path / "legacy")
    lm = _write(legacy, 48, 2, format=LEGACY_MASK_DEPTH_FORMAT)
    assert _bytes(legacy, lm["shards"]) > s48 + t48 + 40 * bg_bytes  # /2: every row its own copy


def test_pack_stores_each_background_file_once(tmp_path):
    """Breaks if `data pack` writes a background per sample, or ids that do not point at the
    sample's own background file."""
    src = tmp_path / "src"
    synthesize_seed_layout(str(src), 40, seed=5, image_size=SIZE, workers=1)
    dest = str(tmp_path / "ds")
    res = pack(str(src), dest, rows_per_shard=16, rows_per_group=4, workers=1)
    m = res.manifest
    used = {line.split("/")[1] for f in (src / "labels").iterdir() for line in f.read_text().splitlines()}
    assert m["format"] == CRC32_FORMAT and m["shared"]["bg"]["num"] == len(used) < 40
    ds = open_dataset(dest)
    rows = ds.read_samples(ds.sample_ids)
    for j, src_name in enumerate(ds.index_values("source", ds.sample_ids)):
        assert rows["bg"][j] == (src / "bg" / f"{src_name.split('/')[1]}.jpg").read_bytes()
    shared = {id(b) for b in rows["bg"]}
    assert len(shared) == len(used)  # one bytes object per background, however many samples use it


# -- round trips -----------------------------------------------------------------------------------


def test_every_column_round_trips_bit_exact_and_in_order(tmp_path):
    """Breaks if any stored byte of any column (the shared one resolved) differs from what was
    written, or ids come back in another order."""
    uri = str(tmp_path / "ds")
    _write(uri, 40, 5)
    ds = open_dataset(uri)
    ids = [39, 0, 17, 17, 5, 22, 38]
    got = ds.read_samples(ids, columns=(*ds.sample_columns, "bg_id"))
    for j, i in enumerate(ids):
        want = _sample(i, i % 5)
        for col in ("fg_bg", "bg", "mask", "depth"):
            assert got[col][j] == want[col], (i, col)
        assert (got["height"][j], got["width"][j]) == (SIZE, SIZE)
    assert got["sample_id"].tolist() == ids
    assert [int(b) for b in got["bg_id"]] == [[0, 1, 2, 3, 4][i % 5] for i in ids]  # ids in order of first appearance
    assert ds.index_values("bg_index", ids).tolist() == [i % 5 for i in ids]  # extra index columns as before
    assert ds.read_samples([3], columns=("bg",))["bg"] == [_bg(3)]


def test_pack_round_trips_every_column_from_the_source_files(tmp_path):
    """Breaks if pack alters a JPEG byte, a mask pixel or a depth value (depth is now zstd)."""
    from PIL import Image

    src = tmp_path / "src"
    synthesize_seed_layout(str(src), 12, seed=2, image_size=SIZE, as_zip=False, workers=1)
    dest = str(tmp_path / "ds")
    pack(str(src), dest, workers=1)
    ds = open_dataset(dest)
    rows = ds.read_samples(ds.sample_ids)
    for j, fg in enumerate(ds.index_values("source", ds.sample_ids)):
        folder, name = fg.split("/")[1:]
        assert rows["fg_bg"][j] == (src / fg).read_bytes()
        assert rows["bg"][j] == (src / "bg" / f"{folder}.jpg").read_bytes()
        mask_file = src / "fg_bg_mask" / folder / name.replace(f"_{name.rsplit('_', 1)[1]}",
                                                               f"_mask_{name.rsplit('_', 1)[1]}")
        src_mask = np.asarray(Image.open(mask_file).convert("L"))
        assert np.array_equal(codec.decode_mask(rows["mask"][j]), (src_mask >= 128).astype(np.uint8) * 255)
        src_depth = np.asarray(Image.open(src / "depth" / folder / name.replace(".jpg", ".png")))
        assert codec.raw_header(rows["depth"][j], "depth")[2] == codec.DEPTH8_CODEC
        assert np.array_equal(codec.depth_values(rows["depth"][j]), src_depth)


# -- verify ----------------------------------------------------------------------------------------


def _flip_in(path: Path, needle: bytes) -> None:
    data = bytearray(path.read_bytes())
    at = data.find(needle)
    assert at >= 0
    data[at + len(needle) // 2] ^= 0x55
    path.write_bytes(bytes(data))


def test_verify_names_a_corrupted_shared_background_by_file_and_counts_its_samples(tmp_path):
    """Breaks if a damaged background passes verify, is not named by its file, or the samples
    that use it still count as ok; or training reads it without naming the file."""
    uri = str(tmp_path / "ds")
    _write(uri, 30, 3)
    assert verify(uri, workers=1)["ok"] == 30
    ds = open_dataset(uri)
    victim = ds.read_samples([1], columns=("bg", "bg_id"))
    vid = int(victim["bg_id"][0])
    entry = ds.manifest["shared"]["bg"]
    [file] = [f["file"] for f in entry["files"] if victim["bg"][0] in sfs.read_bytes(sfs.join(uri, f["file"]))]
    _flip_in(Path(uri) / file, victim["bg"][0])
    res = run_cli("data", "verify", uri, "--json", cwd=tmp_path)
    assert res.returncode == 1
    out = json.loads(res.stdout)
    users = 10  # samples 1, 4, 7, ...: every third uses background 1
    named = [b for b in out["bad"] if b["shard"] == file and f"shared bg {vid}:" in b["reason"]]
    assert named and "checksum" in named[0]["reason"] and f"used by {users} samples" in named[0]["reason"]
    assert any(b["shard"] == file and "sha256" in b["reason"] for b in out["bad"])
    assert out["ok"] == 30 - users and out["checksums_ok"] == 30
    with pytest.raises(DatasetError) as err:
        open_dataset(uri).read_samples([0, 1])
    assert sfs.join(uri, file) in str(err.value) and f"shared bg {vid}" in str(err.value)
    assert open_dataset(uri).read_samples([0, 2])["sample_id"].tolist() == [0, 2]  # the other backgrounds still read


def test_verify_checks_the_shared_index_and_a_missing_shared_file(tmp_path):
    """Breaks if the backgrounds' index can change unnoticed, or a missing background file
    goes unreported."""
    uri = str(tmp_path / "ds")
    m = _write(uri, 20, 4, rows_per_shard=2, rows_per_group=1)  # the 4 backgrounds in 2 files
    files = [f["file"] for f in m["shared"]["bg"]["files"]]
    assert len(files) == 2
    (Path(uri) / files[1]).unlink()
    out = verify(uri, workers=2)
    assert {"sample": None, "shard": files[1], "reason": "shard file missing"} in out["bad"]
    assert out["ok"] == 10  # samples on backgrounds 0 and 1 only
    index = Path(uri) / m["shared"]["bg"]["index"]
    index.write_bytes(index.read_bytes() + b"\0")
    out = verify(uri, workers=1)
    assert out["ok"] == 0 and "index.parquet: sha256 differs" in out["bad"][0]["reason"] and "re-pack" in out["bad"][0][
        "reason"]


def test_a_malformed_shared_entry_is_one_dataset_error(tmp_path):
    """Breaks if a /4 manifest with a broken "shared" entry surfaces as a KeyError."""
    uri = str(tmp_path / "ds")
    m = _write(uri, 8, 2)
    for broken in ({**m, "shared": {}}, {**m, "shared": {"bg": {**m["shared"]["bg"], "files": "x"}}},
                   {**m, "shared": {"mask": m["shared"]["bg"]}}, {k: v for k, v in m.items() if k != "columns"}):
        sfs.write_json(sfs.join(uri, "manifest.json"), broken)
        with pytest.raises(DatasetError) as err:
            open_dataset(uri)
        assert "\n" not in str(err.value) and "manifest.json" in str(err.value)


# -- format /2 kept --------------------------------------------------------------------------------


def test_a_format_2_dataset_reads_and_trains_on_identical_values(tmp_path):
    """Breaks if datasets packed before /4 stop reading, or read or decode to other values than
    the same samples written as /4."""
    new, old = str(tmp_path / "new"), str(tmp_path / "old")
    synthesize(new, 40, seed=6, image_size=SIZE, rows_per_shard=16, rows_per_group=4, workers=1)
    synthesize(old, 40, seed=6, image_size=SIZE, rows_per_shard=16, rows_per_group=4, workers=1,
               format=LEGACY_MASK_DEPTH_FORMAT)
    a, b = open_dataset(new), open_dataset(old)
    assert (a.manifest["format"], b.manifest["format"]) == (CRC32_FORMAT, LEGACY_MASK_DEPTH_FORMAT)
    assert "shared" not in b.manifest and b.stored_columns == b.columns
    ids = [9, 0, 33, 21, 9]
    ra, rb = a.read_samples(ids), b.read_samples(ids)
    assert set(ra) == set(rb)
    for col in ra:
        assert (ra[col] == rb[col]) if isinstance(ra[col], list) else np.array_equal(ra[col], rb[col]), col
    assert a.index.to_pydict() != b.index.to_pydict()  # checksums differ (over the id, not the bytes)...
    assert a.index.drop_columns(["checksum"]).equals(b.index.drop_columns(["checksum"]))  # ...nothing else
    for side in (SIZE, 16, 12):
        xa = prepare_batch(ChunkSamples(ra, side, str, hflip=0.5, flip_key=(3,)).__getitems__(list(range(5))), "cpu")
        xb = prepare_batch(ChunkSamples(rb, side, str, hflip=0.5, flip_key=(3,)).__getitems__(list(range(5))), "cpu")
        assert all(torch.equal(p, q) for p, q in zip(xa, xb, strict=True))
    assert verify(old, workers=1)["ok"] == verify(new, workers=1)["ok"] == 40
    assert "orchestrator data pack" in verify(old, workers=1)["note"] and "note" not in verify(new, workers=1)


# -- pack: bad backgrounds, resume -----------------------------------------------------------------


def test_a_corrupt_background_makes_each_of_its_samples_bad_and_skip_bad_packs_the_rest(tmp_path):
    """Breaks if a background that does not decode is packed, or its samples are not each named."""
    src = tmp_path / "src"
    synthesize_seed_layout(str(src), 30, seed=7, image_size=SIZE, workers=1)
    lines = {f.name.split("_label_info")[0]: f.read_text().splitlines() for f in (src / "labels").iterdir()}
    name, users = max(lines.items(), key=lambda kv: len(kv[1]))
    (src / "bg" / f"{name}.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a background")
    with pytest.raises(PackError) as err:
        pack(str(src), str(tmp_path / "ds"), workers=1)
    assert f"{len(users)} bad sample(s)" in str(err.value) and "bg cannot be decoded" in str(err.value)
    res = pack(str(src), str(tmp_path / "ds"), workers=1, skip_bad=True)
    assert res.packed == 30 - len(users) and len(res.skipped) == len(users)
    assert all(s["path"].endswith(f"bg/{name}.jpg") for s in res.skipped)
    out = verify(str(tmp_path / "ds"), workers=1)
    assert out["bad"] == [] and out["ok"] == res.packed


def test_a_rerun_reuses_the_background_parts_and_writes_the_same_bytes(tmp_path):
    """Breaks if the background table is rewritten on a re-run or comes out different."""
    src = tmp_path / "src"
    synthesize_seed_layout(str(src), 30, seed=8, image_size=SIZE, workers=1)
    dest = str(tmp_path / "ds")
    first = pack(str(src), dest, rows_per_shard=16, rows_per_group=4, workers=1)
    record = Path(dest) / ".pack" / "bg-part-00000.json"
    stamp = record.stat().st_mtime_ns
    again = pack(str(src), dest, rows_per_shard=16, rows_per_group=4, workers=1)
    assert record.stat().st_mtime_ns == stamp and again.parts_reused == again.parts == 2
    assert again.manifest["shared"] == first.manifest["shared"] and again.manifest["shards"] == first.manifest["shards"]


# -- decode ----------------------------------------------------------------------------------------


def _reference(rows: dict, r: int, flip: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch as the decode path made it before /4: everything resized to r on the CPU, per sample."""
    n = len(rows["sample_id"])
    rgb = np.empty((n, 2, r, r, 3), np.uint8)
    mask = np.empty((n, r, r), np.uint8)
    depth = np.empty((n, r, r), np.uint16)
    for j in range(n):
        for k, col in enumerate(("fg_bg", "bg")):
            wdata.decode_rgb_into(rows[col][j], rgb[j, k])
        wdata.resize_into(mask[j], codec.decode_mask(rows["mask"][j]), nearest=True)
        wdata.resize_into(depth[j], codec.decode_depth_uint16(rows["depth"][j]), nearest=False)
    x = torch.from_numpy(rgb).permute(0, 1, 4, 2, 3).reshape(n, 6, r, r).float()
    x, m, d = x, torch.from_numpy(mask).unsqueeze(1).float(), torch.from_numpy(depth.astype(np.float32)).unsqueeze(1)
    f = torch.from_numpy(flip).view(-1, 1, 1, 1)
    x, m, d = (torch.where(f, t.flip(-1), t) for t in (x, m, d))
    # as prepare_batch
    x = x.mul(1.0 / (255.0 * mask_depth.INPUT_STD)).sub(mask_depth.INPUT_MEAN / mask_depth.INPUT_STD)
    return x, m / 255, d / 65535


@pytest.fixture(scope="module")
def rows64(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("d64") / "ds")
    synthesize(uri, 16, seed=9, image_size=64, workers=1)
    ds = open_dataset(uri)
    return ds.read_samples(ds.sample_ids)


@pytest.mark.parametrize("r, exact",
                         [(64, True), (40, True), (32, True), (16, True), (24, True), (20, False), (28, False)])
def test_smaller_stages_decode_in_the_dct_and_resize_on_the_device(rows64, r, exact):
    """Breaks if a stage changes its pixels where the decode does not need DCT scaling (side above
    half the stored size, or an exact scale: quickstart's 128 -> 32 and 128), if masks or depth
    ever change, or if the device's resize of the inputs drifts beyond rounding."""
    samples = ChunkSamples(rows64, r, str, hflip=0.5, flip_key=(4,))
    raw = samples.__getitems__(list(range(16)))
    scaled = wdata.jpeg_scaled_size(rows64["fg_bg"][0], r, r)
    carried = tuple(raw.rgb.shape[2:4])
    assert carried == ((r, r) if 2 * r > 64 else scaled)  # 20 -> 24 (3/8), 28 -> 32 (1/2)
    assert tuple(raw.mask.shape[1:]) == (r, r) and tuple(raw.depth.shape[2:]) == (64, 64)  # depth resized on the device
    x, m, d = prepare_batch(raw, "cpu")
    rx, rm, rd = _reference(rows64, r, raw.flip.numpy())
    assert x.shape == rx.shape == (16, 6, r, r)
    assert torch.equal(m, rm) and torch.equal(d, rd)
    if exact:
        assert torch.equal(x, rx)
    else:
        # rounding to 8 bits, nothing else
        assert float((x - rx).abs().max()) * 255 * mask_depth.INPUT_STD <= 1.0 + 1e-4


def test_each_distinct_background_is_decoded_once_per_chunk(rows64, monkeypatch):
    """Breaks if the worker decodes a shared background once per sample, or if reusing it changes
    a single value."""
    calls = []
    real = mask_depth.decode_rgb_into
    monkeypatch.setattr(mask_depth, "decode_rgb_into",
                        lambda data, out, what="input": (calls.append(what), real(data, out, what))[1])
    samples = ChunkSamples(rows64, 32, str, hflip=0.5, flip_key=(5,))
    got = [samples.__getitems__(b) for b in ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15])]
    distinct = len({bytes(b) for b in rows64["bg"]})
    assert calls.count("fg_bg") == 16 and calls.count("bg") == distinct < 16
    monkeypatch.setattr(mask_depth, "decode_rgb_into", real)

    class EveryBg(ChunkSamples):
        def _bg_into(self, data, out):
            real(data, out, "bg")

    again = [EveryBg(rows64, 32, str, hflip=0.5, flip_key=(5,)).__getitems__(b)
             for b in ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9, 10, 11, 12, 13, 14, 15])]
    for a, b in zip(got, again, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_devices_without_antialiased_resize_get_the_same_batch_resized_on_the_host(rows64, monkeypatch):
    """Breaks if the host-side resize (for XLA, whose torch has no antialiased bilinear) gives
    other values than the device-side one."""
    raw = ChunkSamples(rows64, 20, str, hflip=0.5, flip_key=(6,)).__getitems__(list(range(16)))
    on_device = prepare_batch(raw, "cpu")
    monkeypatch.setattr(mask_depth, "RESIZE_DEVICES", ())
    on_host = prepare_batch(raw, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(on_device, on_host, strict=True))
