"""The one exception type a user should ever see from quanta.

Every error that bad input can cause derives from :class:`QuantaError`; stages print it
as a single line (what is wrong, and the fix) and exit non-zero, with no traceback.
Anything else escaping a stage is a bug, and keeps its traceback.
"""


class QuantaError(Exception):
    """Bad input or environment, described in one line that names the fix."""
