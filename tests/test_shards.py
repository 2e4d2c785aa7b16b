"""The packed dataset format and the image codec: round trips, selective reads, clear errors."""

from __future__ import annotations

import hashlib
import io
import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage import codec
from storage import fs as sfs
from storage.columns import MASK_DEPTH_COLUMNS, Column, decode_value, encode_value
from storage.shards import (
    CRC32_FORMAT,
    FORMAT,
    LEGACY_MASK_DEPTH_FORMAT,
    DatasetError,
    ShardWriter,
    columns_checksum,
    open_dataset,
)

SIZE = 24  # px; small images keep the tests fast, the format does not care about size
N = 40
ROWS_PER_SHARD = 16
ROWS_PER_GROUP = 4


def _images(i: int, size: int = SIZE) -> dict[str, np.ndarray]:
    """Smooth images (so JPEG stays close) with a per-sample mask and depth ramp."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / (size - 1)
    base = rng.uniform(40, 200, 3)
    fg_bg = np.clip(base + 40 * np.stack([yy, xx, yy * xx], axis=2), 0, 255).astype(np.uint8)
    bg = np.clip(base[::-1] + 30 * np.stack([xx, yy, 1 - yy], axis=2), 0, 255).astype(np.uint8)
    mask = ((xx - 0.5) ** 2 + (yy - 0.5) ** 2 < rng.uniform(0.05, 0.2)).astype(np.uint8) * 255
    depth = (rng.uniform(0, 0.5) + 0.5 * (1 - yy)).astype(np.float32)
    return {"fg_bg": fg_bg, "bg": bg, "mask": mask, "depth": depth}


def _write(uri: str, n: int = N, extra: bool = True, format: str | None = None) -> dict:
    w = ShardWriter(uri, rows_per_shard=ROWS_PER_SHARD, rows_per_group=ROWS_PER_GROUP, format=format)
    for i in range(n):
        sample = {"sample_id": i, **_images(i)}
        if extra:
            sample["bg_index"] = np.int32(i % 3)
        w.add(sample)
    return w.close({"seed": 7, "source": "test"})


@pytest.fixture(autouse=True)
def _own_shard_cache(tmp_path, monkeypatch):
    """Each test gets an empty shard cache: entries are content-addressed and outlive a test."""
    monkeypatch.setenv("ORCHESTRATOR_CACHE_DIR", str(tmp_path / "shard-cache"))


@pytest.fixture(params=["local", "memory"])
def uri(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "ds")
    else:
        u = f"memory://test-shards/{tmp_path.name}/ds"
        yield u
        sfs.remove(u, recursive=True)


def test_round_trip_decodes_what_was_encoded(uri):
    """Breaks if an encoding is lossy where it must not be (mask, depth) or a column is mixed up."""
    _write(uri)
    ds = open_dataset(uri)
    ids = list(range(N))
    got = ds.read_samples(ids)
    assert got["sample_id"].tolist() == ids
    for i in ids:
        want = _images(i)
        assert np.array_equal(codec.decode_mask(got["mask"][i]), want["mask"])
        depth = codec.decode_depth(got["depth"][i])
        assert depth.dtype == np.float32
        assert np.abs(depth - want["depth"]).max() <= 1 / 65535 + 1e-6
        for key in ("fg_bg", "bg"):
            rgb = codec.decode_jpeg(got[key][i])
            assert rgb.shape == (SIZE, SIZE, 3)
            assert np.abs(rgb.astype(int) - want[key]).mean() < 3
        assert (got["height"][i], got["width"][i]) == (SIZE, SIZE)


def test_manifest_describes_the_shards_exactly(uri):
    """Breaks if the manifest's counts, sizes or sha256 drift from the files actually written."""
    m = _write(uri)
    on_disk = sfs.read_json(sfs.join(uri, "manifest.json"))
    assert on_disk == json.loads(json.dumps(m))
    assert m["format"] == FORMAT
    assert m["num_samples"] == N and m["image_size"] == [SIZE, SIZE]
    assert m["seed"] == 7 and m["source"] == "test" and m["index"] == "index.parquet"
    assert [s["rows"] for s in m["shards"]] == [16, 16, 8]
    assert [s["row_groups"] for s in m["shards"]] == [4, 4, 2]
    for s in m["shards"]:
        data = sfs.read_bytes(sfs.join(uri, s["file"]))
        assert len(data) == s["bytes"]
        assert hashlib.sha256(data).hexdigest() == s["sha256"]
        assert pq.ParquetFile(io.BytesIO(data)).metadata.num_row_groups == s["row_groups"]
    expected_mean = np.mean([codec.decode_depth(codec.encode_depth(_images(i)["depth"])).mean() for i in range(N)])
    assert m["depth_mean"] == pytest.approx(expected_mean, abs=1e-6)


