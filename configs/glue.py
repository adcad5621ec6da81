"""GLUE fine-tuning recipes (spec section 0): `--config=configs/glue.py:<variant>`.

Variants: m2_base_80m (default), m2_base_110m, m2_large_260m, m2_large_341m (the reference's
finetune-glue yamls), smoke (the embedded `wnpos` task, CPU minutes).
`init_from` is required: a pretraining work directory, its `final/` export or a released
checkpoint; "scratch" fine-tunes a random model on purpose. MNLI runs first; RTE, MRPC and STS-B
start from its fine-tuned model (`start_from_task`). Every field can be overridden
(`--config.tasks.rte.epochs=4`, `--config.model.hidden_dropout_prob=0.2`);
`python launch/finetune_glue.py --config=configs/glue.py:smoke --print_config` prints them all.
"""

import ml_collections

from configs import common

# What a task gets when its yaml entry sets nothing: the defaults of the reference's job classes
# (src/glue/finetuning_jobs.py). lr, weight decay, optimizer ("decoupled" = Composer
# DecoupledAdamW; "adamw" = torch AdamW, which the jobs use for any other optim_name), epochs,
# batch size. No yaml changes a batch size.
JOB_DEFAULTS = {
    "mnli": dict(lr=5e-5, wd=5e-6, opt="decoupled", epochs=3, bs=48),
    "qnli": dict(lr=1e-5, wd=1e-6, opt="decoupled", epochs=10, bs=16),
    "qqp": dict(lr=3e-5, wd=3e-6, opt="decoupled", epochs=5, bs=16),
    "sst2": dict(lr=3e-5, wd=3e-6, opt="decoupled", epochs=3, bs=16),
    "cola": dict(lr=5e-5, wd=5e-6, opt="decoupled", epochs=10, bs=32),
    "rte": dict(lr=1e-5, wd=1e-6, opt="decoupled", epochs=3, bs=16),
    "mrpc": dict(lr=8e-5, wd=8e-6, opt="decoupled", epochs=10, bs=32),
    "stsb": dict(lr=3e-5, wd=3e-6, opt="decoupled", epochs=10, bs=32),
}

# The same in every yaml: seeds (the rest run default_seed 19 only) and which tasks start from
# MNLI's fine-tuned model.
SEEDS = {"sst2": [19, 8364, 717], "cola": [19, 8364, 717, 10536],
         "rte": [19, 8364, 717, 10536, 90166], "mrpc": [19, 8364, 717, 10536, 90166],
         "stsb": [19, 8364, 717, 10536, 90166]}
FROM_MNLI = ("rte", "mrpc", "stsb")

# Mean pooling (pool_all). Only QNLI asks for it, but the reference's glue.py writes it into the
# model config it shares between tasks and never resets it, so every task after QNLI in the
# yamls' order (mnli, rte, qqp, qnli, sst2, stsb, mrpc, cola) pools the same way (spec section 0).
YAML_ORDER = ("mnli", "rte", "qqp", "qnli", "sst2", "stsb", "mrpc", "cola")
POOL_ALL = set(YAML_ORDER[YAML_ORDER.index("qnli"):])

# Per variant: the named model (configs/common.py) and what its finetune-glue yaml sets per task
# (trainer_kwargs: lr, wd, optim_name, max_duration) over the job defaults.
YAMLS = {
    # monarch-mixer-finetune-glue-768dim-80m-parameters.yaml; the released 80M checkpoint has
    # hyena_training_additions.
    "m2_base_80m": ("m2-bert-base-80m-released", {
        "mnli": dict(lr=5e-5, wd=5e-6),
        "rte": dict(lr=5e-5, wd=0.01, opt="adamw", epochs=6),
        "qqp": dict(lr=3e-5, wd=0.01, opt="adamw", epochs=10),
        "qnli": dict(lr=5e-5, wd=1e-6),
        "sst2": dict(lr=3e-5, wd=3e-6),
        "stsb": dict(lr=7e-5, wd=0.01, opt="adamw"),
        "mrpc": dict(lr=5e-5, wd=0.01, opt="adamw"),
        "cola": dict(lr=5e-5, wd=5e-6),
    }),
    # monarch-mixer-finetune-glue-960dim-parameter-matched.yaml (no max_duration anywhere).
    "m2_base_110m": ("m2-bert-base-110m", {
        "mnli": dict(lr=5e-5, wd=5e-6),
        "rte": dict(lr=1e-5, wd=1e-6),
        "qqp": dict(lr=3e-5, wd=3e-6),
        "qnli": dict(lr=5e-5, wd=1e-6),
        "sst2": dict(lr=3e-5, wd=3e-6),
        "stsb": dict(lr=8e-5, wd=3e-6),
        "mrpc": dict(lr=8e-5, wd=8e-5),
        "cola": dict(lr=8e-5, wd=5e-6, opt="adamw"),
    }),
    # monarch-mixer-large-finetune-glue-1536dim-260m-parameters.yaml
    "m2_large_260m": ("m2-bert-large-260m", {
        "mnli": dict(lr=5e-5, wd=5e-6),
        "rte": dict(lr=1e-5, wd=1e-6),
        "qqp": dict(lr=3e-5, wd=3e-6),
        "qnli": dict(lr=5e-5, wd=1e-6),
        "sst2": dict(lr=3e-5, wd=3e-6),
        "stsb": dict(lr=7e-5, wd=3e-6, epochs=10),
        "mrpc": dict(lr=8e-5, wd=8e-6),
        "cola": dict(lr=5e-5, wd=5e-6),
    }),
    # monarch-mixer-large-finetune-glue-1792dim-341m-parameters.yaml
    "m2_large_341m": ("m2-bert-large-341m", {
        "mnli": dict(lr=5e-5, wd=5e-6),
        "rte": dict(lr=5e-5, wd=1e-6, opt="adamw", epochs=2),
        "qqp": dict(lr=3e-5, wd=3e-6),
        "qnli": dict(lr=5e-5, wd=1e-6),
        "sst2": dict(lr=3e-5, wd=3e-6),
        "stsb": dict(lr=8e-5, wd=3e-6, epochs=8),
        "mrpc": dict(lr=8e-5, wd=8e-6),
        "cola": dict(lr=5e-5, wd=1e-6),
    }),
}
VARIANTS = (*YAMLS, "smoke")

