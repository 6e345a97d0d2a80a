"""Settings from text: the command line's flags, ``--set KEY=VALUE`` and ``--config FILE``, each
value typed by its field in ``prn.config`` (``--set lr=1e-4`` is a number, ``--set category=01``
stays the text "01", ``--set image_hw=384,160`` a pair), checked before any work.

    >>> parse_field("lr", "1e-4"), parse_field("training.lr", "1e-4")
    (0.0001, 0.0001)
    >>> cfg = config_from_args(build_parser().parse_args(["fit", "--preset", "cpu", "--set", "lr=3e-4"]))
"""

from __future__ import annotations

import argparse
import difflib
import math
import re
import sys
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from prn.config import BACKBONES, DATASETS, PRECISIONS, SECTION_OF, SECTIONS, PRNConfig
from prn.presets import PRESETS
from prn.errors import DataError, UsageError

# Flags every config-building verb takes, mapped to PRNConfig fields.
COMMON_FLAGS = {
    "dataset": dict(choices=DATASETS, help="dataset layout"),
    "root": dict(help="dataset root folder"),
    "category": dict(help="category (sub-dataset), e.g. bottle, Class1, 01"),
    "backbone": dict(choices=BACKBONES, help="encoder (the tf_efficientnet_lite ones work offline)"),
    "backbone_weights": dict(help="'imagenet', 'random' or a state-dict file"),
    "image_size": dict(type=int, help="images are resized to this square size (the long side with "
                                       "--set keep_aspect=true)"),
    "seen_anomalies": dict(type=int, help="k seen anomalies moved from test to train (0, 1, 5, 10)"),
    "epochs": dict(type=int, help="training epochs (the one flag --resume takes: a longer schedule)"),
    "batch_size": dict(type=int, help="split 2:1:1 into normal / extended / simulated"),
    "steps_per_epoch": dict(type=int, help="0: one pass over the normal images"),
    "seed": dict(type=int),
    "device": dict(help="auto, cpu, cuda, cuda:N"),
    "precision": dict(choices=PRECISIONS,
                      help="32 (default); bf16: autocast, CUDA or CPU; 16: autocast and loss scaling, CUDA; "
                           "auto: bf16 where the device computes it natively (CUDA, CPUs with AVX512-BF16 or AMX), "
                           "else 32"),
    "output_dir": dict(help="where run folders are made (default runs/)"),
    "texture_dir": dict(help="DTD-like folder of textures for heterologous anomalies"),
    "target_fpr": dict(type=float, help="calibration: share of held-out good parts rejected (default 0.01)"),
}


PRECEDENCE = ("Sources of the settings, later ones winning: the defaults (the paper's), then "
              "--config FILE, then --preset (a note on stderr lists the file's values it replaces), "
              "then the flags below, then each --set in order.")


def add_config_args(p: argparse.ArgumentParser) -> None:
    p = p.add_argument_group("settings (prn.config.PRNConfig)", PRECEDENCE)
    p.add_argument("--config", type=Path, help="a config.yaml (e.g. from an earlier run); a preset "
                                               "and flags given with it override its values")
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help="budget preset: paper (GPU), cpu, or cpu-fast (cpu without the attention, in "
                        "bfloat16 where native: about half the fit time); overrides --config, flags override it")
    for name, kw in COMMON_FLAGS.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, default=None, **kw)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config field, parsed to the field's type (lr=1e-4 a number, "
                        "category=01 text, image_hw=384,160 a pair, use_attention=false); a value that "
                        "does not convert is refused before any work; repeatable, applied last")


def _load_config_file(path: Path) -> dict:
    """The keys a --config file sets, typed as the fields are (an input file: DataError)."""
    if not path.is_file():
        raise DataError(f"{path}: config file not found")
    try:
        data = fields_from_yaml(path.read_text())
        PRNConfig.from_dict(data)  # unknown keys and out-of-range values, named with the file
    except (OSError, yaml.YAMLError, ValueError) as exc:
        raise DataError(f"{path}: {exc}") from None
    return data


def config_from_args(args: argparse.Namespace, *, notes=None) -> PRNConfig:
    """The config the command line asks for, checked before any work (see PRECEDENCE for the
    order of the sources). A value that does not fit its field is a UsageError naming the flag,
    the value and the type; notes (stderr) hear which --config values a --preset replaces."""
    notes = notes or sys.stderr
    data = PRNConfig().flat()
    if args.config:
        from_file = _load_config_file(args.config)
        data.update(from_file)
    if args.preset:
        preset = PRESETS[args.preset]
        if args.config:
            replaced = [f"{k} {from_file[k]!r} -> {v!r}" for k, v in preset.items()
                        if k in from_file and from_file[k] != v]
            if replaced:
                print(f"note: --preset {args.preset} replaces these values of {args.config}: "
                      f"{', '.join(replaced)}", file=notes)
        data.update(preset)
    for name in COMMON_FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            data[name] = value
    data.update(parse_sets(args.set))
    try:
        return PRNConfig.from_dict(data)
    except ValueError as exc:  # the right type but out of range, e.g. image_size 100
        raise UsageError(str(exc)) from None


