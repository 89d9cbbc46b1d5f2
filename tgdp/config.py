"""Typed configuration: dataclass schemas, YAML presets and dotted command-line overrides.

Every entry point builds its config the same way:

    schema defaults  <-  preset YAML (a name in tgdp/configs/<group>/ or a path)  <-  overrides

OmegaConf's structured configs do the merging and type checking, so a misspelt field or a
value of the wrong type stops the program before any work starts, naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tgdp.redact import scrub_secrets, secret_env_values

T = TypeVar("T")
PRESET_ROOT = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the field and what is expected."""


def require(ok: bool, message: str) -> None:
    """A config's `validate()` rule: raise ConfigError(message) unless `ok`."""
    if not ok:
        raise ConfigError(message)


def preset_path(group: str, preset: str | Path) -> Path:
    """Resolve a preset name (`tiny`) in `tgdp/configs/<group>/` or a path to a YAML file."""
    candidate = Path(preset)
    if candidate.suffix in (".yaml", ".yml"):
        if not candidate.is_file():
            raise ConfigError(f"config file {candidate} does not exist")
        return candidate
    named = PRESET_ROOT / group / f"{preset}.yaml"
    if not named.is_file():
        known = sorted(p.stem for p in (PRESET_ROOT / group).glob("*.yaml"))
        raise ConfigError(f"unknown {group} preset {str(preset)!r}; known presets: {known} (or pass a .yaml path)")
    return named


def available_presets(group: str) -> list[str]:
    return sorted(p.stem for p in (PRESET_ROOT / group).glob("*.yaml"))


def load_config(schema: type[T], group: str, preset: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Build a `schema` instance from its defaults, an optional preset and dotted overrides."""
    try:
        cfg = OmegaConf.structured(schema)
        if preset is not None:
            cfg = OmegaConf.merge(cfg, _load_preset(group, preset))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like field.sub=value, got {bad}")
        if overrides:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        obj = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        # OmegaConf's messages name the key ("Key 'x' not in 'Cfg'", "Value 'a' could not be
        # converted to Integer"); keep them but drop its multi-line object dump.
        raise ConfigError(f"invalid {group} config: {str(exc).splitlines()[0]} (key: {getattr(exc, 'full_key', '?')})") from exc
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj  # type: ignore[return-value]


# A preset may compose other groups' presets instead of repeating them:
#     presets: {model: tiny, task: tgdp}     # field -> preset name in tgdp/configs/<field>/
#     model: {audio_frames: 32}              # then its own values win
PRESETS_KEY = "presets"


def _load_preset(group: str, preset: str | Path):
    raw = OmegaConf.load(preset_path(group, preset))
    composed = OmegaConf.create()
    for field_name, sub in dict(raw.get(PRESETS_KEY) or {}).items():
        composed = OmegaConf.merge(composed, {field_name: OmegaConf.load(preset_path(field_name, sub))})
    if PRESETS_KEY in raw:
        raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != PRESETS_KEY])
    return OmegaConf.merge(composed, raw)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A plain, YAML/JSON-serialisable dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def config_record(cfg: Any) -> dict[str, Any]:
    """The config as it is recorded or shown (config.yaml, checkpoint meta.json, --print-config):
    `to_dict` with secret-looking values and the values of secret environment variables
    (WANDB_API_KEY, HF_TOKEN, ...) replaced by "***", so a key pasted into the wrong field never
    reaches a file, a console or a shared run folder."""
    return scrub_secrets(to_dict(cfg), secret_env_values())


def to_yaml(cfg: Any) -> str:
    """`config_record(cfg)` as YAML."""
    return OmegaConf.to_yaml(OmegaConf.create(config_record(cfg)))


def parse_cli(
    schema: type[T],
    group: str,
    argv: Sequence[str] | None,
    *,
    description: str,
    flags: dict[str, tuple[str, str]] | None = None,
    default_preset: str | None = None,
    epilog: str | None = None,
    prog: str | None = None,
) -> T:
    """Parse `[--config PRESET_OR_YAML] [--flag value ...] [a.b=c ...]` into a `schema` instance.

    `flags` maps a convenience option (`--input`) to a dotted field (`input`) and its help text;
    such options are sugar for the equivalent dotted override and win over the preset. `prog`:
    the command named in errors (default: the script's file name).
    """
    flags = flags or {}
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=(epilog or "")
        + f"\nPresets ({group}): {', '.join(available_presets(group)) or 'none'}. "
        "Any field can be set as a dotted override `section.field=value` (see --print-config).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=default_preset, help="preset name or path to a YAML file")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    for flag, (field, help_text) in flags.items():
        parser.add_argument(flag, dest=f"flag::{field}", default=None, metavar=field.split(".")[-1].upper(),
                            help=f"{help_text} (= {field}=...)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides field.sub=value")
    args = parser.parse_intermixed_args(argv)  # flags and field=value overrides in any order
    overrides = list(args.overrides)
    for name, value in vars(args).items():
        if name.startswith("flag::") and value is not None:
            overrides.append(f"{name[len('flag::'):]}={_quote(value)}")
    try:
        cfg = load_config(schema, group, args.config, overrides)
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    if args.print_config:
        print(to_yaml(cfg), end="")
        parser.exit(0)
    return cfg


def _quote(value: str) -> str:
    """Quote a raw flag value so OmegaConf's dotlist parser keeps it a string (paths with `=`, `:`)."""
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"
