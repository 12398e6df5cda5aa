"""
The config: plain-Python config files and --key=value flags over a script's defaults (configure),
and the checks every script makes of its values before any work (check_keys, check_device,
check_schedules, check_out_dir: one ConfigError naming the key, the value given and what is
allowed). Shared by train.py, probe.py, sample.py and nvs.py; each script's own rules are its own.

As nanoGPT's configurator, a config file is Python assignments to the script's globals; unlike it,
a key that does not exist is an error naming the closest one, and a value keeps its key's type.
"""
import ast
import builtins
import difflib
import math
import os
import re
import tempfile
import traceback
import warnings

import torch

import diffusion as D


class ConfigError(Exception):
    pass


def configure(argv, defaults, lenient_files=False):
    """[config.py ...] [--key=value ...] -> a dict of `defaults` overridden. Config files are
    executed as Python (only the files the user names); unknown keys raise naming the closest one
    (lenient_files=True: a file's keys that `defaults` lacks are skipped, flags stay strict)."""
    cfg = dict(defaults)

    def set_key(k, v, where):
        if k not in cfg:
            close = difflib.get_close_matches(k, cfg, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"unknown config key {k!r} in {where}{hint}")
        old = cfg[k]
        if isinstance(v, bool) != isinstance(old, bool) or \
                not isinstance(v, type(old)) and not (isinstance(old, float) and isinstance(v, int)):
            raise ConfigError(f"{k} in {where} must be {type(old).__name__}, got {v!r}")
        cfg[k] = float(v) if isinstance(old, float) else v

    for arg in argv:
        if arg.startswith("--"):
            k, sep, v = arg[2:].partition("=")
            if not sep:
                raise ConfigError(f"flags look like --key=value, got {arg!r}")
            if not isinstance(cfg.get(k), str):  # a string key keeps the text as typed (--ws=1,2)
                try:
                    v = ast.literal_eval(v)
                except (ValueError, SyntaxError):
                    pass  # left a string: set_key then names the type it wanted
            set_key(k, v, arg)
        else:
            if os.path.isdir(arg):
                raise ConfigError(f"config file {arg!r} is a directory: name a Python file of key = value lines")
            if not os.path.isfile(arg):
                raise ConfigError(f"config file {arg!r} not found")
            ns = {}
            try:  # a mistake in the file is one line naming the file and the line
                code = builtins.compile(open(arg).read(), arg, "exec")  # `compile` is a config key here
            except SyntaxError as e:
                raise ConfigError(f"config file {arg!r}, line {e.lineno}: {e.msg}") from None
            except (OSError, ValueError) as e:  # unreadable, not UTF-8, NUL bytes
                raise ConfigError(f"cannot read config file {arg!r}: {e}") from None
            try:
                exec(code, {}, ns)
            except Exception as e:
                line = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == arg][-1:] or ["?"]
                raise ConfigError(f"config file {arg!r}, line {line[0]}: {type(e).__name__}: {e}") from None
            for k, v in ns.items():
                if not k.startswith("_") and not callable(v) and not isinstance(v, type(os)) and \
                        not (lenient_files and k not in cfg):
                    set_key(k, v, arg)
    return cfg


def check_keys(cfg, choices=None, ranges=()):
    """One ConfigError for the first value not allowed: choices {key: allowed values}, ranges
    [(keys, test, what is allowed)]; floats must also be finite."""
    for k, allowed in (choices or {}).items():
        if cfg[k] not in allowed:
            raise ConfigError(f"{k}={cfg[k]!r} is not allowed: choose from {', '.join(map(repr, allowed))}")
    for keys, ok, what in ranges:
        for k in keys:
            if isinstance(cfg[k], float) and not math.isfinite(cfg[k]) or not ok(cfg[k]):
                raise ConfigError(f"{k}={cfg[k]!r} is out of range: it must be {what}")


def check_schedules(cfg, *keys):
    """Each key must name a schedule diffusion.get_schedule knows."""
    for k in keys:
        try:
            D.get_schedule(cfg[k])
        except ValueError as e:
            raise ConfigError(f"{k}={cfg[k]!r}: {e}") from None


def check_device(dev):
    if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", dev):
        raise ConfigError(f"device={dev!r} is not allowed: 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={dev!r}, but torch sees no CUDA device here: use device='auto' or 'cpu'")
    if dev.startswith("cuda:") and int(dev[5:]) >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"device={dev!r}, but torch sees {n} CUDA device{'s' * (n != 1)} here: use 'cuda:0'"
                          + (f"..'cuda:{n - 1}'" if n > 1 else ""))
    if dev == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={dev!r}, but this torch has no MPS (Apple GPU) device here: use device='auto' "
                          "or 'cpu'")


# a seed reaches torch.manual_seed scaled (train.py's data.Rng: seed * 1_000_003 + step), which must fit 64 bits
SEED_RANGE = (("seed",), lambda v: abs(v) < 2**32, "an integer with |seed| < 2**32")


def parse_list(text, kind=float):
    try:
        return [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"expected comma-separated numbers, got {text!r}") from None


def parse_groups(text):
    """'0,1' -> [[0, 1]]; '0-3;8-15' -> [[0, 1, 2, 3], [8, ..., 15]]: groups of section numbers."""
    groups = []
    for part in str(text).split(";"):
        secs = []
        for item in (i.strip() for i in part.split(",")):
            if not item:
                continue
            lo, _, hi = item.partition("-")
            if not (lo.isdigit() and (hi.isdigit() or not hi)):
                raise ConfigError(f"sections: expected numbers and ranges like 0,1 or 0-7;8-15, got {text!r}")
            if hi and int(hi) < int(lo):
                raise ConfigError(f"sections={text!r}: the range {item!r} runs backwards: write it low-high "
                                  f"({hi}-{lo})")
            secs += range(int(lo), int(hi or lo) + 1)
        if secs:
            groups.append(secs)
    return groups


# -----------------------------------------------------------------------------
# directories a script writes into

def check_out_dir(key, path):
    """path must be a directory this process can write into, or create: one ConfigError otherwise.
    Nothing is left behind: a probe directory is made and removed in its nearest existing parent."""
    if not path:
        raise ConfigError(f"{key}='' is empty: name a directory")
    if os.path.exists(path) and not os.path.isdir(path):
        raise ConfigError(f"{key}={path!r} is a file, not a directory")
    parent = os.path.abspath(path)
    while not os.path.isdir(parent):
        if os.path.lexists(parent):  # a file (or a broken link) on the way
            raise ConfigError(f"{key}={path!r} cannot be created: {parent!r} is not a directory")
        parent = os.path.dirname(parent)
    check_writable(key, path, parent, "its files")


def check_writable(key, value, folder, what):
    """folder, an existing directory, must take new files: one ConfigError naming key=value otherwise.
    what: what the script writes there. Nothing is left behind (a probe directory, made and removed)."""
    try:
        os.rmdir(tempfile.mkdtemp(dir=folder))
    except OSError as e:
        raise ConfigError(f"{key}={value!r}: {what} cannot be written in {folder!r} ({e.strerror})") from None


def plain_warnings():
    """A warning (a partial data copy, a fallback) as one line `warning: ...`, without the file
    and the source line Python shows by default: a user reads a message, not our code."""
    warnings.formatwarning = lambda message, category, *args, **kw: f"warning: {message}\n"
