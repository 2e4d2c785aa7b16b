"""Bad input gets one clear line naming the field, URI, shard or sample, and the contract's exit code."""

from __future__ import annotations

import pytest

from storage.shards import ShardWriter
from storage.synth import make_sample
from tests.conftest import copy_run, run_cli, status_json, tiny_recipe, write_recipe


def _error_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


def test_empty_data_uri_is_a_recipe_error_naming_the_field(tmp_path):
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", tiny_recipe("")), cwd=tmp_path)
    assert res.returncode == 2
    (line,) = _error_lines(res)
    assert "data.uri" in line and "orchestrator data synth" in line


def test_missing_dataset_names_the_uri_and_what_to_do(tmp_path):
    missing = str(tmp_path / "nowhere" / "dataset")
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", tiny_recipe(missing)), cwd=tmp_path)
    assert res.returncode == 1
    (line,) = _error_lines(res)
    assert missing in line and "manifest.json missing" in line and "orchestrator data synth" in line


def test_unknown_model_exits_2_listing_valid_names(tmp_path, tiny_dataset):
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", tiny_recipe(tiny_dataset)), "--set", "model.name=vgg",
                  cwd=tmp_path)
    assert res.returncode == 2
    (line,) = _error_lines(res)
    assert "model.name" in line and "'vgg'" in line and "unet224" in line


def test_images_of_the_wrong_size_stop_before_training_naming_a_sample(tmp_path, tiny_dataset):
    recipe = tiny_recipe(tiny_dataset, data={"image_size": [200, 200]})
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", recipe), cwd=tmp_path)
    assert res.returncode == 1
    (line,) = _error_lines(res)
    assert "shards/shard-" in line and "sample" in line and "64x64" in line and "data.image_size" in line
    assert not (tmp_path / "runs" / "tiny" / "plan.json").exists()


@pytest.fixture
def dataset_with_corrupt_jpeg(tmp_path) -> tuple[str, int]:
    uri = str(tmp_path / "corrupt")
    bad_id = 37
    with ShardWriter(uri, rows_per_shard=64, rows_per_group=16) as w:
        for sid in range(120):
            s = make_sample(0, sid, 64)
            row = {k: s[k] for k in ("fg_bg", "bg", "mask", "depth")}
            if sid == bad_id:
                row["fg_bg"] = b"\xff\xd8\xff\xe0 this is not a jpeg"
                row["height"], row["width"] = 64, 64
            w.add({"sample_id": sid, **row})
        w.close()
    return uri, bad_id


def test_corrupt_image_at_train_time_fails_naming_shard_and_sample(tmp_path, dataset_with_corrupt_jpeg):
    uri, bad_id = dataset_with_corrupt_jpeg
    recipe = tiny_recipe(uri, data={"eval_samples": 16})
    for st in recipe["stages"]:
        st["chunk_size"] = 104
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", recipe), cwd=tmp_path)
    assert res.returncode == 1
    (line,) = _error_lines(res)
    assert f"sample {bad_id}" in line and "shards/shard-" in line and "JPEG" in line
    st = run_cli("status", "tiny", "--json", cwd=tmp_path)
    assert '"state": "failed"' in st.stdout


def test_changed_recipe_for_an_existing_run_is_refused(tmp_path, reference_run):
    """A completed run (a copy of the session's reference run, not trained again here) keeps its recipe."""
    copy_run(reference_run, tmp_path)
    before = status_json(tmp_path)
    assert before["state"] == "completed"
    res = run_cli("run", "r.yaml", "--set", "stages.full.lr=0.1", cwd=tmp_path)
    assert res.returncode == 2
    (line,) = _error_lines(res)
    assert "already exists" in line and "run.name" in line
    assert status_json(tmp_path) == before, "the refused command changed the run"


def test_unwritable_run_storage_fails_fast_naming_it(tmp_path, tiny_dataset):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    recipe = tiny_recipe(tiny_dataset, run={"storage": str(blocker / "runs")})
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", recipe), cwd=tmp_path)
    assert res.returncode == 1
    (line,) = _error_lines(res)
    assert "run.storage" in line and str(blocker) in line


def test_status_of_an_unknown_run_names_it(tmp_path):
    res = run_cli("status", "ghost", cwd=tmp_path)
    assert res.returncode == 1 and "ghost" in res.stderr


def test_secrets_never_reach_error_messages(tmp_path):
    # memory:// keeps the test off the network; the URI still carries user:password@ and a token.
    uri = "memory://user:s3cret@bucket/data?token=abc123"
    res = run_cli("run", write_recipe(tmp_path / "r.yaml", tiny_recipe(str(tmp_path / "x"))), "--set",
                  f"data.uri={uri}", cwd=tmp_path)
    assert res.returncode == 2, res.stderr  # refused at validation: the URI holds credentials
    (line,) = _error_lines(res)
    assert "data.uri" in line and "holds credentials" in line
    assert "s3cret" not in res.stderr + res.stdout and "abc123" not in res.stderr + res.stdout
    assert "memory://***@bucket" in res.stderr
