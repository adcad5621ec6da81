"""Training checkpoints with orbax: train state plus the data iterator's position.

Each step directory holds `state` (params, optimizer state, step, rng; sharded arrays written by
every host) and `data` (the input iterator's JSON state). Saves are asynchronous; the last K are
kept. Restoring walks back from the newest step and tells two failures apart:

- a checkpoint that cannot be read (truncated, corrupt, half-deleted files) is reported with a
  warning, set aside, and the previous one is used;
- a readable checkpoint whose tree, shapes or dtypes differ from the restore target (the config
  changed under an existing work directory) stops with `CheckpointMismatchError`, and nothing in
  the directory is touched: falling back would silently restart the run from step 0.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


# How many differing entries a mismatch error lists (a changed width touches every layer, and
# each parameter's optimizer moments too).
MAX_LISTED_MISMATCHES = 12


class CheckpointMismatchError(ValueError):
    """A readable checkpoint that does not fit the current model or optimizer."""


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


def _mismatch_message(directory: str, step: int, problems: list[str]) -> str:
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


class Checkpointer:
    """Owns saving, keeping and resuming for one work directory."""

    def __init__(self, directory: str, *, save_every: int, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            save_decision_policy=policies.AnySavePolicy(
                [
                    policies.FixedIntervalPolicy(save_every),
                    policies.PreemptionCheckpointingPolicy(),
                ]
            ),
            preservation_policy=policies.LatestN(keep),
            enable_async_checkpointing=async_save,
            create=True,
        )
        # orbax requires absolute paths (a relative --workdir is common on the command line).
        self._directory = os.path.abspath(directory)
        # Registered handlers let a new manager read a step's item metadata before restoring.
        handlers = ocp.handlers.create_default_handler_registry(
            state=ocp.StandardCheckpointHandler(), data=ocp.JsonCheckpointHandler()
        )
        self._manager = ocp.CheckpointManager(
            self._directory, options=options, handler_registry=handlers
        )

    def save(self, step: int, state: Any, data_state: dict, *, force: bool = False) -> bool:
        """Saves when the policy says so (or `force`); returns whether a save started."""
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=force,
        )

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def restore(self, step: int, abstract_state: Any = None) -> tuple[Any, dict]:
        """(state, data_state) of checkpoint `step`, restored into `abstract_state` (target
        shapes, dtypes and shardings); with None, the state as stored, as nested dicts of arrays.

        Raises `CheckpointMismatchError` when the checkpoint reads but does not fit
        `abstract_state`; any other error means its files (or the device) failed.
        """
        self._manager.wait_until_finished()
        if abstract_state is not None:
            # Compared before restoring: orbax's own error for a misfit looks like any read error.
            problems = state_mismatches(self._stored_state(step), abstract_state)
            if problems:
                raise CheckpointMismatchError(_mismatch_message(self._directory, step, problems))
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return restored.state, restored.data

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of the newest checkpoint that restores, or None if none.

        `abstract_state` gives the target shapes, dtypes and shardings (the current mesh's), so a
        run resumes on a different topology. Unreadable checkpoints are skipped (and set aside
        once a usable one is found or none is left); a readable one that does not fit
        `abstract_state` raises `CheckpointMismatchError` and leaves every checkpoint in place.
        """
        bad = []
        found = None
        for step in reversed(self.all_steps()):
            try:
                state, data_state = self.restore(step, abstract_state)
            except (CheckpointMismatchError, MemoryError, jax.errors.JaxRuntimeError):
                # A config change, or the device (out of memory placing the arrays): the
                # checkpoint itself is fine, so nothing may be set aside.
                raise
            except Exception as e:  # noqa: BLE001 - truncated, corrupt or half-deleted files
                self._warn_unreadable(step, e)
                bad.append(step)
                continue
            found = step, state, data_state
            break
        if bad:
            self._set_aside(bad)
        return found

    def _stored_state(self, step: int) -> Any:
        """The stored `state` tree of `step` (per entry: shape, dtype), read from its metadata."""
        meta = self._manager.item_metadata(step)
        state = meta["state"] if meta is not None else None
        if state is None:
            raise ValueError(f"no readable state metadata in step {step}")
        return getattr(state, "tree", state)

    @staticmethod
    def _warn_unreadable(step: int, error: Exception) -> None:
        logging.warning(
            "checkpoint at step %d could not be restored (%s: %s); trying the previous one",
            step,
            type(error).__name__,
            error,
        )

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unusable step directories to `<step>.unreadable-<n>`: kept for inspection, but
        out of the way of the new checkpoints that will be written at those steps."""
        if jax.process_index() == 0:
            for step in steps:
                src = os.path.join(self._directory, str(step))
                n = 0
                while os.path.exists(f"{src}.unreadable-{n}"):
                    n += 1
                os.rename(src, f"{src}.unreadable-{n}")
                logging.warning("moved unreadable checkpoint %s to %s.unreadable-%d", src, src, n)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("m2jax_checkpoint_set_aside")
        self._manager.reload()

    def restore_latest_params(self) -> tuple[int, dict] | None:
        """(step, params) of the newest readable checkpoint, as nested dicts of arrays (no target
        needed: used to initialise another model from a training run's work directory)."""
        self._manager.wait_until_finished()
        for step in reversed(self.all_steps()):
            try:
                return step, self.restore(step)[0]["params"]
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                self._warn_unreadable(step, e)
        return None

    def reached_preemption(self, step: int) -> bool:
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
