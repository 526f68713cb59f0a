"""Entry-point wrapper: the project's own errors end a `python -m skipjax.X` run with one line.

    if __name__ == "__main__":
      cli.run(main)

A config, data, conversion, checkpoint or workdir error (and a bad flag value, e.g. an unknown
preset or `--config.x` field, or an `app.UsageError`) prints `error: <message>` to stderr and exits with status 1, without
a traceback; `--traceback` re-raises it with the full traceback instead. Anything else (a bug) is
not caught and shows its traceback as usual.
"""
import logging as py_logging
import re
import sys
from typing import Callable, List, Optional

from absl import app, flags

_TRACEBACK = flags.DEFINE_bool("traceback", False, "Show the full traceback of a config/data/checkpoint error.")

# ValueError covers config validation, data and ConversionError (a ValueError subclass);
# OSError covers missing / unreadable user-given paths and an occupied workdir;
# FloatingPointError is the non-finite-loss stop of the training loop.
PROJECT_ERRORS = (ValueError, OSError, FloatingPointError)


def one_line(error: BaseException) -> str:
  """The error's message on one line (the last non-empty line for a wrapped traceback)."""
  lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  if "Traceback (most recent call last)" in str(error):
    # config_flags wraps the config file's exception with its traceback: keep its message.
    return re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1])
  return " ".join(lines)


def _wants_traceback(argv: List[str]) -> bool:
  return any(a in ("--traceback", "--traceback=true", "--traceback=True", "--traceback=1") for a in argv)


def _fail(message: str) -> None:
  sys.stdout.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(1)


def _parse_flags(argv: List[str]) -> List[str]:
  """Flag parsing whose errors (bad flag value, unknown preset or config field) are one line."""
  try:
    return flags.FLAGS(argv)
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
    if _wants_traceback(argv):
      raise
    text = one_line(e)
    if isinstance(e, (AttributeError, KeyError)):  # ml_collections: unknown field of a locked config
      raw = str(e).replace("\\n", "\n")
      name = re.search(r"'(\w+)", raw)
      name = name.group(1) if name else ""
      flag = next((a.split("=", 1)[0] for a in argv[1:] if a.startswith("--") and
                   re.search(rf"\.{re.escape(name)}(\.|$)", a.split("=", 1)[0])), name)
      hint = re.search(r'Did you mean "(\w+)"', raw)
      text = f"{flag}: no such config field" + (f" (did you mean {hint.group(1)}?)" if hint else "")
    _fail(text)


class _LibraryInfoFilter(py_logging.Filter):
  """Drops INFO chatter from orbax/jax internals; their warnings and errors still show."""

  def filter(self, record):
    noisy = any(name in record.pathname for name in ("/orbax/", "/jax/_src/"))
    return record.levelno >= py_logging.WARNING or not noisy


def quiet_libraries() -> None:
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.get_absl_handler().addFilter(_LibraryInfoFilter())


def run(main: Callable[[List[str]], Optional[int]], argv: Optional[List[str]] = None) -> None:
  """`absl.app.run(main)` with one-line errors for PROJECT_ERRORS (see module docstring)."""

  def guarded(args):
    try:
      return main(args)
    except (app.UsageError, *PROJECT_ERRORS) as e:  # a UsageError would print the whole --help text
      if _TRACEBACK.value:
        raise
      _fail(one_line(e))

  app.run(guarded, argv=argv, flags_parser=_parse_flags)
