"""The package's log messages that must appear once: per key, or per user callable."""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger("embedloss_kernels")
_warned: set[str] = set()
_warned_callables: dict[tuple, tuple] = {}


def warn_once(key: str, message: str) -> None:
    """Log ``message`` the first time ``key`` is seen in this process."""
    if key not in _warned:
        _warned.add(key)
        logger.warning(message)


def warn_once_per_callable(kind: str, fn: Callable, message: str) -> None:
    """Log ``message`` the first time ``fn`` is used for ``kind`` ("infonce" / "cosent"). Keyed by the callable's
    identity (a bound method by its function and instance), not its name: two lambdas are two callables. The
    callable is kept alive, so its id cannot be reused by a later one."""
    owner, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
    key = (kind, id(owner), id(func)) if owner is not None and func is not None else (kind, id(fn))
    if key not in _warned_callables:
        _warned_callables[key] = (fn, owner)
        logger.warning(message)
