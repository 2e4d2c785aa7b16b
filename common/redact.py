"""Keep secrets out of logs, MLflow params and error messages."""

from __future__ import annotations

import re

_SECRET_KEY = re.compile(r"(token|secret|password|passwd|credential|api[_-]?key|access[_-]?key)", re.I)
_URI_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.I)
_QUERY_SECRET = re.compile(r"(?P<k>[?&](?:token|sig|signature|key|access_token|X-Goog-Signature)=)[^&\s]+", re.I)


def redact_text(text: str) -> str:
    """Strip user:password@ from URIs and secret-looking query parameters."""
    text = _URI_USERINFO.sub(r"\g<scheme>***@", text)
    return _QUERY_SECRET.sub(r"\g<k>***", text)


def redact(key: str, value: str) -> str:
    if _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        return "***"
    return redact_text(value)
