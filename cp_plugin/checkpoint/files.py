"""Where checkpoints are written, and whether one is whole: what every format shares on the filesystem.

A save never leaves half a checkpoint under its name: each format writes next to the target and
renames into place once complete (:func:`put_in_place`), so :func:`is_complete` can tell, without
reading a tensor, a finished checkpoint from one a crash cut short.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch.distributed as dist

META_FILE = "meta.pt"  # lightning.fabric.utilities.load._METADATA_FILENAME: ModelParallelStrategy's name
DCP_METADATA = ".metadata"  # torch.distributed.checkpoint.filesystem: written last, by the coordinator


def rank() -> int:
    """This process's rank (0 outside a process group): rank 0 writes what one process writes."""
    return dist.get_rank() if dist.is_initialized() else 0


def is_local(path: Any) -> bool:
    """Whether a checkpoint path is on a local or mounted filesystem (not an fsspec URL like ``s3://``)."""
    return "://" not in str(path)


def is_sharded(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint directory (complete or not) rather than a one-file checkpoint."""
    return Path(path).is_dir()


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a checkpoint a run can resume from: a sharded directory whose save finished, or a
    one-file checkpoint that is a whole zip archive (``torch.save`` 's format; a truncated one lacks its end record).

    Cheap (no tensor is read): meant for picking the newest usable checkpoint, e.g. ``resume=auto``.
    """
    path = Path(path)
    if path.is_dir():
        return all((path / name).is_file() for name in (DCP_METADATA, META_FILE))
    return path.is_file() and zipfile.is_zipfile(path)


def check_complete(path: str | os.PathLike) -> None:
    """Raise, naming the checkpoint and a fix, if ``path`` is not a checkpoint whose save finished."""
    if not Path(path).exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; pass a checkpoint file or directory")
    if not is_complete(path):
        lacking = [name for name in (DCP_METADATA, META_FILE) if not (Path(path) / name).is_file()] \
            if is_sharded(path) else ["its zip end record"]
        raise ValueError(
            f"checkpoint {path} is incomplete (its save was interrupted: it lacks {', '.join(lacking)}); "
            "resume from an earlier checkpoint (cp_plugin.checkpoint.is_complete tells which are whole)"
        )


def partial_path(path: Path) -> Path:
    """The hidden sibling a checkpoint is written to before :func:`put_in_place` gives it ``path`` 's name."""
    return path.with_name(f".{path.name}.partial")


def put_in_place(written: Path, path: Path) -> None:
    """Rename a finished checkpoint (file or directory) to ``path``, replacing what is there.

    The old checkpoint is renamed aside, not deleted, until the new one has its name: at no moment does
    ``path`` hold a partial checkpoint (a crash in between leaves the old one as ``.<name>.replaced``).
    """
    replaced = path.with_name(f".{path.name}.replaced")
    remove(replaced)
    if path.exists() or path.is_symlink():
        path.rename(replaced)
    written.rename(path)
    remove(replaced)


def remove(path: Path) -> None:
    """Delete a file, link or directory tree, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
