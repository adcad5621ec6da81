"""Builds a Hugging Face Hub cache on disk, in the hub's own layout, for loading tests offline.

    <cache>/models--<org>--<name>/blobs/<sha256>            file contents
    <cache>/models--<org>--<name>/snapshots/<commit>/<file>  -> ../../blobs/<sha256>
    <cache>/models--<org>--<name>/refs/<branch or tag>       the commit hash
"""

import hashlib
import os


def add_snapshot(cache_dir, repo_id: str, files: dict, commit: str, refs=("main",)) -> str:
    """Puts `files` ({name in the repo: local path}) into the cache as commit `commit` (40 hex
    digits) of model `repo_id`, pointed to by `refs`; returns the snapshot directory."""
    repo = os.path.join(str(cache_dir), "models--" + repo_id.replace("/", "--"))
    snapshot = os.path.join(repo, "snapshots", commit)
    os.makedirs(os.path.join(repo, "blobs"), exist_ok=True)
    os.makedirs(os.path.join(repo, "refs"), exist_ok=True)
    os.makedirs(snapshot, exist_ok=True)
    for name, source in files.items():
        with open(source, "rb") as f:
            data = f.read()
        blob = hashlib.sha256(data).hexdigest()
        with open(os.path.join(repo, "blobs", blob), "wb") as f:
            f.write(data)
        os.symlink(os.path.join("..", "..", "blobs", blob), os.path.join(snapshot, name))
    for ref in refs:
        with open(os.path.join(repo, "refs", ref), "w") as f:
            f.write(commit)
    return snapshot


def add_saved_model(cache_dir, repo_id: str, model_dir, commit: str, refs=("main",)) -> str:
    """A `save_pretrained` directory (plus any other files in it) as a cached commit."""
    files = {name: os.path.join(model_dir, name) for name in os.listdir(model_dir)}
    return add_snapshot(cache_dir, repo_id, files, commit, refs)
