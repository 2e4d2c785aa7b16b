"""`data pack`: the source layout (folders or zips) or a manifest -> shards, resumably, in parallel,
and bad input listed sample by sample instead of packed or silently dropped."""

from __future__ import annotations

import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from storage import codec
from storage import fs as sfs
from storage.pack import PackError, pack
from storage.seed_layout import synthesize_seed_layout
from storage.shards import open_dataset
from storage.source_plan import SourceError
from tests.conftest import kill_group, run_cli, start_cli

N = 40
SIZE = 48  # px: small and quick; the layout does not care


def _shas(uri: str) -> list[str]:
    return [s["sha256"] for s in open_dataset(uri).manifest["shards"]]


def _labels(src: Path) -> dict[int, tuple[str, str]]:
    """sample id -> (fg_bg member, mask member) from the label_info files."""
    out = {}
    for f in sorted((src / "labels").iterdir()):
        for line in f.read_text().splitlines():
            fg, mask, *_ = line.split("\t")
            out[int(Path(fg).stem.rsplit("_", 1)[1])] = (fg, mask)
    return out


@pytest.fixture(scope="module")
def seed_src(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("seed") / "src"
    synthesize_seed_layout(str(src), N, seed=5, image_size=SIZE, workers=1)
    return src


@pytest.fixture(scope="module")
def packed(seed_src, tmp_path_factory) -> str:
    dest = str(tmp_path_factory.mktemp("packed") / "ds")
    pack(str(seed_src), dest, rows_per_shard=16, rows_per_group=4, workers=1)
    return dest


def test_pack_keeps_every_sample_with_its_own_pixels(seed_src, packed):
    """Breaks if pairing by label_info mixes up partners, drops samples, or alters the images."""
    ds = open_dataset(packed)
    assert sorted(ds.sample_ids.tolist()) == list(range(N))
    assert ds.manifest["source_layout"] == "seed-folders" and ds.manifest["pack"]["skipped"] == 0
    labels = _labels(seed_src)
    ids = [0, 7, 23, 39]
    rows = ds.read_samples(ids)
    sources = dict(zip(ds.index.column("sample_id").to_pylist(), ds.index.column("source").to_pylist(), strict=True))
    for j, sid in enumerate(ids):
        fg_member, mask_member = labels[sid]
        assert sources[sid] == fg_member
        assert rows["fg_bg"][j] == (seed_src / fg_member).read_bytes()  # JPEGs are kept byte for byte
        bg_name = fg_member.split("/")[1]
        assert rows["bg"][j] == (seed_src / "bg" / f"{bg_name}.jpg").read_bytes()
        src_mask = np.asarray(Image.open(seed_src / mask_member).convert("L"))
        assert np.array_equal(codec.decode_mask(rows["mask"][j]), (src_mask >= 128).astype(np.uint8) * 255)
        depth_file = seed_src / "depth" / fg_member.split("/", 1)[1].replace(".jpg", ".png")
        # stored in the raw format, with the source PNG's 8-bit values exactly
        assert rows["depth"][j].startswith(codec.RAW_MAGIC) and rows["mask"][j].startswith(codec.RAW_MAGIC)
        assert np.array_equal(codec.depth_values(rows["depth"][j]), np.asarray(Image.open(depth_file)))
        assert (rows["height"][j], rows["width"][j]) == (SIZE, SIZE)


def test_packed_seed_data_is_the_synthetic_sample_it_came_from(packed):
    """Breaks if synth --layout seed writes something other than make_sample's images."""
    from storage.synth import make_sample

    ds = open_dataset(packed)
    rows = ds.read_samples([3, 30])
    for j, sid in enumerate((3, 30)):
        s = make_sample(5, sid, SIZE)
        assert np.mean(codec.decode_mask(rows["mask"][j]) == s["mask"]) > 0.97  # JPEG q30 edges
        assert np.abs(codec.decode_depth(rows["depth"][j]) - s["depth"]).max() <= 0.5 / 255 + 1e-6


def test_zips_and_folders_pack_to_identical_shards(seed_src, packed, tmp_path):
    """Breaks if reading from zips changes any byte, order or pairing against the same files in folders."""
    zsrc = tmp_path / "zsrc"
    synthesize_seed_layout(str(zsrc), N, seed=5, image_size=SIZE, as_zip=True, workers=1)
    assert sorted(p.name for p in zsrc.iterdir()) == ["bg.zip", "depth.zip", "fg_bg.zip", "fg_bg_mask.zip", "labels"]
    with zipfile.ZipFile(zsrc / "fg_bg.zip") as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_STORED}  # as the source shipped them
    res = pack(str(zsrc), str(tmp_path / "zds"), rows_per_shard=16, rows_per_group=4, workers=1)
    assert res.packed == N and open_dataset(str(tmp_path / "zds")).manifest["source_layout"] == "seed-zips"
    assert _shas(str(tmp_path / "zds")) == _shas(packed)


