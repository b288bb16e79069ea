"""The one exception of `peagle eval`: unusable evaluation input, shown to the user as one line.

Its own module so that every stage of the package (prompts, continuations, tables, rounds) can
raise it without importing the others.
"""

from __future__ import annotations

__all__ = ["EvalError"]


class EvalError(ValueError):
    """Unusable evaluation input (prompt too long, bad prompt file, draft/target mismatch)."""
