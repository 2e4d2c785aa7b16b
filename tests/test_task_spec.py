"""One torch-free TaskSpec per task (common/tasks.py), read by everything that used to list tasks; and
bring-your-own models, tasks and losses by import path or entry point, with one-line errors."""

from __future__ import annotations

import ast
import subprocess
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest

from common.errors import RecipeError
from common.tasks import get_task_spec, task_names
from orchestrator.recipes import validate_recipe
from tests.conftest import REPO, cli_env, tiny_recipe, write_recipe

BUILT_IN = ["mask_depth", "classification", "segmentation", "depth"]
EXAMPLE = REPO / "examples" / "keypoints"


def test_every_task_list_is_the_specs():
    from orchestrator.data_cli import TASKS as DATA_TASKS
    from storage.layouts import TASK_LAYOUTS
    from storage.layouts import TASKS as LAYOUT_TASKS
    from storage.layouts.manifest import TASK_COLUMNS
    from storage.pack import TASK_COLUMNS as PACK_COLUMNS
    from storage.synth_tasks import task_columns

    assert task_names() == BUILT_IN == list(DATA_TASKS) == list(LAYOUT_TASKS) == list(TASK_LAYOUTS)
    for name in BUILT_IN[1:]:
        spec = get_task_spec(name)
        assert TASK_COLUMNS[name] == spec.column_names
        assert tuple((c.name, c.codec) for c in PACK_COLUMNS[name]) == spec.columns
        assert tuple((c.name, c.codec) for c in task_columns(name)) == spec.columns


def test_the_worker_half_takes_its_declarations_from_the_spec():
    from workers.tasks import get_task

    for name in BUILT_IN:
        spec, task = get_task_spec(name), get_task(name)
        assert task.spec is spec and task.name == name and task.columns == spec.column_names
        assert task.loss_sections == tuple(spec.loss_sections) and task.compare_columns == spec.compare_columns


def test_common_imports_nothing_above_it():
    """common/ is the bottom layer: no import of storage/, workers/ or orchestrator/, not even inside a function."""
    bad = []
    for path in sorted((REPO / "common").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            above = ("storage", "workers", "orchestrator")
            bad += [f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] in above]
    assert not bad, bad


def _error(**changes) -> str:
    data = tiny_recipe("x")
    for key, value in changes.items():
        section, _, field = key.partition("__")
        data.setdefault(section, {})[field] = value if field else value
        if not field:
            data[section] = value
    with pytest.raises(RecipeError) as exc:
        validate_recipe(data, source="r.yaml")
    return str(exc.value)


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"model__name": "nopkg.nets:TinyUNet"}, "model.name", ["cannot import module 'nopkg'", "PYTHONPATH"]),
    ({"model__name": "collections:NoSuchNet"}, "model.name", ["has no attribute 'NoSuchNet'"]),
    ({"model__name": "collections:OrderedDict"}, "model.name", ["not a torch.nn.Module subclass"]),
    ({"task": "nopkg.tasks:KEYPOINTS"}, "task", ["cannot import module 'nopkg'"]),
    ({"task": "collections:OrderedDict"}, "task", ["not a common.task_spec.TaskSpec"]),
    ({"loss": {"mask": {"nopkg.losses:focal": 1.0}}}, "loss.mask", ["cannot import module 'nopkg'"]),
])
def test_a_bad_import_path_is_one_line_naming_the_field(changes, field, words):
    msg = _error(**changes)
    assert len(msg.splitlines()) == 1 and msg.startswith(f"r.yaml: field '{field}'"), msg
    assert all(w in msg for w in words), msg


def test_a_loss_by_import_path_trains_like_a_registered_one(monkeypatch):
    """A loss the package does not ship, named by import path: validated and built as the built-in ones."""
    from workers.losses import build_loss

    data = tiny_recipe("x")
    data["loss"] = {"mask": {"workers.losses:l1_loss": 1.0, "dice": 1.0}}
    rec = validate_recipe(data, source="r.yaml")
    assert [name for name, _, _ in build_loss(rec.loss.mask).terms] == ["workers.losses:l1_loss", "dice"]


def test_a_task_from_an_entry_point_resolves_by_its_name(monkeypatch):
    import common.plugins
    import common.registry

    monkeypatch.syspath_prepend(str(EXAMPLE))
    fake = [EntryPoint(name="keypoints", value="keypoints_spec:KEYPOINTS", group="orchestrator.tasks")]
    monkeypatch.setattr(common.plugins, "entry_points", lambda group: [e for e in fake if e.group == group])
    monkeypatch.setattr(common.registry, "entry_point_names", common.plugins.entry_point_names)
    assert get_task_spec("keypoints").column_names == ("image", "heatmap")


def test_the_cli_names_a_bad_model_path_in_one_line_without_a_traceback(tmp_path: Path):
    path = write_recipe(tmp_path / "r.yaml", tiny_recipe("x", model={"name": "nopkg.nets:TinyUNet"}))
    res = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", path], cwd=tmp_path, env=cli_env(),
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in res.stderr and len(lines) == 1, res.stderr
    assert "model.name" in lines[0] and "nopkg" in lines[0] and "PYTHONPATH" in lines[0]
