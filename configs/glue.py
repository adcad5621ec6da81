"""GLUE fine-tuning recipes (spec section 0): `--config=configs/glue.py:<variant>`.

Variants: m2_base_80m (default), m2_base_110m, m2_large_260m, m2_large_341m (the reference's
finetune-glue yamls), smoke (the embedded `wnpos` task, CPU minutes).
`init_from` is required: a pretraining work directory, its `final/` export or a released
checkpoint; "scratch" fine-tunes a random model on purpose. MNLI runs first; RTE, MRPC and STS-B
start from its fine-tuned model (`start_from_task`). Every M2BertConfig field is under
`model.overrides` (`--config.model.overrides.<field>=...`).
"""

import ml_collections

from m2jax.recipes import model_section, padded_vocab_size

# What a task gets when its yaml entry sets nothing: the defaults of the reference's job classes
# (src/glue/finetuning_jobs.py). lr, weight decay, optimizer ("decoupled" = Composer
# DecoupledAdamW; "adamw" = torch AdamW, which the jobs use for any other optim_name), epochs,
# batch size. No yaml changes a batch size.
_JOB_DEFAULTS = {
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
_SEEDS = {"sst2": [19, 8364, 717], "cola": [19, 8364, 717, 10536],
          "rte": [19, 8364, 717, 10536, 90166], "mrpc": [19, 8364, 717, 10536, 90166],
          "stsb": [19, 8364, 717, 10536, 90166]}
_FROM_MNLI = ("rte", "mrpc", "stsb")

# Mean pooling (pool_all). Only QNLI asks for it, but the reference's glue.py writes it into the
# model config it shares between tasks and never resets it, so every task after QNLI in the
# yamls' order (mnli, rte, qqp, qnli, sst2, stsb, mrpc, cola) pools the same way (spec section 0).
_YAML_ORDER = ("mnli", "rte", "qqp", "qnli", "sst2", "stsb", "mrpc", "cola")
_POOL_ALL = set(_YAML_ORDER[_YAML_ORDER.index("qnli"):])

# Per variant: the named model config, and what its finetune-glue yaml sets per task
# (trainer_kwargs: lr, wd, optim_name, max_duration) over the job defaults.
_VARIANTS = {
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

# The shipped offline task (WordNet definitions: noun or verb?), small enough for a CPU; the
# smoke model is configs/pretrain.py's, so it fine-tunes that recipe's output.
_SMOKE_TASKS = {
    "wnpos": dict(lr=1e-4, wd=1e-6, opt="decoupled", epochs=2, bs=32, seeds=[19], pool_all=False),
}
_SMOKE_MODEL = {"dtype": "float32", "hidden_size": 128, "intermediate_size": 256,
                "num_hidden_layers": 2, "hyena_filter_order": 32, "max_position_embeddings": 64,
                "long_conv_l_max": 64}


def _recipe_tasks(yaml: dict) -> dict:
    tasks = {}
    for name, defaults in _JOB_DEFAULTS.items():
        tasks[name] = {**defaults, **yaml.get(name, {}), "seeds": _SEEDS.get(name, [19]),
                       "pool_all": name in _POOL_ALL}
        if name in _FROM_MNLI:
            tasks[name]["start_from_task"] = "mnli"
    return tasks


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
    known = [*_VARIANTS, "smoke"]
    if variant not in known:
        raise ValueError(f"unknown GLUE variant {variant!r}; known: {', '.join(known)}")
    if variant == "smoke":
        name, changes, tasks = "m2-bert-base-80m", _SMOKE_MODEL, _SMOKE_TASKS
    else:
        name, yaml = _VARIANTS[variant]
        changes, tasks = {"dtype": "bfloat16"}, _recipe_tasks(yaml)
    c = ml_collections.ConfigDict()
    c.seed = 19  # replaced by each task's seeds
    # model.name: a key of m2jax.config.MODEL_CONFIGS; model.overrides: every M2BertConfig field,
    # filled from it (num_labels and pool_all are set per task). Vocabulary padded to 30528 as
    # the reference's models and configs/pretrain.py's, so either's weights load.
    c.model = model_section(name, vocab_size=padded_vocab_size(), **changes)
    # Required: a pretraining work directory (its newest checkpoint), a `final/` export or a
    # released checkpoint; "scratch" = a random initialisation on purpose ("" is an error).
    c.init_from = ""
    c.data = ml_collections.ConfigDict()
    # 'tfds', 'tsv:<GLUE dir>' or 'embedded' (the shipped offline tasks, wnpos and wnsense)
    c.data.source = "tfds"
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
        c.data.source = "embedded"
        c.log_every = 25
        c.eval_batch_size = 32
    return c
