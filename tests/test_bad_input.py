"""Bad input gets one clear line naming the field, URI, shard or sample, and the contract's exit code."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from storage.shards import ShardWriter
from storage.synth import make_sample
from tests.conftest import copy_run, run_cli, run_cli_many, status_json, tiny_recipe, write_recipe


def _error_lines(res) -> list[str]:
    return [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]


@pytest.fixture(scope="module")
def refused(tmp_path_factory: pytest.TempPathFactory, tiny_dataset: str) -> dict[str, tuple[Path, Any]]:
    """The commands below that stop before training, each in a folder of its own, run together
    (each its own process: tests/cli_batch.py). name -> (its folder, its CompletedProcess)."""
    recipes = {
        "empty-data-uri": (tiny_recipe(""), []),
        "missing-dataset": (tiny_recipe("{tmp}/nowhere/dataset"), []),
        "unknown-model": (tiny_recipe(tiny_dataset), ["--set", "model.name=vgg"]),
        "wrong-image-size": (tiny_recipe(tiny_dataset, data={"image_size": [200, 200]}), []),
        "unwritable-storage": (tiny_recipe(tiny_dataset, run={"storage": "{tmp}/file/runs"}), []),
        # memory:// keeps the test off the network; the URI still carries user:password@ and a token.
        "secret-in-data-uri": (tiny_recipe("{tmp}/x"),
                               ["--set", "data.uri=memory://user:s3cret@bucket/data?token=abc123"]),
    }
    calls, dirs = [], {}
    for name, (recipe, extra) in recipes.items():
        d = dirs[name] = tmp_path_factory.mktemp(name)
        recipe = yaml.safe_load(yaml.safe_dump(recipe).replace("{tmp}", str(d)))
        calls.append((["run", write_recipe(d / "r.yaml", recipe), *extra], d))
    (dirs["unwritable-storage"] / "file").write_text("not a directory")
    dirs["status-of-unknown-run"] = tmp_path_factory.mktemp("status-of-unknown-run")
    calls.append((["status", "ghost"], dirs["status-of-unknown-run"]))
    return {name: (dirs[name], res) for name, res in zip(dirs, run_cli_many(calls), strict=True)}


def test_empty_data_uri_is_a_recipe_error_naming_the_field(refused):
    _, res = refused["empty-data-uri"]
    assert res.returncode == 2
    (line,) = _error_lines(res)
    assert "data.uri" in line and "orchestrator data synth" in line


def test_missing_dataset_names_the_uri_and_what_to_do(refused):
    cwd, res = refused["missing-dataset"]
    missing = str(cwd / "nowhere" / "dataset")
    assert res.returncode == 1
    (line,) = _error_lines(res)
    assert missing in line and "manifest.json missing" in line and "orchestrator data synth" in line


def test_unknown_model_exits_2_listing_valid_names(refused):
    _, res = refused["unknown-model"]
    assert res.returncode == 2
    (line,) = _error_lines(res)
    assert "model.name" in line and "'vgg'" in line and "unet224" in line


def test_images_of_the_wrong_size_stop_before_training_naming_a_sample(refused):
    cwd, res = refused["wrong-image-size"]
    assert res.returncode == 1
    (line,) = _error_lines(res)
    assert "shards/shard-" in line and "sample" in line and "64x64" in line and "data.image_size" in line
    assert not (cwd / "runs" / "tiny" / "plan.json").exists()


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


def test_unwritable_run_storage_fails_fast_naming_it(refused):
    cwd, res = refused["unwritable-storage"]
    blocker = cwd / "file"
    assert res.returncode == 1
    (line,) = _error_lines(res)
    assert "run.storage" in line and str(blocker) in line


def test_status_of_an_unknown_run_names_it(refused):
    _, res = refused["status-of-unknown-run"]
    assert res.returncode == 1 and "ghost" in res.stderr


def test_secrets_never_reach_error_messages(refused):
    _, res = refused["secret-in-data-uri"]
    assert res.returncode == 2, res.stderr  # refused at validation: the URI holds credentials
    (line,) = _error_lines(res)
    assert "data.uri" in line and "holds credentials" in line
    assert "s3cret" not in res.stderr + res.stdout and "abc123" not in res.stderr + res.stdout
    assert "memory://***@bucket" in res.stderr
