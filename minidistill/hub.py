"""Model name or path -> a local folder holding the checkpoint files.

A preset name maps to a hub repo id (config.PRESETS); "org/name" is a repo id; anything
that exists on disk is a folder. Downloads go through huggingface_hub, so its cache is
reused, and fetch only what the library reads: config, generation config, tokenizer
files and the safetensors weights named by the index (never *.bin, *.pth or remote code).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import PRESETS, preset_repo

META_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def repo_id_for(name_or_path: str) -> str | None:
    """The hub repo id meant by a name, or None when it is an existing local folder."""
    if os.path.isdir(name_or_path):
        return None
    if name_or_path in PRESETS:
        return PRESETS[name_or_path]
    parts = name_or_path.split("/")
    if len(parts) == 2 and all(parts):
        return name_or_path
    if os.path.sep in name_or_path or name_or_path.startswith("."):
        raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")
    return preset_repo(name_or_path)  # raises, listing the valid presets


def resolve_model_dir(name_or_path: str, *, weights: bool = True, revision: str | None = None) -> Path:
    """Return a local folder with the checkpoint's files, downloading what is missing.

    weights=False fetches only config, generation config and tokenizer files. "demo" names
    the offline demo's tiny model (built on first use), so every command can be tried on it.
    """
    if name_or_path == "demo" and not os.path.isdir(name_or_path):
        from .demo import demo_model_dir

        return demo_model_dir()
    repo = repo_id_for(name_or_path)
    if repo is None:
        return Path(name_or_path)
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError
    except ImportError:  # older huggingface_hub
        from huggingface_hub import hf_hub_download
        from huggingface_hub.utils import EntryNotFoundError

    def fetch(filename: str, required: bool) -> Path | None:
        try:
            return Path(hf_hub_download(repo, filename, revision=revision))
        except EntryNotFoundError:
            if required:
                raise FileNotFoundError(f"{repo} has no {filename}") from None
            return None
        except Exception as e:  # noqa: BLE001 - turned into an actionable message
            raise RuntimeError(_download_advice(repo, filename, e)) from e

    config = fetch("config.json", required=True)
    folder = config.parent
    fetch("generation_config.json", required=False)
    for name in TOKENIZER_FILES:
        fetch(name, required=False)
    if weights:
        index = fetch(INDEX_FILE, required=False)
        if index is not None:
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            for shard in _progress(shards, f"downloading {repo}"):
                fetch(shard, required=True)
        elif fetch(SINGLE_FILE, required=False) is None:
            raise FileNotFoundError(
                f"{repo} has neither {INDEX_FILE} nor {SINGLE_FILE}: minidistill loads safetensors "
                "weights only (never pickled .bin/.pth files)")
    return folder


def _progress(items: list[str], desc: str):
    try:
        from tqdm.auto import tqdm  # installed with huggingface_hub
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="shard", disable=len(items) < 2)


def _download_advice(repo: str, filename: str, err: Exception) -> str:
    kind = type(err).__name__
    if kind == "GatedRepoError":
        return (f"{repo} is gated: accept its licence on the hub page, then log in with "
                "`huggingface-cli login` or set HF_TOKEN; or pass a local folder instead")
    if kind == "RepositoryNotFoundError":
        return (f"repo {repo!r} not found on the hub (or private: set HF_TOKEN). Valid presets: "
                f"{', '.join(sorted(PRESETS))}; or pass a local folder")
    if kind in ("LocalEntryNotFoundError", "OfflineModeIsEnabled") or "offline" in str(err).lower():
        return (f"cannot fetch {filename} of {repo}: offline and not in the Hugging Face cache. "
                "Connect once to download it (it is cached afterwards), unset HF_HUB_OFFLINE, "
                "or pass a local folder holding config.json, tokenizer.json and *.safetensors")
    return f"downloading {filename} from {repo} failed ({kind}: {err}); pass a local folder to skip the hub"
