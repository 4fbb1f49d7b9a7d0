"""The root of qualiface's own errors, and the errors shared by more than one family.

Every error that qualiface raises on purpose for a bad input, file, config or run derives from
:class:`QualifaceError`, so a command line front end catches that one class and prints the
message (which names the offending file or key) as one line instead of a traceback. Each family
keeps its own class next to the code that raises it (``ConfigError`` in ``qualiface.config``,
``RecordIOError`` in ``qualiface.data.recordio``, ``ModelPackageError`` in ``qualiface.package``
...), derived from ``QualifaceError`` and, where callers rely on it, from the built-in it always
was (``ValueError``, ``RuntimeError``, ``KeyError``, ``OSError``): ``except ValueError`` around a
qualiface call keeps working.

Errors used by several families live here, in a module that imports nothing, so the low layers
(``data``, ``scoring``) and the wings (``train``, ``eval``, ``infer``) can all raise them:

* :class:`DataError`: data that cannot be used, from reading a file (``qualiface.data``) to
  building training batches (``qualiface.train``). ``qualiface.data.decode.DataError`` and
  ``qualiface.train.data.DataError`` are this class.
* :class:`EvaluationError`: inputs an evaluation or a score cannot use.
  ``qualiface.eval.EvaluationError`` is this class.

Not every exception from qualiface is a ``QualifaceError``: a wrong argument type in library code
(a programming error) still raises ``TypeError``, a missing file ``FileNotFoundError`` where it is
not wrapped, and a failed write the :class:`qualiface.files.FileWriteError` (an ``OSError`` that
is also a ``QualifaceError``).
"""

from __future__ import annotations


class QualifaceError(Exception):
    """Base class of every error qualiface raises on purpose; ``str(exc)`` is the whole message."""


class DataError(QualifaceError, ValueError):
    """Data that cannot be used: an unreadable or hostile file, a bad record, an empty or too
    small training set (a ``ValueError``)."""


class EvaluationError(QualifaceError, ValueError):
    """Inputs an evaluation cannot use (mismatched lengths, no genuine pairs, bad file, ...).

    The message names the offending input (and the file, when one is involved).
    """