def test_index_locates_every_sample_and_checksums_its_bytes(uri):
    """Breaks if index rows point at the wrong shard/row group/row or checksums cover other bytes."""
    _write(uri)
    ds = open_dataset(uri)
    idx = ds.index.to_pydict()
    assert idx["sample_id"] == list(range(N))
    assert idx["shard"] == [i // ROWS_PER_SHARD for i in range(N)]
    assert idx["row_group"] == [(i % ROWS_PER_SHARD) // ROWS_PER_GROUP for i in range(N)]
    assert idx["row"] == [i % ROWS_PER_GROUP for i in range(N)]
    assert idx["bg_index"] == [i % 3 for i in range(N)]
    assert ds.index.schema.field("bg_index").type == "int32"
    got = ds.read_samples(range(N), columns=(*ds.sample_columns, "bg_id"))
    for i in range(N):  # over the stored values: the background's id in its place (format /4)
        stored = {"fg_bg": got["fg_bg"][i], "bg_id": int(got["bg_id"][i]), "mask": got["mask"][i],
                  "depth": got["depth"][i]}
        assert idx["checksum"][i] == columns_checksum(ds.stored_columns, stored, ds.checksum)
    assert ds.sample_ids.dtype == np.int64 and ds.sample_ids.tolist() == list(range(N))
    assert ds.depth_means([3, 1]).tolist() == [idx["depth_mean"][3], idx["depth_mean"][1]]


def test_read_samples_keeps_the_requested_order(uri):
    """Breaks if results come back grouped by shard instead of in the caller's order."""
    _write(uri)
    ds = open_dataset(uri)
    ids = [37, 2, 18, 2, 39, 0, 17]
    got = ds.read_samples(ids)
    assert got["sample_id"].tolist() == ids
    for j, i in enumerate(ids):
        assert np.array_equal(codec.decode_mask(got["mask"][j]), _images(i)["mask"])
    assert got["fg_bg"][1] == got["fg_bg"][3]
    only = ds.read_samples(np.array([5, 4]), columns=("sample_id", "mask"))
    assert set(only) == {"sample_id", "mask"} and only["sample_id"].tolist() == [5, 4]


def test_read_samples_fetches_only_the_row_groups_that_hold_the_ids(uri, monkeypatch):
    """Breaks if a read pulls whole shards (or extra row groups) instead of the groups it needs."""
    from storage.shards.fetch import ShardReader

    _write(uri)
    ds = open_dataset(uri)
    fetched: list[tuple[int, int, int]] = []
    real = ShardReader.cat_ranges

    def spy(self, ranges):
        fetched.extend(ranges)
        return real(self, ranges)

    monkeypatch.setattr(ShardReader, "cat_ranges", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read_samples read a whole shard"))
    # ids 5, 6 -> shard 0 group 1; 37 -> shard 2 group 1 (without the backgrounds: their own
    # table's reads are tested in test_shard_format4.py)
    got = ds.read_samples([37, 5, 6], columns=("sample_id", "fg_bg", "mask", "depth"))
    assert got["sample_id"].tolist() == [37, 5, 6]
    footers = {s: ds.reader.footers([s])[s] for s in (0, 2)}
    data_ranges = [r for r in fetched if r[2] != ds.manifest["shards"][r[0]]["bytes"]]  # not footer reads
    expected = []
    for s in (0, 2):
        rg = footers[s].row_group(1)
        start = min(rg.column(i).data_page_offset for i in range(rg.num_columns))
        end = max(rg.column(i).data_page_offset + rg.column(i).total_compressed_size for i in range(rg.num_columns))
        expected.append((s, start, end))
    assert sorted(data_ranges) == expected
    assert ds.reader.stats.groups_fetched == 2


def test_missing_manifest_is_not_a_dataset_and_says_how_to_make_one(tmp_path):
    """Breaks if a folder without manifest.json opens, or the error hides the URI or the fix."""
    uri = str(tmp_path / "nothing")
    with pytest.raises(DatasetError) as err:
        open_dataset(uri)
    assert uri in str(err.value) and "manifest.json" in str(err.value)
    assert "orchestrator data synth" in str(err.value)


def test_a_damaged_manifest_is_a_dataset_error(tmp_path):
    """Breaks if a truncated manifest.json surfaces as a bare JSONDecodeError without the URI."""
    uri = str(tmp_path / "ds")
    _write(uri, n=4)
    sfs.write_bytes(sfs.join(uri, "manifest.json"), b'{"format": "orchestrator.sha')
    with pytest.raises(DatasetError, match="not valid JSON") as err:
        open_dataset(uri)
    assert uri in str(err.value)


def test_an_unfinished_write_leaves_no_dataset(uri):
    """Breaks if the manifest is written before the shards and index (it marks completion)."""
    w = ShardWriter(uri, rows_per_shard=ROWS_PER_SHARD, rows_per_group=ROWS_PER_GROUP)
    for i in range(20):
        w.add({"sample_id": i, **_images(i)})
    with pytest.raises(DatasetError, match="manifest.json missing"):
        open_dataset(uri)
    w.close()
    assert open_dataset(uri).num_samples == 20


def test_rewriting_a_dataset_first_removes_its_manifest(uri):
    """Breaks if a crash mid-rewrite could leave an old manifest describing new, partial shards."""
    _write(uri, n=8)
    ShardWriter(uri)
    assert not sfs.exists(sfs.join(uri, "manifest.json"))


def test_empty_dataset_is_an_error_naming_the_uri(uri):
    """Breaks if a 0-sample dataset opens and fails later, far from its cause."""
    ShardWriter(uri).close()
    with pytest.raises(DatasetError, match="empty") as err:
        open_dataset(uri)
    assert sfs.normalize(uri) in str(err.value)


def test_unknown_ids_are_an_error_naming_them(tmp_path):
    """Breaks if unknown ids are silently dropped or the message does not say which."""
    uri = str(tmp_path / "ds")
    _write(uri, n=8)
    ds = open_dataset(uri)
    with pytest.raises(DatasetError) as err:
        ds.read_samples([1, 999, -3, 2])
    msg = str(err.value)
    assert uri in msg and "999" in msg and "-3" in msg and "2 of 4" in msg
    assert "not in the index" in ds.describe(12345)
    assert "shard-00000.parquet" in ds.describe(3)


def test_extra_index_columns_are_optional(tmp_path):
    """Breaks if a dataset without synth's extra columns cannot be opened or read."""
    uri = str(tmp_path / "plain")
    _write(uri, n=6, extra=False)
    ds = open_dataset(uri)
    assert "bg_index" not in ds.index.column_names
    assert ds.read_samples([5])["sample_id"].tolist() == [5]


def test_extra_columns_must_be_the_same_for_every_sample(tmp_path):
    """Breaks if a sample with different extra keys silently misaligns the index."""
    w = ShardWriter(str(tmp_path / "ds"))
    w.add({"sample_id": 0, **_images(0), "a": 1})
    with pytest.raises(ValueError, match="extra index columns"):
        w.add({"sample_id": 1, **_images(1), "b": 1})


def test_dataset_survives_pickling(tmp_path):
    """Breaks if a ShardDataset cannot be shipped to Ray workers."""
    uri = str(tmp_path / "ds")
    _write(uri, n=8)
    ds = pickle.loads(pickle.dumps(open_dataset(uri)))
    assert ds.read_samples([7, 0])["sample_id"].tolist() == [7, 0]


# -- codec -------------------------------------------------------------------------------------


def test_mask_and_depth_are_stored_losslessly_in_the_raw_format():
    """Breaks if depth loses precision (8-bit), the mask is stored lossy or wider, or the header lies."""
    depth = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    data = codec.encode_depth(depth)
    assert data.startswith(codec.RAW_MAGIC)
    dtype, layout, kind, h, w = codec.raw_header(data, "depth")
    assert (dtype, layout, kind, h, w) == (np.dtype("<u2"), codec.DEPTH_LAYOUT, codec.DEPTH_CODEC, 48, 64)
    assert np.array_equal(codec.decode_depth_uint16(data), np.rint(depth * 65535).astype(np.uint16))
    assert np.abs(codec.decode_depth(data) - depth).max() <= 0.5 / 65535 + 1e-7
    planes = np.empty((2, 48, 64), np.uint8)
    codec.decode_depth_planes(data, out=planes)
    assert np.array_equal(planes[1].astype(np.uint32) * 256 + planes[0], codec.decode_depth_uint16(data))
    mask = np.zeros((5, 7), np.uint8)
    mask[1:3, 2:6] = 255
    data = codec.encode_mask(mask)
    assert codec.raw_header(data, "mask")[0] == np.uint8
    assert np.array_equal(codec.decode_mask(data), mask)
    assert np.array_equal(codec.decode_mask(codec.encode_mask(mask.astype(bool))), mask)
    for layout in (codec.LAYOUT_PLAIN, codec.LAYOUT_BYTE_PLANES):
        for kind in (codec.CODEC_NONE, codec.CODEC_ZSTD, codec.CODEC_LZ4):
            values = (np.arange(30 * 20, dtype=np.uint16) * 97).reshape(30, 20)
            assert np.array_equal(codec.decode_raw(codec.encode_raw(values, layout, kind), "x"), values)


def test_png_masks_and_depth_from_older_datasets_still_decode():
    """Breaks if datasets packed before the raw format (16-bit depth PNG, 8-bit mask PNG) stop loading."""
    depth = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    img = Image.open(io.BytesIO(codec.encode_depth_png(depth)))
    assert img.format == "PNG" and img.mode.startswith("I;16")
    assert np.array_equal(codec.decode_depth_uint16(codec.encode_depth_png(depth)),
                          np.rint(depth * 65535).astype(np.uint16))
    assert np.array_equal(codec.decode_depth(codec.encode_depth_png(depth)),
                          codec.decode_depth(codec.encode_depth(depth)))
    mask = np.zeros((5, 7), np.uint8)
    mask[1:3, 2:6] = 255
    assert np.array_equal(codec.decode_mask(codec.encode_mask_png(mask)), mask)
    # 8-bit depth (the source's PNGs, and what `data pack` stores from them): v / 255 exactly, both ways
    v = np.arange(256, dtype=np.uint8).reshape(16, 16)
    buf = io.BytesIO()
    Image.fromarray(v).save(buf, format="PNG")
    for data in (buf.getvalue(), codec.encode_depth_8bit(v)):
        assert np.array_equal(codec.decode_depth(data), v.astype(np.float32) / np.float32(255))
        assert np.array_equal(codec.decode_depth_uint16(data), v.astype(np.uint16) * 257)


def test_encoders_reject_values_they_cannot_store():
    """Breaks if out-of-range depth or non-binary masks are silently clipped into the dataset."""
    for encode in (codec.encode_depth, codec.encode_depth_png):
        with pytest.raises(ValueError):
            encode(np.full((4, 4), 1.5, np.float32))
        with pytest.raises(ValueError):
            encode(np.full((4, 4), np.nan, np.float32))
    for encode in (codec.encode_mask, codec.encode_mask_png):
        with pytest.raises(ValueError):
            encode(np.full((4, 4), 7, np.uint8))
    with pytest.raises(ValueError):
        codec.encode_jpeg(np.zeros((4, 4), np.uint8))


@pytest.mark.parametrize(
    "decode, what, good",
    [
        (codec.decode_jpeg, "JPEG", codec.encode_jpeg(np.full((16, 16, 3), 128, np.uint8))),
        (codec.decode_mask, "mask", codec.encode_mask(np.zeros((16, 16), np.uint8))),
        (codec.decode_mask, "mask", codec.encode_mask_png(np.zeros((16, 16), np.uint8))),
        (codec.decode_depth, "depth", codec.encode_depth(np.zeros((16, 16), np.float32))),
        (codec.decode_depth_uint16, "depth", codec.encode_depth(np.zeros((16, 16), np.float32))),
        (codec.decode_depth, "depth", codec.encode_depth_png(np.zeros((16, 16), np.float32))),
    ],
)
def test_corrupt_bytes_raise_corrupt_image_error_saying_what(decode, what, good):
    """Breaks if bad bytes escape as a bare PIL/OSError/pyarrow error (callers catch CorruptImageError)."""
    if what == "JPEG":
        wrong_format = codec.encode_mask_png(np.zeros((8, 8), np.uint8))
    else:
        wrong_format = codec.encode_jpeg(np.zeros((8, 8, 3), np.uint8))
    bad = [b"", b"not an image at all", good[: len(good) // 2], wrong_format]
    if good.startswith(codec.RAW_MAGIC):
        bad += [good[:-1], good + b"\0", good[:12]]
        garbled = bytearray(good)
        garbled[codec.RAW_HEADER_BYTES:] = b"\xff" * (len(good) - codec.RAW_HEADER_BYTES)
        bad.append(bytes(garbled))  # a payload that does not decompress
    for data in bad:
        with pytest.raises(codec.CorruptImageError, match=what):
            decode(data)
    assert issubclass(codec.CorruptImageError, ValueError)


def test_a_raw_image_of_another_size_than_its_buffer_is_refused():
    """Breaks if a mask or depth map of the wrong size is written into a batch slot unnoticed."""
    with pytest.raises(codec.ImageSizeError, match="8x8, expected 16x16"):
        codec.decode_mask(codec.encode_mask(np.zeros((8, 8), np.uint8)), out=np.empty((16, 16), np.uint8))
    with pytest.raises(codec.ImageSizeError):
        codec.decode_depth_planes(codec.encode_depth(np.zeros((8, 8), np.float32)), out=np.empty((2, 16, 16), np.uint8))


def test_a_format_1_dataset_with_png_masks_and_depth_still_opens_and_verifies(tmp_path):
    """Breaks if datasets written before the raw format (format /1, PNG masks and depth) stop loading."""
    from storage.verify import verify

    uri = str(tmp_path / "old")
    with ShardWriter(uri, rows_per_shard=ROWS_PER_SHARD, rows_per_group=ROWS_PER_GROUP,
                     format=LEGACY_MASK_DEPTH_FORMAT) as w:
        for i in range(8):
            im = _images(i)
            w.add({"sample_id": i, "fg_bg": codec.encode_jpeg(im["fg_bg"]), "bg": codec.encode_jpeg(im["bg"]),
                   "mask": codec.encode_mask_png(im["mask"]), "depth": codec.encode_depth_png(im["depth"])})
        w.close()
    manifest = sfs.read_json(sfs.join(uri, "manifest.json"))
    sfs.write_json(sfs.join(uri, "manifest.json"), {**manifest, "format": "orchestrator.shards/1"})
    ds = open_dataset(uri)
    got = ds.read_samples([5])
    assert got["mask"][0].startswith(codec.PNG_SIGNATURE)
    assert np.array_equal(codec.decode_mask(got["mask"][0]), _images(5)["mask"])
    out = verify(uri, workers=1)
    assert out["bad"] == [] and out["ok"] == 8
    sfs.write_json(sfs.join(uri, "manifest.json"), {**manifest, "format": "orchestrator.shards/9"})
    with pytest.raises(DatasetError, match="shards/9"):
        open_dataset(uri)


# -- declared columns (format /3) and the mask_depth layout kept byte for byte ---------------------

CLASSIFICATION = (Column("image", "image"), Column("label", "int64"))
SEGMENTATION = (Column("image", "image"), Column("mask", "raw_u8"))
CLASSES = ["cat", "dog", "eel"]


def _gray(i: int, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    return ((yy * 7 + xx * 3 + i * 11) % 256).astype(np.uint8)


def _classes_map(i: int, size: int = SIZE) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    seg = ((xx + i) // 8 % 3).astype(np.uint8)
    seg[yy < 2] = 255  # an "ignore" border: raw_u8 stores any byte, not just 0/255
    return seg


def _write_classification(uri: str, n: int = N) -> dict:
    w = ShardWriter(uri, rows_per_shard=ROWS_PER_SHARD, rows_per_group=ROWS_PER_GROUP, columns=CLASSIFICATION,
                    task="classification")
    for i in range(n):
        # 1-channel PNGs from arrays, ids not in order, a string extra column
        w.add({"sample_id": 1000 + (i * 7) % n, "image": _gray((i * 7) % n), "label": np.int64((i * 7) % n % 3),
               "source": f"img{(i * 7) % n}.png"})
    return w.close({"source": "test", "meta": {"classes": CLASSES}})


def _write_segmentation(uri: str, n: int = N) -> dict:
    w = ShardWriter(uri, rows_per_shard=ROWS_PER_SHARD, rows_per_group=ROWS_PER_GROUP, columns=SEGMENTATION,
                    task="segmentation")
    for i in range(n):
        seg = _classes_map(i)
        present = sorted(int(c) for c in np.unique(seg) if c != 255)
        # encoded bytes only: the writer takes height x width from the image
        w.add({"sample_id": i, "image": codec.encode_jpeg(_images(i)["fg_bg"]),
               "mask": encode_value(SEGMENTATION[1], seg),
               "class_pixels": [int((seg == c).sum()) for c in range(3)], "classes_present": present,
               "box": [i, i + 1, 4, 4]})
    return w.close({"meta": {"classes": CLASSES, "ignore_index": 255}})


def test_a_classification_dataset_round_trips_by_id_and_verifies_clean(uri):
    """Breaks if declared image + int64 columns are not written, read back by id, or verified as declared."""
    from storage.verify import verify

    m = _write_classification(uri)
    assert m["format"] == CRC32_FORMAT and m["task"] == "classification"
    assert m["columns"] == [{"name": "image", "codec": "image"}, {"name": "label", "codec": "int64"}]
    assert m["meta"] == {"classes": CLASSES} and "depth_mean" not in m
    ds = open_dataset(uri)
    assert (ds.task, ds.columns, ds.meta) == ("classification", CLASSIFICATION, {"classes": CLASSES})
    assert "depth_mean" not in ds.index.column_names
    assert ds.sample_columns == ("sample_id", "image", "label", "height", "width")
    ids = [1039, 1000, 1017, 1017, 1005]
    got = ds.read_samples(ids)
    assert set(got) == {"sample_id", "image", "label", "height", "width"}
    assert got["sample_id"].tolist() == ids and got["label"].dtype == np.int64
    assert got["label"].tolist() == [(i - 1000) % 3 for i in ids]
    for j, i in enumerate(ids):
        assert got["image"][j].startswith(codec.PNG_SIGNATURE)
        assert np.array_equal(decode_value(CLASSIFICATION[0], got["image"][j]), _gray(i - 1000))  # lossless
        assert (got["height"][j], got["width"][j]) == (SIZE, SIZE)
    assert ds.read_samples([1003], columns=["label"])["label"].tolist() == [0]
    assert ds.index_values("source", [1003, 1001]).tolist() == ["img3.png", "img1.png"]
    with pytest.raises(ValueError, match="unknown columns"):
        ds.read_samples([1003], columns=["mask"])
    with pytest.raises(DatasetError, match="no column 'depth_mean'") as err:
        ds.depth_means([1003])
    assert sfs.normalize(uri) in str(err.value) and "'label'" not in str(err.value) and "'source'" in str(err.value)
    out = verify(uri, workers=1)
    assert (out["samples"], out["shards"], out["bad"], out["ok"], out["checksums_ok"]) == (N, 3, [], N, N)
    assert pickle.loads(pickle.dumps(ds)).read_samples([1002])["label"].tolist() == [2]


def test_a_segmentation_dataset_round_trips_with_list_index_columns(uri):
    """Breaks if a raw_u8 class map is not stored exactly, or list-valued index columns do not round-trip."""
    from storage.verify import verify

    _write_segmentation(uri)
    ds = open_dataset(uri)
    assert ds.task == "segmentation" and ds.meta["ignore_index"] == 255 and ds.manifest["format"] == CRC32_FORMAT
    list_type = ds.index.schema.field("class_pixels").type
    assert pa.types.is_list(list_type) and list_type.value_type == pa.int64()
    ids = [33, 4, 17]
    got = ds.read_samples(ids, columns=("sample_id", "mask", "height"))
    assert set(got) == {"sample_id", "mask", "height"} and got["height"].tolist() == [SIZE] * 3
    for j, i in enumerate(ids):
        assert np.array_equal(decode_value(SEGMENTATION[1], got["mask"][j]), _classes_map(i))
    pixels = ds.index_values("class_pixels", ids)
    assert [p.tolist() for p in pixels] == [[int((_classes_map(i) == c).sum()) for c in range(3)] for i in ids]
    assert [p.tolist() for p in ds.index_values("classes_present", [0, 5])] == [
        sorted(int(c) for c in np.unique(_classes_map(i)) if c != 255) for i in (0, 5)]
    assert [b.tolist() for b in ds.index_values("box", [7])] == [[7, 8, 4, 4]]
    out = verify(uri, workers=1 if uri.startswith("memory://") else 2)  # memory:// is per process
    assert (out["bad"], out["ok"]) == ([], N)


def _shard_of(ds, sample_id: int) -> str:
    return ds.manifest["shards"][int(ds.index.column("shard").to_numpy()[ds.positions([sample_id])[0]])]["file"]


def test_a_corrupted_value_of_a_declared_column_is_caught_by_checksum_and_verify(tmp_path):
    """Breaks if the checksum skips non-mask_depth columns (the image, an int64 label), or verify misses them."""
    from storage.verify import verify

    uri = str(tmp_path / "cls")
    _write_classification(uri)
    ds = open_dataset(uri)
    # the label: rewrite the shard with one label changed (a valid Parquet file, other bytes)
    victim = 1021
    shard = _shard_of(ds, victim)
    path = tmp_path / "cls" / shard
    pf = pq.ParquetFile(str(path))
    groups = [pf.read_row_group(g) for g in range(pf.metadata.num_row_groups)]
    with pq.ParquetWriter(str(path), pf.schema_arrow, compression="none", use_dictionary=False,
                          write_statistics=["sample_id", "height", "width"]) as w:
        for t in groups:
            labels = [lab + 1 if sid == victim else lab
                      for sid, lab
                      in zip(t.column("sample_id").to_pylist(), t.column("label").to_pylist(), strict=True)]
            w.write_table(t.set_column(t.schema.get_field_index("label"), "label", pa.array(labels, pa.int64())))
    # the image of another sample: one flipped byte in place
    other = 1007
    img = ds.read_samples([other])["image"][0]
    other_path = tmp_path / "cls" / _shard_of(ds, other)
    data = bytearray(other_path.read_bytes())
    data[data.find(img) + len(img) // 2] ^= 0x10
    other_path.write_bytes(bytes(data))

    out = verify(uri, workers=1)
    by_sample = {b["sample"]: b for b in out["bad"] if b["sample"] is not None}
    assert set(by_sample) == {str(victim), str(other)}
    assert by_sample[str(victim)]["shard"] == shard and "checksum" in by_sample[str(victim)]["reason"]
    assert by_sample[str(other)]["shard"] == _shard_of(ds, other) and "checksum" in by_sample[str(other)]["reason"]
    assert out["checksums_ok"] == N - 2
    fresh = open_dataset(uri)
    for sid in (victim, other):
        with pytest.raises(DatasetError, match=f"sample {sid} fails its checksum"):
            fresh.read_samples([sid])


def _manifest_text(m: dict) -> bytes:
    return json.dumps(m).encode()


def _without(m: dict, key: str) -> dict:
    return {k: v for k, v in m.items() if k != key}


MALFORMED = {
    "not JSON": lambda m: b'{"format": "orchestrator.sha',
    "a list": lambda m: b"[1, 2]",
    "no num_samples": lambda m: _manifest_text(_without(m, "num_samples")),
    "no shards": lambda m: _manifest_text(_without(m, "shards")),
    "no index": lambda m: _manifest_text(_without(m, "index")),
    "num_samples a string": lambda m: _manifest_text({**m, "num_samples": "40"}),
    "shards an object": lambda m: _manifest_text({**m, "shards": {"0": m["shards"][0]}}),
    "a shard without bytes": lambda m: _manifest_text({**m,
                                                       "shards": [_without(m["shards"][0], "bytes"),
                                                                  *m["shards"][1:]]}),
    "columns not a list": lambda m: _manifest_text({**m, "columns": "image,label"}),
    "an unknown codec": lambda m: _manifest_text({**m,
                                                  "columns": [{"name": "image", "codec": "webp"}, m["columns"][1]]}),
    "/3 without columns": lambda m: _manifest_text(_without(m, "columns")),
    "/2 with other columns": lambda m: _manifest_text({**m, "format": LEGACY_MASK_DEPTH_FORMAT}),
    "meta not an object": lambda m: _manifest_text({**m, "meta": ["cat"]}),
    "task not a string": lambda m: _manifest_text({**m, "task": 3}),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_a_malformed_manifest_is_one_dataset_error_naming_it(tmp_path, kind):
    """Breaks if a damaged manifest.json surfaces as a KeyError/TypeError traceback, or the error
    does not name the manifest, the problem and the fix."""
    uri = str(tmp_path / "ds")
    m = _write_classification(uri, n=8)
    sfs.write_bytes(sfs.join(uri, "manifest.json"), MALFORMED[kind](m))
    with pytest.raises(DatasetError) as err:
        open_dataset(uri)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(sfs.join(uri, "manifest.json") + ": ")
    assert "re-pack" in msg


def test_mask_depth_datasets_are_written_as_before_columns_were_declared(tmp_path):
    """Breaks if the old writer path (format /2, still written on request) changes by a byte: the
    same bytes as a writer frozen at format /2's layout, and, with the library versions they were
    recorded with, the sha256s recorded before columns were declared."""
    uri = str(tmp_path / "ds")
    samples = []
    for i in range(20):
        im = _images(i)
        samples.append({"sample_id": i, "fg_bg": codec.encode_jpeg(im["fg_bg"]), "bg": codec.encode_jpeg(im["bg"]),
                        "mask": codec.encode_mask(im["mask"]), "depth": codec.encode_depth(im["depth"])})
    with ShardWriter(uri, rows_per_shard=8, rows_per_group=3, format=LEGACY_MASK_DEPTH_FORMAT) as w:
        for s in samples:
            w.add(dict(s))
        m = w.close()
    assert m["format"] == "orchestrator.shards/2" and m["task"] == "mask_depth"
    assert m["columns"] == [c.as_dict() for c in MASK_DEPTH_COLUMNS]
    assert open_dataset(uri).index.column_names == ["sample_id", "shard", "row_group", "row", "height", "width",
                                                    "depth_mean", "checksum"]
    schema = pa.schema([("sample_id", pa.int64()), ("fg_bg", pa.binary()), ("bg", pa.binary()), ("mask", pa.binary()),
                        ("depth", pa.binary()), ("height", pa.int32()), ("width", pa.int32())])
    for k, shard in enumerate(m["shards"]):
        buf = io.BytesIO()
        with pq.ParquetWriter(buf, schema, compression="none", use_dictionary=False,
                              write_statistics=["sample_id", "height", "width"]) as pw:
            part = samples[k * 8 : (k + 1) * 8]
            for g in range(0, len(part), 3):
                rows = part[g : g + 3]
                cols = {c: [r[c] for r in rows] for c in ("sample_id", "fg_bg", "bg", "mask", "depth")}
                pw.write_table(pa.Table.from_pydict({**cols, "height": [SIZE] * len(rows), "width": [SIZE] * len(rows)},
                                                    schema=schema),
                               row_group_size=len(rows))
        assert hashlib.sha256(buf.getvalue()).hexdigest() == shard["sha256"]
        assert sfs.read_bytes(sfs.join(uri, shard["file"])) == buf.getvalue()

    import PIL
    import skimage

    from storage.synth import synthesize

    recorded_with = ("25.0.1", "13.0.0", "2.4.6", "0.26.0")
    if (pa.__version__, PIL.__version__, np.__version__, skimage.__version__) != recorded_with:
        pytest.skip(f"sha256s recorded with pyarrow/Pillow/numpy/scikit-image {recorded_with}")
    m = synthesize(str(tmp_path / "synth"), 70, seed=3, image_size=64, rows_per_shard=32, rows_per_group=8, workers=1,
                   format=LEGACY_MASK_DEPTH_FORMAT)
    assert [s["sha256"] for s in m["shards"]] == [
        "34085bc9b55fb440fa03eeb4145dffd8de264779d7884f7b8baa2dd515e37892",
        "d283677d9ff59851e3b032aa6c5537a66c7eec54a5f709a0a4b0020faafa3373",
        "939df86cb2fa9a591bf486225336b0b269ea1861f2749a7f806dbe08a171db2a",
    ]
    index = sfs.read_bytes(sfs.join(str(tmp_path / "synth"), "index.parquet"))
    assert hashlib.sha256(index).hexdigest() == "354b19f57bdde44d47c786e8f42ed53fd11b7d19f326503a0a7fa6cde2fe7e78"
    assert m["depth_mean"] == 0.5032794624567032


def test_a_format_2_manifest_without_columns_reads_as_mask_depth(tmp_path):
    """Breaks if /2 datasets packed before columns were declared stop opening, reading or verifying."""
    from storage.verify import verify

    uri = str(tmp_path / "ds")
    _write(uri, n=12, format=LEGACY_MASK_DEPTH_FORMAT)
    manifest = sfs.read_json(sfs.join(uri, "manifest.json"))
    sfs.write_json(sfs.join(uri, "manifest.json"), {k: v for k, v in manifest.items() if k not in ("task", "columns")})
    ds = open_dataset(uri)
    assert (ds.task, ds.columns, ds.meta) == ("mask_depth", MASK_DEPTH_COLUMNS, {})
    got = ds.read_samples([11, 3])
    assert set(got) == {"sample_id", "fg_bg", "bg", "mask", "depth", "height", "width"}
    assert np.array_equal(codec.decode_mask(got["mask"][1]), _images(3)["mask"])
    assert ds.depth_means([3]).tolist() == ds.index_values("depth_mean",
                                                           [3]).tolist() and ds.depth_means([3]).dtype == np.float32
    assert verify(uri, workers=1)["ok"] == 12


def test_a_writer_refuses_samples_that_do_not_fit_its_columns(tmp_path):
    """Breaks if a missing column or an unstorable value lands in a dataset instead of failing at add()."""
    w = ShardWriter(str(tmp_path / "ds"), columns=CLASSIFICATION, task="classification")
    with pytest.raises(ValueError, match=r"sample 1: columns \['label'\] missing"):
        w.add({"sample_id": 1, "image": _gray(1)})
    with pytest.raises(ValueError, match="sample 2, column 'label'"):
        w.add({"sample_id": 2, "image": _gray(2), "label": 0.5})
    with pytest.raises(ValueError, match="reserved"):
        ShardWriter(str(tmp_path / "ds2"), columns=(Column("width", "int64"),))
    only_ints = ShardWriter(str(tmp_path / "ds3"), columns=(Column("label", "int64"),), task="t")
    with pytest.raises(ValueError, match="pass height and width"):
        only_ints.add({"sample_id": 0, "label": 1})


def test_the_size_comes_from_the_first_value_that_reads(tmp_path):
    """Breaks if a writer given only bytes records no size, or one undecodable image (written on
    purpose, for verify to find) stops it although another column gives the size."""
    uri = str(tmp_path / "ds")
    im = _images(0)
    with ShardWriter(uri, rows_per_shard=4, rows_per_group=2) as w:
        w.add({"sample_id": 0, "fg_bg": b"\xff\xd8\xff\xe0 not a jpeg", "bg": codec.encode_jpeg(im["bg"][:, :20]),
               "mask": codec.encode_mask(im["mask"]), "depth": codec.encode_depth(im["depth"])})
        w.close()
    assert open_dataset(uri).read_samples([0], columns=["height", "width"])["width"].tolist() == [20]
    seg = ShardWriter(str(tmp_path / "seg"), columns=(Column("label", "int64"), Column("seg", "raw_u8")), task="t")
    seg.add({"sample_id": 0, "label": 1, "seg": encode_value(Column("seg", "raw_u8"), np.zeros((5, 9), np.uint8))})
    seg.close()
    got = open_dataset(str(tmp_path / "seg")).read_samples([0])
    assert (got["height"][0], got["width"][0], got["label"][0]) == (5, 9, 1)


def test_packed_reads_give_the_list_reads_values_and_a_null_value_is_named(tmp_path):
    """Breaks if the landing's packed read (storage/shards/groups.py) gives other bytes than
    read_samples' lists, in another order, or lets a value that is missing from a shard through."""
    from storage.shards.groups import Packed

    uri = str(tmp_path / "ds")
    _write(uri)
    ds = open_dataset(uri)
    ids = np.random.default_rng(0).permutation(ds.sample_ids)[:25]
    ids = np.concatenate([ids, ids[:3]])  # repeats come back repeated
    plain, packed = ds.read_samples(ids), ds.read_samples(ids, packed=True)
    assert set(plain) == set(packed)
    kinds = {}
    for c, want in plain.items():
        got = packed[c]
        kinds[c] = type(got).__name__
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and np.array_equal(got, want), c
        else:
            assert list(got) == want and [got[i] for i in range(len(ids))] == want, c
    # The unshared bytes columns come packed; the shared background stays a list (one object per value).
    assert {c for c, k in kinds.items() if k == "Packed"} == {"fg_bg", "mask", "depth"} and kinds["bg"] == "list"
    assert isinstance(packed["mask"], Packed) and packed["mask"].nbytes >= sum(map(len, plain["mask"]))

    # A value missing from a row group (a null where bytes must be) is named, not read as empty bytes.
    from storage.shards.groups import GroupColumns, gather, verify_rows

    table = pa.table({"sample_id": pa.array([5, 6], pa.int64()), "mask": pa.array([b"ab", None], pa.binary())})
    g = GroupColumns(table)
    col = [Column("mask", "raw_u8")]
    for kind in ("blake2b", "crc32"):  # up to /4, and /5
        ok = columns_checksum(col, {"mask": b"ab"}, kind)
        assert verify_rows(g, [(0, 5, ok)], col, kind) is None
        assert verify_rows(g, [(0, 5, ok), (1, 6, ok)], col, kind) == "sample 6 has a missing value"
        assert verify_rows(g, [(1, 5, ok)], col, kind) == "sample 5 is not at row 1 where the index puts it"
        assert "fails its checksum" in verify_rows(g, [(0, 5, "0" * len(ok))], col, kind)
    assert "fails its checksum" in verify_rows(g, [(0, 5, columns_checksum(col, {"mask": b"ab"}, "blake2b"))],
                                               col, "crc32")
    got = gather({(0, 0): g}, {(0, 0): ([1, 0, 2], np.array([0, 1, 0]))}, 3, "mask", "packed")
    assert list(got) == [None, b"ab", b"ab"] and got.blob == b"abab"  # output 1 and 2 take row 0, 0 takes row 1
