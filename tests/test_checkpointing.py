"""Checkpointer (m2jax/train/checkpointing.py): a config change is an error that touches nothing,
an unreadable checkpoint falls back to the previous one, none readable is an error listing them,
the data iterator's state goes through grain's handler, failed writes are one clear error; and
asynchronous saves inside the training loop are complete and resume exactly like synchronous
ones."""

import json
import logging
import os
import signal

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from flax import nnx

import m2jax
from m2jax import sharding as shd
from m2jax.optim import OptimizerConfig, make_optimizer
from m2jax.train.checkpointing import Checkpointer
from m2jax.train.errors import CheckpointError, CheckpointMismatchError, WorkdirError
from m2jax.train.loop import LoopSettings, train_loop
from m2jax.train.step import TrainState
from train_fixtures import snapshot

CFG = m2jax.get_model_config("tiny")


def _abstract(tree):
    return jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree
    )


def _toy_state(step: int, width: int = 3, dtype=jnp.float32) -> dict:
    return {"step": jnp.int32(step), "params": {"w": jnp.arange(width, dtype=dtype) + step,
                                               "b": jnp.full((2, 2), step, jnp.int32)}}


def _numbers(start: int = 0):
    """A grain iterator of 0, 1, 2, ... positioned at `start`."""
    it = iter(grain.MapDataset.range(1000).to_iter_dataset())
    for _ in range(start):
        next(it)
    return it


def _checkpointer(directory, **kw) -> Checkpointer:
    return Checkpointer(epath.Path(directory), keep=kw.get("keep", 10), async_save=False)


def _save(directory, states: dict[int, dict]) -> None:
    ckpt = _checkpointer(directory)
    for step, state in states.items():
        ckpt.save(step, state, _numbers(step))
    ckpt.close()


def _model_train_state(cfg) -> TrainState:
    """A train state of the trainer's layout; zeros (from the abstract model) are enough here."""
    abstract = nnx.state(m2jax.abstract_model(m2jax.M2BertForMaskedLM, cfg), nnx.Param)
    params = jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, x.dtype), abstract)
    tx = make_optimizer(OptimizerConfig(lr=1e-3, total_steps=10), params)
    return TrainState(jnp.zeros((), jnp.int32), params, tx.init(params), jax.random.PRNGKey(0))


def test_restore_sets_the_data_iterator_to_its_saved_position(tmp_path):
    _save(tmp_path, {1: _toy_state(1), 2: _toy_state(2)})
    ckpt = _checkpointer(tmp_path)
    numbers = _numbers()
    step, state = ckpt.restore_latest(_abstract(_toy_state(0)), numbers)
    assert step == 2 and next(numbers) == 2
    np.testing.assert_array_equal(state["params"]["w"], [2.0, 3.0, 4.0])
    ckpt.close()


def test_shape_mismatch_is_an_error_naming_the_entry_and_keeps_both_checkpoints(tmp_path):
    _save(tmp_path, {1: _toy_state(1), 2: _toy_state(2)})
    before = snapshot(tmp_path)
    ckpt = _checkpointer(tmp_path)
    with pytest.raises(CheckpointMismatchError) as e:
        ckpt.restore_latest(_abstract(_toy_state(0, width=4)), _numbers())
    message = str(e.value)
    assert "step 2" in message and "params/w: checkpoint float32[3], current float32[4]" in message
    assert "another workdir" in message and "params/b" not in message  # only what differs
    assert snapshot(tmp_path) == before and ckpt.all_steps() == [1, 2]
    ckpt.close()


def test_dtype_mismatch_is_an_error(tmp_path):
    _save(tmp_path, {1: _toy_state(1)})
    ckpt = _checkpointer(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"params/w: checkpoint float32\[3\], "
                                                      r"current bfloat16\[3\]"):
        ckpt.restore_latest(_abstract(_toy_state(0, dtype=jnp.bfloat16)), _numbers())
    assert ckpt.all_steps() == [1]
    ckpt.close()


