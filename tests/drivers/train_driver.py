"""Runs a tiny pretraining job in its own process, for the trainer's multi-device tests.

  python tests/drivers/train_driver.py --workdir=W --devices=8 --mesh=2,2,2 [--hosts=2]
      [--process_id=I --num_processes=P --port=N] [--set key=value ...]

--devices sets the number of fake CPU devices (must happen before jax is imported).
--hosts=K in a single process feeds the concatenation of K simulated hosts' batches, i.e. the
same global batches that K real processes (each reading its own shard) feed together.
Prints the run's results.json path on its last line.
"""

import argparse
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def tiny_config(overrides: list[str]):
    sys.path.insert(0, ROOT)
    from configs import pretrain

    c = pretrain.get_config("smoke")
    o = c.model.overrides
    o.hidden_size, o.intermediate_size, o.num_hidden_layers, o.hyena_filter_order = 32, 64, 2, 8
    o.max_position_embeddings = o.long_conv_l_max = 32
    c.global_batch_size, c.total_steps, c.log_every = 8, 6, 1
    c.eval_every, c.eval_steps = 0, 0
    c.checkpoint.every, c.checkpoint.keep, c.checkpoint.async_save = 2, 3, False
    c.data.num_threads = 0
    c.export_final = False
    for item in overrides:
        key, value = item.split("=", 1)
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = json.loads(value)
    return c


class SigtermAt:
    """Passes batches through; sends SIGTERM to this process when batch `step` is fetched."""

    def __init__(self, inner, step):
        self._inner, self._step, self._n = inner, step, 0

    def __next__(self):
        self._n += 1
        if self._n == self._step:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self._inner)

    def get_state(self):
        return self._inner.get_state()

    def set_state(self, state):
        self._inner.set_state(state)


class ConcatHosts:
    """One global batch from K host iterators, host 0's rows first (as make_array_from_process_
    local_data lays them out)."""

    def __init__(self, iterators):
        self._its = iterators

    def __next__(self):
        parts = [next(it) for it in self._its]
        return {k: __import__("numpy").concatenate([p[k] for p in parts]) for k in parts[0]}

    def get_state(self):
        return {str(i): it.get_state() for i, it in enumerate(self._its)}

    def set_state(self, state):
        for i, it in enumerate(self._its):
            it.set_state(state[str(i)])


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
    args = parser.parse_args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_default_matmul_precision", "highest")
    if os.environ.get("M2JAX_TEST_COMPILE_CACHE"):
        # The runs of one test session compile the same programs: share them on disk.
        jax.config.update("jax_compilation_cache_dir", os.environ["M2JAX_TEST_COMPILE_CACHE"])
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if args.num_processes:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(f"localhost:{args.port}", args.num_processes, args.process_id)
    c = tiny_config(args.set)
    d, f, t = (int(x) for x in args.mesh.split(","))
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = d, f, t

    from m2jax.recipes import run_pretraining

    if args.kill_after_checkpoint:
        from m2jax import checkpointing

        save = checkpointing.Checkpointer.save

        def save_then_die(self, step, *a, **k):
            out = save(self, step, *a, **k)
            if step == args.kill_after_checkpoint:
                self.wait()
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        checkpointing.Checkpointer.save = save_then_die
    if args.disk_full_after_checkpoint:
        import resource

        from m2jax import checkpointing

        save_fn = checkpointing.Checkpointer.save

        def save_then_fill_disk(self, step, *a, **k):
            out = save_fn(self, step, *a, **k)
            if step == args.disk_full_after_checkpoint:
                self.wait()
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
                resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.RLIM_INFINITY))
            return out

        checkpointing.Checkpointer.save = save_then_fill_disk
    if args.sigterm_at_step:
        from m2jax import trainer

        loop = trainer.train_loop

        def loop_with_sigterm(config, workdir, spec, mesh):
            spec.train_batches = SigtermAt(spec.train_batches, args.sigterm_at_step)
            return loop(config, workdir, spec, mesh)

        import m2jax.recipes

        m2jax.recipes.train_loop = loop_with_sigterm

    if args.hosts == 1:
        results = run_pretraining(c, args.workdir)
    else:
        from m2jax import sharding as shd
        from m2jax.data import pretrain_batches
        from m2jax.trainer import RunSpec, build_model, train_loop

        model = build_model(c, "mlm")
        L = model.config.max_position_embeddings
        hosts = ConcatHosts([pretrain_batches(
            c.data.source, "train", max_seq_len=L, global_batch_size=c.global_batch_size,
            mlm_probability=c.data.mlm_probability, seed=c.seed, shuffle=c.data.shuffle,
            num_threads=0, process_index=i, process_count=args.hosts) for i in range(args.hosts)])
        spec = RunSpec("mlm", model, hosts, c.total_steps, c.global_batch_size, L,
                       lambda step, params: {})
        results = train_loop(c, args.workdir, spec, shd.make_mesh(dict(c.mesh)))
    print(json.dumps({"status": results["status"], "step": results["step"]}))
    print(os.path.join(args.workdir, "results.json"))


if __name__ == "__main__":
    main()
