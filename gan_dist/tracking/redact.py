"""Secret redaction for anything logged (config params, tags, URIs in messages), and the check that keeps secrets out
of a config sent to a Ray cluster.

Keys that look secret lose their values; URIs lose ``user:password@`` and secret-looking query parameters; values
shaped like a known kind of credential (an AWS access key id, a GitHub, Hugging Face, Databricks or Slack token, a
JWT, a PEM private key) are hidden wherever they appear; in free text (a config file's comments), so is the value
of a ``secret-looking-name = value`` assignment.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gan_dist.config import GanConfig

REDACTED = "***"

_SECRET_NAME = r"secret|passw|token|credential|access_?key|api_?key|private_?key|signature"
_SECRET_KEY = re.compile(_SECRET_NAME, re.IGNORECASE)
_URI_USERINFO = re.compile(r"(?<=://)[^/\s]+@")  # greedy up to the host: a password may contain '@'
_QUERY_SECRET = re.compile(rf"([?&;][^=&#\s]*(?:{_SECRET_NAME})[^=&#\s]*=)[^&#\s]*", re.IGNORECASE)
# Credentials recognisable by their shape alone: prefixes their issuers put there so that scanners find them.
_CREDENTIAL = re.compile(
    r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b"  # AWS access key id (long-term, temporary)
    r"|\bgh[pousr]_[A-Za-z0-9]{36,}|\bgithub_pat_\w{22,}"  # GitHub
    r"|\bhf_[A-Za-z0-9]{30,}"  # Hugging Face
    r"|\bdapi[0-9a-f]{32}\b"  # Databricks (MLflow's databricks:// tracking)
    r"|\bxox[abprs]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\beyJ[\w-]{10,}\.eyJ[\w-]{10,}\.[\w-]+"  # JWT (a bearer token)
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)
# `aws_secret_access_key = VALUE`, `password: VALUE` in text. The value has a digit and a letter, and no leading `$`,
# `<`, `{`, `(`, `/`, `~` or `.`; the key names no file, path or directory: placeholders (SECRET_FILE,
# $(kubectl ...), <password>), paths (token_file: ~/.ray/token1) and counts (num_tokens: 12345678) are not secrets.
_SECRET_ASSIGNMENT = re.compile(
    rf"(\b[\w.-]*(?:{_SECRET_NAME})[\w.-]*(?<!file)(?<!path)(?<!dir)[\"']?\s*[:=]\s*[\"']?)(?![$<{{(/~.])"
    rf"(?=[^\s\"',;]*\d)(?=[^\s\"',;]*[a-z])[^\s\"',;]{{8,}}",
    re.IGNORECASE,
)


def redact_uri(text: str) -> str:
    """Hide ``user:password@`` and secret-looking query parameters (``?token=...``) of URIs in ``text``."""
    return _QUERY_SECRET.sub(rf"\g<1>{REDACTED}", _URI_USERINFO.sub(REDACTED + "@", text))


def redact_text(text: str) -> str:
    """``redact_uri``, and hide values shaped like credentials and the values of secret-looking assignments."""
    return _SECRET_ASSIGNMENT.sub(rf"\g<1>{REDACTED}", _CREDENTIAL.sub(REDACTED, redact_uri(text)))


def redact(params: dict[str, Any]) -> dict[str, Any]:
    """Hide values of secret-looking keys, credentials inside URIs and credential-shaped values, in flat or nested
    dicts."""
    return {key: _redact_value(str(key), value) for key, value in params.items()}


def _redact_value(key: str, value: Any) -> Any:
    if value not in (None, "") and _SECRET_KEY.search(key.rsplit(".", 1)[-1]):
        return REDACTED
    if isinstance(value, dict):
        return redact(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_value("", v) for v in value)
    return _CREDENTIAL.sub(REDACTED, redact_uri(value)) if isinstance(value, str) else value


def secret_keys(tree: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys of ``tree`` whose values ``redact`` would hide (in part or whole)."""
    redacted, keys = redact(tree), []
    for key, value in tree.items():
        if isinstance(value, dict):
            keys += secret_keys(value, f"{prefix}{key}.")
        elif value != redacted[key]:
            keys.append(f"{prefix}{key}")
    return keys


def check_no_secrets(cfg: GanConfig, config_path: Path | None = None) -> None:
    """Refuse a config that goes to a Ray cluster (``gan-dist submit``, ``gan-dist train --address``) when a value,
    or the config file uploaded with a submitted job (comments included), carries a credential: Ray keeps both in
    plain text, readable by anyone with the cluster's token and by any code on the cluster."""
    from gan_dist.config import ConfigError  # here: it imports the models (torch), which redacting needs not

    keys = secret_keys(cfg.model_dump(mode="json"))
    if not keys and config_path is not None:
        text = Path(config_path).read_text()
        keys = [str(config_path)] if redact_text(text) != text else []
    if keys:
        raise ConfigError(
            ", ".join(keys),
            "carries a credential (a password or token in a URI, a key or token in a value or comment) that Ray "
            "would store in plain text on the cluster; keep it on the cluster instead (MLflow: "
            "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN in the nodes' environment; "
            "see docs/security.md)",
        )
