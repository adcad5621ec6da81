"""Runs a tiny pretraining job in its own process, the way launch/pretrain.py does (same job,
same console, same exit codes), for the tests of whole runs.

  python tests/drivers/train_driver.py --workdir=W --devices=8 --mesh=2,2,2 [--hosts=2]
      [--process_id=I --num_processes=P --port=N] [--set key=value ...]
      [--kill_after_checkpoint=S | --disk_full_after_checkpoint=S | --sigterm_at_step=S]
      [--fake_gcs=ROOT --workdir=gs://bucket/run] [--then_load=INIT_FROM]

--devices sets the number of fake CPU devices (must happen before jax is imported).
--hosts=K in a single process feeds the concatenation of K simulated hosts' batches, i.e. the
same global batches that K real processes (each reading its own shard) feed together.
Exits with the launch's exit code.
"""

import argparse
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


def tiny_config(overrides: list[str]):
    from configs import pretrain

    c = pretrain.get_config("smoke")
    c.model.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, hyena_filter_order=8,
                   max_position_embeddings=32, long_conv_l_max=32)
    c.global_batch_size, c.total_steps, c.log_every = 8, 6, 1
    c.eval_every, c.eval_steps = 0, 0
    c.checkpoint.every, c.checkpoint.keep, c.checkpoint.async_save = 2, 3, False
    c.data.num_threads = 0
    c.export_final = False
    c.tensorboard = False  # metrics.jsonl: TensorFlow's import is most of a short run's start
    for item in overrides:
        key, value = item.split("=", 1)
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = json.loads(value)
    return c


class _Wrapped:
    """A batch iterator around grain iterators, checkpointed by grain's orbax handler (which
    stores a non-grain iterator's `get_state()` bytes)."""

    def get_state(self) -> bytes:
        return json.dumps(self._states()).encode()

    def set_state(self, state: bytes) -> None:
        self._set_states(json.loads(state))

    def start_prefetch(self) -> None:
        pass


class SigtermAt(_Wrapped):
    """Passes batches through; sends SIGTERM to this process when batch `n` is fetched."""

    def __init__(self, inner, n):
        self._inner, self._n, self._fetched = inner, n, 0

    def __next__(self):
        self._fetched += 1
        if self._fetched == self._n:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self._inner)

    def _states(self):
        return self._inner.get_state()

    def _set_states(self, state):
        self._inner.set_state(state)


class ConcatHosts(_Wrapped):
    """One global batch from K host iterators, host 0's rows first (as make_array_from_process_
    local_data lays them out)."""

    def __init__(self, iterators):
        self._its = iterators

    def __next__(self):
        import numpy as np

        parts = [next(it) for it in self._its]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def _states(self):
        return [it.get_state() for it in self._its]

    def _set_states(self, states):
        for it, state in zip(self._its, states):
            it.set_state(state)


def _after_checkpoint(step: int, action) -> None:
    """Runs `action()` once the checkpoint of `step` is completely written."""
    from m2jax.train import checkpointing

    save = checkpointing.Checkpointer.save

    def save_then_act(self, s, *a, **k):
        out = save(self, s, *a, **k)
        if s == step:
            self.wait()
            action()
        return out

    checkpointing.Checkpointer.save = save_then_act


def _fill_disk() -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--mesh", default="1,1,1")
    parser.add_argument("--hosts", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=None)
    parser.add_argument("--num_processes", type=int, default=None)
    parser.add_argument("--port", type=int, default=None)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--kill_after_checkpoint", type=int, default=0,
                        help="SIGKILL this process right after the checkpoint of this step")
    parser.add_argument("--disk_full_after_checkpoint", type=int, default=0,
                        help="after the checkpoint of this step, let no file grow past 1 MB "
                        "(RLIMIT_FSIZE: writes fail with EFBIG, as on a full disk)")
    parser.add_argument("--sigterm_at_step", type=int, default=0,
                        help="send SIGTERM to this process while fetching this step's batch")
    parser.add_argument("--fake_gcs", default="",
                        help="serve gs:// from files under this folder (tests/fake_gcs.py)")
    parser.add_argument("--then_load", default="",
                        help="after the run, load this init_from source (m2jax.train.init) and "
                        "print the sum of its word embeddings")
    args = parser.parse_args()
    if args.fake_gcs:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        import fake_gcs

        fake_gcs.install(args.fake_gcs)
    os.environ["XLA_FLAGS"] = (
        f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
    ).strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if args.num_processes:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id)
    c = tiny_config(args.set)
    d, f, t = (int(x) for x in args.mesh.split(","))
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = d, f, t

    import m2jax.data
    from launch.common import run_and_report
    from m2jax.train import console, jobs

    console.configure_logging(None)
    if args.kill_after_checkpoint:
        _after_checkpoint(args.kill_after_checkpoint, lambda: os.kill(os.getpid(), signal.SIGKILL))
    if args.disk_full_after_checkpoint:
        _after_checkpoint(args.disk_full_after_checkpoint, _fill_disk)
    if args.sigterm_at_step:
        loop = jobs.train_loop

        def loop_with_sigterm(model, batches, *rest):
            return loop(model, SigtermAt(batches, args.sigterm_at_step), *rest)

        jobs.train_loop = loop_with_sigterm
    if args.hosts > 1:
        one_host = m2jax.data.pretrain_batches

        def all_hosts(*a, process_index, process_count, **k):
            return ConcatHosts([one_host(*a, process_index=i, process_count=args.hosts, **k)
                                for i in range(args.hosts)])

        m2jax.data.pretrain_batches = all_hosts
    code = run_and_report(jobs.run_pretraining, c, args.workdir)
    if args.then_load:
        from m2jax.train.init import load_init_source, model_config

        source = load_init_source(args.then_load, model_config(c.model))
        table = source.bert.embeddings.word_embeddings.embedding[...]
        print(f"loaded {args.then_load}: word embeddings sum {float(table.sum())!r}")
    sys.exit(code)


if __name__ == "__main__":
    main()
