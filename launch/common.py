"""What the training launches share: the flags besides `--config` (work directory, joining a
multi-process run, restart, printing the config), quiet logging, and exit codes.

Exit codes (docs/training.md): 0 finished (now or before), 75 preempted after saving (re-run to
resume), 3 invalid config, 4 unusable input data, 5 non-finite loss, 6 checkpoints that cannot
be resumed, 7 work directory not writable (full disk), 1 anything unexpected (with traceback).
"""

from __future__ import annotations

import difflib
import os
import sys
from typing import Any, Callable

from absl import app, flags, logging
from ml_collections import config_dict, config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKDIR = flags.DEFINE_string(
    "workdir",
    None,
    "work directory (local or gs://): checkpoints, TensorBoard events, "
    "results.json, final/ (the trained model). Re-running with the same one resumes the run, or "
    "reports its results when it finished",
)
PRINT_CONFIG = flags.DEFINE_bool(
    "print_config",
    False,
    "print the resolved config (the recipe with every override applied) "
    "and exit without running",
)
RESTART = flags.DEFINE_bool(
    "restart",
    False,
    "when no checkpoint in --workdir can be read, set them aside "
    "(<step>.unreadable-<n>) and train again from step 0; without it that is an error",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    None,
    "host:port of process 0 (multi-process runs, with "
    "--num_processes and --process_id; not needed on TPU VMs, SLURM or Open MPI)",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


@flags.multi_flags_validator(
    ["coordinator_address", "num_processes", "process_id"],
    message="inconsistent multi-process flags",
)
def _check_distributed_flags(values: dict) -> bool:
    # At parse time, so that a bad combination is a flags error before anything is built.
    from m2jax.train.distributed import check_distributed_args

    try:
        check_distributed_args(
            values["coordinator_address"], values["num_processes"], values["process_id"]
        )
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


def config_help(kind: str, config_file: str, variants: tuple[str, ...]) -> str:
    return (
        f"{kind} recipe, `configs/{config_file}:<variant>`; variants: {', '.join(variants)}. "
        "Override any field with --config.<field>=<value> (e.g. --config.total_steps=1000, "
        "--config.model.hidden_size=512); --print_config shows every field"
    )


def run_job(job_name: str, config: Any) -> None:
    """Runs `m2jax.train.jobs.<job_name>(config, workdir, restart=...)` as the flags say; exits
    with its code."""
    # --print_config and a missing --workdir are answered before jax loads (seconds): the job's
    # module is imported after them.
    if PRINT_CONFIG.value:
        print(config, end="")
        sys.exit(0)
    if not WORKDIR.value:
        raise app.UsageError("--workdir is required (or --print_config)")
    from m2jax.train import jobs
    from m2jax.train.console import configure_logging
    from m2jax.train.distributed import init_distributed

    job = getattr(jobs, job_name)
    verbosity = flags.FLAGS["verbosity"].value if flags.FLAGS["verbosity"].present else None
    configure_logging(verbosity)

    init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    sys.exit(
        run_and_report(
            job, config, WORKDIR.value, restart=RESTART.value, traceback=verbosity is not None
        )
    )


def run_and_report(
    job: Callable[..., dict],
    config: Any,
    workdir: str,
    *,
    restart: bool = False,
    traceback: bool = False,
) -> int:
    """Runs the job; prints its summary line, or `error: <message>` (stderr) for a run that
    stopped on purpose. Returns the exit code (the module docstring's table)."""
    from m2jax.train.console import say
    from m2jax.train.errors import EXIT_OK, EXIT_PREEMPTED, RunError
    from m2jax.train.jobs import summary

    try:
        results = job(config, workdir, restart=restart)
    except RunError as e:
        if traceback:
            logging.exception("the run stopped")
        sys.stderr.write(f"error: {e}\n")
        sys.stderr.flush()
        return e.exit_code
    say(summary(results))
    return EXIT_PREEMPTED if results.get("status") == "preempted" else EXIT_OK


def unknown_override(argv: list[str], flag: str = "config") -> str | None:
    """The message for the first `--<flag>.a.b=...` in `argv` naming a field that the config
    file given by `--<flag>=<file>[:<arg>]` lacks; None when every override names a field."""
    spec = _flag_value(argv, flag)
    if spec is None:
        return None
    config = _load_config(argv[0], flag, spec)
    for arg in argv:
        if not arg.startswith("-"):
            continue
        name = arg.lstrip("-").split("=", 1)[0]
        if name.startswith("no" + flag + "."):
            name = name[2:]
        if not name.startswith(flag + "."):
            continue
        node, where = config, flag
        for part in name.split(".")[1:]:
            if not isinstance(node, config_dict.ConfigDict):
                break  # an index or a dataclass: left to config_flags
            if part not in node:
                fields = sorted(node.keys())
                close = difflib.get_close_matches(part, fields, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                return f"--{name}: {where} has no field {part!r}{hint}; its fields: " + ", ".join(
                    fields
                )
            node, where = node[part], f"{where}.{part}"
    return None


def _load_config(program: str, flag: str, spec: str) -> config_dict.ConfigDict:
    """The config file's config without overrides, through config_flags' own loader."""
    argv = [program, f"--{flag}={spec}"]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file(flag, None, "", flag_values=values, sys_argv=argv)
    values(argv)
    return holder.value


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        for prefix in ("--", "-"):
            if arg.startswith(f"{prefix}{flag}="):
                return arg.split("=", 1)[1]
            if arg == f"{prefix}{flag}" and i + 1 < len(argv):
                return argv[i + 1]
    return None


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run`'s flag parser, plus a clear error for an override of a missing config field
    (ml_collections lets a bare AttributeError/KeyError through, naming only the last key)."""
    try:
        return app.parse_flags_with_usage(argv)
    except (AttributeError, KeyError):
        message = unknown_override(argv)
        if message is None:
            raise
        sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
        sys.exit(1)