def parse_sets(items: list[str], sections: tuple[str, ...] | None = None) -> dict[str, Any]:
    """``--set KEY=VALUE`` items -> {field: value}, each value parsed by its field's type; KEY is
    a field name or SECTION.KEY. ``sections``: the only sections allowed (None: all)."""
    known = set(SECTION_OF) if sections is None else {k for k, v in SECTION_OF.items() if v in sections}
    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        section, _, name = key.strip().rpartition(".")  # "lr" or "training.lr"
        if not sep or name not in known or (section and SECTION_OF[name] != section):
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            where = "" if sections is None else f" of the sections {', '.join(sections)}"
            raise UsageError(f"--set {item!r}: expected KEY=VALUE with KEY one of the config fields{where} "
                             f"(or SECTION.KEY){hint}: {', '.join(sorted(known))}")
        try:
            out[name] = parse_field(name, text)
        except ValueError as exc:
            raise UsageError(f"--set {item}: {exc}") from None
    return out


# ----------------------------------------------------------------------------- values from text
# `--set KEY=VALUE` gives text; each field's declared type says what the text must be, so
# "1e-4" is a float for lr and "01" stays a string for category (YAML would make it 1).

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")
_TYPE_WORDS = {int: "an integer", float: "a finite number", str: "text",
               bool: "true or false (also yes/no, on/off, 1/0)"}


def field_type(key: str) -> Any:
    """The declared type of field ``key`` (a field name or ``section.field``); KeyError if none."""
    section, _, name = key.rpartition(".")
    if name not in SECTION_OF or (section and SECTION_OF[name] != section):
        raise KeyError(key)
    return typing.get_type_hints(SECTIONS[SECTION_OF[name]])[name]


def parse_field(key: str, text: str) -> Any:
    """The value of config field ``key`` from command-line text, converted to the field's type.

        >>> parse_field("lr", "1e-4"), parse_field("category", "01"), parse_field("image_hw", "384,160")
        (0.0001, '01', (384, 160))

    Raises KeyError for an unknown field, ValueError naming the field, the text and the type
    expected when the text does not convert."""
    tp = field_type(key)
    try:
        return _convert(text, tp)
    except ValueError:
        raise ValueError(f"{key} takes {_describe(tp)}, got {text!r}") from None


def fields_from_yaml(text: str) -> dict[str, Any]:
    """The fields a YAML config sets, {field name: value}, each parsed from its text as
    parse_field does; the file may be in sections (as runs write it) or flat (older runs).

    The file is read with YAML's BaseLoader, which keeps every value as written: YAML 1.1 would
    read ``category: 01`` as the number 1 and ``lr: 1e-4`` as the text '1e-4'; here they are
    "01" and 0.0001, as with --set. Unknown keys are kept for from_dict to report all at once.
    Raises ValueError (yaml.YAMLError for malformed YAML)."""
    data = yaml.load(text, Loader=yaml.BaseLoader)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("a config file must be a mapping of config keys to values")
    items = []
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            items += [(name if SECTION_OF.get(name) == key else f"{key}.{name}", v) for name, v in value.items()]
        else:
            items.append((key, value))
    out = {}
    for key, value in items:
        if key not in SECTION_OF:
            out[key] = value
        elif isinstance(value, list) and all(isinstance(v, str) for v in value):
            out[key] = parse_field(key, ",".join(value))
        elif isinstance(value, str):
            out[key] = parse_field(key, value)
        else:
            raise ValueError(f"{key} takes {_describe(field_type(key))}, got {value!r}")
    return out


def _convert(text: str, tp: Any) -> Any:
    if tp is str:
        return text
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        items = [t for t in re.split(r"[,\s]+", text.strip().strip("[]()")) if t]
        if args[-1] is Ellipsis:
            return tuple(_convert(t, args[0]) for t in items)
        if len(items) != len(args):
            raise ValueError(text)
        return tuple(_convert(t, a) for t, a in zip(items, args))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if type(None) in members and text.strip().lower() in ("none", "null", ""):
            return None
        for member in (m for m in members if m is not type(None)):
            try:
                return _convert(text, member)
            except ValueError:
                continue
        raise ValueError(text)
    word = text.strip()
    if tp is bool:
        if word.lower() in _TRUE + _FALSE:
            return word.lower() in _TRUE
        raise ValueError(text)
    if tp is int:
        return int(word)  # "1.5", "1e3" and "" are refused rather than rounded
    if tp is float:
        value = float(word)
        if not math.isfinite(value):
            raise ValueError(text)
        return value
    return yaml.safe_load(text)  # a field of another kind (none today)


def _describe(tp: Any) -> str:
    if typing.get_origin(tp) is tuple:
        args = typing.get_args(tp)
        kind = {int: "integers", float: "numbers"}.get(args[0], "values")
        example = "1" if args[0] is int else "0.5"
        if args[-1] is Ellipsis:
            return f"a list of {kind}, e.g. [{example}, {example}] or {example},{example}"
        n = len(args)
        return f"{n} {kind}, e.g. [{', '.join([example] * n)}] or {','.join([example] * n)}"
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("none" if m is type(None) else _describe(m) for m in typing.get_args(tp))
    return _TYPE_WORDS.get(tp, str(tp))
