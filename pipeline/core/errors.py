"""The one exception type a user should ever see from quanta.

Every error that bad input can cause derives from :class:`QuantaError`; stages print it
as a single line (what is wrong, and the fix) and exit non-zero, with no traceback. The
machine's own refusals (a read-only folder, a full disk, a missing file) arrive as OSError
from wherever the write or read happened; :func:`os_error_line` turns them into one line
too. Anything else escaping a stage is a bug, and keeps its traceback.
"""

import errno


class QuantaError(Exception):
    """Bad input or environment, described in one line that names the fix."""


def os_error_line(e: OSError) -> str:
    """One line for an OSError: what failed, on which path, and what to do about it."""
    where = f" {e.filename}" if getattr(e, "filename", None) else ""
    if e.errno == errno.ENOSPC:
        return f"no space left on the device while writing{where}; free space or point cache/ at a larger disk, then rerun"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write{where}: {e.strerror or 'permission denied'}; make cache/ writable, then rerun"
    return f"{e.strerror or type(e).__name__}:{where or ' ' + str(e)}"
