"""The work directory: its layout, and every file operation on it, through `etils.epath`.

`etils.epath` is orbax's own path type: the same code reads and writes a local folder or
`gs://bucket/run` (and any other file system registered with it), so a pod's hosts can share a
work directory on cloud storage. Nothing here uses `os.path` or `open`.

    <workdir>/config.json      the resolved config of the first attempt
    <workdir>/results.json     status, train/eval history of every attempt (m2jax/train/results.py)
    <workdir>/checkpoints/<step>/{state,data}   orbax (m2jax/train/checkpointing.py)
    <workdir>/events.out.tfevents.*   TensorBoard
    <workdir>/final/           the trained model in the reference's layout
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
from etils import epath

from m2jax.train.errors import WorkdirError

CHECKPOINTS = "checkpoints"
RESULTS = "results.json"
CONFIG = "config.json"
FINAL = "final"


def as_path(path: str | os.PathLike) -> epath.Path:
    """`path` as an epath.Path; local paths made absolute (orbax requires it), URIs kept."""
    p = epath.Path(path)
    return p if "://" in os.fspath(p) else p.resolve()


def is_remote(path: epath.Path) -> bool:
    return "://" in os.fspath(path)


def ensure_writable(directory: epath.Path) -> None:
    """Creates `directory` and writes (then removes) a probe file in it, so that a work
    directory that cannot be written stops the run before anything is built."""
    probe = directory / f".write-check-{jax.process_index()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe.write_text("m2jax")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"cannot write the work directory {directory}: {e}") from None


def read_json(path: epath.Path) -> Any | None:
    """The JSON document at `path`, or None when there is no file."""
    if not path.exists():
        return None
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkdirError(
            f"{path} is not valid JSON ({e}); it was written by something else "
            "than m2jax, or by hand: move it away and re-run"
        ) from None


def write_json(path: epath.Path, data: Any) -> bool:
    """Writes `data` to `path` atomically (a temporary file renamed into place), on process 0
    only; leaves the file alone when it already holds exactly this. Returns whether it wrote."""
    if jax.process_index() != 0:
        return False
    text = json.dumps(data, indent=2) + "\n"
    if path.exists() and path.read_text() == text:
        return False
    tmp = path.parent / f".{path.name}.tmp"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as e:
        raise WorkdirError(f"cannot write {path}: {e}") from None
    return True


def copy_file(src: epath.Path, dst: epath.Path) -> None:
    """Copies one file between any two file systems epath knows (local, gs://, ...)."""
    with src.open("rb") as r, dst.open("wb") as w:
        shutil.copyfileobj(r, w, length=16 << 20)


def export_model(model: Any, directory: epath.Path) -> None:
    """`save_pretrained(model)` into `directory` (local or remote) on process 0.

    The files are written locally first and copied under temporary names that are renamed into
    place only when all are complete, so an interrupted export never replaces a complete one.
    """
    from m2jax.pretrained import save_pretrained

    if jax.process_index() != 0:
        return
    with tempfile.TemporaryDirectory() as staging:
        save_pretrained(model, staging)
        files = sorted(p for p in epath.Path(staging).iterdir())
        try:
            directory.mkdir(parents=True, exist_ok=True)
            for f in files:
                copy_file(f, directory / f".{f.name}.tmp")
            for f in files:
                (directory / f".{f.name}.tmp").replace(directory / f.name)
        except OSError as e:
            raise WorkdirError(f"cannot write the exported model to {directory}: {e}") from None


@contextlib.contextmanager
def local_copy(path: epath.Path) -> Iterator[str]:
    """A local file-system path holding what `path` holds: `path` itself when it is local;
    otherwise a temporary copy of the file, or of the directory's files (not its subfolders:
    a checkpoint export is flat)."""
    if not is_remote(path):
        yield os.fspath(path)
        return
    with tempfile.TemporaryDirectory() as staging:
        target = epath.Path(staging) / path.name
        if path.is_dir():
            target.mkdir()
            for f in path.iterdir():
                if not f.is_dir():
                    copy_file(f, target / f.name)
        else:
            copy_file(path, target)
        yield os.fspath(target)
