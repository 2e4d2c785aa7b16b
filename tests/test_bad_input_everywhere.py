"""No traceback ever reaches a user for bad input: every command, through the real CLI, against a
table of bad inputs. Each must print one `error:` line (one per problem for recipe validation)
naming the file, field, argument or URI, and exit 2 (bad recipe or arguments) or 1 (anything else).

Nothing here trains or starts Ray: every bad input is caught before (recipes use the local backend).
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import yaml

from tests.conftest import cli_env, run_cli, run_cli_many, tiny_recipe

# A mask_depth recipe for the tiny mask_depth set below (40 samples: 8 held out).
MD = tiny_recipe("{md}", data={"eval_samples": 8})
# A classification recipe for the tiny classification set.
CLS: dict[str, Any] = {
    "task": "classification",
    "run": {"name": "cls", "storage": "runs"},
    "data": {"uri": "{cls}", "eval_samples": 8},
    "model": {"name": "basenet"},
    "stages": [{"name": "train", "resolution": 28, "batch_size": 8, "chunk_size": 32, "lr": 0.01}],
    "tracking": {"uri": "sqlite:///mlflow.db", "experiment": "tests"},
    "execution": {"backend": "local", "num_workers": 1, "cpus_per_worker": 1},
}


def edit(recipe: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """The recipe with dotted keys set (list items by index), e.g. {"stages.0.lr": 1}."""
    out = copy.deepcopy(recipe)
    for key, value in changes.items():
        *path, last = key.split(".")
        node: Any = out
        for p in path:
            node = node[int(p)] if isinstance(node, list) else node.setdefault(p, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return out


def sweep_file(**spec: Any) -> dict[str, Any]:
    return {"sweep": {"name": "s", "base": "r.yaml", **spec}}


@dataclass
class Case:
    id: str
    args: list[str]
    code: int
    names: list[str]  # each must appear in the error (placeholders {tmp}, {md}, {cls}, {rawcls})
    files: dict[str, Any] = field(default_factory=dict)  # path -> text, or a dict written as YAML
    json_stdout: bool = False  # `--json` still prints its record on stdout
    lines: int = 1  # lines on stderr: one, or one per problem of a recipe
    absent: list[str] = field(default_factory=list)  # paths the failed command must not leave behind


class Outcome(NamedTuple):
    cwd: Path
    values: dict[str, str]
    res: subprocess.CompletedProcess


BLOCKER = {"blocker": "a regular file, not a folder\n"}

CASES = [
    # -- run: the recipe file ------------------------------------------------------------------------
    Case("run/missing-recipe", ["run", "nope.yaml"], 2, ["nope.yaml", "not found"]),
    Case("run/recipe-is-a-folder", ["run", "."], 2, ["is a folder"]),
    Case("run/malformed-yaml", ["run", "r.yaml"], 2, ["r.yaml", "malformed YAML", "line 2"],
         {"r.yaml": "run: {name: t\n"}),
    Case("run/recipe-is-a-list", ["run", "r.yaml"], 2, ["r.yaml", "YAML mapping"], {"r.yaml": "- run\n- stages\n"}),
    Case("run/empty-recipe", ["run", "r.yaml"], 2, ["r.yaml", "YAML mapping"], {"r.yaml": ""}),
    # -- run: recipe validation (exit 2, naming the file and the dotted field) -------------------------
    Case("run/unknown-field", ["run", "r.yaml"], 2, ["r.yaml", "data.shufle", "unknown field"],
         {"r.yaml": edit(MD, {"data.shufle": True})}),
    Case("run/wrong-type", ["run", "r.yaml"], 2, ["r.yaml", "stages.0.batch_size", "integer"],
         {"r.yaml": edit(MD, {"stages.0.batch_size": "eight"})}),
    Case("run/unknown-task", ["run", "r.yaml"], 2, ["r.yaml", "field 'task'", "classification"],
         {"r.yaml": edit(MD, {"task": "nope"})}),
    Case("run/unknown-model", ["run", "r.yaml"], 2, ["r.yaml", "model.name", "'vgg'", "unet224"],
         {"r.yaml": edit(MD, {"model.name": "vgg"})}),
    Case("run/model-of-another-task", ["run", "r.yaml"], 2,
         ["r.yaml", "model.name", "unet224", "classification", "basenet"],
         {"r.yaml": edit(MD, {"task": "classification"})}),
    Case("run/unknown-variant", ["run", "r.yaml"], 2, ["r.yaml", "model.variant", "huge", "best"],
         {"r.yaml": edit(CLS, {"model.variant": "huge"})}),
    Case("run/unknown-option", ["run", "r.yaml"], 2, ["r.yaml", "model.options", "nope", "dropout"],
         {"r.yaml": edit(CLS, {"model.options": {"nope": 1}})}),
    Case("run/unknown-loss", ["run", "r.yaml"], 2, ["r.yaml", "loss.mask", "'foo'", "dice"],
         {"r.yaml": edit(MD, {"loss.mask": {"foo": 1}})}),
    Case("run/label-loss-in-dense-section", ["run", "r.yaml"], 2, ["r.yaml", "loss.mask", "cross_entropy"],
         {"r.yaml": edit(MD, {"loss.mask": {"cross_entropy": 1}})}),
    Case("run/several-problems", ["run", "r.yaml"], 2,
         ["r.yaml: field 'data.shufle'", "r.yaml: field 'model.name'", "r.yaml: field 'stages.0.batch_size'"],
         {"r.yaml": edit(MD, {"data.shufle": True, "stages.0.batch_size": "eight", "model.name": "vgg"})}, lines=3),
    Case("run/trainable-part-the-model-lacks", ["run", "r.yaml"], 2, ["r.yaml", "stages.0.trainable", "wings", "spine"],
         {"r.yaml": edit(MD, {"stages.0.trainable": ["wings"]})}),
    Case("run/non-finite-lr", ["run", "r.yaml"], 2, ["r.yaml", "stages.0.lr", "finite"],
         {"r.yaml": edit(MD, {"stages.0.lr": float("inf")})}),
    Case("run/keep-one-checkpoint", ["run", "r.yaml"], 2, ["r.yaml", "checkpoint.keep", "greater than or equal to 2"],
         {"r.yaml": edit(MD, {"checkpoint.keep": 1})}),
    Case("run/resolution-out-of-range", ["run", "r.yaml"], 2,
         ["r.yaml", "stages.0.resolution", "less than or equal to 4096"],
         {"r.yaml": edit(MD, {"stages.0.resolution": 100000})}),
    Case("run/password-in-data-uri", ["run", "r.yaml"], 2,
         ["r.yaml", "data.uri", "https://***@host/ds", "holds credentials", "GOOGLE_APPLICATION_CREDENTIALS"],
         {"r.yaml": edit(MD, {"data.uri": "https://bob:hunter2@host/ds"})}),
    # -- run: --set -------------------------------------------------------------------------------------
    Case("run/set-non-finite", ["run", "r.yaml", "--set", "stages.0.lr=.nan"], 2, ["stages.0.lr", "finite"],
         {"r.yaml": MD}),
    Case("run/set-without-equals", ["run", "r.yaml", "--set", "model.name"], 2, ["--set", "model.name", "KEY=VALUE"],
         {"r.yaml": MD}),
    Case("run/set-unknown-stage", ["run", "r.yaml", "--set", "stages.nope.lr=1"], 2, ["--set", "'nope'", "spine"],
         {"r.yaml": MD}),
    # -- run: the data -------------------------------------------------------------------------------------
    Case("run/data-uri-is-not-a-dataset", ["run", "r.yaml"], 1,
         ["{tmp}/notds", "manifest.json missing", "orchestrator data synth"],
         {"r.yaml": edit(MD, {"data.uri": "{tmp}/notds"}), "notds/readme.txt": "not a dataset\n"}),
    Case("run/data-uri-with-a-damaged-manifest", ["run", "r.yaml"], 1, ["{tmp}/ds/manifest.json", "not valid JSON"],
         {"r.yaml": edit(MD, {"data.uri": "{tmp}/ds"}), "ds/manifest.json": "not json{"}),
    Case("run/mask_depth-recipe-on-classification-data", ["run", "r.yaml"], 2,
         ["field 'task'", "{cls}", "'classification' dataset", "task: classification"],
         {"r.yaml": edit(MD, {"data.uri": "{cls}"})}, absent=["runs/tiny/plan.json"]),
    Case("run/classification-recipe-on-mask_depth-data", ["run", "r.yaml"], 2,
         ["field 'task'", "{md}", "'mask_depth' dataset", "task: mask_depth"],
         {"r.yaml": edit(CLS, {"data.uri": "{md}"})}, absent=["runs/cls/plan.json"]),
    Case("run/eval-split-takes-every-sample", ["run", "r.yaml"], 2, ["data.eval_samples"],
         {"r.yaml": edit(MD, {"data.eval_samples": 256})}),
    # -- run: where it writes ------------------------------------------------------------------------------
    Case("run/unwritable-run-storage", ["run", "r.yaml"], 1, ["run.storage", "{tmp}/blocker/runs", "cannot write"],
         {"r.yaml": edit(MD, {"run.storage": "{tmp}/blocker/runs"}), **BLOCKER}),
    Case("run/unusable-tracking-uri", ["run", "r.yaml"], 1, ["tracking.uri", "bogus://x", "sqlite:///"],
         {"r.yaml": edit(MD, {"tracking.uri": "bogus://x"})}, absent=["runs/tiny/plan.json"]),
    Case("run/damaged-run-record", ["run", "r.yaml"], 1, ["{tmp}/runs/tiny/run.json", "not valid JSON"],
         {"r.yaml": MD, "runs/tiny/run.json": "{garbage"}),
    # -- status, runs, logs ----------------------------------------------------------------------------------
    Case("status/unknown-run", ["status", "ghost"], 1, ["'ghost'", "orchestrator runs"]),
    Case("status/no-runs", ["status", "--json"], 1, ["no runs", "{tmp}/runs"]),
    Case("status/damaged-run-record", ["status", "r1"], 1, ["{tmp}/runs/r1/run.json", "not a run record"],
         {"runs/r1/run.json": "[1, 2]"}),
    Case("status/damaged-run-record-not-json", ["status", "r1"], 1,
         ["{tmp}/runs/r1/run.json", "not valid JSON", "restore the file"],
         {"runs/r1/run.json": "{oops"}),
    Case("status/only-damaged-runs", ["status"], 1, ["{tmp}/runs/r1/run.json", "not valid JSON"],
         {"runs/r1/run.json": "{oops"}),
    Case("runs/unknown-option", ["runs", "--jsn"], 2, ["orchestrator runs", "--jsn"]),
    Case("logs/no-address", ["logs", "r1"], 2, ["orchestrator logs", "--address"]),
    Case("logs/unreachable-address", ["logs", "r1", "--address", "http://127.0.0.1:1"], 1,
         ["--address http://127.0.0.1:1", "cannot reach"]),
    # -- data synth -------------------------------------------------------------------------------------------
    Case("synth/dest-under-a-file", ["data", "synth", "blocker/ds", "--samples", "4"], 1,
         ["{tmp}/blocker/ds", "cannot write"], BLOCKER),
    Case("synth/unknown-task", ["data", "synth", "ds", "--task", "nope"], 2, ["--task", "'nope'", "classification"],
         absent=["ds"]),
    Case("synth/zero-samples", ["data", "synth", "ds", "--samples", "0"], 2, ["data synth", "--samples"],
         absent=["ds"]),
    Case("synth/unknown-layout", ["data", "synth", "ds", "--layout", "bogus"], 2, ["--layout", "'bogus'"],
         absent=["ds"]),
    Case("synth/no-dest", ["data", "synth"], 2, ["data synth", "'dest'"]),
    Case("synth/dest-holds-user-files", ["data", "synth", "mydrive", "--samples", "4"], 2,
         ["{tmp}/mydrive", "did not write", "shards/notes.txt", "shared/thesis.docx", "--force"],
         {"mydrive/shared/thesis.docx": "thesis\n", "mydrive/shards/notes.txt": "notes\n"}),
    # -- data pack --------------------------------------------------------------------------------------------
    Case("pack/missing-source", ["data", "pack", "nosuch", "out"], 1, ["{tmp}/nosuch", "no such file or folder"],
         absent=["out"]),
    Case("pack/layout-does-not-fit-task", ["data", "pack", "{rawcls}", "out", "--task", "segmentation"], 1,
         ["{rawcls}", "--task segmentation", "ImageFolder", "--task classification"], absent=["out"]),
    Case("pack/imagefolder-as-mask_depth", ["data", "pack", "{rawcls}", "out"], 1,
         ["{rawcls}", "--task mask_depth", "--task classification"], absent=["out"]),
    Case("pack/packed-dataset-as-source", ["data", "pack", "{md}", "out", "--task", "classification"], 1,
         ["{md}", "packed dataset already"], absent=["out"]),
    Case("pack/unwritable-dest", ["data", "pack", "{rawcls}", "blocker/out", "--task", "classification"], 1,
         ["{tmp}/blocker/out", "cannot write"], BLOCKER),
    Case("pack/unwritable-report",
         ["data", "pack", "{rawcls}", "out", "--task", "classification", "--report", "blocker/report.json"], 1,
         ["--report", "{tmp}/blocker/report.json"], BLOCKER, absent=["out"]),
    Case("pack/unknown-task", ["data", "pack", "{rawcls}", "out", "--task", "nope"], 2, ["--task", "'nope'"],
         absent=["out"]),
    Case("pack/dest-holds-user-files", ["data", "pack", "{rawcls}", "out", "--task", "classification"], 2,
         ["{tmp}/out", "did not write", "notes.txt", "--force"], {"out/notes.txt": "mine\n"}, absent=["out/.pack"]),
    Case("pack/max-pixels-zero", ["data", "pack", "{rawcls}", "out", "--max-pixels", "0"], 2, ["--max-pixels"],
         absent=["out"]),
    Case("pack/bad-column", ["data", "pack", "{rawcls}", "out", "--column", "foo"], 2,
         ["--column", "'foo'", "KIND=COLUMN"], absent=["out"]),
    # -- data verify ------------------------------------------------------------------------------------------
    Case("verify/manifest-not-json", ["data", "verify", "ds"], 1,
         ["{tmp}/ds/manifest.json", "not valid JSON", "re-pack"], {"ds/manifest.json": "not json{"}),
    Case("verify/manifest-not-json--json", ["data", "verify", "ds", "--json"], 1,
         ["{tmp}/ds/manifest.json", "not valid JSON"],
         {"ds/manifest.json": "not json{"}, json_stdout=True),
    Case("verify/manifest-without-format", ["data", "verify", "ds"], 1,
         ["{tmp}/ds/manifest.json", "format", "re-create"], {"ds/manifest.json": '{"a": 1}'}),
    Case("verify/manifest-missing-keys", ["data", "verify", "ds"], 1,
         ["{tmp}/ds/manifest.json", "'index', 'shards'", "missing"],
         {"ds/manifest.json": '{"format": "orchestrator.shards/2", "num_samples": 4}'}),
    Case("verify/manifest-is-a-list", ["data", "verify", "ds"], 1, ["{tmp}/ds/manifest.json", "JSON list"],
         {"ds/manifest.json": "[1, 2]"}),
    Case("verify/missing-folder", ["data", "verify", "nowhere"], 1, ["{tmp}/nowhere", "manifest.json missing"]),
    # -- sweep ------------------------------------------------------------------------------------------------
    Case("sweep/missing-file", ["sweep", "nope.yaml"], 2, ["nope.yaml", "sweep file not found"]),
    Case("sweep/not-a-mapping", ["sweep", "s.yaml"], 2, ["s.yaml", "'sweep' section"], {"s.yaml": "- 1\n"}),
    Case("sweep/unknown-key", ["sweep", "s.yaml"], 2, ["s.yaml", "sweep.grd", "unknown field"],
         {"s.yaml": sweep_file(grd={}), "r.yaml": MD}),
    Case("sweep/missing-base", ["sweep", "s.yaml"], 2, ["s.yaml", "sweep.base", "nobase.yaml", "not found"],
         {"s.yaml": sweep_file(base="nobase.yaml", runs=[{}])}),
    Case("sweep/run-override-with-a-bad-key", ["sweep", "s.yaml"], 2,
         ["s.yaml", "sweep.runs.0", "stages.nope.lr", "spine"],
         {"s.yaml": sweep_file(runs=[{"stages.nope.lr": 0.1}]), "r.yaml": MD}),
    Case("sweep/run-override-with-a-bad-value", ["sweep", "s.yaml"], 2, ["s.yaml", "loss.mask", "'nope'"],
         {"s.yaml": sweep_file(runs=[{"loss.mask": {"nope": 1}}]), "r.yaml": MD}),
    Case("sweep/set-without-equals", ["sweep", "s.yaml", "--set", "model.name"], 2, ["--set", "KEY=VALUE"],
         {"s.yaml": sweep_file(runs=[{"stages.0.lr": 0.1}]), "r.yaml": MD}),
    # -- compare, models, lr-find, the command itself -----------------------------------------------------------
    Case("compare/unknown-experiment", ["compare", "ghost"], 1, ["'ghost'"]),
    Case("compare/unusable-tracking-uri", ["compare", "--tracking-uri", "bogus://x"], 1,
         ["--tracking-uri", "bogus://x"]),
    Case("models/unknown-option", ["models", "--bogus"], 2, ["orchestrator models", "--bogus"]),
    Case("lr-find/unknown-stage", ["lr-find", "r.yaml", "--stage", "nope"], 2, ["--stage", "'nope'", "spine"],
         {"r.yaml": MD}),
    Case("lr-find/too-few-steps", ["lr-find", "r.yaml", "--steps", "5"], 2, ["lr-find", "--steps"], {"r.yaml": MD}),
    Case("lr-find/missing-recipe", ["lr-find", "nope.yaml"], 2, ["nope.yaml", "not found"]),
    Case("cli/unknown-command", ["trian"], 2, ["'trian'"]),
]


# The datasets are made by real `data synth` processes, a few at a time.
WORKERS = max(1, min(4, os.cpu_count() or 1))


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny datasets made through the CLI: a packed mask_depth and classification set, and a raw
    classification tree (ImageFolder) to pack with the wrong --task."""
    d = tmp_path_factory.mktemp("bad-input-data")
    made = {"md": ["data", "synth", "md", "--samples", "40", "--image-size", "32"],
            "cls": ["data", "synth", "cls", "--task", "classification", "--samples", "40"],
            "rawcls": ["data", "synth", "rawcls", "--task", "classification", "--layout", "seed", "--samples", "20"]}
    with ThreadPoolExecutor(WORKERS) as pool:
        for res in pool.map(lambda args: run_cli(*args, cwd=d, timeout=120), made.values()):
            assert res.returncode == 0, res.stderr
    return {name: str(d / name) for name in made}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory, datasets: dict[str, str]) -> dict[str, Outcome]:
    """Every case run through the real CLI, each in its own empty folder as its cwd (a process per case,
    forked from one that imported the CLI once: tests/cli_batch.py)."""
    prepared = []
    for case in CASES:
        cwd = tmp_path_factory.mktemp(case.id.replace("/", "-"))
        values = {"tmp": str(cwd), **datasets}
        for name, content in case.files.items():
            path = cwd / name
            path.parent.mkdir(parents=True, exist_ok=True)
            text = content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False)
            path.write_text(_fill(text, values))
        prepared.append((case, cwd, values))

    results = run_cli_many([([_fill(a, values) for a in case.args], cwd) for case, cwd, values in prepared])
    return {case.id: Outcome(cwd, values, res) for (case, cwd, values), res in zip(prepared, results, strict=True)}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_naming_it_with_the_contract_exit_code(case: Case, outcomes: dict[str, Outcome]):
    cwd, values, res = outcomes[case.id]
    shown = f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert "Traceback (most recent call last)" not in res.stdout + res.stderr, shown
    # The CLI's last-resort line: a bad input no check caught.
    assert "this is a bug in orchestrator" not in res.stderr, shown
    assert res.returncode == case.code, shown
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == case.lines and lines[0].startswith("error: "), shown
    if case.json_stdout:
        record = json.loads(res.stdout)
        assert len(record["bad"]) == 1 and lines[0] == f"error: {record['bad'][0]['reason']}", shown
    else:
        assert not res.stdout.strip(), shown
    for needle in case.names:
        assert _fill(needle, values) in res.stderr, f"{_fill(needle, values)!r} not in the message\n{shown}"
    for path in case.absent:
        assert not (cwd / path).exists(), f"{path} left behind\n{shown}"


