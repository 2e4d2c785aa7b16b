"""`data synth` and `data pack` never delete a user's files: a DEST holding files this tool did not
write is refused (exit 2, naming DEST and the files) unless --force, and even then, like every
re-synth and re-pack, only files this tool wrote are replaced or removed."""

from __future__ import annotations

from pathlib import Path

import pytest

from storage import fs as sfs
from storage.dest_check import ForeignDestError, check_dest, foreign_files
from storage.shards import open_dataset
from tests import gcs_emulator as _emulator
from tests.conftest import run_cli

gcs_emulator, gcs = _emulator.gcs_emulator, _emulator.gcs  # fixtures

THESIS = b"PK\x03\x04 my thesis, three years of work\n"
NOTES = b"notes I keep next to the shards\n"


def _user_files(dest: Path) -> dict[Path, bytes]:
    """A user's folder as in the issue: shared/thesis.docx and shards/notes.txt."""
    files = {dest / "shared" / "thesis.docx": THESIS, dest / "shards" / "notes.txt": NOTES}
    for path, data in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return files


def _intact(files: dict[Path, bytes]) -> None:
    for path, data in files.items():
        assert path.read_bytes() == data, f"{path} changed or vanished"


def _refused(res, dest: Path, command: str) -> None:
    shown = f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 2, shown
    assert "Traceback" not in res.stderr, shown
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), shown
    for needle in (str(dest), command, "shards/notes.txt", "shared/thesis.docx", "--force"):
        assert needle in res.stderr, f"{needle!r} not in\n{shown}"


@pytest.mark.parametrize("extra",
                         [["--task", "classification"], ["--image-size", "32"],
                          ["--task", "depth", "--layout", "seed"]],
                         ids=["classification", "mask_depth", "depth-seed"])
