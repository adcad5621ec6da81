"""GLUE fine-tuning recipes (spec section 0): `--config=configs/glue.py:<variant>`.

Variants: m2_base_80m (default), m2_base_110m, smoke (the embedded `wnpos` task, CPU minutes).
`init_from` must point at a pretrained checkpoint (an m2jax `final/` export or a released one).
MNLI runs first; RTE, MRPC and STS-B start from its fine-tuned model (`start_from_task`).
"""

import ml_collections

# Per task: lr, weight decay, optimizer ("decoupled" = Composer DecoupledAdamW, "adamw" = torch
# AdamW), epochs, batch size, seeds, pooling (pool_all: mean pooling, a per-task quirk of the
# reference configs). 80M recipe.
_TASKS_80M = {
    "mnli": dict(lr=5e-5, wd=5e-6, opt="decoupled", epochs=3, bs=48, seeds=[19], pool_all=False),
    "qnli": dict(lr=5e-5, wd=1e-6, opt="decoupled", epochs=10, bs=16, seeds=[19], pool_all=True),
    "qqp": dict(lr=3e-5, wd=0.01, opt="adamw", epochs=10, bs=16, seeds=[19], pool_all=False),
    "sst2": dict(lr=3e-5, wd=3e-6, opt="decoupled", epochs=3, bs=16, seeds=[19, 8364, 717],
                 pool_all=True),
    "cola": dict(lr=5e-5, wd=5e-6, opt="decoupled", epochs=10, bs=32,
                 seeds=[19, 8364, 717, 10536], pool_all=True),
    "rte": dict(lr=5e-5, wd=0.01, opt="adamw", epochs=6, bs=16,
                seeds=[19, 8364, 717, 10536, 90166], pool_all=False, start_from_task="mnli"),
    "mrpc": dict(lr=5e-5, wd=0.01, opt="adamw", epochs=10, bs=32,
                 seeds=[19, 8364, 717, 10536, 90166], pool_all=True, start_from_task="mnli"),
    "stsb": dict(lr=7e-5, wd=0.01, opt="adamw", epochs=10, bs=32,
                 seeds=[19, 8364, 717, 10536, 90166], pool_all=True, start_from_task="mnli"),
}

# 110M: lr / wd / optimizer differ (decoupled unless noted); epochs as the 80M recipe.
_110M_CHANGES = {
    "mnli": dict(lr=5e-5, wd=5e-6), "rte": dict(lr=1e-5, wd=1e-6, opt="decoupled"),
    "qqp": dict(lr=3e-5, wd=3e-6, opt="decoupled"), "qnli": dict(lr=5e-5, wd=1e-6),
    "sst2": dict(lr=3e-5, wd=3e-6), "stsb": dict(lr=8e-5, wd=3e-6, opt="decoupled"),
    "mrpc": dict(lr=8e-5, wd=8e-5, opt="decoupled"), "cola": dict(lr=8e-5, wd=5e-6, opt="adamw"),
}

# The shipped offline task (WordNet definitions: noun or verb?), small enough for a CPU.
_SMOKE_TASKS = {
    "wnpos": dict(lr=1e-4, wd=1e-6, opt="decoupled", epochs=2, bs=32, seeds=[19], pool_all=False),
}


def _task(spec: dict) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    t.optimizer = ml_collections.ConfigDict(
        {"name": spec["opt"], "lr": spec["lr"], "weight_decay": spec["wd"]})
    t.epochs = spec["epochs"]
    t.batch_size = spec["bs"]
    t.seeds = spec["seeds"]
    t.pool_all = spec["pool_all"]
    t.start_from_task = spec.get("start_from_task", "")
    return t


def get_config(variant: str = "m2_base_80m") -> ml_collections.ConfigDict:
    if variant not in ("m2_base_80m", "m2_base_110m", "smoke"):
        raise ValueError(f"unknown GLUE variant {variant!r}; known: m2_base_80m, m2_base_110m, smoke")
    tasks = {k: dict(v) for k, v in (_SMOKE_TASKS if variant == "smoke" else _TASKS_80M).items()}
    if variant == "m2_base_110m":
        for k, change in _110M_CHANGES.items():
            tasks[k].update(change)
    c = ml_collections.ConfigDict()
    c.seed = 19  # replaced by each task's seeds
    c.model = ml_collections.ConfigDict()
    c.model.name = {"m2_base_80m": "m2-bert-base-80m-released", "m2_base_110m": "m2-bert-base-110m",
                    "smoke": "m2-bert-base-80m"}[variant]
    c.model.overrides = ml_collections.ConfigDict({"dtype": "bfloat16"})
    # Pretrained weights (required for meaningful scores): a pretraining work directory, a
    # `final/` export or a released checkpoint.
    c.init_from = ""
    c.data = ml_collections.ConfigDict()
    c.data.source = "tfds"  # 'tfds', 'tsv:<GLUE dir>' or 'embedded' (wnsense only)
    c.data.data_dir = ""
    c.data.shuffle = False  # the reference does not shuffle GLUE training data
    c.tasks = ml_collections.ConfigDict({k: _task(v) for k, v in tasks.items()})
    # Parents before children: MNLI first (spec section 5).
    c.task_order = [k for k in tasks if not tasks[k].get("start_from_task")] + \
        [k for k in tasks if tasks[k].get("start_from_task")]
    c.eval_batch_size = 64
    c.max_steps = 0  # > 0 caps each run's steps (quick checks)
    c.accum_steps = 1
    c.log_every = 100
    c.eval_every = 0  # evaluation happens after the final step (as the reference)
    c.eval_steps = -1  # all of each dev split
    c.optimizer = ml_collections.ConfigDict(dict(
        name="decoupled", lr=5e-5, b1=0.9, b2=0.98, eps=1e-6, weight_decay=5e-6, clip_norm=None,
        warmup_fraction=0.06, final_lr_fraction=0.0, param_groups="single"))
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.checkpoint = ml_collections.ConfigDict({"every": 2000, "keep": 1, "async_save": True})
    if variant == "smoke":
        c.model.overrides = ml_collections.ConfigDict(
            {"dtype": "float32", "hidden_size": 128, "intermediate_size": 256,
             "num_hidden_layers": 2, "hyena_filter_order": 32, "max_position_embeddings": 64,
             "long_conv_l_max": 64})
        c.data.source = "embedded"
        c.log_every = 25
        c.eval_batch_size = 32
    return c
