"""Errors raised where a bad value enters.

`InputError` means the caller gave something unusable (wrong shape, bad key, missing file); the command
line maps it to exit status 2 and prints its one-line message. Anything else is a bug or an
environment failure (exit status 1); `NonFiniteError` is one of those the command line reports in one
line.
"""


class InputError(ValueError):
    """A bad input: the message names the value at fault and how to fix it."""


class FactorizationError(InputError):
    """A Cholesky factorisation failed even after raising the damping."""


class NonFiniteError(RuntimeError):
    """Activations became NaN or inf during calibration (e.g. a block overflowing float16); the message
    names the block and the stream. Nothing is written."""


def suggest(word: str, options, prefix: str = "") -> str:
    """` (did you mean 'X'?)` for the option closest to a misspelled `word`, or nothing."""
    import difflib
    close = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""
