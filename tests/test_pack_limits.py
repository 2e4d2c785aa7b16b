"""`data pack` refuses images over a pixel limit (--max-pixels raises it), naming the file: a bad
sample like any other, so --skip-bad and --report hold."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from storage.layouts.base import DEFAULT_MAX_PIXELS
from storage.shards import open_dataset
from tests.conftest import run_cli


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims width x height (8-bit gray) and holds no pixels: the limit must refuse it
    from its header, before any decode (a real 10000x10000 decode costs 100-300 MB)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + chunk(b"IEND", b"")


@pytest.fixture()
def raw(tmp_path: Path) -> Path:
    assert run_cli("data", "synth", "raw", "--task", "classification", "--layout", "seed", "--samples", "20",
                   cwd=tmp_path).returncode == 0
    return tmp_path / "raw"


def test_a_huge_image_is_a_bad_sample_named_with_its_size_and_the_flag(tmp_path: Path, raw: Path):
    assert DEFAULT_MAX_PIXELS == 40_000_000
    victim = sorted(raw.rglob("*.png"))[3]
    victim.write_bytes(_png_header(10000, 10000))
    res = run_cli("data", "pack", "raw", "out", "--task", "classification", cwd=tmp_path)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert str(victim) in res.stderr and "--max-pixels" in res.stderr
    assert "10000x10000 (100.0 MP), over the 40 MP limit" in res.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()

    res = run_cli("data", "pack", "raw", "out", "--task", "classification", "--skip-bad", "--report", "report.json",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["packed"] == 19 and [b["path"] for b in report["skipped"]] == [str(victim)]
    assert "over the 40 MP limit" in report["skipped"][0]["reason"]


def test_max_pixels_lowers_and_raises_the_limit_and_a_resumed_pack_rechecks(tmp_path: Path, raw: Path):
    victim = sorted(raw.rglob("*.png"))[5]
    Image.fromarray(np.full((1000, 2000), 128, np.uint8)).save(victim)  # 2 MP, a real image
    res = run_cli("data", "pack", "raw", "out", "--task", "classification", "--max-pixels", "1000000", cwd=tmp_path)
    assert res.returncode == 1 and str(
        victim) in res.stderr and "2000x1000 (2.0 MP), over the 1 MP limit" in res.stderr, res.stderr
    # The same pack with the limit raised: the part that held the refused image is packed again.
    res = run_cli("data", "pack", "raw", "out", "--task", "classification", "--max-pixels", "3000000", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    ds = open_dataset(str(tmp_path / "out"))
    assert ds.num_samples == 20 and int(ds.index.column("width").to_numpy().max()) == 2000


def test_max_pixels_must_be_positive(tmp_path: Path, raw: Path):
    res = run_cli("data", "pack", "raw", "out", "--task", "classification", "--max-pixels", "0", cwd=tmp_path)
    assert res.returncode == 2 and "--max-pixels" in res.stderr and "Traceback" not in res.stderr, res.stderr


def test_mask_depth_images_and_backgrounds_are_held_to_the_limit_too(tmp_path: Path):
    from storage.pack import PackError, pack
    from storage.seed_layout import synthesize_seed_layout

    synthesize_seed_layout(str(tmp_path / "src"), 8, image_size=32, workers=1)
    with pytest.raises(PackError) as exc:
        pack(str(tmp_path / "src"), str(tmp_path / "out"), workers=1, max_pixels=1000)
    assert "fg_bg is 32x32 (0.0 MP), over the 0.001 MP limit" in str(exc.value) and "--max-pixels 1024" in str(
        exc.value)
    res = pack(str(tmp_path / "src"), str(tmp_path / "out"), workers=1, max_pixels=1024)
    assert res.packed == 8
