"""Task kinds beside mask_depth (classification, segmentation, depth): synthetic sets, the raw layouts
`data pack --task KIND` takes, bad samples, and what the packed datasets hold for the training side."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage.columns import decode_value
from storage.layouts.voc import VOC_CLASSES, voc_palette
from storage.pack import pack
from storage.seed_layout import synthesize_seed_layout
from storage.shards import BASE_INDEX_COLUMNS, open_dataset
from storage.source_plan import SourceError
from storage.synth_tasks import (
    CLASSIFICATION_CLASSES,
    SEGMENTATION_CLASSES,
    index_extra,
    synthesize_task,
    synthesize_task_seed_layout,
)
from tests.conftest import run_cli

TASKS = ("classification", "segmentation", "depth")
N = 24


def _png(values: np.ndarray, mode: str | None = None, palette: list[int] | None = None) -> bytes:
    img = Image.fromarray(values) if mode is None else Image.fromarray(values, mode)
    if palette is not None:
        img.putpalette(palette)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(rgb: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _decoded(ds, ids, column: str) -> list:
    col = next(c for c in ds.columns if c.name == column)
    return [decode_value(col, v) for v in ds.read_samples(ids)[column]]


def _by_source(ds) -> dict[str, int]:
    return dict(zip(ds.index.column("source").to_pylist(), ds.index.column("sample_id").to_pylist(), strict=True))


def _shas(uri: str) -> list[str]:
    return [s["sha256"] for s in open_dataset(uri).manifest["shards"]]


@pytest.fixture(scope="module")
def synth_sets(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("synth")
    out = {}
    for task in TASKS:
        out[task] = str(root / task)
        synthesize_task(task, out[task], N, seed=7, rows_per_shard=16, rows_per_group=4, workers=1)
    return out


@pytest.fixture(scope="module")
def raw_sets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("raw")
    for task in TASKS:
        synthesize_task_seed_layout(task, str(root / task), N, seed=7, workers=1)
    return {task: root / task for task in TASKS}


# -- synthetic sets ------------------------------------------------------------------------------------


def test_synth_classification_is_28px_gray_glyphs_with_labels_in_columns_index_and_meta(synth_sets):
    """Breaks if the classification set's columns, label index column, class list or image format drift."""
    ds = open_dataset(synth_sets["classification"])
    assert ds.task == "classification" and [(c.name, c.codec) for c in ds.columns] == [("image", "image"),
                                                                                       ("label", "int64")]
    assert ds.meta == {"classes": list(CLASSIFICATION_CLASSES), "channels": 1}
    ids = list(range(N))
    rows = ds.read_samples(ids)
    assert rows["label"].tolist() == ds.index_values("label", ids).tolist()
    assert set(rows["label"].tolist()) <= set(range(10)) and len(set(rows["label"].tolist())) >= 5
    for img in _decoded(ds, ids[:5], "image"):
        assert img.shape == (28, 28) and img.dtype == np.uint8  # grayscale stays one channel
    assert Image.open(io.BytesIO(rows["image"][0])).format == "PNG"


def test_synth_segmentation_masks_are_class_ids_or_255_and_class_pixels_count_them(synth_sets):
    """Breaks if masks hold other values than the 6 class ids and 255, or class_pixels miscounts."""
    ds = open_dataset(synth_sets["segmentation"])
    assert ds.task == "segmentation" and [(c.name, c.codec) for c in ds.columns] == [("image", "image"),
                                                                                     ("mask", "raw_u8")]
    assert ds.meta["classes"] == list(SEGMENTATION_CLASSES) and ds.meta["ignore_index"] == 255 and len(
        SEGMENTATION_CLASSES) == 6
    ids = list(range(N))
    images, masks = _decoded(ds, ids, "image"), _decoded(ds, ids, "mask")
    stats = ds.index_values("class_pixels", ids)
    seen = set()
    for img, mask, counts in zip(images, masks, stats, strict=True):
        assert img.shape == (64, 64, 3) and mask.shape == (64, 64)
        vals = set(np.unique(mask).tolist())
        assert vals <= set(range(6)) | {255}
        seen |= vals
        assert list(counts) == [int((mask == k).sum()) for k in range(6)]
    assert seen == set(range(6)) | {255}  # every class, and the ignore band on edges, occur