@pytest.mark.parametrize("saved_residual, current_residual, phrase", [
    (True, False, "in the checkpoint (float32[32]), not in the current state"),
    (False, True, "not in the checkpoint (current float32[32])"),
])
def test_missing_or_extra_parameters_are_an_error(tmp_path, saved_residual, current_residual,
                                                  phrase):
    """`residual_long_conv` adds a second filter set per layer: a structure change."""
    _save(tmp_path, {2: _model_train_state(CFG.replace(residual_long_conv=saved_residual))})
    before = snapshot(tmp_path)
    current = _model_train_state(CFG.replace(residual_long_conv=current_residual))
    ckpt = _checkpointer(tmp_path)
    with pytest.raises(CheckpointMismatchError) as e:
        ckpt.restore_latest(_abstract(current), _numbers())
    message = str(e.value)
    # 2 layers x (bias_D, freq, z, 2 MLPs of 7 arrays) = 34 params, each with Adam's mu and nu.
    assert "(102 differing entries)" in message and "... and 90 more" in message
    assert f"params/bert/layers/0/attention/filter_fn2/bias_D: {phrase}" in message
    assert snapshot(tmp_path) == before
    ckpt.close()


def _zero_every_file(step_dir) -> None:
    for root, _, files in os.walk(step_dir):
        for name in files:
            open(os.path.join(root, name), "w").close()


def _truncate_array_data(step_dir) -> None:
    """Cuts every array-data file in half; the tree metadata stays readable."""
    cut = 0
    for root, _, files in os.walk(step_dir):
        if os.path.basename(root) == "d":
            for name in files:
                path = os.path.join(root, name)
                os.truncate(path, os.path.getsize(path) // 2)
                cut += 1
    assert cut > 0


def _truncate_data_state(step_dir) -> None:
    """Cuts the data iterator's JSON state short: not JSON any more."""
    with open(os.path.join(step_dir, "..", "data", "process_0-of-1.json"), "r+") as f:
        f.truncate(5)


# When a tensorstore read fails, orbax closes its event loop before tensorstore's last callback
# arrives ("Event loop is closed", printed and ignored): noise of the failed read, not of ours.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [_zero_every_file, _truncate_array_data, _truncate_data_state])
def test_unreadable_newest_checkpoint_falls_back_to_the_previous(tmp_path, caplog, damage):
    _save(tmp_path, {1: _toy_state(1), 2: _toy_state(2)})
    damage(str(tmp_path / "2" / "state"))
    ckpt = _checkpointer(tmp_path)
    numbers = _numbers()
    with caplog.at_level(logging.WARNING):
        step, state = ckpt.restore_latest(_abstract(_toy_state(0)), numbers)
    assert step == 1 and next(numbers) == 1
    np.testing.assert_array_equal(state["params"]["w"], [1.0, 2.0, 3.0])
    assert "checkpoint at step 2 could not be restored" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ["1", "2.unreadable-0"]
    ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_readable_checkpoint_is_an_error_listing_them_unless_restarting(tmp_path):
    _save(tmp_path, {1: _toy_state(1), 2: _toy_state(2)})
    _zero_every_file(tmp_path / "1" / "state")
    _truncate_array_data(tmp_path / "2" / "state")
    before = snapshot(tmp_path)
    ckpt = _checkpointer(tmp_path)
    with pytest.raises(CheckpointError, match=r"(?s)no checkpoint in .* can be read:\n  step 1: "
                                              r".*\n  step 2: .*--restart"):
        ckpt.restore_latest(_abstract(_toy_state(0)), _numbers())
    assert snapshot(tmp_path) == before
    # --restart: set aside, start from scratch.
    assert ckpt.restore_latest(_abstract(_toy_state(0)), _numbers(), restart=True) is None
    assert sorted(os.listdir(tmp_path)) == ["1.unreadable-0", "2.unreadable-0"]
    ckpt.close()


def test_a_data_state_that_does_not_fit_the_pipeline_is_an_error_naming_it(tmp_path):
    _save(tmp_path, {3: _toy_state(3)})
    (tmp_path / "3" / "data" / "process_0-of-1.json").write_text(json.dumps({"foo": 1}))
    before = snapshot(tmp_path)
    ckpt = _checkpointer(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"data iterator state saved at step 3 "
                                                      r"\(.*process_0-of-1.json\) does not fit"):
        ckpt.restore_latest(_abstract(_toy_state(0)), _numbers())
    assert snapshot(tmp_path) == before
    ckpt.close()


def test_a_failed_write_is_one_error_naming_the_step_and_the_checkpoint_kept(tmp_path,
                                                                            monkeypatch):
    ckpt = _checkpointer(tmp_path)
    ckpt.save(1, _toy_state(1), _numbers(1))

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt._manager, "save", no_space)
    with pytest.raises(WorkdirError, match=r"checkpoint of step 2 .*No space left on device.*"
                                           r"checkpoint of step 1 is kept"):
        ckpt.save(2, _toy_state(2), _numbers(2))
    ckpt.close()