def test_synth_refuses_a_folder_of_user_files_and_force_keeps_them(tmp_path: Path, extra: list[str]):
    dest = tmp_path / "mydrive"
    files = _user_files(dest)
    res = run_cli("data", "synth", "mydrive", "--samples", "32", *extra, cwd=tmp_path)
    _refused(res, dest, "data synth")
    _intact(files)
    assert sorted(p.name for p in dest.rglob("*") if p.is_file()) == ["notes.txt", "thesis.docx"]  # nothing written

    res = run_cli("data", "synth", "mydrive", "--samples", "32", *extra, "--force", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    _intact(files)
    # Synthesizing again over its own output (and the user's files, with --force) still keeps them.
    res = run_cli("data", "synth", "mydrive", "--samples", "16", *extra, "--force", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    _intact(files)
    if "seed" not in extra:
        assert open_dataset(str(dest)).num_samples == 16


def test_synth_again_into_its_own_dataset_or_a_killed_synths_leftovers_needs_no_force(tmp_path: Path):
    res = run_cli("data", "synth", "ds", "--task", "classification", "--samples", "32", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    # A synth killed half-way (the runner's first-run synthesis into data/<run.name> too): shards
    # written, no manifest yet, an atomic write's temp file left behind.
    (tmp_path / "ds" / "manifest.json").unlink()
    (tmp_path / "ds" / "shards" / "shard-00001.parquet.tmp-0a1b2c3d").write_bytes(b"half")
    assert foreign_files(str(tmp_path / "ds")) == []
    res = run_cli("data", "synth", "ds", "--task", "classification", "--samples", "24", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert open_dataset(str(tmp_path / "ds")).num_samples == 24


def test_the_runners_first_run_synthesis_refuses_user_files_too(tmp_path: Path):
    """orchestrator.runner.open_data synthesizes into data/<run.name> through synthesize(): the same check."""
    from storage.synth import synthesize
    from storage.synth_tasks import synthesize_task

    dest = tmp_path / "data" / "quickstart"
    files = _user_files(dest)
    with pytest.raises(ForeignDestError, match="shards/notes.txt"):
        synthesize(str(dest), 16, image_size=32, workers=1)
    with pytest.raises(ForeignDestError, match="shared/thesis.docx"):
        synthesize_task("classification", str(dest), 16, workers=1)
    _intact(files)


def test_pack_refuses_user_files_and_a_repack_removes_only_what_a_pack_recorded(tmp_path: Path):
    assert run_cli("data", "synth", "raw", "--task", "classification", "--layout", "seed", "--samples", "40",
                   cwd=tmp_path).returncode == 0
    dest = tmp_path / "out"
    files = _user_files(dest)
    res = run_cli("data", "pack", "raw", "out", "--task", "classification", cwd=tmp_path)
    _refused(res, dest, "data pack")
    _intact(files)

    # --force: packs next to the user's files; a re-pack with other shard sizes (every old part is
    # stale: its shards go) and one with the same settings (resumed) keep them as well.
    for args in (["--rows-per-shard", "16"], ["--rows-per-shard", "8"], ["--rows-per-shard", "8"]):
        res = run_cli("data", "pack", "raw", "out", "--task", "classification", "--force", *args, cwd=tmp_path)
        assert res.returncode == 0, res.stderr
        _intact(files)
    ds = open_dataset(str(dest))
    assert ds.num_samples == 40
    shards = sorted(p.name for p in (dest / "shards").iterdir())
    # the 16-row pack's 3 shards were replaced
    assert shards == ["notes.txt"] + [f"shard-{i:05d}.parquet" for i in range(5)]
    assert run_cli("data", "verify", "out", cwd=tmp_path).returncode == 0


def test_pack_resumes_from_its_own_state_without_force(tmp_path: Path):
    """A killed pack leaves DEST/.pack/ and shards: the same command goes on, no --force needed."""
    assert run_cli("data", "synth", "raw", "--task", "classification", "--layout", "seed", "--samples", "40",
                   cwd=tmp_path).returncode == 0
    assert run_cli("data", "pack", "raw", "out", "--task", "classification", "--rows-per-shard", "16",
                   cwd=tmp_path).returncode == 0
    (tmp_path / "out" / "manifest.json").unlink()
    (tmp_path / "out" / "index.parquet").unlink()
    assert foreign_files(str(tmp_path / "out")) == []
    res = run_cli("data", "pack", "raw", "out", "--task", "classification", "--rows-per-shard", "16", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "3 of 3 parts reused" in res.stderr


def test_a_damaged_record_cannot_point_a_repack_at_a_user_file(tmp_path: Path):
    import json

    assert run_cli("data", "synth", "raw", "--task", "classification", "--layout", "seed", "--samples", "20",
                   cwd=tmp_path).returncode == 0
    assert run_cli("data", "pack", "raw", "out", "--task", "classification", cwd=tmp_path).returncode == 0
    files = _user_files(tmp_path / "out")
    record = tmp_path / "out" / ".pack" / "part-00000.json"
    rec = json.loads(record.read_text())
    rec["shard"]["file"] = "shards/notes.txt"
    record.write_text(json.dumps(rec))
    res = run_cli("data", "pack", "raw", "out", "--task", "classification", "--force", "--rows-per-shard", "4",
                  cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    _intact(files)


def test_an_object_store_dest_is_checked_and_kept_the_same_way():
    """fsspec URIs (memory:// here, gs:// the same code path): refused with the objects named, and
    --force keeps them."""
    from storage.pack import pack
    from storage.synth_tasks import synthesize_task, synthesize_task_seed_layout

    root = "memory://user-files-check"
    raw, dest = f"{root}/raw", f"{root}/mydrive"
    synthesize_task_seed_layout("classification", raw, 24, workers=1)
    assert foreign_files(raw) == []
    sfs.write_bytes(f"{dest}/shards/notes.txt", NOTES)
    sfs.write_bytes(f"{dest}/shared/thesis.docx", THESIS)
    with pytest.raises(ForeignDestError,
                       match=r"memory://user-files-check/mydrive.*shards/notes\.txt, shared/thesis\.docx"):
        check_dest(dest, "data pack")
    with pytest.raises(ForeignDestError):
        pack(raw, dest, task="classification", workers=1)
    with pytest.raises(ForeignDestError):
        synthesize_task("classification", dest, 16, workers=1)
    pack(raw, dest, task="classification", workers=1, force=True, rows_per_shard=8)
    pack(raw, dest, task="classification", workers=1, force=True, rows_per_shard=16)
    synthesize_task("classification", dest, 16, workers=1, force=True)
    assert sfs.read_bytes(f"{dest}/shards/notes.txt") == NOTES
    assert sfs.read_bytes(f"{dest}/shared/thesis.docx") == THESIS
    assert open_dataset(dest).num_samples == 16


def test_a_gcs_dest_is_checked_and_kept_the_same_way(gcs):
    """gs:// through real gcsfs (the emulator): a bucket's objects are listed, named and kept."""
    from storage.pack import pack
    from storage.synth_tasks import synthesize_task, synthesize_task_seed_layout

    raw, dest = gcs.uri("raw"), gcs.uri("mydrive")
    synthesize_task_seed_layout("classification", raw, 16, workers=1)
    sfs.write_bytes(f"{dest}/shards/notes.txt", NOTES)
    sfs.write_bytes(f"{dest}/shared/thesis.docx", THESIS)
    with pytest.raises(ForeignDestError, match=rf"{dest}: .*shards/notes\.txt, shared/thesis\.docx"):
        synthesize_task("classification", dest, 16, workers=1)
    pack(raw, dest, task="classification", workers=1, force=True, rows_per_shard=8)
    pack(raw, dest, task="classification", workers=1, force=True, rows_per_shard=4)
    assert sfs.read_bytes(f"{dest}/shards/notes.txt") == NOTES
    assert sfs.read_bytes(f"{dest}/shared/thesis.docx") == THESIS
    assert open_dataset(dest).num_samples == 16
