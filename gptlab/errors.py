"""The one exception type that means "your input, not our bug".

A :class:`UserError` is an expected failure the user fixes: a missing or malformed file, a value out of range,
an unreachable service. Its message names the file or field and what was expected, and callers (the stages'
``main``, the ``gptlab`` command) show it as one line. Any other exception is a bug and keeps its traceback.
The library's own input errors (:class:`gptlab.checkpoint.CheckpointError`, the format readers' errors …)
derive from it. It is a ``ValueError`` (bad input), so callers that catch one keep working; the errors that
have always been ``RuntimeError`` (a NaN loss, an unreachable server) are both.
"""

from __future__ import annotations


class UserError(ValueError):
    """An expected, user-fixable failure; the message is the whole story (one line)."""