def test_device_errors_are_not_taken_for_a_damaged_checkpoint(tmp_path, monkeypatch):
    _save(tmp_path, {1: _toy_state(1)})
    ckpt = _checkpointer(tmp_path)

    def out_of_memory(*args, **kwargs):
        raise MemoryError("placing the restored arrays")

    monkeypatch.setattr(ckpt._manager, "restore", out_of_memory)
    with pytest.raises(MemoryError):
        ckpt.restore_latest(_abstract(_toy_state(0)), _numbers())
    assert sorted(os.listdir(tmp_path)) == ["1"]
    ckpt.close()


# ---------------------------------------------------------------------------------------------
# Asynchronous checkpointing inside the training loop.

TOTAL_STEPS, BATCH = 6, 4
LOOP_CFG = CFG.replace(num_hidden_layers=1)  # one layer: compiling the step is most of the time
OPTIMIZER = OptimizerConfig(lr=3e-3, warmup_fraction=0.2, clip_norm=1.0, total_steps=TOTAL_STEPS)


def _batch(index: int) -> dict[str, np.ndarray]:
    """MLM batch number `index`: fixed random tokens, a third of them predicted."""
    L = LOOP_CFG.max_position_embeddings
    rng = np.random.default_rng(index)
    ids = rng.integers(1, LOOP_CFG.vocab_size, (BATCH, L)).astype(np.int32)
    labels = np.where(rng.random((BATCH, L)) < 0.3, ids, -100).astype(np.int32)
    return {"input_ids": ids, "token_type_ids": np.zeros_like(ids),
            "attention_mask": np.ones_like(ids), "labels": labels}


class _SigtermOnFetch:
    """Batches that send this process SIGTERM (a preemption) when batch `n` is fetched;
    checkpointed through grain's handler like any non-grain iterator (bytes)."""

    def __init__(self, inner, n: int):
        self._inner, self._n, self._fetched = inner, n, 0

    def __next__(self):
        self._fetched += 1
        if self._fetched == self._n:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self._inner)

    def get_state(self) -> bytes:
        return json.dumps(self._inner.get_state()).encode()

    def set_state(self, state: bytes) -> None:
        self._inner.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        pass


def _train(workdir, *, async_save: bool, sigterm_at_fetch: int = 0, model_cfg=LOOP_CFG) -> dict:
    batches = iter(grain.MapDataset.range(10**6).map(_batch).to_iter_dataset())
    if sigterm_at_fetch:
        batches = _SigtermOnFetch(batches, sigterm_at_fetch)
    model = m2jax.M2BertForMaskedLM(model_cfg, rngs=nnx.Rngs(0))
    settings = LoopSettings(workdir=epath.Path(workdir), task="mlm", total_steps=TOTAL_STEPS,
                            global_batch_size=BATCH, log_every=1, eval_every=0,
                            checkpoint_every=2, checkpoint_keep=3, async_save=async_save)
    mesh = shd.make_mesh({"data": 1, "fsdp": 1, "tensor": 1})
    before = signal.getsignal(signal.SIGTERM)
    results, _ = train_loop(model, batches, OPTIMIZER, None, settings, mesh)
    assert signal.getsignal(signal.SIGTERM) == before  # the loop put the handler back
    return results


