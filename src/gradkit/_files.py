"""Files and folders gradkit writes: checked before any work starts."""

from __future__ import annotations

from pathlib import Path

__all__ = ["make_writable_dir"]


def make_writable_dir(path: Path) -> None:
    """Create `path` (with parents) and write and delete a probe file there.

    Raises:
        OSError: the folder cannot be created or written to; callers turn it into
            an error that names their own setting.
    """
    path.mkdir(parents=True, exist_ok=True)
    probe = path / ".gradkit-write-test"
    probe.write_text("")
    probe.unlink()
