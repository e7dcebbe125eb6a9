"""A failed file operation (a full disk, a permission, a directory removed under the run) as one line that names
the newest intact checkpoint: the loop raises it as a StorageError, launch.py prints it (exit status 4)."""

import errno
import re

from research import checkpoint

# tensorstore's status codes for a failed file operation (orbax's array writes raise them as ValueError)
STORAGE_STATUSES = ("RESOURCE_EXHAUSTED", "PERMISSION_DENIED", "DATA_LOSS")


def is_storage_failure(error: BaseException) -> bool:
    """A failed file operation: an OSError, or tensorstore's status for one."""
    return isinstance(error, OSError) or (isinstance(error, ValueError) and str(error).startswith(STORAGE_STATUSES))


def storage_failure(error: BaseException, manager) -> str:
    """One line for a failed file operation: what failed, the newest intact checkpoint, what to do."""
    if not isinstance(error, OSError):  # tensorstore's status: the OS error it carries, and its file
        text = str(error)
        path = re.search(r'"([^"]+)"', text)
        for number, reason in ((errno.ENOSPC, "No space left on device"), (errno.EACCES, "Permission denied")):
            if reason in text or f"os_error_code='{number}'" in text:
                return storage_failure(OSError(number, reason, path.group(1) if path else None), manager)
        return storage_failure(OSError(text.splitlines()[0][:300]), manager)
    where = f": {error.filename}" if error.filename else ""
    return (
        f"{type(error).__name__}: {error.strerror or error}{where}; the run stopped and "
        f"{checkpoint.newest_complete(manager)}: "
        "free space or fix the permissions, then rerun the same command to resume"
    )