def _stored(workdir, step: int):
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore()))
        data = json.loads((epath.Path(workdir) / "checkpoints" / str(step) / "data"
                           / "process_0-of-1.json").read_text())
        return restored.state, data
    finally:
        manager.close()


def _assert_same_checkpoint(workdir_a, workdir_b, step: int) -> None:
    (state_a, data_a), (state_b, data_b) = _stored(workdir_a, step), _stored(workdir_b, step)
    assert data_a == data_b and int(state_a["step"]) == step
    leaves_a, leaves_b = jax.tree_util.tree_leaves(state_a), jax.tree_util.tree_leaves(state_b)
    assert len(leaves_a) == len(leaves_b) > 50  # params, both Adam moments, counters, rng
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_array_equal(a, b)


def _losses(results: dict) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in results["train"]}


@pytest.fixture(scope="module")
def sync_run(tmp_path_factory) -> tuple[str, dict]:
    """An uninterrupted run with synchronous saves (checkpoints 2, 4, 6); tests only read it."""
    workdir = tmp_path_factory.mktemp("sync")
    results = _train(workdir, async_save=False)
    assert results["status"] == "completed" and sorted(_losses(results)) == list(range(1, 7))
    return str(workdir), results


def test_async_checkpoints_are_complete_and_resume_like_synchronous_ones(sync_run, tmp_path,
                                                                          capsys):
    sync_dir, sync = sync_run
    # Asynchronous saves; SIGTERM while fetching batch 3: step 3 is saved on the way out.
    first = _train(tmp_path, async_save=True, sigterm_at_fetch=3)
    assert first["status"] == "preempted" and first["step"] == 3
    ckpt_dir = tmp_path / "checkpoints"
    # Only committed step directories (no orbax temporary ones), each holding what the
    # synchronous run wrote at that step, bit for bit.
    assert sorted(os.listdir(ckpt_dir)) == ["2", "3"]
    _assert_same_checkpoint(tmp_path, sync_dir, 2)
    state3, data3 = _stored(tmp_path, 3)
    assert int(state3["step"]) == 3 and data3 == {"next_index": 3}

    capsys.readouterr()
    second = _train(tmp_path, async_save=True)
    assert "resumed from step 3" in capsys.readouterr().out
    # results.json keeps the first attempt's history: one entry per step, both attempts listed.
    assert second["status"] == "completed" and sorted(_losses(second)) == list(range(1, 7))
    assert [(a["start_step"], a["end_step"], a["status"]) for a in second["attempts"]] == [
        (0, 3, "preempted"), (3, 6, "completed")]
    np.testing.assert_allclose([_losses(second)[s] for s in range(1, 7)],
                               [_losses(sync)[s] for s in range(1, 7)], rtol=1e-6)
    assert sorted(os.listdir(ckpt_dir)) == ["3", "4", "6"]  # keep=3
    _assert_same_checkpoint(tmp_path, sync_dir, 6)


def test_resuming_with_another_model_config_is_refused_and_changes_nothing(sync_run):
    sync_dir, _ = sync_run
    before = snapshot(sync_dir)
    wider = LOOP_CFG.replace(intermediate_size=2 * LOOP_CFG.intermediate_size)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)step 6 .*params/bert/layers/0/mlp/"
                                                      r"gated_layers/weight: checkpoint float32"
                                                      r"\[4, 32, 8\], current float32\[4, 64, 8\]"):
        _train(sync_dir, async_save=False, model_cfg=wider)
    assert snapshot(sync_dir) == before
