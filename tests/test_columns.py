"""Declared columns and their codecs (storage/columns.py): what a manifest may declare, how each
codec encodes, decodes and is checked, independent of what the column means."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from storage import codec
from storage.columns import (
    CODECS,
    MASK_DEPTH_COLUMNS,
    Column,
    ColumnsError,
    checksum_bytes,
    columns_from_manifest,
    columns_to_manifest,
    decode_check,
    decode_value,
    encode_mask_depth_value,
    encode_value,
    encoded_size,
)
from storage.shards import (
    BASE_INDEX_COLUMNS,
    ShardWriter,
    columns_checksum,
    open_dataset,
    sample_checksum,
)


def _rgb(h: int = 12, w: int = 20) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([yy * 10, xx * 10, (yy + xx) * 5], axis=2).astype(np.uint8)


def test_manifests_without_columns_hold_the_mask_depth_columns():
    """Breaks if /1 and /2 datasets (no "columns" key) stop reading as fg_bg, bg, mask, depth."""
    assert columns_from_manifest({"format": "orchestrator.shards/2"}) == MASK_DEPTH_COLUMNS
    assert [c.as_dict() for c in MASK_DEPTH_COLUMNS] == [
        {"name": "fg_bg", "codec": "image"}, {"name": "bg", "codec": "image"},
        {"name": "mask", "codec": "raw_u8"}, {"name": "depth", "codec": "raw_u16"},
    ]
    declared = (Column("image", "image"), Column("label", "int64"))
    assert columns_from_manifest({"columns": columns_to_manifest(declared)}) == declared


@pytest.mark.parametrize(
    "columns, says",
    [
        ("image", "must be a list"),
        ({"name": "image", "codec": "image"}, "must be a list"),
        ([{"name": "image"}], "string \"name\" and \"codec\""),
        (["image"], "string \"name\" and \"codec\""),
        ([{"name": "image", "codec": "webp"}], "unknown codec 'webp'"),
        ([{"name": "x", "codec": "image"}, {"name": "x", "codec": "int64"}], "more than once"),
        ([{"name": "height", "codec": "int64"}], "reserved"),
        ([], "at least one column"),
    ],
)
def test_malformed_columns_are_refused_saying_why(columns, says):
    """Breaks if a manifest with unusable columns opens and fails later, far from its cause."""
    with pytest.raises(ColumnsError, match=says):
        columns_from_manifest({"columns": columns})


def test_each_codec_round_trips_arrays():
    """Breaks if a codec loses values it must keep, or stores them in another layout than documented."""
    rgb = _rgb()
    img = decode_value(Column("image", "image"), encode_value(Column("image", "image"), rgb))
    assert img.shape == rgb.shape and np.abs(img.astype(int) - rgb).mean() < 3  # JPEG
    gray = (np.arange(12 * 20) % 251).astype(np.uint8).reshape(12, 20)
    data = encode_value(Column("image", "image"), gray)
    assert data.startswith(codec.PNG_SIGNATURE) and np.array_equal(decode_value(Column("image", "image"), data), gray)
    assert np.array_equal(decode_value(Column("image", "image"),
                                       encode_value(Column("image", "image"), gray[:, :, None])), gray)

    classes = (np.arange(12 * 20) % 21).astype(np.uint8).reshape(12, 20)  # not a 0/255 mask: raw_u8 stores any bytes
    data = encode_value(Column("seg", "raw_u8"), classes)
    assert data == codec.encode_raw(classes, codec.LAYOUT_PLAIN, codec.CODEC_LZ4)
    assert np.array_equal(decode_value(Column("seg", "raw_u8"), data), classes)
    assert np.array_equal(decode_value(Column("m", "raw_u8"), encode_value(Column("m", "raw_u8"), classes > 10)),
                          (classes > 10) * 255)

    deep = (np.arange(12 * 20) * 271).astype(np.uint16).reshape(12, 20)
    data = encode_value(Column("d", "raw_u16"), deep)
    assert data == codec.encode_raw(deep, codec.LAYOUT_BYTE_PLANES, codec.CODEC_LZ4)
    assert np.array_equal(decode_value(Column("d", "raw_u16"), data), deep)
    frac = np.linspace(0, 1, 12 * 20, dtype=np.float32).reshape(12, 20)
    assert encode_value(Column("d", "raw_u16"), frac) == codec.encode_depth(frac)
    # kept 8-bit
    assert decode_value(Column("d", "raw_u16"), encode_value(Column("d", "raw_u16"), gray)).dtype == np.uint8

    assert encode_value(Column("label", "int64"), np.int16(-3)) == -3
    assert decode_value(Column("label", "int64"), 7) == 7


def test_encoded_bytes_pass_through_and_bad_values_are_refused():
    """Breaks if pre-encoded bytes are re-encoded, or unstorable values are silently coerced."""
    blob = codec.encode_jpeg(_rgb())
    assert encode_value(Column("image", "image"), bytearray(blob)) == blob
    bad = [
        (Column("image", "image"), np.zeros((4, 4, 3), np.float32)),
        (Column("image", "image"), b""),
        (Column("seg", "raw_u8"), np.zeros((4, 4), np.uint16)),
        (Column("seg", "raw_u8"), np.zeros((4, 4, 3), np.uint8)),
        (Column("d", "raw_u16"), np.full((4, 4), 1.5, np.float32)),
        (Column("d", "raw_u16"), np.zeros((4, 4), np.int32)),
        (Column("label", "int64"), 1.5),
        (Column("label", "int64"), True),
        (Column("label", "int64"), b"\x01"),
        (Column("label", "int64"), 2**63),
        (Column("image", "image"), "a path.jpg"),
    ]
    for column, value in bad:
        with pytest.raises(ValueError, match=repr(column.name)):
            encode_value(column, value)


def test_png_values_of_raw_columns_still_decode():
    """Breaks if raw columns packed as PNG (format /1's masks and depth) stop decoding."""
    mask = np.zeros((6, 9), np.uint8)
    mask[2:4, 3:7] = 255
    assert np.array_equal(decode_value(Column("mask", "raw_u8"), codec.encode_mask_png(mask)), mask)
    depth = np.linspace(0, 1, 54, dtype=np.float32).reshape(6, 9)
    assert np.array_equal(decode_value(Column("depth", "raw_u16"), codec.encode_depth_png(depth)),
                          codec.depth_to_uint16(depth))


def test_decode_check_names_the_column_and_what_is_wrong():
    """Breaks if verify could pass undecodable values, values of another size, or a missing int."""
    image = Column("image", "image")
    good = encode_value(image, _rgb(12, 20))
    decode_check(image, good, 12, 20)
    with pytest.raises(codec.ImageSizeError, match="'image' is 12x20, the index says 10x20"):
        decode_check(image, good, 10, 20)
    with pytest.raises(codec.CorruptImageError, match="'image'"):
        decode_check(image, good[: len(good) // 2], 12, 20)
    buf = io.BytesIO()
    Image.new("RGB", (20, 12)).save(buf, format="BMP")
    with pytest.raises(codec.CorruptImageError, match="BMP"):
        decode_check(image, buf.getvalue(), 12, 20)
    seg = Column("seg", "raw_u8")
    with pytest.raises(codec.CorruptImageError, match="expected uint8"):
        decode_check(seg, encode_value(Column("d", "raw_u16"), np.zeros((12, 20), np.uint16)), 12, 20)
    with pytest.raises(codec.CorruptImageError, match="neither the raw format nor PNG"):
        decode_check(seg, good, 12, 20)
    decode_check(Column("label", "int64"), 3, 0, 0)
    with pytest.raises(codec.CorruptImageError, match="'label'"):
        decode_check(Column("label", "int64"), None, 12, 20)


def test_checksums_cover_declared_values_and_equal_the_mask_depth_ones():
    """Breaks if a checksum skips a column (an int64 label), changes for existing data (blake2b up
    to /4, the fixed layout's sample_checksum), or a format reads with the other kind."""
    import zlib

    from storage.shards import BLAKE2B, CRC32, READABLE_FORMATS, checksum_of

    label = Column("label", "int64")
    assert checksum_bytes(label, -2) == (-2).to_bytes(8, "little", signed=True)
    cols = (Column("image", "image"), label)
    for kind in (BLAKE2B, CRC32):
        a = columns_checksum(cols, {"image": b"xyz", "label": 1}, kind)
        assert a != columns_checksum(cols, {"image": b"xyz", "label": 2}, kind)
        assert a != columns_checksum(cols, {"image": b"xyy", "label": 1}, kind)
        assert len(a) == {BLAKE2B: 16, CRC32: 8}[kind]
    assert columns_checksum(cols, {"image": b"xyz", "label": 1}, CRC32) == (
        f"{zlib.crc32((1).to_bytes(8, 'little', signed=True), zlib.crc32(b'xyz')):08x}")
    parts = {"fg_bg": b"a", "bg": b"bc", "mask": b"d", "depth": b"ef"}
    assert columns_checksum(MASK_DEPTH_COLUMNS, parts, BLAKE2B) == sample_checksum(b"a", b"bc", b"d", b"ef")
    assert {f: checksum_of(f) for f in READABLE_FORMATS} == {
        "orchestrator.shards/1": BLAKE2B, "orchestrator.shards/2": BLAKE2B, "orchestrator.shards/3": BLAKE2B,
        "orchestrator.shards/4": BLAKE2B, "orchestrator.shards/5": CRC32}
    with pytest.raises(ValueError, match="unknown checksum 'md5'"):
        columns_checksum(cols, {"image": b"xyz", "label": 1}, "md5")


def test_mask_depth_arrays_keep_their_checks():
    """Breaks if the mask_depth layout starts storing non-binary masks or RGB inputs as PNG."""
    fg_bg, bg, mask, depth = MASK_DEPTH_COLUMNS
    with pytest.raises(ValueError):
        encode_mask_depth_value(mask, np.full((4, 4), 7, np.uint8))
    with pytest.raises(ValueError):
        encode_mask_depth_value(fg_bg, np.zeros((4, 4), np.uint8))
    m = np.zeros((4, 4), np.uint8)
    m[1:3] = 255
    assert encode_mask_depth_value(mask, m) == encode_value(mask, m) == codec.encode_mask(m)
    d = np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4)
    assert encode_mask_depth_value(depth, d) == encode_value(depth, d) == codec.encode_depth(d)


def test_sizes_are_read_from_encoded_values():
    """Breaks if a writer given only bytes records another height x width than the values have."""
    assert encoded_size(Column("image", "image"), codec.encode_jpeg(_rgb(12, 20))) == (12, 20)
    assert encoded_size(Column("seg", "raw_u8"), codec.encode_mask(np.zeros((7, 5), np.uint8))) == (7, 5)
    assert set(CODECS) == {"image", "raw_u8", "raw_u16", "int64"}


def test_declared_int64_columns_named_in_index_columns_are_copied_into_the_index(tmp_path):
    """Breaks if ShardWriter's index_columns stops copying a declared label into index.parquet
    (first, in the order named, before the sorted extra keys), or changes the shards for it."""
    cols = (Column("image", "image"), Column("label", "int64"))
    samples = [{"sample_id": i, "image": codec.encode_jpeg(_rgb()), "label": np.int64(i % 3), "zeta": np.int32(i),
                "alpha": float(i),
                "beta": [i, i]} for i in range(7)]

    def write(uri, **kw):
        with ShardWriter(str(uri), rows_per_shard=3, rows_per_group=2, columns=cols, task="classification", **kw) as w:
            w.add_many(dict(s) for s in samples)
            return w.close()

    plain = write(tmp_path / "plain")
    copied = write(tmp_path / "copied", index_columns=("label", "zeta"))
    assert [s["sha256"] for s in copied["shards"]] == [s["sha256"] for s in plain["shards"]]  # the shards do not change
    ds, ds_plain = open_dataset(str(tmp_path / "copied")), open_dataset(str(tmp_path / "plain"))
    assert "label" not in ds_plain.index.column_names  # only when asked
    assert ds.index.column_names == [*BASE_INDEX_COLUMNS, "label", "zeta", "alpha", "beta"]
    assert ds.index.schema.field("label").type == "int64" and ds.index.schema.field("zeta").type == "int32"
    ids = [6, 0, 4]
    assert ds.index_values("label", ids).tolist() == ds.read_samples(ids)["label"].tolist() == [0, 0, 1]


@pytest.mark.parametrize(
    "index_columns, says",
    [
        (("image",), "only int64 columns"),
        (("checksum",), "always in the index"),
        (("height",), "always in the index"),
        (("label", "label"), "twice"),
        (("",), "not a column name"),
    ],
)
def test_unusable_index_columns_are_refused_saying_why(tmp_path, index_columns, says):
    """Breaks if ShardWriter accepts index columns it cannot write (bytes, the index's own, repeats)."""
    cols = (Column("image", "image"), Column("label", "int64"))
    with pytest.raises(ValueError, match=says):
        ShardWriter(str(tmp_path / "ds"), columns=cols, task="classification", index_columns=index_columns)


def test_a_sample_without_a_named_index_column_is_refused(tmp_path):
    """Breaks if a sample that lacks an index column the writer was told to write slips through."""
    cols = (Column("image", "image"), Column("label", "int64"))
    with ShardWriter(str(tmp_path / "ds"), columns=cols, task="classification", index_columns=("label", "source")) as w:
        with pytest.raises(ValueError, match=r"sample 3: index columns \['source'\] missing"):
            w.add({"sample_id": 3, "image": codec.encode_jpeg(_rgb()), "label": 1})
