"""Hugging Face Hub model ids -> local checkpoint directories, through `huggingface_hub`'s cache.

`resolve_checkpoint("danfu09/m2-bert-80M", filenames=...)` does what transformers'
`from_pretrained` does with an id: it fetches `config.json` and the first weights file of
`filenames` the repository has (nothing else: no tokenizer, README or other weight formats) into
the hub cache (`cache_dir`, else `HF_HUB_CACHE`, else `$HF_HOME/hub`), at `revision` (a branch,
tag or commit; default the main branch), and returns the snapshot directory holding them. With
`HF_HUB_OFFLINE=1` or `local_files_only=True` only the cache is used. A path that exists locally
always wins over a hub id.
"""

from __future__ import annotations

import os
import re

# `org/name` or `name`: letters, digits, `-`, `_`, `.`; at most 96 characters per part.
_REPO_ID = re.compile(r"(?:[\w][\w.-]{0,95}/)?[\w][\w.-]{0,95}")


def is_hub_id(path: str) -> bool:
    """Whether `path` (which does not exist locally) can be a Hub model id."""
    return bool(_REPO_ID.fullmatch(path)) and ".." not in path and "--" not in path


def resolve_checkpoint(
    path: str,
    filenames: tuple[str, ...],
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    local_files_only: bool = False,
) -> str:
    """`path` itself if it exists; else the cache snapshot directory of Hub model `path`.

    Raises FileNotFoundError naming the id (and the cache, when downloads are off) if the model
    or its weights cannot be found.
    """
    if os.path.exists(path):
        return path
    if not is_hub_id(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        import huggingface_hub
        from huggingface_hub import constants
        from huggingface_hub.utils import (
            EntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:
        raise ImportError(
            f"no local checkpoint at {path!r}; loading it as a Hugging Face Hub id needs "
            "huggingface_hub (pip install huggingface_hub)"
        ) from None
    offline = local_files_only or constants.HF_HUB_OFFLINE
    where = f"{path!r} (revision {revision or constants.DEFAULT_REVISION})"

    def fetch(filename: str) -> str | None:
        try:
            return huggingface_hub.hf_hub_download(
                path,
                filename,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=offline,
            )
        except EntryNotFoundError:  # not in the repository, or (offline) not in the cache
            return None

    try:
        fetch("config.json")  # optional: without it the config is inferred from the shapes
        weights = next((w for name in filenames if (w := fetch(name)) is not None), None)
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"no local checkpoint at {path!r}, and no model {path!r} on the Hugging Face Hub "
            "(or it is private or gated: log in with `hf auth login`)"
        ) from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hugging Face Hub model {where}: no such revision") from None
    if weights is None:
        cache = os.path.abspath(os.path.expanduser(cache_dir or constants.HF_HUB_CACHE))
        if offline:
            raise FileNotFoundError(
                f"no local checkpoint at {path!r}, and the Hugging Face Hub model {where} is not "
                f"in the cache {cache} (none of {', '.join(filenames)}), and downloads are off "
                "(HF_HUB_OFFLINE=1 or local_files_only=True)"
            )
        raise FileNotFoundError(
            f"the Hugging Face Hub model {where} has none of {', '.join(filenames)} (or the Hub "
            f"could not be reached and the cache {cache} lacks them)"
        )
    return os.path.dirname(weights)
