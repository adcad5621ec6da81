"""The two jobs users launch, composed from the pieces in one pass:

    config -> checks -> (finished already? report it) -> data -> model -> evaluator
           -> train_loop -> export

`run_pretraining` (configs/pretrain.py) and `run_glue` (configs/glue.py: every task and seed,
chained tasks after their parent). Both take the config and a work directory (local or gs://);
`launch/pretrain.py` and `launch/finetune_glue.py` are thin absl wrappers. A job that already
finished reports its stored results and changes nothing; one that stopped resumes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
from etils import epath
from flax import nnx

from m2jax import sharding as shd
from m2jax.model import M2BertForMaskedLM, abstract_model
from m2jax.optim import OptimizerConfig, make_optimizer
from m2jax.train import validate
from m2jax.train import workdir as wd
from m2jax.train.console import format_metrics, say
from m2jax.train.errors import ConfigError, DataError
from m2jax.train.evaluators import GlueEvaluator, MlmEvaluator
from m2jax.train.init import build_model, model_config
from m2jax.train.loop import LoopSettings, train_loop
from m2jax.train.results import finished_results

_OPTIMIZER_FIELDS = {f.name for f in dataclasses.fields(OptimizerConfig)}


def _mesh(config: Any) -> jax.sharding.Mesh:
    try:
        return shd.make_mesh(dict(config.mesh))
    except ValueError as e:
        raise ConfigError(f"config.mesh: {e}") from None


def optimizer_config(
    fields: Mapping[str, Any], total_steps: int, cfg: Any, where: str = "config.optimizer"
) -> OptimizerConfig:
    """The OptimizerConfig of `fields` for a run of `total_steps`, checked by building it for
    the parameters of model config `cfg` (abstractly: nothing is allocated or compiled)."""
    opt = OptimizerConfig(
        **{k: v for k, v in fields.items() if k in _OPTIMIZER_FIELDS}, total_steps=total_steps
    )
    try:
        make_optimizer(opt, nnx.state(abstract_model(M2BertForMaskedLM, cfg), nnx.Param))
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    return opt


def _record_config(directory: epath.Path, config: Any) -> None:
    """`config.json`: the resolved config of the run's first attempt. A resume with another
    config keeps the file and names what changed."""
    current = json.loads(json.dumps(config.to_dict(), default=str))
    stored = wd.read_json(directory / wd.CONFIG)
    if stored is None:
        wd.write_json(directory / wd.CONFIG, current)
        return
    changed = sorted(_flat(current).items() ^ _flat(stored).items())
    if changed:
        names = sorted({k for k, _ in changed})
        logging.warning("the config differs from %s in %s", directory / wd.CONFIG, names)


def _flat(tree: Any, prefix: str = "") -> dict[str, str]:
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: json.dumps(tree)}


def _data(what: str, make: Callable[[], Any]) -> Any:
    """`make()`, with a failure to read the input reported as a DataError naming `what`."""
    try:
        return make()
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{what}: {e}") from None


def _loop_settings(config: Any, directory: epath.Path, restart: bool, **kwargs) -> LoopSettings:
    return LoopSettings(
        workdir=directory,
        log_every=config.log_every,
        eval_every=config.eval_every,
        checkpoint_every=config.checkpoint.every,
        checkpoint_keep=config.checkpoint.keep,
        async_save=config.checkpoint.async_save,
        accum_steps=config.accum_steps,
        axis_rules=tuple(tuple(pair) for pair in config.axis_rules),
        restart=restart,
        tensorboard=config.tensorboard,
        **kwargs,
    )


def _already_finished(directory: epath.Path, stored: dict, export_final: bool) -> bool:
    if export_final and not (directory / wd.FINAL).exists():
        return False  # the export is redone from the last checkpoint (no training step runs)
    say(
        f"{directory} finished before (step {stored['step']}/{stored['total_steps']}); "
        "its stored results stand, nothing was changed"
    )
    return True


# ---------------------------------------------------------------------------------------------
# Pretraining.


def run_pretraining(config: Any, workdir: str | epath.Path, *, restart: bool = False) -> dict:
    """MLM pretraining per configs/pretrain.py; resumes from `workdir`; returns the results
    (results.json). `restart`: when no checkpoint in the work directory can be read, set them
    aside and train again from step 0 (otherwise that is an error)."""
    from m2jax.data import pretrain_batches

    directory = wd.as_path(workdir)
    validate.check_pretraining_config(config)
    stored = finished_results(directory, config.total_steps)
    if stored is not None and _already_finished(directory, stored, config.export_final):
        return stored
    mesh = _mesh(config)
    cfg = model_config(config.model, mesh, config.long_conv_on_sharded_cpu)
    validate.check_batch_fits(
        "global_batch_size", config.global_batch_size, mesh, jax.process_count()
    )
    optimizer = optimizer_config(config.optimizer, config.total_steps, cfg)
    wd.ensure_writable(directory)  # before anything is built: a full disk stops here
    d = config.data
    common = dict(
        max_seq_len=cfg.max_position_embeddings,
        global_batch_size=config.global_batch_size,
        packing=d.packing,
        data_dir=d.data_dir or None,
        text_field=d.text_field,
        num_threads=d.num_threads,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    train = _data(
        f"config.data.source {d.source!r}",
        lambda: pretrain_batches(
            d.source,
            d.train_split,
            mlm_probability=d.mlm_probability,
            seed=config.seed,
            shuffle=d.shuffle,
            prefetch_batches=d.prefetch_batches,
            **common,
        ),
    )
    model = build_model(cfg, "mlm", config.seed, config.init_from)
    evaluator = None
    if config.eval_steps:
        source = d.eval_source or d.source
        # 'files:' sources are their own split; the others hold `eval_split`.
        split = None if source.startswith("files:") else d.eval_split
        make_eval_batches = functools.partial(
            pretrain_batches,
            source,
            split,
            mlm_probability=d.eval_mlm_probability,
            seed=config.seed + 1,
            shuffle=False,
            **common,
        )
        _data(f"config.data.eval_source {source!r}", make_eval_batches)  # fails here, not later
        evaluator = MlmEvaluator(model, make_eval_batches, config.eval_steps, mesh)
    say(
        f"pretraining {config.get('variant', '')}: {cfg.num_hidden_layers} layers x "
        f"{cfg.hidden_size}, L {cfg.max_position_embeddings}, {config.total_steps} steps of "
        f"{config.global_batch_size} rows on {jax.device_count()} device(s) "
        f"{dict(mesh.shape)}; work directory {directory}"
    )
    _record_config(directory, config)
    settings = _loop_settings(
        config,
        directory,
        restart,
        task="mlm",
        total_steps=config.total_steps,
        global_batch_size=config.global_batch_size,
        seed=config.seed,
        record={"variant": config.get("variant", "")},
    )
    results, trained = train_loop(model, train, optimizer, evaluator, settings, mesh)
    if results["status"] == "completed" and config.export_final:
        wd.export_model(trained, directory / wd.FINAL)
    return results


# ---------------------------------------------------------------------------------------------
# GLUE.


def _glue_split(config: Any, task: str, split: str, max_seq_len: int, labelled: bool) -> Any:
    """One encoded split, refused (DataError) when it has no examples, or unlabelled rows where
    labels are needed."""
    from m2jax.data import get_task, glue_dataset

    data = _data(
        f"GLUE {task} {split} (config.data.source {config.data.source!r})",
        lambda: glue_dataset(
            task,
            split,
            config.data.source,
            max_seq_len=max_seq_len,
            data_dir=config.data.data_dir or None,
        ),
    )
    where = data.skip_log.name
    if not len(data):
        raise DataError(
            f"{where}: no examples (GLUE {task} {split}); nothing to "
            f"{'train' if split == 'train' else 'evaluate'} on"
        )
    if labelled:
        bad = ~np.isfinite(data.labels) if get_task(task).is_regression else data.labels < 0
        if bad.any():
            raise DataError(
                f"{where}: {int(bad.sum())} of {len(data)} rows have no label "
                f"(-1 or not finite): is it a test split? (GLUE {task} {split})"
            )
    return data


def _glue_run_fields(config: Any, task: str, seed: int, init_from: str) -> dict[str, Any]:
    """What identifies a (task, seed) run in its results.json: a stored run with other values
    is not the same run and is not skipped."""
    t = config.tasks[task]
    return {
        "glue_task": task,
        "seed": seed,
        "init_from": init_from,
        "epochs": t.epochs,
        "batch_size": t.batch_size,
        "max_steps": config.max_steps,
    }


def run_glue_task(
    config: Any,
    directory: epath.Path,
    task: str,
    seed: int,
    init_from: str,
    mesh: jax.sharding.Mesh,
    *,
    restart: bool = False,
) -> dict:
    """Fine-tunes on one GLUE task with one seed in `directory`, evaluates its dev split(s) after
    training (the reference evaluates after the final epoch), exports `directory/final`."""
    from m2jax.data import get_task

    spec, t = get_task(task), config.tasks[task]
    fields = _glue_run_fields(config, task, seed, init_from)
    stored = wd.read_json(directory / wd.RESULTS)
    if (
        stored
        and stored.get("status") == "completed"
        and stored.get("final_eval")
        and all(stored.get(k) == v for k, v in fields.items())
        and _already_finished(directory, stored, config.export_final)
    ):
        return stored
    cfg = model_config(
        {**config.model, "num_labels": spec.num_labels, "pool_all": t.pool_all},
        mesh,
        config.long_conv_on_sharded_cpu,
    )
    pidx, pcount = jax.process_index(), jax.process_count()
    validate.check_batch_fits(f"tasks.{task}.batch_size", t.batch_size, mesh, pcount)
    validate.check_batch_fits("eval_batch_size", config.eval_batch_size, mesh, pcount)
    L = cfg.max_position_embeddings
    train = _glue_split(config, task, "train", L, labelled=True)
    eval_sets = {s: _glue_split(config, task, s, L, labelled=True) for s in spec.eval_splits}
    steps_per_epoch = math.ceil(len(train) / t.batch_size)
    total_steps = t.epochs * steps_per_epoch
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    optimizer = optimizer_config(
        {**config.optimizer, **t.optimizer},
        total_steps,
        cfg,
        where=f"config.tasks.{task}.optimizer",
    )
    model = build_model(cfg, "classification", seed, init_from)
    evaluator = GlueEvaluator(model, task, eval_sets, config.eval_batch_size, mesh, pidx, pcount)
    batches = train.batches(
        t.batch_size,
        shuffle=config.data.shuffle,
        seed=seed,
        num_epochs=None,
        pad_remainder=True,
        process_index=pidx,
        process_count=pcount,
    )
    say(
        f"GLUE {task} seed {seed}: {len(train)} examples, {total_steps} steps of "
        f"{t.batch_size} ({t.epochs} epochs of {steps_per_epoch}"
        + (", capped by max_steps" if total_steps < t.epochs * steps_per_epoch else "")
        + f"), from {init_from}"
    )
    settings = _loop_settings(
        config,
        directory,
        restart,
        task="classification",
        total_steps=total_steps,
        global_batch_size=t.batch_size,
        seed=seed,
        record=fields,
    )
    results, trained = train_loop(model, batches, optimizer, evaluator, settings, mesh)
    if results["status"] == "completed" and config.export_final:
        wd.export_model(trained, directory / wd.FINAL)
    return results


def run_glue(config: Any, workdir: str | epath.Path, *, restart: bool = False) -> dict:
    """Every task in `config.task_order`, every seed, each in `<workdir>/<task>/seed_<n>`;
    chained tasks start from the first seed's final model of their parent (MNLI -> RTE, MRPC,
    STS-B). Finished (task, seed) runs are skipped, stopped ones resume. Writes
    `<workdir>/results.json`: per-task scores (mean over seeds) and the GLUE average when all
    eight tasks ran. Returns it, or the results of a run that did not complete (preempted)."""
    from m2jax.data import GLUE_SCORE_TASKS, glue_average

    directory = wd.as_path(workdir)
    validate.check_glue_config(config)
    mesh = _mesh(config)
    wd.ensure_writable(directory)
    scores: dict[str, float] = {}
    per_seed: dict[str, list[float]] = {}
    for task in config.task_order:
        t = config.tasks[task]
        parent = t.start_from_task
        init = (
            os.fspath(directory / parent / f"seed_{config.tasks[parent].seeds[0]}" / wd.FINAL)
            if parent
            else config.init_from
        )
        per_seed[task] = []
        for seed in t.seeds:
            run = run_glue_task(
                config, directory / task / f"seed_{seed}", task, seed, init, mesh, restart=restart
            )
            if run["status"] != "completed":
                return run
            per_seed[task].append(run["final_eval"]["score"])
        scores[task] = float(np.mean(per_seed[task]))
        say(f"{task}: score {scores[task]:.4f} (seeds {list(t.seeds)})")
    results = {"status": "completed", "task_scores": scores, "per_seed": per_seed}
    if all(task in scores for task in GLUE_SCORE_TASKS):
        results["glue_average"] = glue_average(scores)
    wd.write_json(directory / wd.RESULTS, results)
    _record_config(directory, config)
    return results


def summary(results: Mapping[str, Any]) -> str:
    """The final console line of a job's results."""
    if "task_scores" in results:
        line = "scores: " + ", ".join(f"{k} {v:.4f}" for k, v in results["task_scores"].items())
        if "glue_average" in results:
            line += f"; GLUE average {results['glue_average']:.4f}"
        return line
    if results["status"] == "preempted":
        return (
            f"preempted at step {results['step']}/{results['total_steps']} (saved); re-run "
            "the same command to resume"
        )
    final = results.get("final_eval") or {}
    line = f"done: {results['status']} at step {results['step']}/{results['total_steps']}"
    return line + (f"; eval {format_metrics(final)}" if final else "")