def test_worker_processes_write_the_same_bytes_as_one_process(seed_src, packed, tmp_path):
    """Breaks if parallel parts interleave, reorder or renumber shards."""
    res = pack(str(seed_src), str(tmp_path / "par"), rows_per_shard=16, rows_per_group=4, workers=2)
    assert res.parts == 3 and res.shards == 3
    assert _shas(str(tmp_path / "par")) == _shas(packed)


def test_a_rerun_reuses_every_packed_part(seed_src, tmp_path):
    """Breaks if a finished (or killed) pack starts over instead of continuing."""
    dest = str(tmp_path / "ds")
    first = pack(str(seed_src), dest, rows_per_shard=16, rows_per_group=4, workers=1)
    again = pack(str(seed_src), dest, rows_per_shard=16, rows_per_group=4, workers=1)
    assert (first.parts_reused, again.parts_reused, again.parts) == (0, 3, 3)
    assert _shas(dest) == [s["sha256"] for s in first.manifest["shards"]]


def test_a_killed_pack_continues_where_it_stopped(tmp_path):
    """Breaks if a pack killed mid-way leaves a dataset behind, or the re-run redoes finished parts."""
    src = tmp_path / "src"
    synthesize_seed_layout(str(src), 600, seed=1, image_size=32, workers=1)
    dest = tmp_path / "ds"
    args = ("data", "pack", str(src), str(dest), "--rows-per-shard", "20", "--workers", "1")
    proc = start_cli(*args, cwd=tmp_path, log=tmp_path / "pack.log")
    marker = dest / ".pack" / "part-00001.json"
    try:
        for _ in range(3000):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.01)
    finally:
        kill_group(proc)
    assert marker.exists(), (tmp_path / "pack.log").read_text()
    assert not (dest / "manifest.json").exists(), "killed too late: the pack had already finished"
    res = run_cli(*args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    reused = int(res.stderr.split(" parts reused")[0].rsplit(",", 1)[1].split(" of ")[0])
    assert 2 <= reused < 30
    clean = pack(str(src), str(tmp_path / "clean"), rows_per_shard=20, workers=1)
    assert _shas(str(dest)) == [s["sha256"] for s in clean.manifest["shards"]]


# -- bad input ---------------------------------------------------------------------------------------


def _png(size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros(size, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def bad_src(tmp_path) -> tuple[Path, dict[int, str]]:
    """A folder source with one sample of each kind of bad input; returns it and {id: reason word}."""
    src = tmp_path / "bad"
    synthesize_seed_layout(str(src), N, seed=2, image_size=SIZE, workers=1)
    labels = _labels(src)

    def depth_of(sid: int) -> Path:
        return src / "depth" / labels[sid][0].split("/", 1)[1].replace(".jpg", ".png")

    (src / labels[3][0]).write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg at all")  # corrupt JPEG
    depth_of(5).write_bytes(depth_of(5).read_bytes()[:60])  # truncated PNG
    (src / labels[7][1]).unlink()  # missing partner (mask)
    depth_of(9).write_bytes(_png((SIZE - 8, SIZE)))  # size mismatch
    # Duplicate id 11: the same number under another background folder, fully present.
    fg, mask = labels[11]
    other_bg = "bg_051" if "bg_051" not in fg else "bg_050"
    dup_fg, dup_mask = fg.replace(fg.split("/")[1], other_bg), mask.replace(mask.split("/")[1], other_bg)
    for a, b in ((fg, dup_fg), (mask, dup_mask)):
        (src / b).parent.mkdir(parents=True, exist_ok=True)
        (src / b).write_bytes((src / a).read_bytes())
    d = depth_of(11).read_bytes()
    dup_depth = src / "depth" / dup_fg.split("/", 1)[1].replace(".jpg", ".png")
    dup_depth.parent.mkdir(parents=True, exist_ok=True)
    dup_depth.write_bytes(d)
    with open(src / "labels" / f"{other_bg}_label_info.txt", "a") as f:
        f.write(f"{dup_fg}\t{dup_mask}\t0\t0\n")
    return src, {3: "cannot be decoded", 5: "cannot be decoded", 7: "missing partner", 9: "size mismatch",
                 11: "duplicate sample id"}


def test_bad_samples_fail_the_pack_listing_each_and_writing_no_dataset(bad_src, tmp_path):
    """Breaks if a bad sample is packed, dropped silently, or reported without its path and reason."""
    src, expected = bad_src
    dest = tmp_path / "ds"
    res = run_cli("data", "pack", str(src), str(dest), "--report", str(tmp_path / "r.json"), cwd=tmp_path)
    assert res.returncode == 1
    assert res.stderr.startswith("error:") and "6 bad sample(s)" in res.stderr and "no dataset written" in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("- sample ")]
    for sid, reason in expected.items():
        mine = [ln for ln in lines if ln.startswith(f"- sample {sid}:")]
        assert mine and all(reason in ln and str(src) in ln for ln in mine), (sid, lines)
    assert len([ln for ln in lines if ln.startswith("- sample 11:")]) == 2  # both copies of the duplicate
    assert "mask" in next(ln for ln in lines if ln.startswith("- sample 7:"))
    assert not (dest / "manifest.json").exists() and not (dest / "index.parquet").exists()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["packed"] == 0 and report["complete"] is False and len(report["skipped"]) == 6


def test_skip_bad_packs_the_rest_and_reports_exactly_the_skipped(bad_src, tmp_path):
    """Breaks if --skip-bad skips more or fewer samples than the report names."""
    src, expected = bad_src
    dest = tmp_path / "ds"
    report = tmp_path / "report.json"
    res = run_cli("data", "pack", str(src), str(dest), "--skip-bad", "--report", str(report), cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    rep = json.loads(report.read_text())
    assert set(rep) >= {"packed", "skipped"} and rep["complete"] is True
    assert sorted(int(s["sample"]) for s in rep["skipped"]) == [3, 5, 7, 9, 11, 11]
    assert all(s["path"] and s["reason"] for s in rep["skipped"])
    ds = open_dataset(str(dest))
    assert sorted(ds.sample_ids.tolist()) == sorted(set(range(N)) - set(expected))
    assert rep["packed"] == ds.num_samples == N - 5
    assert "skipped 6 bad sample(s)" in res.stderr


def test_an_unreadable_zip_member_is_a_bad_sample_named_by_its_zip_path(tmp_path):
    """Breaks if a damaged zip member crashes the pack or is packed, instead of being listed."""
    src = tmp_path / "z"
    synthesize_seed_layout(str(src), 12, seed=4, image_size=SIZE, as_zip=True, workers=1)
    archive = src / "fg_bg_mask.zip"
    with zipfile.ZipFile(archive) as zf:
        info = zf.infolist()[4]
    data = bytearray(archive.read_bytes())
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 20] ^= 0xFF  # stored, so this flips one pixel byte: the CRC no longer matches
    archive.write_bytes(bytes(data))
    with pytest.raises(PackError) as err:
        pack(str(src), str(tmp_path / "ds"), workers=1)
    assert "zip member unreadable" in str(err.value) and f"zip://{info.filename}::{archive}" in str(err.value)
    res = pack(str(src), str(tmp_path / "ds"), workers=1, skip_bad=True)
    assert res.packed == 11 and len(res.skipped) == 1 and "CRC" in res.skipped[0]["reason"]


def test_an_empty_source_is_an_error_saying_so(tmp_path):
    """Breaks if packing nothing 'succeeds' with an empty dataset."""
    (tmp_path / "empty").mkdir()
    res = run_cli("data", "pack", str(tmp_path / "empty"), str(tmp_path / "ds"), cwd=tmp_path)
    assert res.returncode == 1 and "empty source" in res.stderr and str(tmp_path / "empty") in res.stderr
    src = tmp_path / "nolines"
    for name in ("fg_bg", "fg_bg_mask", "depth", "bg", "labels"):
        (src / name).mkdir(parents=True)
    (src / "labels" / "bg_000_label_info.txt").write_text("")
    with pytest.raises(SourceError, match="empty source"):
        pack(str(src), str(tmp_path / "ds2"))
    assert not (tmp_path / "ds2" / "manifest.json").exists()


def test_a_missing_container_is_named(seed_src, tmp_path):
    """Breaks if a source without its depth folder fails as N 'missing partner' lines, not one cause."""
    src = tmp_path / "nodepth"
    src.mkdir()
    for name in ("fg_bg", "fg_bg_mask", "bg", "labels"):
        os.symlink(seed_src / name, src / name)
    with pytest.raises(SourceError, match="no depth/ or depth.zip"):
        pack(str(src), str(tmp_path / "ds"))


# -- manifests -----------------------------------------------------------------------------------------


def test_a_csv_manifest_with_relative_paths_and_mapped_columns_packs(seed_src, packed, tmp_path):
    """Breaks if manifest paths are not resolved against the manifest's folder or --column is ignored."""
    labels = _labels(seed_src)
    lines = ["id,input,background,target_mask,target_depth"]
    for sid, (fg, mask) in sorted(labels.items()):
        depth = "depth/" + fg.split("/", 1)[1].replace(".jpg", ".png")
        lines.append(f"{sid + 1000},{fg},bg/{fg.split('/')[1]}.jpg,{mask},{depth}")
    (seed_src / "manifest.csv").write_text("\n".join(lines) + "\n")
    dest = tmp_path / "ds"
    cols = ["--column", "sample_id=id", "--column", "fg_bg=input", "--column", "bg=background", "--column",
            "mask=target_mask", "--column", "depth=target_depth"]
    res = run_cli("data", "pack", str(seed_src / "manifest.csv"), str(dest), *cols, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ds, ref = open_dataset(str(dest)), open_dataset(packed)
    assert sorted(ds.sample_ids.tolist()) == [i + 1000 for i in range(N)]
    assert ds.read_samples([1017])["fg_bg"] == ref.read_samples([17])["fg_bg"]
    bad = run_cli("data", "pack", str(seed_src / "manifest.csv"), str(dest), "--column", "nonsense", cwd=tmp_path)
    assert bad.returncode == 2 and "--column" in bad.stderr


def test_a_parquet_manifest_of_uris_packs_and_names_missing_files(seed_src, tmp_path):
    """Breaks if manifest URIs on another filesystem are not read, or a missing one is not named."""
    labels = _labels(seed_src)
    mem = f"memory://pack-manifest/{tmp_path.name}"
    rows = {"sample_id": [], "fg_bg": [], "bg": [], "mask": [], "depth": []}
    for sid in (1, 2, 3):
        fg, mask = labels[sid]
        files = {"fg_bg": fg, "bg": f"bg/{fg.split('/')[1]}.jpg", "mask": mask,
                 "depth": "depth/" + fg.split("/", 1)[1].replace(".jpg", ".png")}
        for kind, rel in files.items():
            uri = f"{mem}/{rel}"
            if not (sid == 3 and kind == "depth"):
                sfs.write_bytes(uri, (seed_src / rel).read_bytes())
            rows[kind].append(uri)
        rows["sample_id"].append(sid)
    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    sfs.write_bytes(f"{mem}/manifest.parquet", buf.getvalue())
    try:
        res = pack(f"{mem}/manifest.parquet", f"{mem}/ds", skip_bad=True, workers=1)
        assert res.packed == 2 and [s["sample"] for s in res.skipped] == ["3"]
        assert "missing partner file" in res.skipped[0]["reason"] and res.skipped[0]["path"].endswith(".png")
        assert sorted(open_dataset(f"{mem}/ds").sample_ids.tolist()) == [1, 2]
    finally:
        sfs.remove(mem, recursive=True)


@pytest.mark.ray
def test_pack_runs_its_parts_as_ray_tasks_when_a_cluster_is_there(seed_src, packed, tmp_path):
    """Breaks if pack ignores a running Ray cluster, or Ray tasks write other bytes than processes."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    try:
        from storage.pack import driver as pack_mod  # pack() calls run_parts from there

        where: list[str] = []
        real = pack_mod.run_parts

        def spy(*a, **k):
            where.append(real(*a, **k))
            return where[-1]

        pack_mod.run_parts = spy
        try:
            pack(str(seed_src), str(tmp_path / "ray"), rows_per_shard=16, rows_per_group=4)
        finally:
            pack_mod.run_parts = real
    finally:
        ray.shutdown()
    assert where == ["ray"]
    assert _shas(str(tmp_path / "ray")) == _shas(packed)


def test_zip_members_not_located_by_the_plan_are_read_through_zipfile_beside_the_located(tmp_path):
    """Breaks if a member the listing did not locate is not read (through zipfile), if a member
    missing from the zip stops being "missing from the zip" (a missing partner, said so), if either
    reader changes a byte, or if nearby located members stop sharing a request."""
    import random

    from storage.zip_ranges import locate_members, merge_spans, read_zip_members

    archive = tmp_path / "m.zip"
    rng = random.Random(0)
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(40):
            # 10-40 KB each: members 10 apart are more than GAP_BYTES (64 KB) apart
            data = rng.randbytes(rng.randrange(10_000, 40_000)) if i % 2 else b"ab" * rng.randrange(5_000, 20_000)
            zf.writestr(f"d/{i:03d}.bin", data, compress_type=zipfile.ZIP_DEFLATED if i % 3 else zipfile.ZIP_STORED)
    with zipfile.ZipFile(archive) as zf:
        expected = {m: zf.read(m) for m in zf.namelist()}
        located = locate_members(zf)
    wanted = [f"d/{i:03d}.bin" for i in (3, 4, 5, 6, 20, 31, 39)]
    spans = merge_spans((located[m].start, located[m].end) for m in wanted)
    assert len(spans) == 4, "members within GAP_BYTES share one request, no others"
    fs, path = sfs.filesystem(str(archive))
    some = {m: located[m] for m in wanted[::2]}
    got = read_zip_members(fs, path, [*wanted, "d/nope.bin"], some)
    assert got == {**{m: expected[m] for m in wanted}, "d/nope.bin": "missing from the zip"}


def test_a_zip_member_located_by_the_plan_is_read_without_the_zips_directory(tmp_path):
    """Breaks if a part reads a zip's central directory again (3.4 s and 30 MB a part at 400K members),
    if a located member's bytes differ from zipfile's, if a flipped byte or a wrong offset is not a
    one-line reason, or if a method of zipfile's own (bzip2) is not read through zipfile."""
    import random

    from storage.zip_ranges import locate_members, read_zip_members

    archive = tmp_path / "m.zip"
    rng = random.Random(1)
    methods = [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2]
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(30):
            data = rng.randbytes(rng.randrange(100, 9000)) if i % 2 else b"xy" * rng.randrange(100, 9000)
            zf.writestr(f"a/{i:02d}.bin", data, compress_type=methods[i % 3])
    with zipfile.ZipFile(archive) as zf:
        expected = {m: zf.read(m) for m in zf.namelist()}
        located = locate_members(zf)
        directory = zf.start_dir
    fs, path = sfs.filesystem(str(archive))
    plain = [m for m in expected if located[m].method != zipfile.ZIP_BZIP2]
    # The directory zeroed: zipfile cannot open the file any more, the located members still read.
    blank = tmp_path / "blank.zip"
    blank.write_bytes(archive.read_bytes()[:directory] + bytes(archive.stat().st_size - directory))
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(blank)
    got = read_zip_members(fs, str(blank), plain, {m: located[m] for m in plain})
    assert got == {m: expected[m] for m in plain}
    # bzip2 goes through zipfile (on the intact file).
    bz = [m for m in expected if located[m].method == zipfile.ZIP_BZIP2]
    assert read_zip_members(fs, path, bz, {m: located[m] for m in bz}) == {m: expected[m] for m in bz}
    # A flipped data byte of a stored member, and a wrong offset: reasons, not bytes.
    stored = next(m for m in plain if located[m].method == zipfile.ZIP_STORED and located[m].size > 100)
    at = located[stored]
    data = bytearray(archive.read_bytes())
    data[at.end - 50] ^= 0xFF
    (tmp_path / "flipped.zip").write_bytes(bytes(data))
    assert read_zip_members(fs, str(tmp_path / "flipped.zip"), [stored], {stored: at}) == {
        stored: f"zip member unreadable (BadZipFile: Bad CRC-32 for file {stored!r})"}
    moved = at._replace(start=at.start + 1)
    assert "bad magic number" in read_zip_members(fs, path, [stored], {stored: moved})[stored]


def test_pack_parts_carry_where_each_zip_member_lies(tmp_path):
    """Breaks if the plan's listing stops handing the parts their members' locations (the parts
    would parse every zip's directory again), for the sample parts and the backgrounds' part."""
    from storage.pack import plan_pack_source
    from storage.pack.mask_depth import background_ids, background_tasks
    from storage.pack.parts import sample_tasks

    src = tmp_path / "z"
    synthesize_seed_layout(str(src), 12, seed=4, image_size=SIZE, as_zip=True, workers=1)
    plan = plan_pack_source("mask_depth", str(src))
    ids, refs = background_ids(plan)
    parts = sample_tasks(plan, str(tmp_path / "ds"), 6, 3, ids) + background_tasks(plan, str(tmp_path / "ds"), refs)
    for task in parts:
        wanted = {f for _, _, files, _ in task.samples for f in files.values()}
        assert wanted and set(task.zip_at) == wanted, task.role
