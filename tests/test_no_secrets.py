"""A password in a URI never reaches the terminal or a file: every entry point that takes a URI
(recipe fields, --set, sweep files, study files, the data commands, --storage, --tracking-uri)
refuses one holding credentials at validation, exit 2, naming the field or argument and where
credentials go instead, without repeating the secret. Checked through the real CLI, grepping
stdout, stderr and every file the command left under its folder for the planted password."""

from __future__ import annotations

import pytest
import yaml

from tests.conftest import run_cli_many, tiny_recipe

SECRET = "hunter2pw"
USERINFO = f"https://bob:{SECRET}@host/ds"
BUCKET = f"gs://bob:{SECRET}@bucket/ds"
TOKEN = f"https://host/ds?token={SECRET}"

RECIPE = tiny_recipe("{data}")
STUDY = {"name": "st", "storage": "runs", "model_from": "somerun", "multiplier": "exact", "scaling": {"kind": "fixed"}}


def _recipe(**changes: str) -> str:
    r = yaml.safe_load(yaml.safe_dump(RECIPE))
    r["data"]["uri"] = "ds"
    for key, value in changes.items():
        section, field = key.split("__")
        r.setdefault(section, {})[field] = value
    return yaml.safe_dump(r)


# (id, args, the input files (they hold the secret themselves), what the error must name)
CASES = [
    ("recipe/data.uri", ["run", "r.yaml"], {"r.yaml": _recipe(data__uri=USERINFO)}, "data.uri"),
    ("recipe/run.storage", ["run", "r.yaml"], {"r.yaml": _recipe(run__storage=BUCKET)}, "run.storage"),
    ("recipe/tracking.uri", ["run", "r.yaml"], {"r.yaml": _recipe(tracking__uri=f"http://bob:{SECRET}@mlflow:5000")},
     "tracking.uri"),
    ("recipe/model.init_from", ["run", "r.yaml"], {"r.yaml": _recipe(model__init_from=TOKEN)}, "model.init_from"),
    ("recipe/lr-find", ["lr-find", "r.yaml"], {"r.yaml": _recipe(data__uri=BUCKET)}, "data.uri"),
    ("set/data.uri", ["run", "r.yaml", "--set", f"data.uri={USERINFO}"], {"r.yaml": _recipe()}, "data.uri"),
    ("set/run.storage", ["run", "r.yaml", "--set", f"run.storage={BUCKET}"], {"r.yaml": _recipe()}, "run.storage"),
    ("sweep/run-override", ["sweep", "s.yaml"],
     {"r.yaml": _recipe(), "s.yaml": yaml.safe_dump({"sweep": {"name": "s", "base": "r.yaml",
                                                               "runs": [{"data.uri": BUCKET}]}})}, "data.uri"),
    ("study/storage", ["study", "st.yaml"], {"st.yaml": yaml.safe_dump({**STUDY, "storage": BUCKET})}, "storage"),
    ("synth/dest-userinfo", ["data", "synth", USERINFO, "--samples", "4"], {}, "DEST"),
    ("synth/dest-bucket", ["data", "synth", BUCKET, "--samples", "4"], {}, "DEST"),
    ("pack/source", ["data", "pack", BUCKET, "out"], {}, "SOURCE"),
    ("pack/dest", ["data", "pack", "src", USERINFO], {"src/readme.txt": "x\n"}, "DEST"),
    ("pack/report", ["data", "pack", "src", "out", "--report", f"gs://bucket/r.json?sig={SECRET}"],
     {"src/readme.txt": "x\n"}, "--report"),
    ("verify/uri", ["data", "verify", BUCKET], {}, "URI"),
    ("status/storage", ["status", "--storage", BUCKET], {}, "--storage"),
    ("runs/storage", ["runs", "--storage", BUCKET], {}, "--storage"),
    ("compare/tracking-uri", ["compare", "--tracking-uri", f"http://bob:{SECRET}@mlflow:5000"], {}, "--tracking-uri"),
]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory):
    prepared = []
    for case_id, args, files, _ in CASES:
        cwd = tmp_path_factory.mktemp(case_id.replace("/", "-").replace(".", "_"))
        for name, text in files.items():
            (cwd / name).parent.mkdir(parents=True, exist_ok=True)
            (cwd / name).write_text(text)
        prepared.append((cwd, args))
    results = run_cli_many([(args, cwd) for cwd, args in prepared])
    return {c[0]: (cwd, res) for c, (cwd, _), res in zip(CASES, prepared, results, strict=True)}


@pytest.mark.parametrize(("case_id", "files", "names"), [(c[0], c[2], c[3]) for c in CASES], ids=[c[0] for c in CASES])
def test_a_uri_with_a_password_is_refused_and_the_password_is_never_written(case_id, files, names, outcomes):
    cwd, res = outcomes[case_id]
    shown = f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    assert res.returncode == 2 and "Traceback" not in res.stderr, shown
    assert SECRET not in res.stdout + res.stderr, shown
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], shown
    for where in ("holds credentials", "GOOGLE_APPLICATION_CREDENTIALS", "MLFLOW_TRACKING_PASSWORD"):
        assert where in res.stderr, shown
    leaked = [str(p) for p in cwd.rglob("*")
              if p.is_file() and str(p.relative_to(cwd)) not in files and SECRET.encode() in p.read_bytes()]
    assert not leaked, f"{SECRET} written to {leaked}"
    assert not (cwd / "runs").exists() and not (cwd / "mlflow.db").exists(), shown


def test_redaction_covers_secret_query_parameters():
    from common.redact import has_credentials, redact_text

    for uri in (USERINFO, BUCKET, TOKEN, f"gs://b/x?X-Goog-Signature={SECRET}", f"https://h/x?password={SECRET}&a=1"):
        assert has_credentials(uri) and SECRET not in redact_text(uri), uri
    for uri in ("gs://bucket/ds", "sqlite:///mlflow.db", "runs", "/data/x@2x", "https://host/path@v2", "memory://a/b"):
        assert not has_credentials(uri), uri


def test_a_database_store_may_name_its_user_but_not_its_password():
    from common.redact import credentials_problem

    assert credentials_problem("postgresql://mlflow@db:5432/mlflow") is None  # the password: PGPASSWORD
    for uri in (f"postgresql://mlflow:{SECRET}@db/mlflow", f"postgresql://mlflow@db/mlflow?password={SECRET}",
                f"https://{SECRET}@github.com/x"):
        problem = credentials_problem(uri)
        assert problem and SECRET not in problem, uri
