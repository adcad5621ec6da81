"""Flag handling shared by the training launches: joining a multi-process (multi-host) run, and
parsing that names the field when a `--config.x.y` override has none."""

import difflib
import sys

from absl import app, flags
from ml_collections import config_dict, config_flags

from m2jax.trainer import check_distributed_args, init_distributed

_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "number of processes")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "this process's index")


@flags.multi_flags_validator(
    ["coordinator_address", "num_processes", "process_id"],
    message="inconsistent multi-process flags",
)
def _check_distributed_flags(values: dict) -> bool:
    # At parse time, so that a bad combination is a flags error before anything is built.
    try:
        check_distributed_args(
            values["coordinator_address"], values["num_processes"], values["process_id"]
        )
    except ValueError as e:
        raise flags.ValidationError(str(e)) from None
    return True


def init_distributed_from_flags() -> bool:
    """jax.distributed.initialize from these flags, or from the cluster's environment."""
    return init_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


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
                return (
                    f"--{name}: {where} has no field {part!r}{hint}; its fields: "
                    + ", ".join(fields)
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
