"""bench.peer, small: our two arms run locally and on the GCS emulator and report sane figures, the
resume check holds for them, and the acceptance lines read the figures the right way round. litdata's
arms are skipped here (an optional extra); a missing litdata is a note, never a failure."""

from __future__ import annotations

import pytest

from bench import peer

SAMPLES = 200


@pytest.fixture(scope="module")
def small_run() -> dict:
    return peer.main(["--samples", str(SAMPLES), "--sizes", "56", "--skip", "litdata", "--json"])


@pytest.mark.parametrize("where", ["local", "gcs"])
@pytest.mark.parametrize("arm", ["ours_stream", "ours_whole"])
def test_our_arms_read_every_sample_once_and_resume_exactly(small_run: dict, where: str, arm: str) -> None:
    got = small_run[f"{where}_56_{arm}"]
    assert got["samples"] == SAMPLES and got["distinct_samples"] == SAMPLES
    assert got["resume_exact"] is True and got["resume_after_batches"] >= 1
    assert got["first_batch_s"] > 0 and got["steady_samples_per_s"] > 0
    assert got["pss_mb"] > 50  # a Python process with torch imported: never near zero
    if where == "gcs":
        assert got["gets"] >= got["gets_object_data"] >= 1 and got["requests_at_emulator"] >= got["gets"]
    else:
        assert got["requests"] >= 3  # manifest, index and at least one ranged read


def test_ratios_and_acceptance_are_reported(small_run: dict) -> None:
    assert small_run["arms"] == ["ours_stream", "ours_whole"]
    for where, count in (("local", "requests"), ("gcs", "gets")):
        ratio = small_run[f"{where}_56_ratio_vs_ours_whole"]
        assert set(ratio) == {"steady_samples_per_s", "second_half_samples_per_s", "first_batch_s", "pss", count}
        ours, whole = small_run[f"{where}_56_ours_stream"], small_run[f"{where}_56_ours_whole"]
        assert ratio["pss"] == round(ours["pss_mb"] / whole["pss_mb"], 2)
        # Without litdata the comparisons with it are not measured, and the whole cannot pass.
        a = small_run["acceptance"][f"{where}_56"]
        assert a["steady_ge_1x_litdata"] is None and a["resume_exact"] is True
    assert small_run["acceptance"]["passed"] is False and small_run["acceptance"]["not_measured"] > 0


def _arm(steady: float, first: float, pss: float, gets: int, exact: bool = True) -> dict:
    return {"steady_samples_per_s": steady, "first_batch_s": first, "pss_mb": pss, "gets": gets,
            "resume_exact": exact}


def test_acceptance_reads_each_line_the_right_way_round() -> None:
    out = {"gcs_56_ours_stream": _arm(1000, 0.5, 300, 10), "gcs_56_litdata": _arm(900, 0.6, 400, 5),
           "gcs_56_litdata_parquet": _arm(1100, 2.0, 500, 4)}
    a = peer.acceptance(out, ["gcs"], [56])
    assert a["gcs_56"] == {"steady_ge_1x_litdata": True, "steady_ge_1x_litdata_parquet": False,
                           "first_batch_le_litdata": True, "pss_le_litdata": True, "gets_le_2x_litdata": True,
                           "gets_le_2x_litdata_parquet": False, "resume_exact": True}
    assert a["passed"] is False
    out["gcs_56_litdata_parquet"] = _arm(900, 2.0, 500, 5)
    assert peer.acceptance(out, ["gcs"], [56])["passed"] is True
    out["gcs_56_litdata"]["resume_exact"] = False  # any arm's inexact resume fails the line
    assert peer.acceptance(out, ["gcs"], [56])["gcs_56"]["resume_exact"] is False


def test_without_litdata_its_arms_are_skipped_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    import bench.peer_lit

    monkeypatch.setattr(bench.peer_lit, "have_litdata", lambda: False)
    out = peer.main(["--samples", "20", "--sizes", "56", "--skip", "local,gcs"])
    assert out["arms"] == ["ours_stream", "ours_whole"]
    assert "pip install --no-deps litdata==0.2.76" in out["litdata_note"]


def test_the_decoded_copy_holds_the_same_bytes_of_the_two_decoded_columns_only(tmp_path) -> None:
    from storage.shards import open_dataset
    from storage.synth import synthesize

    synthesize(str(tmp_path / "full"), 40, seed=1, image_size=64, rows_per_group=8, workers=1)
    peer.decoded_copy(str(tmp_path / "full"), str(tmp_path / "dec"), 8)
    full, dec = open_dataset(str(tmp_path / "full")), open_dataset(str(tmp_path / "dec"))
    assert [c.name for c in dec.stored_columns] == ["fg_bg", "mask"]  # no depth, no background ids
    ids = full.sample_ids
    a, b = full.read_samples(ids, columns=("fg_bg", "mask")), dec.read_samples(ids, columns=("fg_bg", "mask"))
    assert a["fg_bg"] == b["fg_bg"] and a["mask"] == b["mask"]
    assert dec.manifest["rows_per_group"] == 8


def test_pss_is_sampled_outside_the_measured_process_and_sees_its_memory() -> None:
    import time

    import numpy as np

    from bench.peer_measure import PssPeak

    with PssPeak() as idle:
        time.sleep(0.3)
    with PssPeak() as busy:
        block = np.ones(200 * 2**20, dtype=np.uint8)  # 200 MB, every page touched
        time.sleep(0.4)
        del block
    assert busy.peak > idle.peak + 150
    assert busy._proc is not None and busy._proc.returncode == 0  # a watcher process sampled it, and is done


def test_repeated_passes_are_taken_in_turns_and_reported_as_medians() -> None:
    calls: list[tuple[str, bool]] = []
    steady = iter([100.0, 300.0, 200.0, 900.0, 50.0, 400.0])

    def one(arm: str, first: bool) -> dict:
        calls.append((arm, first))
        return {"first_batch_s": 1.0, "steady_samples_per_s": next(steady), "second_half_samples_per_s": 1.0,
                "pss_mb": 10.0, "resume_exact": True}

    out = peer.rounds(["ours_stream", "litdata"], 3, one)
    assert calls == [("ours_stream", True), ("litdata", True), ("ours_stream", False), ("litdata", False),
                     ("ours_stream", False), ("litdata", False)]
    assert out["ours_stream"]["steady_samples_per_s"] == 100.0  # median of 100, 200, 50
    assert out["litdata"]["steady_samples_per_s"] == 400.0  # median of 300, 900, 400
    assert out["litdata"]["runs"]["steady_samples_per_s"] == [300.0, 900.0, 400.0]
