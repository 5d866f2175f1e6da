"""Catching upstream deprecations (see conftest.py, which applies this to every test)."""

from __future__ import annotations

import contextlib
import logging
import os
import warnings

UPSTREAM = ("transformers", "accelerate", "peft")
_SOURCES = tuple(os.sep + name + os.sep for name in (*UPSTREAM, "leanvlm", "tests"))


class _DeprecationRecords(logging.Handler):
    def __init__(self, found: list[str]):
        super().__init__(logging.WARNING)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "deprecat" in message.lower():
            self.found.append(f"{record.name}: {message}")


def _is_ours_to_fix(warning: warnings.WarningMessage) -> bool:
    """A deprecation raised in an upstream package's frame, or attributed to leanvlm's (or a test's) own call."""
    return issubclass(warning.category, (DeprecationWarning, FutureWarning)) and any(
        source in warning.filename for source in _SOURCES
    )


@contextlib.contextmanager
def upstream_deprecations():
    """Yields a list that fills with the deprecations transformers, accelerate and peft report inside the block,
    through either channel they use: Python warnings, or a transformers logger message (`warning_once`). Other
    warnings pass through unchanged."""
    found: list[str] = []
    handler = _DeprecationRecords(found)
    loggers = [logging.getLogger(name) for name in UPSTREAM]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield found
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    for warning in caught:
        if _is_ours_to_fix(warning):
            found.append(f"{warning.category.__name__} at {warning.filename}:{warning.lineno}: {warning.message}")
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
