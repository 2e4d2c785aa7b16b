"""Recipe loading: typed validation, --set overrides, and errors that name the field.

Recipes load through orchestrator.recipes: common's validation plus the worker-side checks."""

from __future__ import annotations

import pytest

from common.errors import RecipeError
from common.recipe import apply_override
from orchestrator.recipes import load_recipe, validate_recipe
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
    with pytest.raises(RecipeError, match="field 'data.uri': gs://\\*\\*\\*@bucket.*holds credentials") as exc:
        validate_recipe(tiny_recipe("gs://user:hunter2@bucket/data?token=abc"))
    assert "hunter2" not in str(exc.value) and "abc" not in str(exc.value)
    # Refused at validation; flat_params still redacts, should one get past it.
    r = validate_recipe(tiny_recipe("gs://bucket/data"))
    r.data.__dict__["uri"] = "gs://user:hunter2@bucket/data?token=abc"
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

    gpu = scaling_config(load_recipe("recipes/unet224.yaml",
                                     ["execution.use_gpu=true", "execution.num_workers=4"]).execution)
    assert gpu.use_gpu and gpu.num_workers == 4 and gpu.resources_per_worker["GPU"] == 1
    tpu = scaling_config(load_recipe("recipes/unet224.yaml", [
        "execution.use_gpu=false", "execution.use_tpu=true", "execution.num_workers=2",
        "execution.tpu_topology=2x2x2", "execution.tpu_accelerator_type=TPU-V4"]).execution)
    assert tpu.use_tpu and tpu.topology == "2x2x2" and tpu.resources_per_worker[
        "TPU"] == 4 and "GPU" not in tpu.resources_per_worker


def test_tpu_settings_that_ray_would_reject_are_named_at_load_time():
    with pytest.raises(RecipeError, match="use_gpu and use_tpu"):
        load_recipe("recipes/unet224.yaml", ["execution.use_gpu=true", "execution.use_tpu=true"])
    with pytest.raises(RecipeError, match="tpu_topology"):
        load_recipe("recipes/unet224.yaml",
                    ["execution.use_gpu=false", "execution.use_tpu=true", "execution.num_workers=2"])


# The identity of every shipped recipe: a run in progress resumes only while its recipe's sha256 is
# the same, so a validation change must not move these (recorded before the issue-20 bounds).
SHIPPED_SHA256 = {
    "basenet.yaml": "6ab192c9e613d984a739a2add3d0d39ddd9d71d60098c9229871514d4ef66236",
    "mobilenetv2_depth.yaml": "db8a1c44e969346e9a804fc6cf3ee0577a14949699545351e5c1fe034fa94b9f",
    "mobilenetv2_depth_cpu.yaml": "f9fc5b9472aeef528cf624d696c051b3c77a6beb224e703e2757f582ee0cad0f",
    "quickstart.yaml": "75c5a65c941835863ff9790797840362e6af2a25841fa0a6714bc4ce8ad47368",
    "resnet18_seg.yaml": "dec9569b475261faec63b1d5da57bb9d8cbc93c9a4e1a7aacc74ad735dc0402e",
    "resnet18_seg_cpu.yaml": "013bcaef7340ca94cec627027bba7b3776eac0ed4c9563266520c7d466971eed",
    "resunet.yaml": "64a228f633c436db0e89912eec3c0514cbd5b6d96001336febb6bb55adb8a104",
    "resunet_cpu.yaml": "b7e47b3a6f2e54c9ca463a20a77295015fc039ebba70703a5b98c157386cf6ea",
    "resunext.yaml": "b5ae898f3d55bae18153da925d5337cbd97dfc6056ea59437af999b88b7ecd0a",
    "resunext_cpu.yaml": "14d21513085d6d6e74b78d2013ed0b5ccccabc0cced0d9d8b421459f02302274",
    "unet224.yaml": "a68972eebf98b12b0122d665f74043fd29569925039a28746a59667738c2ddfd",
}


@pytest.mark.parametrize("name", sorted(SHIPPED_SHA256))
def test_shipped_recipe_identity_is_pinned(name):
    assert load_recipe(str(REPO / "recipes" / name)).sha256() == SHIPPED_SHA256[name]


@pytest.mark.parametrize(("changes", "field", "says"), [
    ({"stages.0.lr": float("inf")}, "stages.0.lr", "finite"),
    ({"stages.0.lr": float("nan")}, "stages.0.lr", "finite"),
    ({"loss.mask": {"l1": float("inf")}}, "loss.mask.l1", "finite"),
    ({"checkpoint.every_seconds": float("inf")}, "checkpoint.every_seconds", "finite"),
    ({"data.hflip": float("nan")}, "data.hflip", "finite"),
    ({"model.options": {"dropout": float("nan")}}, "model.options", "dropout"),
    ({"checkpoint.keep": 1}, "checkpoint.keep", "greater than or equal to 2"),
    ({"stages.0.resolution": 100_000}, "stages.0.resolution", "less than or equal to 4096"),
    ({"execution.num_workers": 100_000}, "execution.num_workers", "less than or equal to 1024"),
    ({"data.decode_workers": 1000}, "data.decode_workers", "less than or equal to 64"),
    ({"execution.cpus_per_worker": float("inf")}, "execution.cpus_per_worker", "finite"),
])
def test_non_finite_numbers_and_out_of_range_values_are_refused_naming_the_field(changes, field, says):
    d = tiny_recipe("x")
    for key, value in changes.items():
        *path, last = key.split(".")
        node = d
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        node[last] = value
    with pytest.raises(RecipeError) as exc:
        validate_recipe(d, "r.yaml")
    assert f"r.yaml: field '{field}'" in str(exc.value) and says in str(exc.value)


def test_set_of_a_non_finite_number_is_refused():
    d = tiny_recipe("x")
    apply_override(d, "stages.0.lr=.inf")
    with pytest.raises(RecipeError, match="stages.0.lr.*finite"):
        validate_recipe(d)
