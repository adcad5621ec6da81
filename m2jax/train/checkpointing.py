"""Training checkpoints with orbax: the train state plus the input iterator's position.

Each step directory holds `state` (params, optimizer state, step, rng: sharded arrays written by
every host) and `data` (the grain iterator's state, written by grain's own orbax handler, one
file per process). Restoring walks back from the newest step and tells the failures apart:

- a checkpoint that cannot be read (truncated, corrupt, half-deleted files) is reported with a
  warning and the previous one is used; once a usable one is found, the unreadable newer ones
  are renamed `<step>.unreadable-<n>` (kept for inspection, out of the way of new saves);
- when no checkpoint can be read, the run stops with `CheckpointError` listing them and changes
  nothing (`restart=True` sets them all aside and starts over, on purpose);
- a readable checkpoint whose arrays, or whose data-iterator state, do not fit the current model,
  optimizer or input pipeline (the config changed under an existing work directory) stops with
  `CheckpointMismatchError`, and nothing in the directory is touched.

Saves that fail (full disk, lost permissions) raise `WorkdirError` at once, synchronous or not:
the loop polls `check_for_errors` every step. Paths are `etils.epath` paths (local or gs://).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from m2jax.train.errors import (
    CheckpointError,
    CheckpointMismatchError,
    WorkdirError,
)

# How many differing entries a mismatch error lists (a changed width touches every layer, and
# each parameter's optimizer moments too).
MAX_LISTED_MISMATCHES = 12

_UNREADABLE = "unreadable"


def _entry_name(key: tuple[str, ...]) -> str:
    # nnx Variables store their array under "value": `params/bert/.../kernel`, not `.../value`.
    return "/".join(key[:-1] if len(key) > 1 and key[-1] == "value" else key)


def _describe(leaf: Any) -> str:
    """`float32[768, 2304]` for an array or its metadata; the type's name for anything else."""
    dtype, shape = getattr(leaf, "dtype", None), getattr(leaf, "shape", None)
    if dtype is None or shape is None:
        return type(leaf).__name__
    return f"{np.dtype(dtype).name}{list(shape)}"


def state_mismatches(stored: Any, target: Any) -> list[str]:
    """How a checkpoint's stored tree (orbax metadata: shapes and dtypes per entry) differs from
    the restore target, one line per entry, in the target's order; [] when they fit."""
    saved = ocp.tree.to_flat_dict(stored)
    wanted = ocp.tree.to_flat_dict(target)
    problems = []
    for key, want in wanted.items():
        have = saved.get(key)
        if have is None:
            problems.append(
                f"{_entry_name(key)}: not in the checkpoint (current {_describe(want)})"
            )
        elif _describe(have) != _describe(want):
            problems.append(
                f"{_entry_name(key)}: checkpoint {_describe(have)}, current {_describe(want)}"
            )
    problems += [
        f"{_entry_name(key)}: in the checkpoint ({_describe(have)}), not in the current state"
        for key, have in saved.items()
        if key not in wanted
    ]
    return problems


def _mismatch_message(directory: epath.Path, step: int, problems: list[str]) -> str:
    # Optimizer moments repeat their parameter's line: list the parameters first.
    problems = sorted(problems, key=lambda line: line.startswith("opt_state"))
    listed = problems[:MAX_LISTED_MISMATCHES]
    more = len(problems) - len(listed)
    return (
        f"the checkpoint at step {step} in {directory} does not fit the current model and "
        f"optimizer ({len(problems)} differing entries):\n  "
        + "\n  ".join(listed)
        + (f"\n  ... and {more} more" if more else "")
        + "\nThe config differs from the one that wrote this work directory. Nothing was "
        "changed there: resume with the original config, or start the new one in another workdir."
    )


class _Unreadable(Exception):
    """A checkpoint's files failed to read (not a config change): try the previous one."""


