"""The two jobs users launch: MLM pretraining and GLUE fine-tuning (with task chaining).

`launch/pretrain.py` and `launch/finetune_glue.py` are thin absl wrappers around these.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import typing
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from m2jax import sharding as shd
from m2jax.config import TOKENIZER_VOCAB_SIZE, M2BertConfig, get_model_config
from m2jax.pretrained import save_pretrained
from m2jax.run_logging import write_results
from m2jax.trainer import FROM_SCRATCH, EpochBatches, RunSpec, build_model, train_loop

if TYPE_CHECKING:
    import ml_collections

# The reference rounds the tokenizer's vocabulary up to a multiple of 8 before it builds any
# model (create_bert.py), so every checkpoint it wrote, the released ones included, has 30528
# rows; recipes do the same so that pretraining, GLUE and released weights fit one another.
VOCAB_MULTIPLE = 8


def padded_vocab_size(
    tokenizer_size: int = TOKENIZER_VOCAB_SIZE, multiple: int = VOCAB_MULTIPLE
) -> int:
    """`tokenizer_size` rounded up to a multiple of `multiple` (30522 -> 30528)."""
    return -(-tokenizer_size // multiple) * multiple


def _field_type(hint: Any) -> type:
    """The one concrete type of an M2BertConfig annotation (`float | None` -> float)."""
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    return kinds[0]


def model_section(name: str, **changes: Any) -> ml_collections.ConfigDict:
    """A recipe's `config.model`: the named model config with EVERY M2BertConfig field listed
    under `overrides`, filled from `name` plus `changes`.

    Listing them all is what makes each one settable from the command line
    (`--config.model.overrides.<field>=...`) although the launches lock the config, and gives
    each a type for ml_collections to check; a field whose value is None (classifier_dropout)
    is a typed placeholder. `overrides_from` records `name`, so that `build_model` can tell a
    later change of `model.name` alone (which these complete fields would silently overrule).
    """
    import ml_collections
    from ml_collections import config_dict

    base = get_model_config(name)
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(M2BertConfig)})
    if unknown:
        raise ValueError(f"{unknown} are not M2BertConfig fields (m2jax/config.py)")
    hints = typing.get_type_hints(M2BertConfig)
    overrides = ml_collections.ConfigDict()
    for field in dataclasses.fields(M2BertConfig):
        overrides[field.name] = config_dict.placeholder(_field_type(hints[field.name]))
        value = changes.get(field.name, getattr(base, field.name))
        if value is not None:
            overrides[field.name] = value
    model = ml_collections.ConfigDict()
    model.name = name  # a key of m2jax.config.MODEL_CONFIGS: where the fields below come from
    model.overrides_from = name  # checked against model.name by trainer.build_model
    model.overrides = overrides
    return model


def _write_config(workdir: str, config: Any) -> None:
    """`workdir/config.json`: the run's resolved config (process 0), for the record."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(config.to_dict(), f, indent=2, default=str)


def _host() -> tuple[int, int]:
    return jax.process_index(), jax.process_count()


