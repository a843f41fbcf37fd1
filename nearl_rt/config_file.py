"""`--config FILE.yaml` for the command-line tools: a YAML mapping of option names (the argparse dests, `batch_size`
or `batch-size`) to values, read through the tool's own argparse definitions (no second list of options): each
value is checked against its option's type and choices, becomes that option's default, and flags given on the
command line override it. `write_config` writes a run's fully resolved options back as such a file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Iterable, Optional, Sequence

from nearl_rt.core.atomic import atomic_output
from nearl_rt.core.errors import NearlError

CONFIG_OPTION = "--config"


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(CONFIG_OPTION, metavar="FILE.yaml",
                        help="read options from this YAML file (keys: option names, e.g. batch_size: 16); flags on "
                             "the command line override it. Every run writes its resolved options to config.yaml")


def config_path(argv: Sequence[str]) -> Optional[str]:
    """The value of --config in `argv`, or None (parse_with_config checks that argparse read the same)."""
    for i, word in enumerate(argv):
        if word == CONFIG_OPTION and i + 1 < len(argv):
            return argv[i + 1]
        if word.startswith(CONFIG_OPTION + "="):
            return word.split("=", 1)[1]
    return None


def read_config(path) -> dict:
    """The YAML mapping in `path` (safe loader: plain values only)."""
    import yaml
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise NearlError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        raise NearlError(f"--config {path} is not valid YAML"
                         + (f" (line {where.line + 1})" if where else "")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise NearlError(f"--config {path} must hold a mapping of option names to values, not a {type(data).__name__}")
    return data


def options(parser: argparse.ArgumentParser) -> dict:
    """dest -> action for a parser's options (not help, not --config itself)."""
    return {a.dest: a for a in parser._actions  # argparse has no public list of its actions
            if a.dest not in ("help", "config") and not isinstance(a, argparse._HelpAction)}


def typed_value(action: argparse.Action, key: str, value, path):
    """`value` from the YAML file as `action` would store it; NearlError naming `key` when it does not fit."""
    def wrong(expected: str) -> NearlError:
        return NearlError(f"--config {path}: {key}: expected {expected}, got {value!r}")
    if value is None:
        if action.required:
            raise wrong(f"a value (--{key.replace('_', '-')} is required)")
        return None
    if action.nargs == 0:  # store_true / store_false
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    typ = action.type
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong("an integer")
    elif typ is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong("a number")
        value = float(value)
    elif typ is None:  # strings; numbers are accepted as their text (seeds: 0)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise wrong("a string")
        value = str(value)
    else:
        raise wrong(f"a value {typ!r} cannot take from a file")
    if action.choices is not None and value not in action.choices:
        raise wrong(f"one of {', '.join(map(str, action.choices))}")
    return value


def config_defaults(parser: argparse.ArgumentParser, data: dict, path, *,
                    refuse: Iterable[str] = ()) -> tuple[dict, dict]:
    """Split a config mapping into (values for `parser`'s options, the remaining keys), typed; keys in `refuse`
    are an error."""
    known, rest = {}, {}
    actions = options(parser)
    refused = set(refuse)
    for key, value in data.items():
        dest = str(key).replace("-", "_")
        if dest in refused:
            raise NearlError(f"--config {path}: {key} cannot be set in a config file here ({parser.prog} sets it)")
        if dest in known:
            raise NearlError(f"--config {path}: {key} is given twice (as {dest} and with dashes); keep one")
        if dest in actions:
            known[dest] = typed_value(actions[dest], key, value, path)
        else:
            rest[key] = value
    return known, rest


def apply_defaults(parser: argparse.ArgumentParser, values: dict) -> None:
    """Make `values` the parser's defaults; an option they give is no longer required on the command line."""
    for action in parser._actions:
        if action.dest in values:
            action.required = False
    parser.set_defaults(**values)


def unknown_keys(rest: dict, path, prog: str) -> None:
    if rest:
        key = next(iter(rest))
        raise NearlError(f"--config {path}: unknown key {key!r} (not an option of {prog}; see {prog} --help)")


def parse_with_config(parser: argparse.ArgumentParser, argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """parser.parse_args(argv) with --config FILE.yaml's values as defaults (the parser must have --config)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    path = config_path(argv)
    if path is not None:
        known, rest = config_defaults(parser, read_config(path), path)
        unknown_keys(rest, path, parser.prog)
        apply_defaults(parser, known)
    args = parser.parse_args(argv)
    if args.config != path:
        raise NearlError(f"write {CONFIG_OPTION} in full (an abbreviation is not read)")
    return args


def write_config(path, values: dict, header: str = "") -> Path:
    """Write option values (dest -> value) as a YAML config file, atomically."""
    import yaml
    text = "".join(f"# {line}\n" for line in header.splitlines()) + yaml.safe_dump(values, sort_keys=False)
    with atomic_output(Path(path)) as tmp:
        tmp.write_text(text)
    return Path(path)


def resolved_options(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: Iterable[str] = ()) -> dict:
    """A namespace's values of `parser`'s options (what write_config writes), in the parser's order."""
    skipped = set(skip)
    return {dest: getattr(args, dest) for dest in options(parser) if dest not in skipped and hasattr(args, dest)}


def non_default_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, skip: Iterable[str] = ()) -> list:
    """The command-line flags that give `args`'s values of the options not at their default (in the parser's
    order): one canonical form however the values were given."""
    flags = []
    for dest, action in options(parser).items():
        value = getattr(args, dest, action.default)
        if dest in set(skip) or value == action.default or not action.option_strings:
            continue
        flags += [action.option_strings[0]] if action.nargs == 0 else [action.option_strings[0], str(value)]
    return flags
