"""API keys and the namespaces each may read and write.

Keys come from two places, and both may be used together:

- ``AERIE_API_KEYS``: comma-separated keys, each allowed every namespace (as before scoping).
- ``AERIE_API_KEYS_FILE``: a JSON or YAML file of scoped keys::

      {"keys": [{"key": "sk-...", "name": "team-a-app", "namespaces": ["team-a"],
                 "rate_limit_rps": 5, "rate_limit_burst": 10}]}

  ``namespaces`` is required; ``["*"]`` means every namespace. ``name`` (default
  ``key-<n>``) is what logs show, never the key. The rate limit fields are optional and
  override ``AERIE_RATE_LIMIT_RPS`` / ``_BURST`` for that key.

With no key at all, authentication is off and every caller may use every namespace.
A malformed file stops the gateway at start-up with a message naming the bad field; no
message quotes a key.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Request
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import authentication_error, namespace_forbidden
from .settings import GatewaySettings

NAMESPACE_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
ALL_NAMESPACES = "*"
# Visible ASCII: what an `Authorization: Bearer` header can carry unchanged.
_KEY_PATTERN = re.compile(r"^[\x21-\x7e]+$")


class KeysFileError(ValueError):
    """The keys configuration is unusable; the message says where and why."""


@dataclass(frozen=True)
class ApiKey:
    """One key as the gateway keeps it: a SHA-256 digest, not the key."""

    name: str
    digest: bytes
    namespaces: frozenset[str] | None  # None: every namespace
    rate_limit_rps: float | None = None
    rate_limit_burst: int | None = None

    def may_use(self, namespace: str) -> bool:
        return self.namespaces is None or namespace in self.namespaces

    def check_namespace(self, namespace: str) -> None:
        if not self.may_use(namespace):
            raise namespace_forbidden(namespace)


# Who a request acts for when authentication is off.
ANYONE = ApiKey(name="anonymous", digest=b"", namespaces=None)


def key_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class _KeyEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    key: str = Field(min_length=1)
    name: str = Field(default="", pattern=r"^[A-Za-z0-9_.-]{0,64}$")
    namespaces: list[str] = Field(min_length=1)
    rate_limit_rps: float | None = Field(default=None, ge=0)
    rate_limit_burst: int | None = Field(default=None, ge=1)

    @field_validator("key")
    @classmethod
    def _printable(cls, key: str) -> str:
        if not _KEY_PATTERN.fullmatch(key):
            raise ValueError("a key must be visible ASCII characters, without spaces")
        return key

    @field_validator("namespaces")
    @classmethod
    def _namespaces(cls, namespaces: list[str]) -> list[str]:
        for namespace in namespaces:
            if namespace != ALL_NAMESPACES and not re.fullmatch(NAMESPACE_PATTERN, namespace):
                raise ValueError(
                    f"{namespace!r} is not a namespace: use 1-64 characters from A-Z a-z 0-9 _ -, or '*'"
                )
        return namespaces


class _KeysFile(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    keys: list[_KeyEntry] = Field(min_length=1)


def _load_document(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise KeysFileError(f"cannot read the keys file {path}: {err}") from None
    if path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            # JSONDecodeError's message holds a position, never the text.
            raise KeysFileError(f"the keys file {path} is not valid JSON: {err}") from None
    import yaml  # YAML is a superset of JSON, so any other suffix takes either

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        # Only the problem and its position: YAML's full message quotes the line.
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise KeysFileError(f"the keys file {path} is not valid YAML: {problem}{where}") from None


def _field_path(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def parse_keys_file(path: Path) -> list[_KeyEntry]:
    document = _load_document(path)
    try:
        return _KeysFile.model_validate(document).keys
    except ValidationError as err:
        # Messages only: pydantic's full text quotes the offending input, which may be a key.
        problems = "; ".join(f"{_field_path(e['loc']) or 'top level'}: {e['msg']}" for e in err.errors())
        raise KeysFileError(f"the keys file {path} is invalid: {problems}") from None


class KeyRegistry:
    """Every accepted key, looked up in constant time."""

    def __init__(self, keys: list[ApiKey]):
        self.keys = keys
        digests = [key.digest for key in keys]
        if len(set(digests)) != len(digests):
            raise KeysFileError("the same API key is configured twice")
        names = [key.name for key in keys]
        if len(set(names)) != len(names):
            duplicated = sorted({name for name in names if names.count(name) > 1})
            raise KeysFileError(f"API key names must be unique; repeated: {', '.join(duplicated)}")

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> KeyRegistry:
        keys = []
        for index, key in enumerate(settings.api_key_list, start=1):
            if not _KEY_PATTERN.fullmatch(key):
                raise KeysFileError(f"AERIE_API_KEYS entry {index} is not visible ASCII without spaces")
            keys.append(ApiKey(name=f"env-key-{index}", digest=key_digest(key), namespaces=None))
        if settings.api_keys_file:
            for index, entry in enumerate(parse_keys_file(Path(settings.api_keys_file)), start=1):
                scope = None if ALL_NAMESPACES in entry.namespaces else frozenset(entry.namespaces)
                keys.append(
                    ApiKey(
                        name=entry.name or f"key-{index}",
                        digest=key_digest(entry.key),
                        namespaces=scope,
                        rate_limit_rps=entry.rate_limit_rps,
                        rate_limit_burst=entry.rate_limit_burst,
                    )
                )
        return cls(keys)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def lookup(self, presented: str) -> ApiKey | None:
        """The key matching ``presented``. Every stored digest is compared, so the time
        taken tells nothing about which key, if any, nearly matched."""
        digest = key_digest(presented)
        found = None
        for key in self.keys:
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    def authenticate(self, authorization: str) -> ApiKey:
        """The key an ``Authorization`` header carries; ANYONE when authentication is off."""
        if not self.enabled:
            return ANYONE
        scheme, _, presented = authorization.partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            raise authentication_error("Missing API key: send it as `Authorization: Bearer <key>`.")
        key = self.lookup(presented)
        if key is None:
            raise authentication_error("Incorrect API key provided.")
        return key


async def authenticated_key(request: Request) -> ApiKey:
    """FastAPI dependency: the request's key, by the app's KeyRegistry (``app.state.keys``)."""
    registry: KeyRegistry = request.app.state.keys
    return registry.authenticate(request.headers.get("authorization", ""))


AuthenticatedKey = Annotated[ApiKey, Depends(authenticated_key)]