def _gather(x: jax.Array) -> np.ndarray:
    """A (possibly multi-host) global array as one host-side NumPy array."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run_pretraining(config: Any, workdir: str) -> dict[str, Any]:
    """MLM pretraining per `configs/pretrain.py`; resumes from `workdir`; returns results.json."""
    from m2jax.data import pretrain_batches

    mesh = shd.make_mesh(dict(config.mesh))
    model = build_model(config, "mlm", mesh)
    L = model.config.max_position_embeddings
    d = config.data
    pidx, pcount = _host()
    common = dict(
        max_seq_len=L,
        global_batch_size=config.global_batch_size,
        packing=d.packing,
        data_dir=d.data_dir or None,
        text_field=d.text_field,
        num_threads=d.num_threads,
        process_index=pidx,
        process_count=pcount,
    )
    train = pretrain_batches(
        d.source,
        d.train_split,
        mlm_probability=d.mlm_probability,
        seed=config.seed,
        shuffle=d.shuffle,
        **common,
    )

    def evaluate(eval_step, params) -> dict[str, float]:
        # A fresh pass over the same held-out batches every time, so evaluations compare.
        batches = pretrain_batches(
            d.source,
            d.eval_split,
            mlm_probability=d.eval_mlm_probability,
            seed=config.seed + 1,
            shuffle=False,
            num_epochs=None,
            prefetch_batches=0,
            **common,
        )
        loss = count = correct = 0.0
        for _ in range(config.eval_steps):
            out = eval_step(params, shd.global_batch(next(batches), mesh))
            loss += float(out["loss_sum"])
            count += float(out["count"])
            correct += float(out["correct"])
        return {"mlm_loss": loss / max(count, 1.0), "mlm_accuracy": correct / max(count, 1.0)}

    spec = RunSpec("mlm", model, train, config.total_steps, config.global_batch_size, L, evaluate)
    _write_config(workdir, config)
    results = train_loop(config, workdir, spec, mesh)
    if config.get("export_final", True) and results["status"] == "completed":
        save_pretrained(spec.model, os.path.join(workdir, "final"))
    return results


def run_glue_task(
    config: Any, workdir: str, task: str, seed: int, init_from: str | None
) -> dict[str, Any]:
    """Fine-tunes on one GLUE task with one seed, evaluates on its dev split(s) after training
    (the reference evaluates after the final epoch), exports the model to `workdir/final`."""
    from m2jax.data import get_task, glue_dataset, glue_metrics, glue_task_score

    spec_task = get_task(task)
    t = config.tasks[task]
    run_config = config.copy_and_resolve_references()
    with run_config.unlocked():
        run_config.seed = seed
        run_config.init_from = init_from or ""
        run_config.optimizer.update(dict(t.optimizer))
        run_config.model.overrides.update(
            dict(num_labels=spec_task.num_labels, pool_all=t.pool_all)
        )
    mesh = shd.make_mesh(dict(run_config.mesh))
    model = build_model(run_config, "classification", mesh)
    L = model.config.max_position_embeddings
    source = config.data.source
    train = glue_dataset(
        task, "train", source, max_seq_len=L, data_dir=config.data.data_dir or None
    )
    pidx, pcount = _host()
    bs = t.batch_size
    steps_per_epoch = math.ceil(len(train) / bs)
    total_steps = t.epochs * steps_per_epoch
    if config.get("max_steps"):
        total_steps = min(total_steps, config.max_steps)
    batches = EpochBatches(
        lambda epoch: train.batches(
            bs,
            shuffle=config.data.shuffle,
            seed=seed,
            epoch=epoch,
            pad_remainder=True,
            process_index=pidx,
            process_count=pcount,
        )
    )
    eval_sets = {
        split: glue_dataset(
            task, split, source, max_seq_len=L, data_dir=config.data.data_dir or None
        )
        for split in spec_task.eval_splits
    }

    def evaluate(eval_step, params) -> dict[str, float]:
        split_metrics = {}
        for split, data in eval_sets.items():
            preds, labels = [], []
            for local in data.batches(
                config.eval_batch_size, pad_remainder=True, process_index=pidx, process_count=pcount
            ):
                out = eval_step(params, shd.global_batch(local, mesh))
                keep = _gather(shd.global_batch({"m": local["example_mask"]}, mesh)["m"]) == 1
                preds.append(_gather(out["logits"])[keep])
                labels.append(_gather(shd.global_batch({"l": local["labels"]}, mesh)["l"])[keep])
            split_metrics[split] = glue_metrics(task, np.concatenate(preds), np.concatenate(labels))
        flat = {f"{split}/{k}": v for split, m in split_metrics.items() for k, v in m.items()}
        flat["score"] = glue_task_score(task, split_metrics)
        return flat

    spec = RunSpec("classification", model, batches, total_steps, bs, L, evaluate)
    results = train_loop(run_config, workdir, spec, mesh)
    results.update(task=task, seed=seed, init_from=init_from)
    if results["status"] == "completed":
        save_pretrained(spec.model, os.path.join(workdir, "final"))
    write_results(workdir, results)
    return results


def glue_init_source(config: Any) -> str:
    """`config.init_from`, which GLUE requires: an empty value would fine-tune a random model and
    report near-chance scores as if they were results. `"scratch"` opts into that on purpose."""
    init_from = config.get("init_from") or ""
    if not init_from:
        raise ValueError(
            "config.init_from is empty: GLUE fine-tuning starts from pretrained weights; set "
            "--config.init_from to a pretraining work directory, a final/ export or a released "
            f"checkpoint, or to {FROM_SCRATCH!r} to fine-tune a randomly initialised model"
        )
    return init_from


def run_glue(config: Any, workdir: str) -> dict[str, Any]:
    """Every task in `config.task_order`, every seed; chained tasks start from the first seed's
    final model of their parent (MNLI -> RTE, MRPC, STS-B). Writes `workdir/results.json` with
    per-task scores (mean over seeds) and the GLUE average when all eight tasks ran."""
    from m2jax.data import GLUE_SCORE_TASKS, glue_average

    init_from = glue_init_source(config)
    scores: dict[str, float] = {}
    per_seed: dict[str, list[float]] = {}
    for task in config.task_order:
        t = config.tasks[task]
        parent = t.get("start_from_task") or ""
        init = (
            os.path.join(workdir, parent, f"seed_{config.tasks[parent].seeds[0]}", "final")
            if parent
            else init_from
        )
        per_seed[task] = []
        for seed in t.seeds:
            r = run_glue_task(config, os.path.join(workdir, task, f"seed_{seed}"), task, seed, init)
            if r["final_eval"] is None:
                raise RuntimeError(
                    f"{task} seed {seed} ended without an evaluation ({r['status']})"
                )
            per_seed[task].append(r["final_eval"]["score"])
        scores[task] = float(np.mean(per_seed[task]))
        print(f"{task}: score {scores[task]:.4f} (seeds {list(t.seeds)})", flush=True)
    results = {"task_scores": scores, "per_seed": per_seed}
    if all(task in scores for task in GLUE_SCORE_TASKS):
        results["glue_average"] = glue_average(scores)
    write_results(workdir, results)
    _write_config(workdir, config)
    return results
