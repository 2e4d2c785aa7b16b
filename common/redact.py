"""Keep secrets out of logs, MLflow params and error messages."""

from __future__ import annotations

import re

_SECRET_KEY = re.compile(r"(token|secret|password|passwd|credential|api[_-]?key|access[_-]?key)", re.I)
_URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
_QUERY_SECRET = re.compile(
    r"(?P<k>[?&](?:token|sig|signature|key|access_token|X-Goog-Signature|X-Goog-Credential|password|passwd|secret|"
    r"api_?key)=)[^&\s]+", re.I)
# Where credentials go instead of a URI: named by every refusal of a URI that holds some.
CREDENTIALS_HELP = (
    "give credentials through the environment instead: for gs:// Application Default Credentials "
    "(`gcloud auth application-default login`, or GOOGLE_APPLICATION_CREDENTIALS=key.json), for an MLflow "
    "server MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN), for a database "
    "store its driver's (PGPASSWORD for postgresql://USER@host/db)"
)


def redact_text(text: str) -> str:
    """Strip user:password@ from URIs and secret-looking query parameters."""
    text = _URI_USERINFO.sub(r"\g<scheme>***@", text)
    return _QUERY_SECRET.sub(r"\g<k>***", text)


def redact(key: str, value: str) -> str:
    if _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        return "***"
    return redact_text(value)


def has_credentials(text: str) -> bool:
    """Whether a URI (or any text) holds user[:password]@ or a secret-looking query parameter."""
    return redact_text(text) != text


# A database tracking store names its user in the URI (postgresql://mlflow@host/db) and takes the
# password from the driver's own environment (PGPASSWORD, ~/.pgpass): a user alone is not a secret there.
_DB_USER_ONLY = re.compile(r"^(?:postgres(?:ql)?|mysql|mariadb|mssql|oracle)(?:\+\w+)?://[^/@:\s]+@", re.I)


def credentials_problem(uri: str) -> str | None:
    """What is wrong with a URI that holds credentials, without repeating them; None when it holds none."""
    if not has_credentials(uri) or not has_credentials(_DB_USER_ONLY.sub("db://", uri)):
        return None
    return f"{redact_text(uri)} holds credentials (a user:password@ or a token in the URI), which would be printed " \
        f"and stored with the run; remove them and {CREDENTIALS_HELP}"


def check_no_credentials(uri: str | None, where: str) -> None:
    """RecipeError (exit 2) naming `where` (an argument or field) when `uri` holds credentials."""
    from common.errors import RecipeError

    problem = credentials_problem(uri or "")
    if problem:
        raise RecipeError(f"{where}: {problem}")
