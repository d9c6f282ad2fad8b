"""Secret redaction for anything logged: config params, tags, URIs in messages.

Keys that look secret lose their values, URIs lose ``user:password@`` and secret-looking query parameters.
"""

from __future__ import annotations

import re
from typing import Any

REDACTED = "***"

_SECRET_NAME = r"secret|passw|token|credential|access_?key|api_?key|private_?key|signature"
_SECRET_KEY = re.compile(_SECRET_NAME, re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?<=://)[^/\s]+@")  # greedy up to the host: a password may contain '@'
_QUERY_SECRET = re.compile(rf"([?&;][^=&#\s]*(?:{_SECRET_NAME})[^=&#\s]*=)[^&#\s]*", re.IGNORECASE)


def redact_uri(text: str) -> str:
    """Hide ``user:password@`` and secret-looking query parameters (``?token=...``) of URIs in ``text``."""
    return _QUERY_SECRET.sub(rf"\g<1>{REDACTED}", _URI_USERINFO.sub(REDACTED + "@", text))


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Hide values of secret-looking keys and credentials inside URIs, in flat or nested dicts."""
    return {key: _redact_value(str(key), value) for key, value in params.items()}


def _redact_value(key: str, value: Any) -> Any:
    if value not in (None, "") and _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        return REDACTED
    if isinstance(value, dict):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value("", v) for v in value)
    return redact_uri(value) if isinstance(value, str) else value