@pytest.mark.parametrize("task", ["mask_depth", "depth", "segmentation", "classification"])
def test_the_run_line_shows_the_headline_metrics_only(task: str):
    """The line printed at the end of a run: the task's compare columns and its eval baselines; the
    per-class values (dozens for classification and segmentation) stay in `status --json`."""
    from orchestrator.cli import headline_metrics
    from workers.tasks import get_task

    headline = [key for _, key, _ in get_task(task).compare_columns]
    metrics = {key: 0.5 for key in headline} | {"eval/loss": 1.0, "eval/made_up_baseline": 0.1}
    metrics |= {f"eval/accuracy/class{i}": 0.5 for i in range(10)} | {f"eval/iou/c{i}": 0.3 for i in range(21)}
    shown = headline_metrics(metrics, task)
    assert list(shown) == list(dict.fromkeys([*headline, "eval/made_up_baseline"]))
    assert headline_metrics({}, task) == {}


LOG_LEVELS = [("debug", "DEBUG"), (" Info ", "INFO"), ("loud", "WARNING"), ("", "WARNING")]

# The CLI's entry point, once per ORCHESTRATOR_LOG value, in one fresh interpreter (pytest's own logging
# handlers would make logging.basicConfig a no-op here): the root logger's level and what main() printed.
_LOG_PROBE = """
import contextlib, io, json, logging, os, sys
from orchestrator import cli
out = {}
for value in json.loads(sys.argv[1]):
    os.environ["ORCHESTRATOR_LOG"] = value
    for handler in logging.root.handlers[:]:
        logging.root.removeHandler(handler)  # so that main()'s basicConfig configures afresh
    sys.argv = ["orchestrator", "--help"]
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            cli.main()
        except SystemExit:
            pass
    out[value] = {"level": logging.getLevelName(logging.root.level), "stderr": err.getvalue()}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def log_levels_seen() -> dict[str, dict[str, str]]:
    res = subprocess.run([sys.executable, "-c", _LOG_PROBE, json.dumps([v for v, _ in LOG_LEVELS])],
                         env=cli_env(), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.splitlines()[-1])


@pytest.mark.parametrize(("value", "level"), LOG_LEVELS)
def test_orchestrator_log_takes_any_case_and_an_unknown_level_warns_instead_of_a_traceback(
        value: str, level: str, log_levels_seen: dict[str, dict[str, str]]) -> None:
    seen = log_levels_seen[value]
    assert seen["level"] == level, seen
    assert ("is not a log level" in seen["stderr"]) == (value == "loud"), seen
    assert "Traceback" not in seen["stderr"], seen


def test_runs_lists_the_others_and_marks_a_damaged_run(tmp_path: Path):
    """One torn run.json (or plan.json) never hides the other runs: `runs` lists them all, the
    damaged ones with state "damaged", the file and what to do (text and --json)."""
    from dataclasses import asdict

    from orchestrator.engine.record import RunRecord

    good = asdict(RunRecord(run_name="good", recipe={}, recipe_sha256="x", state="completed", mlflow_run_id="abc"))
    (tmp_path / "runs" / "good").mkdir(parents=True)
    (tmp_path / "runs" / "good" / "run.json").write_text(json.dumps(good))
    (tmp_path / "runs" / "torn").mkdir()
    (tmp_path / "runs" / "torn" / "run.json").write_text("{oops")
    (tmp_path / "runs" / "badplan").mkdir()
    (tmp_path / "runs" / "badplan" / "run.json").write_text(json.dumps(good | {"run_name": "badplan"}))
    (tmp_path / "runs" / "badplan" / "plan.json").write_text("[")

    res = run_cli("runs", "--json", cwd=tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    by_name = {r["run_name"]: r for r in json.loads(res.stdout)}
    assert by_name["good"]["state"] == "completed" and by_name["good"]["mlflow_run_id"] == "abc"
    for name, file in (("torn", "run.json"), ("badplan", "plan.json")):
        assert by_name[name]["state"] == "damaged"
        assert f"{tmp_path}/runs/{name}/{file}" in by_name[name]["error"] and "not valid JSON" in by_name[name]["error"]

    res = run_cli("runs", cwd=tmp_path)
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    assert "good" in res.stdout and "completed" in res.stdout and res.stdout.count("damaged") == 2
    assert f"{tmp_path}/runs/torn/run.json" in res.stderr and "restore the file" in res.stderr

    res = run_cli("status", "--json", cwd=tmp_path)  # the newest intact run, not a damaged one
    assert res.returncode == 0 and json.loads(res.stdout)["run_name"] == "good", res.stderr
