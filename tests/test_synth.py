"""The synthetic dataset: deterministic per seed, real photo backgrounds, consistent mask and depth."""

from __future__ import annotations

import os

import numpy as np
import pytest

from storage import codec, synth
from storage import fs as sfs
from storage.shards import open_dataset

N = 64
SIZE = 96  # px; big enough for every shape kind, small enough to be quick
SEED = 3
DEPTH_STEP = 1 / 65535


def _synth(uri: str, seed: int = SEED, n: int = N, **kw) -> dict:
    kw.setdefault("workers", 1)
    return synth.synthesize(uri, n, seed=seed, image_size=SIZE, rows_per_shard=32, rows_per_group=8, **kw)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("synth") / "ds")
    manifest = _synth(uri)
    ds = open_dataset(uri)
    rows = ds.read_samples(ds.sample_ids)
    return uri, manifest, ds, rows


@pytest.fixture(scope="module")
def raw():
    """Undecoded samples (exact arrays) for the geometry checks."""
    return [synth.make_sample(SEED, i, SIZE) for i in range(N)]


def _fingerprint(manifest: dict) -> list[str]:
    return [s["sha256"] for s in manifest["shards"]]


def test_synth_is_byte_identical_for_the_same_seed(made, tmp_path):
    """Breaks if anything unseeded (global RNG, dict order, time) reaches the output bytes."""
    uri, manifest, ds, _ = made
    again = _synth(str(tmp_path / "again"))
    assert _fingerprint(again) == _fingerprint(manifest)
    again = sfs.read_bytes(sfs.join(str(tmp_path / "again"), "index.parquet"))
    assert again == sfs.read_bytes(sfs.join(uri, "index.parquet"))


def test_synth_writes_the_same_bytes_to_memory_as_to_disk(made):
    """Breaks if the destination filesystem changes the bytes (e.g. a buffered-write bug)."""
    _, manifest, _, _ = made
    mem = "memory://test-synth/ds"
    try:
        assert _fingerprint(_synth(mem)) == _fingerprint(manifest)
        assert open_dataset(mem).num_samples == N
    finally:
        sfs.remove(mem, recursive=True)


def test_synth_differs_for_another_seed(made, tmp_path):
    """Breaks if the seed is ignored, so 'new data' would silently repeat the old."""
    _, _, ds, _ = made
    _synth(str(tmp_path / "other"), seed=SEED + 1)
    other = open_dataset(str(tmp_path / "other"))
    same = np.asarray(ds.index.column("checksum").to_pylist()) == np.asarray(other.index.column("checksum").to_pylist())
    assert same.mean() < 0.1


def test_synth_bytes_do_not_depend_on_the_number_of_workers(made, tmp_path, monkeypatch):
    """Breaks if the process pool reorders samples or shares RNG state between them."""
    _, manifest, _, _ = made
    monkeypatch.setattr(synth, "MIN_SAMPLES_PER_POOL", 0)
    monkeypatch.setattr(synth, "CHUNK_SAMPLES", 8)
    seen: list[int] = []
    pooled = _synth(str(tmp_path / "pooled"), workers=2, progress=seen.append)
    assert _fingerprint(pooled) == _fingerprint(manifest)
    assert sum(seen) == N and len(seen) == N // 8


def test_manifest_records_how_the_data_was_made(made):
    """Breaks if the manifest loses the seed/source/size the trainer and re-runs rely on."""
    _, manifest, ds, _ = made
    assert manifest["num_samples"] == N and manifest["image_size"] == [SIZE, SIZE]
    assert manifest["seed"] == SEED and manifest["source"] == "synth"
    assert manifest["depth_mean"] == pytest.approx(float(np.mean(ds.index.column("depth_mean").to_numpy())), abs=1e-6)
    assert 0.2 < manifest["depth_mean"] < 0.9
    assert ds.sample_ids.tolist() == list(range(N))
    types = {f.name: str(f.type) for f in ds.index.schema}
    for col in ("bg_index", "fg_x", "fg_y", "fg_w", "fg_h"):
        assert types[col] == "int32"
    assert types["flipped"] == "bool"


def test_backgrounds_are_bundled_photos_that_load_offline():
    """Breaks if a listed photo is missing from the scikit-image wheel (it would need a download)."""
    data_dir = os.path.dirname(__import__("skimage.data").data.__file__)
    for name in synth.PHOTOS:
        assert os.path.exists(os.path.join(data_dir, name)), name
    assert synth.NUM_BACKGROUNDS >= 24
    bgs = synth.backgrounds(SIZE)
    assert bgs.shape == (synth.NUM_BACKGROUNDS, SIZE, SIZE, 3)
    # photographs, not flat colours, and no two crops the same (two sky crops may look alike)
    assert min(float(b.std()) for b in bgs) > 10
    flat = bgs.reshape(len(bgs), -1).astype(np.int16)
    diffs = [np.abs(flat[i] - flat[j]).mean() for i in range(len(bgs)) for j in range(i + 1, len(bgs))]
    assert min(diffs) > 2


def test_samples_use_many_backgrounds_and_the_stored_bg_is_that_photo(made):
    """Breaks if bg_index does not name the stored background or only a few are used."""
    _, _, ds, rows = made
    bg_index = ds.index.column("bg_index").to_numpy()
    assert len(np.unique(bg_index)) >= 20
    bgs = synth.backgrounds(SIZE)
    for i in range(0, N, 7):
        bg = codec.decode_jpeg(rows["bg"][i])
        assert np.abs(bg.astype(int) - bgs[bg_index[i]]).mean() < 4


