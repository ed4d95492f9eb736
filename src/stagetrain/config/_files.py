"""Reading configs: YAML/TOML files and dicts validated into a CurriculumConfig, with
errors that name the field; readable differences between two configs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    ValidationError,
)

from stagetrain.config._curriculum import CurriculumConfig
from stagetrain.errors import ConfigError

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib  # type: ignore[no-redef]


def format_validation_error(exc: ValidationError, source: str | None = None) -> str:
    """Turn pydantic's report into lines ``field.path: message``."""
    lines = []
    for err in exc.errors():
        loc = _format_loc(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see the docs for allowed fields)"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        elif isinstance(err.get("input"), str | int | float | bool):
            msg = f"{msg}, got {type(err['input']).__name__} {err['input']!r}"
        lines.append(f"{loc}: {msg}" if loc else msg)
    prefix = f"{source}: " if source else ""
    return prefix + "; ".join(lines)


def _format_loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after[_exactly_one(), SourceConfig]",) or "[" in str(part):
            # pydantic names validator wrappers in the location; they mean nothing to users.
            continue
        elif not re.fullmatch(r"[A-Za-z_][\w-]*", str(part)):
            out += f"[{str(part)!r}]"  # an odd key from the file, quoted so the path stays readable
        else:
            out += f".{part}" if out else str(part)
    return out


def parse_config(data: dict[str, Any], *, source: str | None = None) -> CurriculumConfig:
    """Validate a plain dict (as read from YAML/TOML) into a :class:`CurriculumConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source or 'config'}: expected a mapping at the top level")
    try:
        return CurriculumConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}" if source else str(exc)) from None


def _read_text(path: Path) -> str:
    """A config file's text; unreadable or binary files are one-line :class:`ConfigError` s."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not a text file (not valid UTF-8 at byte {exc.start}); "
            "a curriculum is a .yaml or .toml text file"
        ) from None


def load_config(path: str | Path) -> CurriculumConfig:
    """Read a curriculum from a ``.yaml``/``.yml`` or ``.toml`` file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    text = _read_text(path)
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise ConfigError(f"{path}: unknown config format; use .yaml, .yml or .toml")
    except (yaml.YAMLError, tomllib.TOMLDecodeError) as exc:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {first_line}") from None
    return parse_config(data, source=str(path))


def config_diff(old: Any, new: Any, path: str = "") -> list[str]:
    """Readable differences between two plain config dicts: ``path: old -> new``."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old:
                out.append(f"{sub}: added {new[key]!r}")
            elif key not in new:
                out.append(f"{sub}: removed (was {old[key]!r})")
            else:
                out.extend(config_diff(old[key], new[key], sub))
        return out
    if isinstance(old, list) and isinstance(new, list):
        out = []
        if len(old) != len(new):
            out.append(f"{path}: {len(old)} entries -> {len(new)}")
        for i, (a, b) in enumerate(zip(old, new, strict=False)):
            out.extend(config_diff(a, b, f"{path}[{i}]"))
        return out
    return [] if old == new else [f"{path}: {old!r} -> {new!r}"]
