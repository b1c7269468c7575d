"""What every command-line tool of the project shares: user errors, quiet logs, `--help`, `--debug`.

`run(main)` replaces `absl.app.run(main)`:

  * a bad input (a `UserError`, or a ValueError / OSError raised by the project's own checks) is printed
    as one paragraph on stderr, without a traceback, and the command exits with status 2;
    `--debug` (or the environment variable AST_SEG_DEBUG=1) shows the traceback instead;
  * a flag that cannot be parsed, such as a misspelt `--config.` key, is one paragraph too (with the
    nearest key when there is one), status 2;
  * `--help` (and --helpshort, --helpfull) exits with status 0;
  * the INFO logs of absl, Orbax and TFDS are off unless `--verbosity` is given (e.g. --verbosity=0);
  * a Ctrl-C outside training ends the command with status 130 and one line.

`enable_compilation_cache()`, called by every launcher, keeps XLA's compiled programs between runs (see
`compilation_cache_dir` for where, and how to move or switch it off).

Importing this module is cheap (absl only): no JAX or TensorFlow.
"""

import os
import re
import sys
import traceback

from absl import app, flags, logging

DEBUG_ENV = "AST_SEG_DEBUG"
COMPILATION_CACHE_ENV = "AST_SEG_COMPILATION_CACHE"
_OFF = ("0", "off", "false", "no", "none")
USER_ERROR_STATUS = 2
# TensorFlow's C++ INFO lines (e.g. oneDNN) go when this is set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
_HELP_FLAGS = ("--help", "--helpshort", "--helpfull", "--helpxml", "-?", "-help")

_DEBUG = flags.DEFINE_bool(
    "debug",
    False,
    f"Show the full traceback of an error (also with the environment variable {DEBUG_ENV}=1).",
)


class UserError(ValueError):
    """Bad input from the user (a config value, a file, a flag): printed as one paragraph, no traceback."""


def raised_by_project(error: BaseException) -> bool:
    """Whether `error` was raised by this project's own checks (bad input), not deep inside a library.

    The CLIs print such errors as one paragraph; anything else keeps its traceback.
    """
    if isinstance(error, UserError):
        return True
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    last = os.path.abspath(frames[-1].filename)
    return last.startswith(root + os.sep) and "site-packages" not in last


def debug_requested(argv=None) -> bool:
    """--debug on the command line or AST_SEG_DEBUG set to something other than '', 0 or false."""
    if os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no"):
        return True
    if flags.FLAGS.is_parsed():
        return bool(_DEBUG.value)
    argv = sys.argv if argv is None else argv
    return any(a in ("--debug", "--debug=true", "--debug=1") for a in argv)


def paragraph(message: str) -> str:
    """`message` as `error: ...`, its further lines indented (not re-wrapped: names and paths stay whole)."""
    lines = str(message).strip().splitlines() or [""]
    return "\n".join(
        ["error: " + lines[0], *("  " + line.strip() for line in lines[1:])]
    )


def fail(message: str, status: int = USER_ERROR_STATUS):
    """Prints `message` as an error paragraph on stderr and exits with `status`."""
    print(paragraph(message), file=sys.stderr, flush=True)
    sys.exit(status)


