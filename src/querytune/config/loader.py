"""From an experiment file and command-line flags to an `ExperimentConfig`.

The YAML (with `base:` inheritance) is turned into flags and parsed with the command line through one
`HfArgumentParser` over every section (`schema.sections()`), so a YAML value is type-checked exactly like a flag.
Unknown keys, bad values, YAML syntax errors, an option of another method or augmenter, and a flag meant for
`accelerate launch` raise `ConfigError` naming the key and its source, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import logging
import re
import shlex
import typing
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser

from querytune.augment import option_classes as augmenter_option_classes
from querytune.augment import options_owner as augmenter_option_owner
from querytune.config.schema import (
    ExperimentConfig,
    sections,
)
from querytune.errors import ConfigError
from querytune.methods.registry import MethodArguments, check_supports, get_method, method_names, option_owners
from querytune.methods.registry import option_classes as method_option_classes

logger = logging.getLogger(__name__)


class RaisingParser(HfArgumentParser):
    """argparse prints and exits on error; we want an exception that the caller can attribute to a source."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # argparse %-formats help texts; a literal "% of queries" in a field's help broke `train --help`.
        for action in self._actions:
            if action.help:
                action.help = re.sub(r"%(?!\()", "%%", action.help)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _known_keys() -> dict[str, dataclasses.Field]:
    keys: dict[str, dataclasses.Field] = {}
    for cls in sections():
        for f in dataclasses.fields(cls):
            if f.init:
                keys[f.name] = f
    return keys


def _field_kinds() -> dict[str, str]:
    """Declared types as text, from the annotations: HfArgumentParser rewrites `Field.type` in place."""
    kinds: dict[str, str] = {}
    for cls in sections():
        kinds.update(_hints(cls))
    return kinds


@functools.cache
def _hints(cls: type) -> dict[str, str]:
    return {name: str(hint) for name, hint in typing.get_type_hints(cls).items()}