def test_synth_depth_is_millimetres_in_range_with_valid_counts_and_sums(synth_sets):
    """Breaks if depth is not mm in ~0.5-10 m, or depth_sum_m / depth_valid / meta range disagree with it."""
    ds = open_dataset(synth_sets["depth"])
    assert ds.task == "depth" and [(c.name, c.codec) for c in ds.columns] == [("image", "image"), ("depth", "raw_u16")]
    ids = list(range(N))
    depths = _decoded(ds, ids, "depth")
    sums, valid = ds.index_values("depth_sum_m", ids), ds.index_values("depth_valid", ids)
    lo = min(int(d[d > 0].min()) for d in depths)
    hi = max(int(d.max()) for d in depths)
    assert 500 <= lo and hi <= 10000
    assert ds.meta["depth_scale"] == 1000 and ds.meta["min_depth_m"] == lo / 1000 and ds.meta[
        "max_depth_m"] == hi / 1000
    for d, s, v in zip(depths, sums, valid, strict=True):
        assert d.dtype == np.uint16 and d.shape == (64, 64)
        assert v == int((d > 0).sum()) and s == pytest.approx(d[d > 0].sum(dtype=np.int64) / 1000)
    assert any(v < 64 * 64 for v in valid)  # some samples carry invalid (0) holes
    # Depth is inferable: the floor recedes, so the bottom rows are nearer than the top ones.
    assert np.mean([d[-4:][d[-4:] > 0].mean() < d[:4][d[:4] > 0].mean() for d in depths]) > 0.9


@pytest.mark.parametrize("task", TASKS)
def test_synth_index_holds_the_task_index_columns_in_order(task, synth_sets):
    """Breaks if a synthetic set's index gains helper values (depth's min/max) or reorders its columns."""
    ds = open_dataset(synth_sets[task])
    assert ds.index.column_names == [*BASE_INDEX_COLUMNS, *index_extra(task)]


@pytest.mark.parametrize("task", TASKS)
def test_synth_is_deterministic_by_seed(task, synth_sets, tmp_path):
    """Breaks if a synthetic set depends on anything but its seed (or ignores the seed)."""
    synthesize_task(task, str(tmp_path / "same"), N, seed=7, rows_per_shard=16, rows_per_group=4, workers=1)
    synthesize_task(task, str(tmp_path / "other"), N, seed=8, rows_per_shard=16, rows_per_group=4, workers=1)
    assert _shas(str(tmp_path / "same")) == _shas(synth_sets[task])
    assert _shas(str(tmp_path / "other")) != _shas(synth_sets[task])


def test_synth_classification_is_learnable_by_a_nearest_centroid_rule(tmp_path):
    """Breaks if the glyph classes stop being separable (then no small CNN gets above chance either)."""
    from storage.synth_tasks import make_classification

    train = [make_classification(0, i) for i in range(600)]
    test = [make_classification(1, i) for i in range(300)]
    x = np.stack([t[0] for t in train]).reshape(600, -1).astype(np.float32)
    y = np.array([t[1] for t in train])
    x = (x - x.mean(1, keepdims=True)) / (x.std(1, keepdims=True) + 1e-6)
    centroids = np.stack([x[y == k].mean(0) for k in range(10)])
    xt = np.stack([t[0] for t in test]).reshape(300, -1).astype(np.float32)
    xt = (xt - xt.mean(1, keepdims=True)) / (xt.std(1, keepdims=True) + 1e-6)
    acc = np.mean(np.argmax(xt @ centroids.T, 1) == np.array([t[1] for t in test]))
    assert acc > 0.3  # chance is 0.1; a CNN does far better than this template matcher


# -- raw layouts -> pack --task -> verify -----------------------------------------------------------------