def test_mask_is_the_alpha_and_lies_inside_the_paste_box(made, raw):
    """Breaks if mask and composite disagree, or the label box (fg_x..fg_h) misplaces the object."""
    _, _, ds, rows = made
    idx = ds.index.to_pydict()
    for i, s in enumerate(raw):
        x, y, w, h = s["fg_x"], s["fg_y"], s["fg_w"], s["fg_h"]
        assert (idx["fg_x"][i], idx["fg_y"][i], idx["fg_w"][i], idx["fg_h"][i]) == (x, y, w, h)
        assert 0 <= x and x + w <= SIZE and 0 <= y and y + h <= SIZE
        expected = np.zeros((SIZE, SIZE), np.uint8)
        expected[y : y + h, x : x + w][s["alpha"] > 0] = 255
        mask = codec.decode_mask(rows["mask"][i])
        assert np.array_equal(mask, expected) and np.array_equal(s["mask"], expected)
        # the box is the mask's tight bounding box
        ys, xs = np.nonzero(mask)
        assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x, y, x + w, y + h)
        # outside the mask the composite is the background
        assert np.array_equal(s["fg_bg"][mask == 0], s["bg"][mask == 0])
        assert np.abs(s["fg_bg"][mask > 0].astype(int) - s["bg"][mask > 0]).mean() > 0


def test_ground_ramp_is_farther_towards_the_top(raw):
    """Breaks if the background depth is not a ground plane (far at the top, near at the bottom)."""
    for b in range(synth.NUM_BACKGROUNDS):
        ramp = synth.ground_ramp(b, SIZE, SIZE)
        assert np.all(np.diff(ramp, axis=0) < 0)
        assert 0 <= ramp.min() and ramp.max() <= 1
        assert ramp[0].mean() - ramp[-1].mean() > 0.3
    for s in raw:
        ramp = synth.ground_ramp(s["bg_index"], SIZE, SIZE)
        assert np.array_equal(s["depth"][s["mask"] == 0], ramp[s["mask"] == 0])


def test_foreground_is_nearer_than_the_ground_at_its_foot(made, raw):
    """Breaks if objects float behind the ground they stand on (depth inconsistent with geometry)."""
    _, _, _, rows = made
    for i, s in enumerate(raw):
        depth = codec.decode_depth(rows["depth"][i])
        assert np.abs(depth - s["depth"]).max() <= DEPTH_STEP + 1e-6
        inside = s["mask"] > 0
        foot = s["fg_y"] + s["fg_h"] - 1
        ramp = synth.ground_ramp(s["bg_index"], SIZE, SIZE)
        foot_ground = ramp[foot, inside[foot]].min()
        fg = depth[inside]
        margin_lo, margin_hi = synth.FG_MARGIN_RANGE
        assert fg.max() <= foot_ground - margin_lo + 2 * DEPTH_STEP
        assert fg.min() >= foot_ground - margin_hi - synth.FG_BULGE_MAX - 2 * DEPTH_STEP
        # nearly constant over the object, and in front of all the ground it covers
        assert fg.max() - fg.min() <= synth.FG_BULGE_MAX + 2 * DEPTH_STEP
        assert np.all(fg < ramp[inside])


def test_about_half_the_foregrounds_are_flipped():
    """Breaks if flipping is never (or always) applied, as the source did both for every pair."""
    flipped = [synth.make_sample(11, i, 48)["flipped"] for i in range(200)]
    assert 0.35 < np.mean(flipped) < 0.65


def test_foregrounds_vary_in_shape_and_size():
    """Breaks if every sample gets the same shape kind or sizes leave the source's range."""
    samples = [synth.make_sample(5, i, SIZE) for i in range(160)]
    assert {s["fg_shape"] for s in samples} == set(synth.FG_SHAPES)
    longest = np.array([max(s["fg_w"], s["fg_h"]) for s in samples]) / SIZE
    assert longest.min() >= 0.12 and longest.max() <= 0.5 + 1 / SIZE
    assert longest.max() - longest.min() > 0.2


def test_synth_seed_layout_writes_the_source_folders_and_label_files(tmp_path):
    """Breaks if `data synth --layout seed` stops writing what `data pack` reads, or --zip is accepted without it."""
    from tests.conftest import run_cli

    res = run_cli("data", "synth", str(tmp_path / "raw"), "--layout", "seed", "--samples", "12", "--image-size", "32",
                  "--workers", "1", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    raw = tmp_path / "raw"
    assert sorted(p.name for p in raw.iterdir()) == ["bg", "depth", "fg_bg", "fg_bg_mask", "labels"]
    lines = [ln.split("\t") for f in sorted((raw / "labels").iterdir()) for ln in f.read_text().splitlines()]
    assert len(lines) == 12 and all(len(fields) == 4 for fields in lines)
    for fg, mask, x, y in lines:
        assert (raw / fg).is_file() and (raw / mask).is_file() and int(x) >= 0 and int(y) >= 0
        assert (raw / "depth" / fg.split("/", 1)[1].replace(".jpg", ".png")).is_file()
        assert (raw / "bg" / f"{fg.split('/')[1]}.jpg").is_file()
    bad = run_cli("data", "synth", str(tmp_path / "x"), "--zip", cwd=tmp_path)
    assert bad.returncode == 2 and "--zip" in bad.stderr