class Checkpointer:
    """Owns saving, keeping and resuming for one work directory's `checkpoints/`."""

    def __init__(self, directory: epath.Path, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            # The loop decides when to save (every n steps, at the end, on preemption); the
            # preemption policy is what makes `reached_preemption` answer.
            save_decision_policy=policies.PreemptionCheckpointingPolicy(),
            preservation_policy=policies.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._directory = directory
        import grain

        # Registered handlers let a new manager read a step's item metadata before restoring.
        handlers = ocp.handlers.create_default_handler_registry(
            state=ocp.StandardCheckpointHandler(), data=grain.checkpoint.CheckpointHandler()
        )
        try:
            self._manager = ocp.CheckpointManager(
                directory, options=options, handler_registry=handlers
            )
        except OSError as e:
            raise WorkdirError(f"cannot create the checkpoint directory {directory}: {e}") from None
        self._last_saved = max(self.all_steps(), default=None)
        self._saving: int | None = None

    @property
    def directory(self) -> epath.Path:
        return self._directory

    @property
    def last_saved(self) -> int | None:
        """The newest step known to be completely written."""
        return self._last_saved

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    # -- saving ----------------------------------------------------------------------------

    def save(self, step: int, state: Any, batches: Any) -> None:
        """Saves `state` and the position of the grain iterator `batches` as step `step`.

        Raises WorkdirError (naming the step and the checkpoint kept) when the write fails, here
        or, for an asynchronous save, at the next `check_for_errors`, `save` or `wait`."""
        import grain

        # orbax waits for the previous save before starting one; waiting here first attributes
        # a failure to the step whose save failed.
        self.wait()
        self._saving = step
        try:
            self._manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state),
                    data=grain.checkpoint.CheckpointSave(batches),
                ),
                force=True,
            )
        except Exception as e:  # noqa: BLE001 - any failure to write is the work directory's
            raise self._write_error(step, e) from None

    def check_for_errors(self) -> None:
        """Raises WorkdirError if the asynchronous save in flight has failed (cheap: no wait)."""
        try:
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self._saving, e) from None

    def _write_error(self, step: int | None, error: Exception) -> WorkdirError:
        kept = self._last_saved
        return WorkdirError(
            f"cannot write the checkpoint of step {step} to {self._directory} "
            f"({type(error).__name__}: {_first_line(error)}); "
            + (
                f"the checkpoint of step {kept} is kept and resumes the run"
                if kept is not None
                else "no checkpoint was saved before"
            )
            + ": free space or fix the permissions, then re-run the same command"
        )

    def wait(self) -> None:
        """Blocks until the save in flight is written; raises WorkdirError if it failed."""
        try:
            self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as e:  # noqa: BLE001
            raise self._write_error(self._saving, e) from None
        if self._saving is not None:
            self._last_saved, self._saving = self._saving, None

    def reached_preemption(self, step: int) -> bool:
        """Whether the cluster announced a preemption (all hosts agree on the step)."""
        return self._manager.reached_preemption(step)

    def close(self) -> None:
        self._manager.close()

    # -- restoring -------------------------------------------------------------------------

    def restore_latest(
        self, abstract_state: Any, batches: Any, *, restart: bool = False
    ) -> tuple[int, Any] | None:
        """(step, state) of the newest checkpoint that restores, with `batches` (a grain
        iterator) set to its saved position; None when there is no checkpoint.

        `abstract_state` gives the target shapes, dtypes and shardings (the current mesh's), so
        a run resumes on another topology. See the module docstring for what happens to
        unreadable checkpoints and to ones that do not fit."""
        self.wait()
        unreadable: dict[int, str] = {}
        for step in reversed(self.all_steps()):
            try:
                state = self._restore_state(step, abstract_state)
                self._restore_data(step, batches)
            except _Unreadable as e:
                logging.warning(
                    "checkpoint at step %d could not be restored (%s); trying the previous one",
                    step,
                    e,
                )
                unreadable[step] = str(e)
                continue
            if unreadable:
                self._set_aside(sorted(unreadable))
            self._last_saved = step
            return step, state
        if unreadable and not restart:
            listed = "\n  ".join(f"step {s}: {why}" for s, why in sorted(unreadable.items()))
            raise CheckpointError(
                f"no checkpoint in {self._directory} can be read:\n  {listed}\nNothing was "
                "changed. Restore the files, or re-run with --restart to set them aside and "
                "train again from step 0."
            )
        if unreadable:
            self._set_aside(sorted(unreadable))
        self._last_saved = None
        return None

    def _restore_state(self, step: int, abstract_state: Any) -> Any:
        try:
            stored = self._stored_state(step)
        except Exception as e:  # noqa: BLE001 - no readable metadata: a damaged step
            raise _Unreadable(_first_line(e)) from None
        # Compared before restoring: orbax's own error for a misfit looks like any read error.
        problems = state_mismatches(stored, abstract_state)
        if problems:
            raise CheckpointMismatchError(_mismatch_message(self._directory, step, problems))
        try:
            return self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
            ).state
        except (MemoryError, jax.errors.JaxRuntimeError):
            # The device (out of memory placing the arrays): the checkpoint itself is fine.
            raise
        except Exception as e:  # noqa: BLE001 - truncated, corrupt or half-deleted files
            raise _Unreadable(f"{type(e).__name__}: {_first_line(e)}") from None

    def _restore_data(self, step: int, batches: Any) -> None:
        """Sets `batches` to the position saved at `step` (grain's handler reads the file)."""
        import grain

        folder = self._directory / str(step) / "data"
        name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        try:
            saved = sorted(p.name for p in folder.glob("process_*-of-*.json"))
            if name not in saved:
                if saved:
                    raise CheckpointMismatchError(
                        f"the data iterator state of step {step} in {folder} was saved by "
                        f"another number of processes ({', '.join(saved)}); this run has "
                        f"{jax.process_count()}: resume with the same number of processes"
                    )
                raise _Unreadable(f"{folder / name} is missing")
            json.loads((folder / name).read_text())
        except (OSError, ValueError) as e:
            if isinstance(e, CheckpointMismatchError):
                raise
            raise _Unreadable(f"{folder / name}: {_first_line(e)}") from None
        try:
            self._manager.restore(
                step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(batches))
            )
        except Exception as e:  # noqa: BLE001 - valid JSON that the pipeline cannot take
            raise CheckpointMismatchError(
                f"the data iterator state saved at step {step} ({folder / name}) does not fit "
                f"this input pipeline ({type(e).__name__}: {_first_line(e)}). The data config "
                "(source, batch size, packing, hosts) differs from the run that wrote it, or "
                "the file was edited. Nothing was changed: resume with the original config."
            ) from None

    def _stored_state(self, step: int) -> Any:
        """The stored `state` tree of `step` (per entry: shape, dtype), read from its metadata."""
        meta = self._manager.item_metadata(step)
        state = meta["state"] if meta is not None else None
        if state is None:
            raise ValueError(f"no readable state metadata in step {step}")
        return getattr(state, "tree", state)

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unusable step directories to `<step>.unreadable-<n>`."""
        if jax.process_index() == 0:
            for step in steps:
                src = self._directory / str(step)
                n = 0
                while (self._directory / f"{step}.{_UNREADABLE}-{n}").exists():
                    n += 1
                dst = self._directory / f"{step}.{_UNREADABLE}-{n}"
                src.rename(dst)
                logging.warning("moved unreadable checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("m2jax_checkpoint_set_aside")
        self._manager.reload()

    def restore_latest_params(self) -> tuple[int, dict] | None:
        """(step, params) of the newest readable checkpoint, as nested dicts of arrays (no target
        needed: used to initialise another model from a training run's work directory)."""
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
                )
                return step, restored.state["params"]
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                logging.warning(
                    "checkpoint at step %d could not be read (%s)", step, _first_line(e)
                )
        return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