def quiet_third_party_logs() -> None:
    """absl / Orbax / TFDS INFO logs off (warnings stay) unless --verbosity was given; TF's C++ logs off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)


def compilation_cache_dir(environ=None) -> str | None:
    """The directory of the persistent compilation cache that the launchers use, or None for none.

    AST_SEG_COMPILATION_CACHE=PATH puts it at PATH; AST_SEG_COMPILATION_CACHE=off (or 0, false, no,
    none) switches it off. Unset or empty: ast_seg_jax/jax_compilation_cache in the user's cache
    directory ($XDG_CACHE_HOME, else ~/.cache).

    Args:
      environ: the environment to read (default: os.environ).
    """
    environ = os.environ if environ is None else environ
    value = environ.get(COMPILATION_CACHE_ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return os.path.abspath(os.path.expanduser(value))
    base = environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return os.path.join(base, "ast_seg_jax", "jax_compilation_cache")


def enable_compilation_cache(environ=None) -> str | None:
    """Turns on JAX's persistent compilation cache (`compilation_cache_dir`); returns its directory.

    A second run, a resume or a phase switch whose programs were compiled before loads them from the
    cache instead of compiling them again (JAX keys each entry by the program, the JAX/XLA versions,
    the device and the compiler flags, so a stale entry is never used). A directory already given to
    JAX (JAX_COMPILATION_CACHE_DIR, or `jax.config`) is kept as it is. Call it before the first
    compilation.
    """
    import jax

    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = compilation_cache_dir(environ)
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", path)
    return path


def _flag_error_message(error: BaseException, argv) -> str:
    """One paragraph for an exception raised while parsing the command line."""
    text = str(error).strip().strip("'\"").replace("\\n", "\n").replace("\\'", "'")
    missing = re.search(r"'([^'\s]+)'", text)
    hint = re.search(r'Did you mean "([^"]+)"', text)
    if missing and hint:
        name = missing.group(1)
        culprit = next(
            (
                a.split("=", 1)[0]
                for a in argv
                if a.startswith("--config.") and a.split("=", 1)[0].endswith("." + name)
            ),
            f"--config...{name}",
        )
        return (
            f"{culprit}: the config has no key {name!r}; did you mean {hint.group(1)!r}? Every key "
            "and its meaning is in experiments/configs/base.py."
        )
    if isinstance(error, (AttributeError, KeyError)) and missing:
        culprit = next(
            (a.split("=", 1)[0] for a in argv if missing.group(1) in a),
            "a --config. flag",
        )
        return (
            f"{culprit}: the config has no key {missing.group(1)!r}. Every key and its meaning is in "
            "experiments/configs/base.py."
        )
    return f"cannot read the command line: {' '.join(text.split())}"


def _without_traceback(message: str) -> str:
    """A flag error whose text embeds a traceback (config_flags does) as its first and last lines."""
    if "Traceback (most recent call last)" not in message:
        return message
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    head = message.split("Traceback (most recent call last)")[0].strip()
    return f"{head} {lines[-1]}"


def _config_load_errors() -> list[str]:
    """config_flags keeps a config file that failed to load as a placeholder that raises when used."""
    errors = []
    for name, flag in flags.FLAGS._flags().items():
        value = flag.value
        if type(value).__name__ == "_ErrorConfig":
            cause = object.__getattribute__(value, "_error")
            text = " ".join(str(cause).split())
            errors.append(f"--{name}={flag.serialize().split('=', 1)[-1]}: {text}")
    return errors


def _parse_flags(argv):
    try:
        remaining = flags.FLAGS(argv)
        errors = _config_load_errors()
        if errors:
            fail("\n".join(errors))
        return remaining
    except SystemExit as e:
        if e.code == 1 and any(a.split("=")[0] in _HELP_FLAGS for a in argv[1:]):
            sys.exit(0)  # absl exits with 1 after printing the help.
        raise
    except flags.Error as e:
        if debug_requested(argv):
            raise
        fail(f"{_without_traceback(str(e))} (--help lists the flags).")
    except Exception as e:
        if debug_requested(argv):
            raise
        fail(_flag_error_message(e, argv))


def _guarded(main):
    def wrapped(argv):
        try:
            return main(argv)
        except KeyboardInterrupt:
            if debug_requested():
                raise
            print("interrupted.", file=sys.stderr, flush=True)
            sys.exit(130)
        except (ValueError, OSError) as e:
            if not raised_by_project(e):
                raise  # A bug, not bad input: keep the traceback.
            if debug_requested():
                traceback.print_exc()
            fail(str(e))

    return wrapped


def run(main) -> None:
    """`absl.app.run(main)` with the behaviour described in the module docstring."""
    app.run(_guarded(main), flags_parser=_parse_flags)