# The shipped offline task (WordNet definitions: noun or verb?), small enough for a CPU; the
# smoke model is configs/pretrain.py's, so it fine-tunes that recipe's output.
SMOKE_TASKS = {
    "wnpos": dict(lr=1e-4, wd=1e-6, opt="decoupled", epochs=2, bs=32, seeds=[19], pool_all=False),
}


def _recipe_tasks(yaml: dict) -> dict:
    tasks = {}
    for name, defaults in JOB_DEFAULTS.items():
        tasks[name] = {**defaults, **yaml.get(name, {}), "seeds": SEEDS.get(name, [19]),
                       "pool_all": name in POOL_ALL}
        if name in FROM_MNLI:
            tasks[name]["start_from_task"] = "mnli"
    return tasks


def _task(spec: dict) -> ml_collections.ConfigDict:
    t = ml_collections.ConfigDict()
    # Optimizer fields set for this task; the rest come from `config.optimizer`.
    t.optimizer = ml_collections.ConfigDict(
        {"name": spec["opt"], "lr": spec["lr"], "weight_decay": spec["wd"]})
    t.epochs = spec["epochs"]  # passes over the training split
    t.batch_size = spec["bs"]  # rows per step, all hosts together
    t.seeds = spec["seeds"]  # one fine-tuning run per seed; the task's score is their mean
    t.pool_all = spec["pool_all"]  # mean pooling instead of the first token
    # "" = `config.init_from`; else a task run first, whose first seed's final/ model is the
    # starting point (the reference chains RTE, MRPC and STS-B to MNLI).
    t.start_from_task = spec.get("start_from_task", "")
    return t


def get_config(variant: str = "m2_base_80m") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown GLUE variant {variant!r}; known: {', '.join(VARIANTS)}")
    if variant == "smoke":
        model = common.model("m2-bert-base-80m", **common.SMOKE_MODEL)
        tasks = SMOKE_TASKS
    else:
        name, yaml = YAMLS[variant]
        model = common.model(name, dtype="bfloat16")
        tasks = _recipe_tasks(yaml)
    c = ml_collections.ConfigDict()
    c.variant = variant  # for the record (results.json, the console)
    # Every M2BertConfig field; num_labels and pool_all are set per task.
    c.model = model
    # Required: a pretraining work directory (its newest checkpoint), a `final/` export or a
    # released checkpoint; "scratch" = a random initialisation on purpose ("" is an error).
    c.init_from = ""
    c.data = ml_collections.ConfigDict()
    # 'tfds' (glue/<task> under data_dir), 'tsv:<GLUE dir>' (the classic download's folders) or
    # 'embedded' (the shipped offline tasks, wnpos and wnsense)
    c.data.source = "tfds"
    c.data.data_dir = ""  # tfds data_dir ("" = tfds default)
    c.data.shuffle = False  # the reference does not shuffle GLUE training data
    c.tasks = ml_collections.ConfigDict({k: _task(v) for k, v in tasks.items()})
    # Parents before children: MNLI first (spec section 5).
    c.task_order = [k for k in tasks if not tasks[k].get("start_from_task")] + \
        [k for k in tasks if tasks[k].get("start_from_task")]
    c.eval_batch_size = 64  # rows per evaluation batch (dev splits are evaluated in full)
    c.max_steps = 0  # > 0 caps each run's steps (quick checks); 0: all epochs
    c.accum_steps = 1  # microbatches per step; must divide every task's batch size
    c.log_every = 100  # steps between console lines / TensorBoard points (and step 1)
    c.eval_every = 0  # steps between dev evaluations; 0: after the last step only (as the reference)
    # Defaults of every task's optimizer; `tasks.<task>.optimizer` overrides name, lr, weight decay.
    c.optimizer = ml_collections.ConfigDict(dict(
        name="decoupled", lr=5e-5, b1=0.9, b2=0.98, eps=1e-6, weight_decay=5e-6,
        clip_norm=ml_collections.config_dict.placeholder(float), warmup_fraction=0.06,
        final_lr_fraction=0.0, param_groups="single"))
    c.mesh = common.mesh()
    c.axis_rules = common.AXIS_RULES
    c.long_conv_on_sharded_cpu = common.LONG_CONV_ON_SHARDED_CPU
    c.checkpoint = common.checkpoint(every=2000, keep=1)
    # Each (task, seed) run writes <workdir>/<task>/seed_<n>/final; chained tasks start from it.
    c.export_final = True
    # TensorBoard event files through clu (TensorFlow); False (or clu missing): metrics.jsonl
    c.tensorboard = True
    if variant == "smoke":
        c.data.source = "embedded"
        c.log_every = 25
        c.eval_batch_size = 32
    return c
