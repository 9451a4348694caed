"""Settings defined once: a dataclass field carries its default, help text and allowed values.

    @dataclass
    class StoryConfig:
        n_layer: int = setting(4, "transformer blocks", low=1, high=64)

Everything else is generated from those fields: the command line (`add_arguments`), the checks
(`check`, `from_values`), the command line the app runs for a job (`to_argv`) and the app's
Train form (`specs`). A config class may add a `check(self)` method for rules that tie several
settings together (the width must split into heads). This module imports no torch, so the app
can build its form without loading any model code.

A setting whose right value depends on the device (a LoRA run's length on a CPU or a GPU) says both:

    max_steps: int | str = setting(help="optimizer steps", low=1, high=10**7, by_device={"cpu": 30, "cuda": 500})

Its default is then "auto", which the help and the form spell out ("auto: 30 on a CPU, 500 on a GPU");
the trainer, once it knows its device, puts the device's value in (`resolve_by_device`). A value given
explicitly always wins.
"""

import argparse
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path

from llmb.errors import UserError, clip


def setting(default=MISSING, help="", *, low=None, high=None, choices=None, words=(), label=None, form=False,
            required=False, factory=None, app_range=None, called=None, env=None, by_device=None):
    """A dataclass field that knows its help text and allowed values.

    low/high: the inclusive range of a number; choices: the allowed strings; words: strings
    allowed instead of a number (e.g. "auto"); label: the app's name for it; form: shown in the
    app's Train tab; required: the command line must give it (the dataclass keeps a default
    so that code can build a config step by step); app_range: the (lowest, highest) the app's
    slider offers and its API takes, where a public server bounds one call's work more tightly
    than low/high; called: its name in the checks' messages (default: its flag), for settings
    a library call takes by keyword ("max new tokens must be between 1 and 1e+06"); env: the
    environment variable that gives it when its flag is not given (the app's settings: a Space
    passes no flags); by_device: {"cpu": value, "cuda": value}, the default being "auto", that value on the
    device the run gets (`resolve_by_device`).
    """
    if by_device is not None:
        default, words = "auto", (*words, "auto")
        shown = {d: ("on" if v else "off") if isinstance(v, bool) else v for d, v in by_device.items()}
        help += f"; auto: {shown['cpu']} on a CPU, {shown['cuda']} on a GPU"
    meta = dict(help=help, low=low, high=high, choices=tuple(choices) if choices else None, words=tuple(words),
                label=label, form=form, required=required, app_range=app_range, called=called,
                env=env, by_device=by_device)
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Spec:
    """One setting as the parsers and the form see it."""

    name: str
    kind: type  # int, float, str, bool or list
    default: object
    help: str
    low: float | None = None
    high: float | None = None
    choices: tuple | None = None
    words: tuple = ()
    optional: bool = False  # None is allowed (e.g. no time limit)
    label: str | None = None
    form: bool = False
    required: bool = False
    app_range: tuple | None = None
    called: str | None = None
    env: str | None = None
    by_device: dict | None = None  # {"cpu": value, "cuda": value} of an "auto" default

    @property
    def flag(self):
        return "--" + self.name.replace("_", "-")

    def allowed(self):
        """What the setting accepts, in words: 'a whole number from 1 to 64', 'one of a, b'."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.kind in (int, float):
            what = "a whole number" if self.kind is int else "a number"
            if self.low is not None and self.high is not None:
                what += f" from {_shown(self.low)} to {_shown(self.high)}"
            elif self.low is not None:
                what += f" of at least {_shown(self.low)}"
            return what + "".join(f" or '{w}'" for w in self.words)
        if self.kind is bool and self.words:
            return "true, false" + "".join(f" or '{w}'" for w in self.words)
        return {bool: "true or false", list: "one or more values"}.get(self.kind, "text")


def _kind(annotation):
    """(base type, None allowed) of a field's annotation: int | None -> (int, True)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        numeric = [a for a in args if a in (int, float)]
        return (numeric[0] if numeric else args[0]), optional
    return (typing.get_origin(annotation) or annotation), False


def specs(cls):
    """The Spec of every field of the config class `cls`, in order."""
    out = []
    for f in fields(cls):
        kind, optional = _kind(f.type)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        meta = dict(f.metadata)
        out.append(Spec(f.name, kind, default, meta.pop("help", ""), optional=optional or default is None, **meta))
    return out


def spec_of(cls, name):
    return next(s for s in specs(cls) if s.name == name)


def resolve_by_device(cfg, device, saved=None):
    """Put in each setting of `cfg` left to "auto" that depends on the device its value on `device` ("cpu" or
    "cuda"), or the value in `saved` (the settings of the run a --resume continues, which it must keep).
    Returns {name: value} of what it put in."""
    chosen = {}
    for spec in specs(type(cfg)):
        if spec.by_device is not None and getattr(cfg, spec.name) == "auto":
            chosen[spec.name] = (saved or {}).get(spec.name, spec.by_device[device])
            setattr(cfg, spec.name, chosen[spec.name])
    return chosen


