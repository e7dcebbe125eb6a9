"""Where our builders look for data files, and the fast one-line error when they are missing.

Files a user supplies go to tfds's manual directory, `<data_dir>/downloads/manual/`, under
their official names. Offline, tfds's download manager retries for minutes before failing,
so builders ask `online()` first (one DNS lookup and TCP connect, a few seconds at most).
"""

import hashlib
import os
import socket
import urllib.parse
from pathlib import Path

from research.errors import MissingDataError

CONNECT_TIMEOUT_S = 3.0


def data_dir_path(data_dir: str | None) -> Path:
    """The tfds data directory in use: tfds's default ($TFDS_DATA_DIR or ~/tensorflow_datasets) when empty."""
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")).expanduser()


def manual_dir(data_dir: str | None) -> Path:
    """tfds's default manual-download directory under `data_dir`."""
    return data_dir_path(data_dir) / "downloads" / "manual"


def manual_dir_of(dl_manager) -> Path | None:
    """The download manager's manual directory, or None when it is absent or empty."""
    try:
        return Path(dl_manager.manual_dir)
    except (AssertionError, ValueError):  # tfds raises these for a missing or empty directory
        return None


def online(url: str) -> bool:
    """Whether `url`'s host answers a TCP connect within a few seconds."""
    parsed = urllib.parse.urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port or 443), timeout=CONNECT_TIMEOUT_S):
            return True
    except OSError:
        return False


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def find_files(directory: Path | None, names: list[str]) -> dict[str, Path] | None:
    """`{name: path}` when every name exists in `directory`, else None."""
    if directory is None:
        return None
    paths = {name: directory / name for name in names}
    return paths if all(path.is_file() for path in paths.values()) else None


def missing(dataset: str, names: list[str], directory: Path, hint: str = "") -> MissingDataError:
    """The one-line error for files that are neither in `directory` nor downloadable now."""
    listed = ", ".join(names)
    return MissingDataError(
        f"dataset {dataset!r} is not available offline: put {listed} in {directory} (or connect to the internet){hint}"
    )
