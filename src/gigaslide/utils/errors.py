"""The exception for problems the user must fix (as opposed to bugs).

The command line prints a :class:`UserError` (like ``ValueError`` and ``OSError``) as one line,
``gigaslide COMMAND: error: MESSAGE``, with exit status 2 and no traceback hint. Subclass it for
states that are neither bad values nor failing I/O, such as an output folder held by another run.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input or a state the user must change; the message names the file and the fix."""