# ------------------------------------------------------------------------------------- checks

def check_number(label, value, low=None, high=None, kind=float):
    """`value` (a number or its text) as `kind`, inside [low, high]; else a UserError naming `label`.

    The one bounded-number check of the project: the CLIs, the trainers and the app use it. Whole
    numbers are compared exactly (2**63 - 1 is not rounded up), and numbers beyond a float's range
    (10**400, 1e400) are refused like any other out of range.
    """
    if isinstance(value, bool):
        raise UserError(f"{label} must be a number (got {value})")
    try:
        x = _exact_int(value) if kind is int else None
        x = float(value) if x is None else x
    except (TypeError, ValueError):
        raise UserError(f"{label} must be a number (got {clip(value)!r})") from None
    except OverflowError:  # a whole number beyond a float's range
        raise UserError(f"{label} must be {_span(low, high) or 'a finite number'} (got {_shown(value)})") from None
    if isinstance(x, float) and not math.isfinite(x):
        raise UserError(f"{label} must be a finite number (got {clip(value)})")
    if kind is int and x != int(x):
        raise UserError(f"{label} must be a whole number (got {x:g})")
    if (low is not None and x < low) or (high is not None and x > high):
        raise UserError(f"{label} must be {_span(low, high)} (got {_shown(x)})")
    return kind(x)


def _exact_int(value):
    """A whole number given as an int or as digits, as an exact int; None for anything else."""
    if isinstance(value, int):
        return value
    digits = value.strip().lstrip("+-") if isinstance(value, str) else ""
    if digits.isdigit():
        if len(digits) > 1000:  # Python refuses to read such a long one
            raise OverflowError
        return int(value)
    return None


def _shown(x):
    """A number for a message: 1e+07, 0.5, 18446744073709551615 (exact when :g would round it), and a
    number too large for that as 'a number of 401 digits'."""
    if isinstance(x, int) and abs(x) >= 10**30:
        return f"a number of {len(str(abs(x)))} digits" if x.bit_length() < 3000 else "a number too large to use"
    if isinstance(x, str) or not isinstance(x, (int, float)):
        return "a number too large to use"
    return f"{x:g}" if float(f"{x:g}") == x else str(x)


def _span(low, high):
    if low is not None and high is not None:
        return f"between {_shown(low)} and {_shown(high)}"
    return f"at least {_shown(low)}" if low is not None else f"at most {_shown(high)}" if high is not None else ""


# ------------------------------------------------------------------------------------- sampling

MIN_TEMPERATURE = 0.01  # below it, logits / temperature overflow to inf; and it already samples like greedy
SEED_RANGE = (0, 2**64 - 1)  # what torch's generators take
MAX_NEW_TOKENS = 1_000_000


class SamplingRules:
    """The rules of sampling settings that no range can say, shared by the story model's and the assistant's
    sampling settings (llmb.story.config.StorySampling, llmb.assistant.config.ChatSampling), which inherit
    them. Temperature 0 is greedy; top-p None is off."""

    def check(self):
        if 0 < self.temperature < MIN_TEMPERATURE:
            raise UserError(f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE:g} (got "
                            f"{self.temperature:g}); smaller ones sample as greedy does, and overflow")
        if self.top_p == 0:
            raise UserError("top-p must be more than 0 and at most 1 (got 0)")


def parse(spec, value, label=None):
    """`value` (text from a command line or a form, or a Python value) as the setting wants it.

    UserError names the setting (its flag, or `label`) and what it accepts.
    """
    name = label or spec.flag
    if value is None or (isinstance(value, str) and not value.strip()):
        if spec.optional:
            return None
        raise UserError(f"{name} is empty; give {spec.allowed()}")
    if isinstance(value, str) and value.strip().lower() in spec.words:  # "auto", " Auto " alike
        return value.strip().lower()
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise UserError(f"{name} must be true or false (got {clip(value)!r})")
    if spec.kind is list:
        items = [value] if isinstance(value, str) else list(value)
        items = [part.strip() for item in items for part in str(item).split(",") if part.strip()]  # a,b works too
        if not items and (spec.required or spec.default):
            raise UserError(f"{name} needs at least one value")
        return [str(item) for item in items]
    if spec.kind is Path:
        return Path(value).expanduser().resolve()
    if spec.kind is str:
        if not isinstance(value, str):
            raise UserError(f"{name} must be text (got {clip(value)!r})")
        if spec.choices and value not in spec.choices:
            raise UserError(f"{name} must be {spec.allowed()} (got {clip(value)!r})")
        return value
    try:
        return check_number(name, value, spec.low, spec.high, spec.kind)
    except UserError:
        if spec.words:  # say what else it takes
            raise UserError(f"{name} must be {spec.allowed()} (got {clip(value)!r})") from None
        raise


