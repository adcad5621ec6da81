"""Training checkpoints with orbax: train state plus the data iterator's position.

Each step directory holds `state` (params, optimizer state, step, rng; sharded arrays written by
every host) and `data` (the input iterator's JSON state). Saves are asynchronous; the last K are
kept. Restoring walks back from the newest step: a checkpoint that fails to restore (truncated,
corrupt, half-deleted) is reported with a warning and the previous one is used.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
from jax.experimental import multihost_utils

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


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
        self._manager = ocp.CheckpointManager(self._directory, options=options)

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

    def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
        """(step, state, data_state) of the newest checkpoint that restores, or None if none.

        `abstract_state` gives the target shapes, dtypes and shardings (the current mesh's), so a
        run resumes on a different topology.
        """
        self._manager.wait_until_finished()
        bad = []
        found = None
        for step in reversed(self.all_steps()):
            try:
                restored = self._manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
                found = step, restored.state, restored.data
                break
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                logging.warning(
                    "checkpoint at step %d could not be restored (%s: %s); trying the "
                    "previous one",
                    step,
                    type(e).__name__,
                    e,
                )
                bad.append(step)
        if bad:
            self._set_aside(bad)
        return found

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
                restored = self._manager.restore(
                    step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
                )
                return step, restored.state["params"]
            except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
                logging.warning("checkpoint at step %d could not be restored (%s: %s); trying the "
                                "previous one", step, type(e).__name__, e)
        return None

    def reached_preemption(self, step: int) -> bool:
        return self._manager.reached_preemption(step)

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