def _to_argv(mapping: dict[str, Any]) -> list[str]:
    """Turn YAML values into flags so that argparse type-checks them exactly like command-line input."""
    argv: list[str] = []
    for key, value in mapping.items():
        if value is None:
            continue
        if isinstance(value, list):
            if not value:
                continue
            argv += [f"--{key}", *[str(v) for v in value]]
        elif isinstance(value, dict):
            argv += [f"--{key}", json.dumps(value)]
        elif isinstance(value, bool):
            argv += [f"--{key}", "true" if value else "false"]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def _suggest(key: str, known: dict[str, Any]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def read_experiment_file(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML experiment file into a flat dict; syntax errors name the file and line.

    `base: other.yaml` (relative to this file) inherits every key of another experiment, so a variant holds only
    what differs. `base: [clinc150-full.yaml, ../methods/lora.yaml]` layers a method block over a dataset
    experiment; later files win, and this file's own keys win over all.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"experiment file not found: {path}")
    if path.resolve() in _seen:
        raise ConfigError(f"{path}: 'base' files include each other in a cycle")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"{path}: YAML syntax error{where}: {problem}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: an experiment file must be a mapping of keys, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    bases = [base] if isinstance(base, str) else base
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: key 'base' must be a file name or a list of them, got {base!r}")
    merged: dict[str, Any] = {}
    for name in bases:  # later bases override earlier ones; this file overrides them all
        merged.update(read_experiment_file(path.parent / name, (*_seen, path.resolve())))
    return {**merged, **data}


NULLS = ("null", "~")  # what means null on the command line, as in YAML


def _is_null(key: str, value: str) -> bool:
    """`null` / `~` mean null for any key; `none` / `None` only where the key takes no text (`--lora_r none`): for a
    text or a choice it stays the word (`--oos_detector none`, `--report_to none`)."""
    if value.lower() in NULLS:
        return True
    kind = _field_kinds().get(key, "")
    return value.lower() == "none" and "str" not in kind


def _pop_nulls(overrides: list[str]) -> tuple[list[str], set[str]]:
    """Remove `--key null` / `--key=~` pairs (and `none` for a key that takes no text); return the rest and the keys
    set to None."""
    kept: list[str] = []
    nulls: set[str] = set()
    i = 0
    while i < len(overrides):
        tok = overrides[i]
        key = tok[2:].split("=", 1)[0]
        if tok.startswith("--") and "=" in tok and _is_null(key, tok.split("=", 1)[1]):
            nulls.add(key)
        elif tok.startswith("--") and "=" not in tok and i + 1 < len(overrides) and _is_null(key, overrides[i + 1]):
            nulls.add(key)
            i += 1
        else:
            kept.append(tok)
        i += 1
    return kept, nulls


def _cli_keys(overrides: list[str]) -> set[str]:
    return {re.sub(r"=.*", "", tok[2:]) for tok in overrides if tok.startswith("--")}


def _cli_value(overrides: list[str], key: str) -> str | None:
    """The last value given to `--key value` / `--key=value` on the command line, or None."""
    value = None
    for i, tok in enumerate(overrides):
        if tok == f"--{key}" and i + 1 < len(overrides):
            value = overrides[i + 1]
        elif tok.startswith(f"--{key}="):
            value = tok.split("=", 1)[1]
    return value


def _take_config_flag(path: str | Path | None, overrides: list[str]) -> tuple[str | Path | None, list[str]]:
    """`--config FILE` (TRL's habit) as well as the positional file; both at once is an error."""
    kept: list[str] = []
    given: str | None = None
    i = 0
    while i < len(overrides):
        tok = overrides[i]
        if tok == "--config":
            if i + 1 >= len(overrides) or overrides[i + 1].startswith("--"):
                raise ConfigError("command line: --config needs an experiment file: --config experiments/x.yaml")
            given, i = overrides[i + 1], i + 2
            continue
        if tok.startswith("--config="):
            given = tok.split("=", 1)[1]
        else:
            kept.append(tok)
        i += 1
    if given is not None and path is not None:
        raise ConfigError(f"command line: the experiment file is given twice ({path} and --config {given}); give one")
    return (given if given is not None else path), kept


_KEY_VALUE = re.compile(r"([A-Za-z_][\w.]*)=(.*)", re.DOTALL)


def _as_flag(token: str) -> str:
    """`key=value` (Hydra's and TRL-script habit) rewritten as the flag querytune takes."""
    key, value = _KEY_VALUE.fullmatch(token).groups()
    return f"--{key} {shlex.quote(value)}" if value else f"--{key} VALUE"


@functools.cache
def _accelerate_flags() -> frozenset[str]:
    """The options of `accelerate launch` (asked from accelerate's own parser; only on the error path)."""
    try:
        from accelerate.commands.launch import launch_command_parser

        return frozenset(o for a in launch_command_parser()._actions for o in a.option_strings if o.startswith("--"))
    except Exception:  # noqa: BLE001  (an accelerate without this parser: the common flags)
        return frozenset({"--num_processes", "--config_file", "--mixed_precision", "--multi_gpu", "--cpu",
                          "--num_machines", "--main_process_port", "--use_deepspeed", "--use_fsdp", "--gpu_ids"})  # fmt: skip


def _unparsed_argument(rest: list[str], known: dict[str, Any]) -> ConfigError:
    """The error for what no section took: a bare key=value, an accelerate flag, an unknown key, a stray word."""
    tok = next((t for t in rest if t.startswith("-") or _KEY_VALUE.fullmatch(t)), rest[0])
    if not tok.startswith("-") and _KEY_VALUE.fullmatch(tok):
        return ConfigError(f"command line: {tok!r} is not a flag; write {_as_flag(tok)}")
    if tok.startswith("-"):
        flag = tok.split("=", 1)[0]
        if flag in _accelerate_flags():
            return ConfigError(
                f"command line: {flag} is an `accelerate launch` option, not an experiment key: put it before `-m`, "
                f"as in `accelerate launch {flag} ... -m querytune.train EXPERIMENT.yaml`"
            )
        key = flag.lstrip("-")
        return ConfigError(f"command line: unknown key {key!r}{_suggest(key, known)}")
    return ConfigError(f"command line: unexpected argument {tok!r}: flags are --key value, after the experiment file")


def _method_options() -> frozenset[str]:
    """Every registered method's own option keys."""
    return frozenset(f.name for cls in method_option_classes() for f in dataclasses.fields(cls))


def _switch_method(file_values: dict[str, Any], source: str, overrides: list[str], cli_set: set[str]) -> None:
    """`--method X` on the command line (or from a sweep) drops the file's options for other methods, with one
    notice; an option for another method given on the command line itself is an error that names it."""
    cli_method = _cli_value(overrides, "method")
    method = cli_method or file_values.get("method") or MethodArguments.method
    if method not in method_names():
        return  # the parser names the bad method
    owned = set(get_method(method).options)
    wrong = sorted(k for k in cli_set if k in _method_options() and k not in owned)
    if wrong:
        owners = ", ".join(option_owners(wrong[0])) or "no method"
        raise ConfigError(f"command line: {wrong[0]} is set but method is {method!r} ({wrong[0]} is for {owners})")
    if cli_method is not None:
        dropped = [k for k in file_values if k in _method_options() and k not in owned and k not in cli_set]
        named = [k for k in dropped if file_values[k] is not None]
        for key in dropped:
            del file_values[key]
        if named:
            logger.warning("--method %s on the command line: ignoring the options %s set for another method: %s",
                           method, source, ", ".join(named))  # fmt: skip


def _cli_list(overrides: list[str], key: str) -> list[str] | None:
    """The values given to a list flag on the command line (`--key a b`, `--key=a,b`), the last time; or None."""
    values = None
    for i, tok in enumerate(overrides):
        if tok == f"--{key}":
            values = []
            for nxt in overrides[i + 1 :]:
                if nxt.startswith("--"):
                    break
                values.append(nxt)
        elif tok.startswith(f"--{key}="):
            values = [tok.split("=", 1)[1]]
    return values


def _augmenter_names(value: Any) -> list[str]:
    items = value if isinstance(value, list) else [] if value is None else [value]
    names = [n.strip() for item in items for n in str(item).split(",") if n.strip()]
    return [] if names in (["none"], ["null"]) else names


def _switch_augmenters(file_values: dict[str, Any], source: str, overrides: list[str], cli_set: set[str],
                       cli_nulls: set[str]) -> None:  # fmt: skip
    """Options of augmenters that `augment` does not list are an error naming the key; when `augment` comes from the
    command line (or a sweep), the file's options of the augmenters it drops are dropped with one notice."""
    given = _cli_list(overrides, "augment")
    from_cli = given is not None or "augment" in cli_nulls
    selected = _augmenter_names([] if "augment" in cli_nulls else given if given is not None else
                                file_values.get("augment"))  # fmt: skip
    owned = {k: augmenter_option_owner(k) for k in {*cli_set, *file_values}}
    for key in sorted(cli_set):
        if owned.get(key) and owned[key] not in selected:
            raise ConfigError(f"command line: {key} is set but augment does not include {owned[key]!r} (augment: "
                              f"{', '.join(selected) or 'none'})")  # fmt: skip
    stray = [k for k, v in file_values.items() if owned.get(k) and owned[k] not in selected and v is not None]
    if stray and not from_cli:
        raise ConfigError(f"{source}: {stray[0]} is set but augment does not include {owned[stray[0]]!r} (augment: "
                          f"{', '.join(selected) or 'none'})")  # fmt: skip
    for key in stray:
        del file_values[key]
    if stray:
        logger.warning("augment %s on the command line: ignoring the options %s set for other augmenters: %s",
                       ", ".join(selected) or "none", source, ", ".join(stray))  # fmt: skip


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Parse an experiment file plus `--key value` overrides into an `ExperimentConfig`.

    The file is `path`, or `--config FILE` among the overrides. Raises `ConfigError` naming the key and its source
    (the file or the command line) for unknown keys, values of the wrong type, YAML syntax errors and broken
    cross-field rules.
    """
    path, overrides = _take_config_flag(path, list(overrides))
    if path is not None and not Path(path).is_file() and _KEY_VALUE.fullmatch(str(path)):
        raise ConfigError(f"command line: {str(path)!r} is not a flag; write {_as_flag(str(path))} after the "
                          "experiment file")  # fmt: skip
    source = str(path) if path is not None else "the command line"
    file_values = read_experiment_file(path) if path is not None else {}
    known = _known_keys()
    for key, value in file_values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key {key!r}{_suggest(key, known)}")
        kind = _field_kinds()[key]
        if isinstance(value, list) and "list" not in kind:
            raise ConfigError(f"{source}: bad value for key {key!r}: expected a single value ({kind}), got a list")
        if isinstance(value, dict) and "dict" not in kind:
            raise ConfigError(f"{source}: bad value for key {key!r}: expected {kind}, got a mapping")

    cli_keys = _cli_keys(overrides)
    overrides, cli_nulls = _pop_nulls(overrides)
    _switch_method(file_values, source, overrides, cli_keys - cli_nulls)
    _switch_augmenters(file_values, source, overrides, cli_keys - cli_nulls, cli_nulls)
    nulls = {k for k, v in file_values.items() if v is None} - (cli_keys - cli_nulls) | cli_nulls
    classes = sections()
    parser = RaisingParser(classes, allow_abbrev=False)
    argv = _to_argv(file_values) + overrides
    try:
        *parsed, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except ConfigError as err:
        match = re.search(r"--([A-Za-z0-9_]+)", str(err))
        key = match.group(1) if match else None
        where = "command line" if key in cli_keys or key is None else source
        raise ConfigError(f"{where}: bad value for key {key!r}: {err}" if key else f"{where}: {err}") from None
    except ValueError as err:  # a dataclass __post_init__ rule
        raise ConfigError(f"{source}: {err}") from None
    if rest:
        raise _unparsed_argument(rest, known)
    model, data, method, *rest, training = parsed
    n_method, n_augmenter = len(method_option_classes()), len(augmenter_option_classes())
    method_parts, (augment, *rest) = rest[:n_method], rest[n_method:]
    augmenter_parts, (distill, *task_parts) = rest[:n_augmenter], rest[n_augmenter:]

    for key in nulls:  # `key: null` / `--key null` means None, not "keep the default"
        if key not in known:
            raise ConfigError(f"command line: unknown key {key!r}{_suggest(key, known)}")
        if "None" not in _field_kinds()[key]:
            raise ConfigError(f"{source}: key {key!r} cannot be null")
        for section in parsed:
            if key in {f.name for f in dataclasses.fields(section)}:
                setattr(section, key, None)
    try:
        for section in (model, data, *method_parts, augment, *augmenter_parts, distill, *task_parts):
            if hasattr(section, "__post_init__"):
                section.__post_init__()
        method.set_sections(method_parts)  # and checks that no option of another method is set
        for part in task_parts:  # rules across sections (e.g. a slot option set for another task)
            if hasattr(part, "check"):
                part.check(data)
        check_supports(method.method, data.task)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None

    if training.output_dir == "runs/unnamed" and path is not None:
        training.output_dir = f"runs/{Path(path).stem}"
    if training.run_name is None:
        training.run_name = Path(path).stem if path is not None else None
    return ExperimentConfig(model=model, data=data, method=method, training=training, source=source,
                            task_sections={type(part): part for part in task_parts}, augment=augment,
                            augmenter_sections={type(part): part for part in augmenter_parts},
                            distill=distill)  # fmt: skip