@pytest.mark.parametrize("task", TASKS)
def test_raw_layout_packs_with_task_and_verifies_clean(task, raw_sets, synth_sets, tmp_path):
    """Breaks if `data pack --task` cannot read the layout `data synth --layout seed` writes, or changes values."""
    dest = tmp_path / "ds"
    report = tmp_path / "report.json"
    res = run_cli("data", "pack", str(raw_sets[task]), str(dest), "--task", task, "--report", str(report), "--workers",
                  "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert json.loads(report.read_text())["packed"] == N and json.loads(report.read_text())["skipped"] == []
    ver = run_cli("data", "verify", str(dest), "--json", cwd=tmp_path)
    assert ver.returncode == 0, ver.stderr
    assert json.loads(ver.stdout)["ok"] == N and json.loads(ver.stdout)["bad"] == []
    ds, ref = open_dataset(str(dest)), open_dataset(synth_sets[task])
    assert ds.task == task and ds.columns == ref.columns
    assert {k: v
            for k, v in ds.meta.items() if k
            not in ("min_depth_m", "max_depth_m", "data_min_depth_m", "data_max_depth_m")} == \
        {k: v for k, v in ref.meta.items() if k not in ("min_depth_m", "max_depth_m")}
    src = _by_source(ds)
    for name, sid in list(src.items())[:6]:
        ref_id = int(Path(name).stem)
        got, want = ds.read_samples([sid]), ref.read_samples([ref_id])
        for c in ref.columns:
            value, expected = got[c.name][0], want[c.name][0]
            assert (value == expected) if c.codec in ("image", "int64") else np.array_equal(decode_value(c, value),
                                                                                            decode_value(c, expected))


def test_classification_imagefolder_keeps_bytes_channels_and_counts_labels(tmp_path):
    """Breaks if ImageFolder class order, labels, kept JPEG/PNG bytes or the channels meta are wrong."""
    src = tmp_path / "src"
    rng = np.random.default_rng(0)
    gray = _write(src / "b_cat" / "x.png", _png(rng.integers(0, 255, (10, 12), dtype=np.uint8)))
    rgb = _write(src / "a_ant" / "y.jpg", _jpeg(rng.integers(0, 255, (9, 7, 3), dtype=np.uint8)))
    _write(src / "a_ant" / "sub" / "z.png", _png(rng.integers(0, 255, (5, 5), dtype=np.uint8)))
    bmp = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(bmp, format="BMP")
    _write(src / "c_cow" / "w.bmp", bmp.getvalue())
    _write(src / "c_cow" / "notes.txt", b"not an image")
    res = pack(str(src), str(tmp_path / "ds"), task="classification", workers=1)
    assert res.packed == 4 and len(res.unlisted) == 1 and res.unlisted[0].endswith("notes.txt")
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.meta == {"classes": ["a_ant", "b_cat", "c_cow"], "channels": 3}
    src_id = _by_source(ds)
    labels = dict(zip(ds.index.column("source").to_pylist(), ds.index_values("label", ds.sample_ids).tolist(),
                      strict=True))
    assert labels == {"a_ant/sub/z.png": 0, "a_ant/y.jpg": 0, "b_cat/x.png": 1, "c_cow/w.bmp": 2}
    rows = ds.read_samples([src_id["b_cat/x.png"], src_id["a_ant/y.jpg"], src_id["c_cow/w.bmp"]])
    assert rows["image"][0] == gray.read_bytes() and rows["image"][1] == rgb.read_bytes()  # kept as they are
    assert rows["label"].tolist() == [1, 0, 2] and (rows["height"][0], rows["width"][0]) == (10, 12)
    assert Image.open(io.BytesIO(rows["image"][2])).format == "PNG"  # BMP became a lossless PNG
    assert _decoded(ds, [src_id["b_cat/x.png"]], "image")[0].shape == (10, 12)


def test_segmentation_and_depth_index_stats_are_exact_on_a_hand_case(tmp_path):
    """Breaks if class_pixels leaves in 255 or miscounts, or depth_sum_m / depth_valid are off."""
    seg = tmp_path / "seg"
    mask = np.array([[0, 0, 1, 255, 2], [2, 2, 255, 255, 0]], np.uint8)
    _write(seg / "images" / "a.png", _png(np.zeros((2, 5, 3), np.uint8)))
    _write(seg / "masks" / "a.png", _png(mask))
    (seg / "classes.txt").write_text("bg\nthing\nstuff\n")
    pack(str(seg), str(tmp_path / "seg_ds"), task="segmentation", workers=1)
    ds = open_dataset(str(tmp_path / "seg_ds"))
    assert ds.index_values("class_pixels", [0])[0].tolist() == [3, 1, 3]
    assert np.array_equal(_decoded(ds, [0], "mask")[0], mask) and ds.meta["classes"] == ["bg", "thing", "stuff"]

    dep = tmp_path / "dep"
    mm = np.array([[0, 1000, 2500], [500, 0, 12000]], np.uint16)
    _write(dep / "rgb" / "a.jpg", _jpeg(np.zeros((2, 3, 3), np.uint8)))
    _write(dep / "depth" / "a.png", _png(mm))
    pack(str(dep), str(tmp_path / "dep_ds"), task="depth", workers=1)
    ds = open_dataset(str(tmp_path / "dep_ds"))
    assert ds.index_values("depth_sum_m", [0])[0] == pytest.approx(16.0) and ds.index_values("depth_valid", [0])[0] == 4
    assert np.array_equal(_decoded(ds, [0], "depth")[0], mm)
    # NYU's 0.1-10 m by default, widened to what the data hold.
    assert (ds.meta["min_depth_m"], ds.meta["max_depth_m"], ds.meta["depth_scale"]) == (0.1, 12.0, 1000)


def test_a_voc_tree_packs_with_the_21_classes_and_keeps_255_as_ignore(tmp_path):
    """Breaks if VOC palette indices are not taken as class ids, 255 borders are lost, or the
    ImageSets lists are not what picks the samples."""
    root = tmp_path / "VOCdevkit" / "VOC2012"
    rng = np.random.default_rng(1)
    masks = {}
    for i, name in enumerate(["2007_000032", "2007_000039", "2008_000001", "2009_000002"]):
        m = np.zeros((20, 30), np.uint8)
        m[4:12, 5:15] = 15  # person
        m[3, 4:16] = m[12, 4:16] = 255  # the border VOC draws round objects
        m[14:18, 20:28] = 1 + i  # aeroplane, bicycle, ...
        masks[name] = m
        _write(root / "JPEGImages" / f"{name}.jpg", _jpeg(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)))
        _write(root / "SegmentationClass" / f"{name}.png", _png(m, "P", voc_palette()))
    sets = root / "ImageSets" / "Segmentation"
    _write(sets / "train.txt", b"2007_000032\n2008_000001\n")
    _write(sets / "val.txt", b"2007_000039\n")
    _write(sets / "test.txt", b"2009_000002\n")  # train + val are packed; the test list is not
    assert Image.open(root / "SegmentationClass" / "2007_000032.png").mode == "P"
    dest = tmp_path / "ds"
    res = run_cli("data", "pack", str(tmp_path / "VOCdevkit"), str(dest), "--task", "segmentation", "--workers", "1",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ds = open_dataset(str(dest))
    assert ds.meta["classes"] == VOC_CLASSES and len(VOC_CLASSES) == 21 and ds.meta["ignore_index"] == 255
    assert ds.manifest["source_layout"] == "voc"
    names = ds.index.column("source").to_pylist()
    assert sorted(names) == ["2007_000032", "2007_000039", "2008_000001"]
    splits = dict(zip(names, ds.index.column("split").to_pylist(), strict=True))
    assert splits == {"2007_000032": "train", "2007_000039": "val", "2008_000001": "train"}
    for name, sid in _by_source(ds).items():
        got = _decoded(ds, [sid], "mask")[0]
        assert np.array_equal(got, masks[name]) and (got == 255).sum() == 24
        counts = ds.index_values("class_pixels", [sid])[0].tolist()
        assert len(counts) == 21 and counts[15] == 80 and sum(counts) == 20 * 30 - 24


def test_nyu_16bit_png_and_npy_metres_pack_to_the_same_millimetres(tmp_path):
    """Breaks if .npy metres and 16-bit mm PNGs disagree, or NaN/inf/<=0 are not stored as 0 (invalid)."""
    rng = np.random.default_rng(2)
    mm = rng.integers(100, 10000, (12, 16)).astype(np.uint16)
    mm[0, :4] = 0
    metres = mm.astype(np.float64) / 1000
    metres[0, 0], metres[0, 1], metres[0, 2], metres[0, 3] = np.nan, np.inf, -1.0, 0.0
    rgb = _jpeg(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
    for kind in ("png", "npy"):
        _write(tmp_path / kind / "rgb" / "0001.jpg", rgb)
    _write(tmp_path / "png" / "depth" / "0001.png", _png(mm))
    buf = io.BytesIO()
    np.save(buf, metres.astype(np.float32))
    _write(tmp_path / "npy" / "depth" / "0001.npy", buf.getvalue())
    kitti = np.rint(mm.astype(np.float64) * 0.256).astype(np.uint16)  # KITTI: 256 per metre
    _write(tmp_path / "kitti" / "rgb" / "0001.jpg", rgb)
    _write(tmp_path / "kitti" / "depth" / "0001.png", _png(kitti))
    got = {}
    for kind in ("png", "npy", "kitti"):
        pack(str(tmp_path / kind), str(tmp_path / f"{kind}_ds"), task="depth", workers=1,
             depth_units_per_m=256 if kind == "kitti" else None)
        ds = open_dataset(str(tmp_path / f"{kind}_ds"))
        got[kind] = _decoded(ds, [0], "depth")[0]
        assert ds.read_samples([0])["image"][0] == rgb
    assert np.array_equal(got["png"], mm) and np.array_equal(got["npy"], mm)
    assert np.array_equal(got["kitti"] == 0, mm == 0) and np.abs(got["kitti"].astype(int) - mm).max() <= 2


@pytest.mark.parametrize("task", TASKS)
def test_a_csv_manifest_packs_each_task_like_its_folder_layout(task, raw_sets, tmp_path):
    """Breaks if task manifests (relative paths, --column mapping, label names) pack other values than the folders."""
    src = raw_sets[task]
    rows, cols = [], []
    if task == "classification":
        for p in sorted(src.glob("*/*.png")):
            rows.append(f"{p.relative_to(src)},{p.parent.name}")
        header, cols = "path,category", ["--column", "image=path", "--column", "label=category"]
    elif task == "segmentation":
        rows = [f"images/{p.stem}.jpg,masks/{p.name}" for p in sorted((src / "masks").glob("*.png"))]
        header = "image,mask"
    else:
        rows = [f"rgb/{p.stem}.jpg,depth/{p.name}" for p in sorted((src / "depth").glob("*.png"))]
        header, cols = "img,d", ["--column", "image=img", "--column", "depth=d"]
    (src / "manifest.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
    try:
        res = run_cli("data", "pack", str(src / "manifest.csv"), str(tmp_path / "m"), "--task", task, *cols,
                      "--workers", "1", cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        folder = pack(str(src), str(tmp_path / "f"), task=task, workers=1)
    finally:
        (src / "manifest.csv").unlink()
    m, f = open_dataset(str(tmp_path / "m")), open_dataset(str(tmp_path / "f"))
    assert m.num_samples == f.num_samples == folder.packed == N and m.meta == f.meta
    # the same file packs to the same values, whichever way it was named
    f_ids = [_by_source(f)[name] for name in m.index.column("source").to_pylist()]
    got, want = m.read_samples(m.sample_ids), f.read_samples(f_ids)
    for c in f.columns:
        assert list(got[c.name]) == list(want[c.name]), c.name
    bad = run_cli("data", "pack", str(src), str(tmp_path / "x"), "--task", task, "--column", "fg_bg=x", cwd=tmp_path)
    assert bad.returncode == 2 and "--column" in bad.stderr


def test_a_task_pack_resumes_its_parts_and_runs_them_in_processes_alike(raw_sets, tmp_path):
    """Breaks if a task pack does not reuse finished parts, or worker processes write other bytes."""
    src = str(raw_sets["segmentation"])
    first = pack(src, str(tmp_path / "a"), task="segmentation", rows_per_shard=8, rows_per_group=4, workers=1)
    again = pack(src, str(tmp_path / "a"), task="segmentation", rows_per_shard=8, rows_per_group=4, workers=1)
    par = pack(src, str(tmp_path / "b"), task="segmentation", rows_per_shard=8, rows_per_group=4, workers=2)
    assert (first.parts, first.parts_reused, again.parts_reused) == (3, 0, 3)
    assert _shas(str(tmp_path / "a")) == _shas(str(tmp_path / "b")) and par.shards == 3
    # another task packed into the same DEST starts over instead of reusing segmentation parts
    other = pack(str(raw_sets["depth"]), str(tmp_path / "a"), task="depth", rows_per_shard=8, rows_per_group=4,
                 workers=1)
    assert other.parts_reused == 0 and open_dataset(str(tmp_path / "a")).task == "depth"
    assert sorted(p.name for p in (tmp_path / "a" / "shards").iterdir()) == [f"shard-{i:05d}.parquet" for i in range(3)]


# -- bad samples ------------------------------------------------------------------------------------------


@pytest.fixture
def bad_sources(tmp_path) -> dict[str, tuple[Path, dict[str, str]]]:
    """One source per task with each kind of bad sample; {task: (SOURCE, {file name: reason words})}."""
    rng = np.random.default_rng(3)
    out = {}

    cls = tmp_path / "cls"
    for c in ("a", "b"):
        for i in range(3):
            _write(cls / c / f"{c}{i}.png", _png(rng.integers(0, 255, (8, 8), dtype=np.uint8)))
    (cls / "a" / "a1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # corrupt
    (cls / "b" / "b2.png").write_bytes((cls / "b" / "b2.png").read_bytes()[:40])  # truncated
    (cls / "empty").mkdir()
    out["classification"] = (cls,
                             {"a1.png": "cannot be decoded", "b2.png": "cannot be decoded",
                              "empty": "empty class folder"})

    seg = tmp_path / "seg"
    _write(seg / "classes.txt", b"bg\nfg\n")
    for i in range(6):
        _write(seg / "images" / f"s{i}.jpg", _jpeg(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)))
        _write(seg / "masks" / f"s{i}.png", _png((rng.random((10, 10)) > 0.5).astype(np.uint8)))
    (seg / "masks" / "s1.png").unlink()  # missing partner
    (seg / "masks" / "s2.png").write_bytes(_png(np.zeros((10, 9), np.uint8)))  # size mismatch
    (seg / "masks" / "s3.png").write_bytes(_png(np.full((10, 10), 7, np.uint8)))  # 7 >= 2 classes, not 255
    (seg / "masks" / "s4.png").write_bytes(_png(np.zeros((10, 10, 3), np.uint8)))  # RGB, not a class map
    out["segmentation"] = (seg,
                           {"s1.jpg": "missing partner file", "s2.jpg": "size mismatch",
                            "s3.png": "mask has value(s) 7", "s4.png": "mode RGB"})

    dep = tmp_path / "dep"
    for i in range(6):
        _write(dep / "rgb" / f"d{i}.jpg", _jpeg(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)))
        _write(dep / "depth" / f"d{i}.png", _png(rng.integers(1, 5000, (10, 10)).astype(np.uint16)))
    (dep / "depth" / "d1.png").unlink()
    (dep / "depth" / "d2.png").write_bytes(_png(np.ones((8, 10), np.uint16)))  # size mismatch
    (dep / "depth" / "d3.png").write_bytes(_png(np.ones((10, 10), np.uint8)))  # 8-bit, not millimetres
    (dep / "depth" / "d4.png").unlink()
    _write(dep / "depth" / "d4.npy", b"\x93NUMPY not really")  # corrupt .npy
    out["depth"] = (dep,
                    {"d1.jpg": "missing partner file", "d2.jpg": "size mismatch", "d3.png": "mode L",
                     "d4.npy": "cannot be read"})
    return out


@pytest.mark.parametrize("task", TASKS)
def test_bad_samples_are_named_with_path_and_reason_and_nothing_is_written(task, bad_sources, tmp_path):
    """Breaks if a bad sample of a task is packed, dropped silently, or listed without its path and reason."""
    src, expected = bad_sources[task]
    dest = tmp_path / "ds"
    report = tmp_path / "r.json"
    res = run_cli("data", "pack", str(src), str(dest), "--task", task, "--report", str(report), "--workers", "1",
                  cwd=tmp_path)
    assert res.returncode == 1 and res.stderr.startswith("error:") and f"{len(expected)} bad sample(s)" in res.stderr
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("- sample ")]
    assert len(lines) == len(expected)
    for name, reason in expected.items():
        assert any(name in ln and reason in ln and str(src) in ln for ln in lines), (name, reason, lines)
    assert not (dest / "manifest.json").exists() and not (dest / "index.parquet").exists()
    rep = json.loads(report.read_text())
    assert rep["packed"] == 0 and len(rep["skipped"]) == len(expected)


@pytest.mark.parametrize("task", TASKS)
def test_skip_bad_packs_the_rest_and_the_report_lists_exactly_the_skipped(task, bad_sources, tmp_path):
    """Breaks if --skip-bad packs a bad sample or skips a good one, or the report differs from what was skipped."""
    src, expected = bad_sources[task]
    dest = tmp_path / "ds"
    report = tmp_path / "r.json"
    res = pack(str(src), str(dest), task=task, skip_bad=True, report=str(report), workers=1)
    rep = json.loads(report.read_text())
    kept = 6 - len(expected) + (1 if task == "classification" else 0)
    assert rep["packed"] == res.packed == open_dataset(str(dest)).num_samples == kept
    assert len(rep["skipped"]) == len(expected) and all(s["sample"] and s["path"] and s["reason"]
                                                        for s in rep["skipped"])
    packed_names = set(open_dataset(str(dest)).index.column("source").to_pylist())
    assert not any(name.split(".")[0] in Path(p).stem for name in expected for p in packed_names)
    if task == "classification":  # the empty class keeps its index: labels still match folder order
        assert open_dataset(str(dest)).meta["classes"] == ["a", "b", "empty"]


# -- wrong layouts, arguments and destinations --------------------------------------------------------------


def test_a_layout_that_does_not_fit_the_task_is_one_line_saying_what_to_do(raw_sets, tmp_path):
    """Breaks if a wrong layout for --task fails with N bad samples, a traceback, or no hint."""
    seed = tmp_path / "seed"
    synthesize_seed_layout(str(seed), 4, seed=0, image_size=32, workers=1)
    cases = [
        (seed, "depth", "the mask_depth seed layout", "--task mask_depth"),
        (raw_sets["classification"], "segmentation", "ImageFolder", "--task classification"),
        (raw_sets["segmentation"], "classification", "images/ + masks/", "--task segmentation"),
        (raw_sets["depth"], "mask_depth", "rgb/ + depth/", "--task depth"),
    ]
    for src, task, found, fix in cases:
        res = run_cli("data", "pack", str(src), str(tmp_path / "ds"), "--task", task, cwd=tmp_path)
        msg = res.stderr.strip()
        assert res.returncode == 1 and msg.count("\n") == 0, msg
        assert msg.startswith(f"error: {src}: --task {task} expects") and found in msg and fix in msg
    assert not (tmp_path / "ds" / "manifest.json").exists()
    with pytest.raises(SourceError, match="expects"):
        pack(str(raw_sets["depth"]), str(tmp_path / "ds"), task="classification")
    # SOURCE/train/<class>/... is splits holding classes, not two classes "train" and "val"
    for split in ("train", "val"):
        _write(tmp_path / "splits" / split / "cat" / "a.png", _png(np.zeros((4, 4), np.uint8)))
    with pytest.raises(SourceError, match="look like splits"):
        pack(str(tmp_path / "splits"), str(tmp_path / "ds"), task="classification")


def test_unknown_task_is_exit_2_naming_the_kinds(tmp_path):
    """Breaks if a misspelt --task is accepted or its error does not list the valid kinds."""
    for args in (("data", "synth", str(tmp_path / "s"), "--task", "segmentaton"),
                 ("data", "pack", str(tmp_path), str(tmp_path / "d"), "--task", "nope")):
        res = run_cli(*args, cwd=tmp_path)
        assert res.returncode == 2 and all(k in res.stderr
                                           for k
                                           in ("mask_depth", "classification", "segmentation", "depth")), res.stderr


def test_an_unwritable_destination_is_one_line_naming_it(tmp_path):
    """Breaks if synth or pack to a DEST that cannot be created ends in a traceback."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for args, dest in (
        (("data", "synth", str(afile / "ds"), "--samples", "4"), str(afile / "ds")),
        (("data", "synth", "/proc/orchestrator-x", "--samples", "4", "--task", "depth"), "/proc/orchestrator-x"),
        (("data", "pack", str(tmp_path), str(afile / "ds"), "--task", "classification"), str(afile / "ds")),
    ):
        res = run_cli(*args, cwd=tmp_path)
        msg = res.stderr.strip()
        assert res.returncode == 1 and msg.count("\n") == 0 and "Traceback" not in msg, msg
        assert msg.startswith(f"error: {dest}: cannot") and "choose a DEST" in msg


def test_synth_cli_writes_each_task_and_its_raw_layout(tmp_path):
    """Breaks if `data synth --task` or `--layout seed` do not write what pack and open_dataset take."""
    res = run_cli("data", "synth", str(tmp_path / "s"), "--task", "segmentation", "--samples", "8", "--image-size",
                  "32", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ds = open_dataset(str(tmp_path / "s"))
    assert ds.task == "segmentation" and ds.num_samples == 8 and ds.manifest["image_size"] == [32, 32]
    res = run_cli("data", "synth", str(tmp_path / "r"), "--task", "depth", "--samples", "5", "--layout", "seed",
                  cwd=tmp_path)
    assert res.returncode == 0 and "--task depth" in res.stderr, res.stderr
    assert sorted(p.name for p in (tmp_path / "r" / "depth").iterdir()) == [f"{i:06d}.png" for i in range(5)]
    assert Image.open(tmp_path / "r" / "depth" / "000000.png").mode.startswith("I")  # 16-bit


# -- real data: scikit-learn's digits -------------------------------------------------------------------------


def test_sklearn_digits_as_an_imagefolder_pack_into_10_classes_of_1797(tmp_path):
    """Breaks if a real ImageFolder tree (1,797 digits, 28x28 PNG) does not pack whole, with its labels."""
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits

    from storage.layouts.digits import write_digits_imagefolder

    info = write_digits_imagefolder(str(tmp_path / "digits"), size=28)
    assert info["samples"] == 1797
    res = pack(str(tmp_path / "digits"), str(tmp_path / "ds"), task="classification", workers=1)
    ds = open_dataset(str(tmp_path / "ds"))
    assert res.packed == ds.num_samples == 1797 and ds.meta == {"classes": [str(d) for d in range(10)], "channels": 1}
    labels = ds.index_values("label", ds.sample_ids)
    assert np.bincount(labels, minlength=10).tolist() == np.bincount(load_digits().target, minlength=10).tolist()
    img = _decoded(ds, [1000], "image")[0]
    assert img.shape == (28, 28) and img.max() > 100
    # each image is its digit: the packed pixels match the tree's file for that sample
    src = dict(zip(ds.index.column("source").to_pylist(), ds.sample_ids.tolist(), strict=True))
    name = next(iter(sorted(src)))
    assert ds.read_samples([src[name]])["image"][0] == (tmp_path / "digits" / name).read_bytes()


def test_parquet_classification_manifest_takes_label_indices(tmp_path):
    """Breaks if integer labels in a manifest are not class indices, or an index beyond --classes is not bad."""
    rng = np.random.default_rng(4)
    paths = []
    for i in range(4):
        p = _write(tmp_path / "img" / f"{i}.png", _png(rng.integers(0, 255, (6, 6), dtype=np.uint8)))
        paths.append(str(p))
    buf = io.BytesIO()
    pq.write_table(pa.table({"image": paths, "label": [2, 0, 2, 5], "sample_id": [10, 11, 12, 13]}), buf)
    (tmp_path / "m.parquet").write_bytes(buf.getvalue())
    (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
    res = pack(str(tmp_path / "m.parquet"), str(tmp_path / "ds"), task="classification",
               classes=str(tmp_path / "names.txt"), skip_bad=True, workers=1)
    assert res.packed == 3 and [s["sample"] for s in res.skipped] == ["13"] and "label 5" in res.skipped[0]["reason"]
    ds = open_dataset(str(tmp_path / "ds"))
    assert ds.meta["classes"] == ["zero", "one", "two"] and ds.read_samples([10, 11, 12])["label"].tolist() == [2, 0, 2]
