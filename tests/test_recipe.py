"""Recipe loading: typed validation, --set overrides, and errors that name the field."""

from __future__ import annotations

import pytest

from common.errors import RecipeError
from common.recipe import apply_override, load_recipe, validate_recipe
from tests.conftest import REPO, run_cli, tiny_recipe, write_recipe


@pytest.mark.parametrize("name", ["quickstart.yaml", "unet224.yaml"])
def test_shipped_recipes_validate(name):
    """The recipes the README tells people to run must load as they are."""
    r = load_recipe(str(REPO / "recipes" / name))
    assert [s.name for s in r.stages] == ["spine", "head_tail", "full"]
    assert [s.trainable for s in r.stages] == [["spine"], ["head", "tail"], ["all"]]


def test_unet224_recipe_is_the_source_recipe():
    """Chunks 50K/50K/100K, 56/224/224 px, batch 256/64/64, full width: the source's strategy."""
    r = load_recipe(str(REPO / "recipes" / "unet224.yaml"))
    assert [s.chunk_size for s in r.stages] == [50_000, 50_000, 100_000]
    assert [s.resolution for s in r.stages] == [56, 224, 224]
    assert [s.batch_size for s in r.stages] == [256, 64, 64]
    assert r.model.width == 1.0 and r.data.expected_samples == 1_200_000


def _error(data) -> str:
    with pytest.raises(RecipeError) as exc:
        validate_recipe(data, source="r.yaml")
    return str(exc.value)


def test_wrong_choice_names_dotted_field_and_allowed_values():
    d = tiny_recipe("x")
    d["stages"][1]["forward"] = "spin"
    msg = _error(d)
    assert "stages.1.forward" in msg and "'spine'" in msg and "'full'" in msg


def test_unknown_key_is_rejected_with_its_path():
    """A typo silently ignored would train with the default instead of what was asked."""
    d = tiny_recipe("x")
    d["checkpoint"]["evry_steps"] = 3
    msg = _error(d)
    assert "checkpoint.evry_steps" in msg and "unknown field" in msg


def test_unknown_model_lists_registered_models():
    msg = _error(tiny_recipe("x", model={"name": "resnet9000"}))
    assert "model.name" in msg and "resnet9000" in msg and "unet224" in msg and "unet56" in msg


def test_unknown_loss_lists_registered_losses():
    msg = _error(tiny_recipe("x", loss={"mask": {"focal": 1.0}}))
    assert "loss.mask" in msg and "focal" in msg and "dice" in msg and "ssim" in msg


def test_full_forward_needs_a_resolution_the_head_can_quarter():
    d = tiny_recipe("x")
    d["stages"][2]["resolution"] = 62
    assert "stages.2" in _error(d) and "multiple of 4" in _error(d)


def test_set_overrides_by_stage_name_or_index_with_yaml_types():
    d = tiny_recipe("x")
    apply_override(d, "stages.head_tail.batch_size=32")
    apply_override(d, "stages.0.lr=1e-3")
    apply_override(d, "run.deterministic=false")
    r = validate_recipe(d)
    assert r.stages[1].batch_size == 32 and r.stages[0].lr == 1e-3 and r.run.deterministic is False


@pytest.mark.parametrize("item,needle", [
    ("stages.nosuch.lr=1", "no item named 'nosuch'"),
    ("stages.9.lr=1", "out of range"),
    ("justakey", "expected KEY=VALUE"),
    ("run.name.x=1", "is a value, not a section"),
])
def test_bad_set_names_the_argument(item, needle):
    d = tiny_recipe("x")
    with pytest.raises(RecipeError) as exc:
        apply_override(d, item)
    assert needle in str(exc.value) and item in str(exc.value)


def test_recipe_identity_ignores_execution_settings():
    """A run may resume with more workers or a GPU; anything else changed is a different run."""
    a = validate_recipe(tiny_recipe("x"))
    b = validate_recipe(tiny_recipe("x", execution={"num_workers": 4}))
    c = validate_recipe(tiny_recipe("x", run={"seed": 1}))
    assert a.sha256() == b.sha256() != c.sha256()
    # When a checkpoint is written (in the background or not) is not what the run trains either.
    d = validate_recipe(tiny_recipe("x", checkpoint={"background": False}))
    e = validate_recipe(tiny_recipe("x", checkpoint={"keep": 5}))
    assert d.sha256() == a.sha256() != e.sha256()


def test_flat_params_are_dotted_and_redact_secrets():
    r = validate_recipe(tiny_recipe("gs://user:hunter2@bucket/data?token=abc"))
    p = r.flat_params()
    assert p["stages.head_tail.batch_size"] == "8"
    assert "hunter2" not in p["data.uri"] and "abc" not in p["data.uri"]


def test_cli_malformed_yaml_exits_2_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\n stages: [\n")
    res = run_cli("run", str(bad), cwd=tmp_path)
    assert res.returncode == 2
    assert str(bad) in res.stderr and "malformed YAML at line" in res.stderr


def test_cli_invalid_field_exits_2_with_one_line_per_problem(tmp_path, tiny_dataset):
    d = tiny_recipe(tiny_dataset)
    d["stages"][0]["batch_size"] = 0
    path = write_recipe(tmp_path / "r.yaml", d)
    res = run_cli("run", path, "--set", "model.name=nope", cwd=tmp_path)
    assert res.returncode == 2
    errors = [ln for ln in res.stderr.splitlines() if "field '" in ln]
    assert any("stages.0.batch_size" in ln for ln in errors) and any("model.name" in ln for ln in errors)
    assert not (tmp_path / "runs").exists(), "a bad recipe must not start a run"


def test_gpu_and_tpu_workers_ask_ray_for_those_resources():
    from orchestrator.launcher import scaling_config

    gpu = scaling_config(load_recipe("recipes/unet224.yaml", ["execution.use_gpu=true", "execution.num_workers=4"]).execution)
    assert gpu.use_gpu and gpu.num_workers == 4 and gpu.resources_per_worker["GPU"] == 1
    tpu = scaling_config(load_recipe("recipes/unet224.yaml", [
        "execution.use_gpu=false", "execution.use_tpu=true", "execution.num_workers=2",
        "execution.tpu_topology=2x2x2", "execution.tpu_accelerator_type=TPU-V4"]).execution)
    assert tpu.use_tpu and tpu.topology == "2x2x2" and tpu.resources_per_worker["TPU"] == 4 and "GPU" not in tpu.resources_per_worker


def test_tpu_settings_that_ray_would_reject_are_named_at_load_time():
    with pytest.raises(RecipeError, match="use_gpu and use_tpu"):
        load_recipe("recipes/unet224.yaml", ["execution.use_gpu=true", "execution.use_tpu=true"])
    with pytest.raises(RecipeError, match="tpu_topology"):
        load_recipe("recipes/unet224.yaml", ["execution.use_gpu=false", "execution.use_tpu=true", "execution.num_workers=2"])