def check(cfg):
    """Check every setting of a config instance, then its own cross-setting rules; UserError names the flag
    (or what the setting is `called`)."""
    for spec in specs(type(cfg)):
        setattr(cfg, spec.name, parse(spec, getattr(cfg, spec.name), spec.called))
    if hasattr(cfg, "check"):
        cfg.check()
    return cfg


def from_values(cls, values, labels=False):
    """A checked config from {name: value} (form fields or API values); unknown names are refused."""
    known = {s.name: s for s in specs(cls)}
    parsed = {}
    for name, value in values.items():
        if name not in known:
            raise UserError(f"{name!r} is not a setting of {cls.__name__}")
        spec = known[name]
        parsed[name] = parse(spec, value, (spec.label or name.replace("_", " ")) if labels else None)
    return check(cls(**parsed))


def app_values(cls, values):
    """{name: value} from the app's sliders and boxes, each within the range the app offers (`app_range`) and
    named in a message as the page names it ("temperature must be between 0 and 2"); `check` the config
    built from them for the rest."""
    known = {s.name: s for s in specs(cls)}
    parsed = {}
    for name, value in values.items():
        spec = known[name]
        if spec.app_range:
            spec = replace(spec, low=spec.app_range[0], high=spec.app_range[1])
        parsed[name] = parse(spec, value, (spec.label or name.replace("_", " ")).lower())
    return parsed


# ------------------------------------------------------------------------------ command line

class Parser(argparse.ArgumentParser):
    """argparse's parser for every llmb command line (and its subcommands): a mistake in the flags is one
    `error:` line, as a bad value that a config's check finds is, not argparse's usage block before it
    (`--help` shows the usage)."""

    def error(self, message):
        self.exit(2, f"error: {message} (see: {self.prog} --help)\n")


def _argparse_type(spec):
    def convert(text):
        try:
            return parse(spec, text)
        except UserError as e:  # argparse names the flag already: "argument --n-layer: must be ..."
            raise argparse.ArgumentTypeError(str(e).removeprefix(spec.flag + " ")) from None
    convert.__name__ = spec.kind.__name__  # argparse names it in "invalid int value"
    return convert


def add_arguments(parser, cls, only=None, skip=(), as_text=False, defaults=None):
    """One flag per setting of `cls` (or of the names in `only`), with its help, default and range.

    defaults: {name: value} in place of the class's defaults (the app's, from environment variables).

    as_text: argparse keeps the values as given and `from_args` checks them, so that a bad one is an
    `error:` line naming the setting as the class's check does (not argparse's usage and complaint).
    """
    for spec in specs(cls):
        if spec.name in skip or (only is not None and spec.name not in only):
            continue
        default = None if spec.required else (defaults or {}).get(spec.name, spec.default)
        shown = "" if spec.required or default in (None, [], "") or spec.kind is bool else f" (default: {default})"
        limits = f" [{spec.allowed()}]" if spec.kind in (int, float) and (spec.low is not None or spec.words) else ""
        text = spec.help + shown + limits + (f"; environment variable {spec.env}" if spec.env else "")
        if spec.kind is bool and spec.by_device is not None:  # auto, or either way
            parser.add_argument(spec.flag, dest=spec.name, action="store_const", const=True, default=default,
                                help=text + " (default: auto)")
            parser.add_argument(f"--no-{spec.flag[2:]}", dest=spec.name, action="store_const", const=False,
                                default=default, help=f"turn off {spec.flag}")
        elif spec.kind is bool and spec.default:
            parser.add_argument(f"--no-{spec.flag[2:]}", dest=spec.name, action="store_false", help="turn off: " + text)
        elif spec.kind is bool:
            parser.add_argument(spec.flag, action="store_true", default=bool(default), help=text)
        elif spec.kind is list:  # `--data a b` and `--data a --data b` alike; the class's default when not given
            parser.add_argument(spec.flag, nargs="+", action="extend", default=None, required=spec.required,
                                metavar="VALUE", help=text)
        else:
            parser.add_argument(spec.flag, type=None if as_text else _argparse_type(spec), default=default,
                                required=spec.required,
                                choices=spec.choices, metavar=None if spec.choices else spec.name.upper(), help=text)


def from_args(cls, args):
    """The config of `cls` from parsed arguments (names not in `cls` are ignored), checked."""
    given = {s.name for s in specs(cls) if not (s.kind is list and getattr(args, s.name, None) is None)}
    return check(cls(**{k: v for k, v in vars(args).items() if k in given}))


def to_argv(cfg, skip=()):
    """The flags that give `cfg` on a command line: only settings that differ from the default."""
    argv = []
    for spec in specs(type(cfg)):
        value = getattr(cfg, spec.name)
        if spec.name in skip or (value == spec.default and not spec.required) or value is None:
            continue
        if spec.kind is bool:
            argv.append(spec.flag if value else f"--no-{spec.flag[2:]}")
        elif spec.kind is list:
            argv += [spec.flag, *map(str, value)]
        else:
            argv += [spec.flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return argv
