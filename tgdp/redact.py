"""Secret redaction for everything tgdp writes or sends: configs (config.yaml, meta.json, wandb)
and logged metrics. Its own module so that the config and the metrics both use it without
importing each other."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

REDACTED = "***"
# Any value under such a name is hidden (substring of the name, lower-cased, separators removed).
_STRONG_NAMES = ("password", "passwd", "passphrase", "secret", "apikey", "accesskey", "privatekey", "credential",
                 "authtoken", "accesstoken", "bearer", "cookie")
# Only STRING values are hidden under these name parts: ML configs say `cls_token: true` or
# `num_register_tokens: 8`, which are no secrets, while `hf_token: hf_...` is one.
_WEAK_PARTS = {"key", "keys", "token", "auth", "pass"}  # not "pwd": $PWD is the working directory
_SECRET_VALUE = re.compile(
    r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_\-]{16,}|gh[pousr]_[A-Za-z0-9]{20,}|github_pat_\w{20,}|AKIA[0-9A-Z]{16}"
    r"|xox[abprs]-[A-Za-z0-9\-]{10,}"
    r"|[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]+:[^/\s@]+@"  # user:password@ in a URL
    # a run of >= 32 letters AND digits (wandb keys are 40 hex); separators (_ - / .) break it, so run
    # names and paths survive
    r"|(?<![A-Za-z0-9])(?=[A-Za-z0-9]*[0-9])(?=[A-Za-z0-9]*[A-Za-z])[A-Za-z0-9]{32,}(?![A-Za-z0-9])")


def _name_parts(name: str) -> list[str]:
    return [p.lower() for p in re.split(r"[^A-Za-z0-9]+|(?<=[a-z])(?=[A-Z])", name) if p]


def is_secret_name(name: str, value: Any = "") -> bool:
    """Whether a value stored under `name` must be hidden (see _STRONG_NAMES / _WEAK_PARTS)."""
    flat = re.sub(r"[^a-z0-9]", "", name.lower())
    if any(word in flat for word in _STRONG_NAMES):
        return value is not None
    return isinstance(value, (str, bytes)) and bool(_WEAK_PARTS.intersection(_name_parts(name)))


def secret_env_values(env: Mapping[str, str] | None = None, min_len: int = 8) -> list[str]:
    """Values of environment variables with secret-looking names (WANDB_API_KEY, HF_TOKEN, ...):
    hidden wherever they appear inside a logged string, whatever its key."""
    env = os.environ if env is None else env
    return [v for k, v in env.items() if len(v) >= min_len and is_secret_name(k, v)]


def scrub_secrets(obj: Any, extra_secrets: Iterable[str] = ()) -> Any:
    """A copy of `obj` (dicts, lists, tuples, dataclasses, scalars) with secrets replaced by "***".

    Hidden: values under secret-looking names, strings that look like tokens (HF, OpenAI, GitHub,
    AWS, Slack, wandb's 40-hex keys, URL passwords, long letter+digit runs), and strings containing
    any of `extra_secrets`. False positives (a 32-char hash) are the price of never leaking a key.
    """
    extra = [s for s in extra_secrets if s]

    def value(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            v = dataclasses.asdict(v)
        if isinstance(v, Mapping):
            return {k: REDACTED if is_secret_name(str(k), v[k]) else value(v[k]) for k in v}
        if isinstance(v, (list, tuple)):
            return type(v)(value(x) for x in v)
        if isinstance(v, Path):
            v = str(v)
        if isinstance(v, bytes):
            v = v.decode("utf-8", "replace")
        if isinstance(v, str) and (_SECRET_VALUE.search(v) or any(s in v for s in extra)):
            return REDACTED
        return v

    return value(obj)
