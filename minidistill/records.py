"""Dataset records in, chat messages out: file readers, hub file choice, schema adapters.

Readers stream: JSONL line by line (dolphin-r1 is 3.85 GB), Parquet by row group, a JSON
array element by element from one read of the text. Every record comes with where it was
found (`data.jsonl:17`, `data.json:element 3 (line 12)`, `data.parquet:row 5`), so a bad one
can be named. Schemas are recognised from the keys of
the first valid record (or forced with `format`) and turned into a list of
{"role", "content"} messages whose last assistant turn holds `<think>\n…\n</think>\n answer`.
Plain-text records (a prompt template, or the `text` format) skip the chat format: templates.py.
"""

from __future__ import annotations

import fnmatch
import gzip
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

FORMATS = ("messages", "sharegpt", "dolphin-r1", "medical-o1", "magpie", "alpaca")  # chat schemas
DATA_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "valid", "val", "dev"),
                 "test": ("test",)}
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                  "assistant": "assistant", "chatgpt": "assistant", "model": "assistant"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(:[\w.-]+)?$")


class BadRecord(ValueError):
    """A record that cannot be turned into a conversation; the message says why."""


@dataclass
class Record:
    where: str  # "data.jsonl:17" (file name and line; "element N (line L)" in a JSON array, "row N" in Parquet)
    data: Any  # the parsed object, or a BadRecord when the text itself did not parse


# ---------------------------------------------------------------------------- files

def resolve_files(source: str, *, config: str | None = None, split: str = "train") -> list[Path]:
    """Local file, local folder, or hub dataset `org/name[:config]` -> the data files to read."""
    path = Path(source).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        rel = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        readme = path / "README.md"
        chosen = choose_files(rel, readme.read_text(encoding="utf-8") if readme.exists() else None,
                              config, split, where=str(path))
        return [path / f for f in chosen]
    if _HUB_ID.match(source) and not source.startswith((".", "/", "~")):
        repo, _, cfg_from_id = source.partition(":")
        if cfg_from_id and config and cfg_from_id != config:
            raise ValueError(f"dataset config given twice: {source!r} and config={config!r}; keep one")
        return hub_files(repo, config=cfg_from_id or config, split=split)
    raise FileNotFoundError(
        f"data source {source!r} is neither an existing file or folder nor a hub dataset id "
        "(org/name or org/name:config); check the path")


def skipped_files(source: str) -> list[str]:
    """The files of a local folder that are not read as data (other extensions), relative to it;
    its README.md (the dataset card) and hidden files are left out. [] for anything but a folder."""
    path = Path(source).expanduser()
    if not path.is_dir():
        return []
    rel = (p.relative_to(path) for p in path.rglob("*") if p.is_file())
    return sorted(str(r) for r in rel if not str(r).lower().endswith(DATA_SUFFIXES) and str(r) != "README.md"
                  and not any(part.startswith(".") for part in r.parts))


def hub_files(repo: str, *, config: str | None, split: str) -> list[Path]:
    """Download (or find in the HF cache) the files of one config/split of a hub dataset."""
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    try:
        files = HfApi().list_repo_files(repo, repo_type="dataset")
    except Exception as e:  # noqa: BLE001 - turned into advice, or the offline cache below
        kind = type(e).__name__
        if kind == "GatedRepoError":
            raise RuntimeError(f"dataset {repo} is gated: accept its terms on the hub page, then "
                               "`huggingface-cli login` or set HF_TOKEN") from e
        if kind == "RepositoryNotFoundError":
            raise FileNotFoundError(f"dataset {repo!r} not found on the hub (or private: set HF_TOKEN); "
                                    "for a local file or folder, check that the path exists") from e
        try:  # offline: whatever an earlier run left in the HF cache
            folder = Path(snapshot_download(repo, repo_type="dataset", local_files_only=True))
        except Exception:  # noqa: BLE001
            raise RuntimeError(
                f"cannot list dataset {repo} ({kind}: {e}) and it is not in the Hugging Face cache. "
                "Connect once to download it (it is cached afterwards), unset HF_HUB_OFFLINE, or "
                "download the files and pass their local path") from e
        return resolve_files(str(folder), config=config, split=split)
    readme = None
    if "README.md" in files:
        readme = Path(hf_hub_download(repo, "README.md", repo_type="dataset")).read_text(encoding="utf-8")
    chosen = choose_files(files, readme, config, split, where=repo)
    return [Path(hf_hub_download(repo, f, repo_type="dataset")) for f in chosen]


def choose_files(files: list[str], readme: str | None, config: str | None, split: str,
                 *, where: str = "dataset") -> list[str]:
    """Pick the data files of one config and split from a repo's file list.

    The README's YAML `configs:` (config_name -> data_files, per split or not) decides when
    present; otherwise file names do: files naming the config, then files naming the split
    (`*train*`), all data files being the train split when none names a split."""
    data = sorted(f for f in files if f.lower().endswith(DATA_SUFFIXES))
    configs = _readme_configs(readme)
    if configs:
        names = [c.get("config_name", "default") for c in configs]
        if config is None:
            default = [c for c in configs if c.get("default")] or \
                [c for c in configs if c.get("config_name", "default") == "default"]
            if len(default) == 1 or len(configs) == 1:
                entry = (default or configs)[0]
            else:
                raise ValueError(f"{where} has configs {names}; choose one with org/name:config "
                                 "or DataConfig.config")
        else:
            match = [c for c in configs if c.get("config_name", "default") == config]
            if not match:
                raise ValueError(f"{where} has no config {config!r}; its configs are {names}")
            entry = match[0]
        patterns = _split_patterns(entry.get("data_files"), split, where)
        chosen = [f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)]
        if not chosen:
            raise FileNotFoundError(f"{where}: config {entry.get('config_name')!r} split {split!r} "
                                    f"names {patterns}, which match none of its files")
        return sorted(chosen)
    if not data:
        raise FileNotFoundError(f"{where} holds no data files ({', '.join(DATA_SUFFIXES)}); "
                                f"files: {sorted(files)[:20]}")
    if config is not None:
        tok = re.compile(rf"(^|[/_.-]){re.escape(config)}([/_.-]|$)", re.IGNORECASE)
        data = [f for f in data if tok.search(f)]
        if not data:
            raise FileNotFoundError(f"{where}: no data file names config {config!r}; "
                                    f"data files: {sorted(f for f in files if f.endswith(DATA_SUFFIXES))}")
    by_split = {s: [f for f in data if _names_split(f, aliases)] for s, aliases in SPLIT_ALIASES.items()}
    if any(by_split.values()):
        chosen = by_split.get(split) or [f for f in data if _names_split(f, (split,))]
        if not chosen:
            raise FileNotFoundError(f"{where}: no data file for split {split!r}; data files: {data}")
        return chosen
    if split != "train":
        raise FileNotFoundError(f"{where}: no file names a split, so all of {data} are 'train'; "
                                f"split {split!r} does not exist")
    return data


def _readme_configs(readme: str | None) -> list[dict]:
    if not readme or not readme.startswith("---"):
        return []
    from huggingface_hub import DatasetCard

    try:
        meta = DatasetCard(readme).data.to_dict()
    except Exception:  # noqa: BLE001 - a broken card falls back to the file-name rules
        return []
    configs = meta.get("configs") or []
    return [c for c in configs if isinstance(c, dict) and c.get("data_files")]


def _split_patterns(data_files: Any, split: str, where: str) -> list[str]:
    if isinstance(data_files, str):  # one pattern, which is the train split
        data_files = [{"split": "train", "path": data_files}]
    entries = [e if isinstance(e, dict) else {"split": "train", "path": e} for e in data_files]
    for e in entries:
        if e.get("split", "train") == split:
            p = e.get("path")
            return [p] if isinstance(p, str) else list(p)
    raise FileNotFoundError(f"{where}: split {split!r} not found; splits: "
                            f"{[e.get('split', 'train') for e in entries]}")


def _names_split(path: str, aliases: tuple[str, ...]) -> bool:
    stem = path.lower()
    return any(re.search(rf"(^|[/_.-]){a}([/_.-]|$)", stem) for a in aliases)


# ---------------------------------------------------------------------------- readers

def iter_records(files: list[Path], limit: int | None = None) -> Iterator[Record]:
    """Every record of every file, in order, with its location; stops after `limit`."""
    n = 0
    for f in files:
        for rec in _read(Path(f)):
            if limit is not None and n >= limit:
                return
            n += 1
            yield rec


def _read(path: Path) -> Iterator[Record]:
    name = path.name
    if name.endswith(".parquet"):
        yield from _read_parquet(path)
        return
    opener = gzip.open if name.endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(4096).lstrip()
    if name.endswith(".json") and head.startswith(b"["):
        yield from _read_json_array(path)
        return
    with opener(path, "rb") as f:  # JSONL: one line in memory at a time
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Record(f"{name}:{i}", json.loads(line))
            except ValueError as e:
                yield Record(f"{name}:{i}", BadRecord(f"invalid JSON ({e})"))


def _read_json_array(path: Path) -> Iterator[Record]:
    # One parse per element with raw_decode, so each record knows its line and one bad
    # element does not lose the file (it does lose what follows: JSON has no resync point).
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    pos, line = text.index("[") + 1, 1 + text.count("\n", 0, text.index("["))
    ws = re.compile(r"[\s,]*")
    k = 0  # the element's number (1-based, as Parquet rows): a minified array is all on line 1
    while True:
        end = ws.match(text, pos).end()
        line += text.count("\n", pos, end)
        pos = end
        if pos >= len(text) or text[pos] == "]":
            return
        k += 1
        where = f"{path.name}:element {k} (line {line})"
        try:
            obj, new = dec.raw_decode(text, pos)
        except ValueError as e:
            yield Record(where, BadRecord(f"invalid JSON ({e}); the rest of the file is skipped"))
            return
        yield Record(where, obj)
        line += text.count("\n", pos, new)
        pos = new


def _read_parquet(path: Path) -> Iterator[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install minidistill[parquet]") from None
    pf = pq.ParquetFile(path)
    row = 0
    for g in range(pf.num_row_groups):  # one row group in memory at a time
        for obj in pf.read_row_group(g).to_pylist():
            row += 1
            yield Record(f"{path.name}:row {row}", obj)


# ---------------------------------------------------------------------------- schemas

def detect_schema(obj: Any) -> str | None:
    """The schema of a record from its keys, or None when no schema fits."""
    if not isinstance(obj, dict):
        return None
    k = obj.keys()
    if "messages" in k and "reasoning" in k and "answer" in k:
        return "dolphin-r1"
    if "Question" in k and "Response" in k:
        return "medical-o1"
    if "instruction" in k and "response" in k:
        return "magpie"  # before sharegpt: Magpie rows also carry `conversations`
    if "instruction" in k and "output" in k:
        return "alpaca"
    if "messages" in k:
        return "messages"
    if "conversations" in k:
        return "sharegpt"
    return None


def to_messages(obj: Any, fmt: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """One record of schema `fmt` -> chat messages ending with an assistant turn; BadRecord if not."""
    if not isinstance(obj, dict):
        raise BadRecord(f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "messages":
        msgs = _chat(_field(obj, "messages", list), "role", "content", {r: r for r in ROLES}, "messages")
    elif fmt == "sharegpt":
        msgs = _chat(_field(obj, "conversations", list), "from", "value", SHAREGPT_ROLES, "conversations")
    elif fmt == "dolphin-r1":
        msgs = _chat(_field(obj, "messages", list), "role", "content", {r: r for r in ROLES}, "messages")
        while msgs and msgs[-1]["role"] == "assistant":  # the prompt side only
            msgs.pop()
        msgs.append(_assistant(obj.get("reasoning"), _field(obj, "answer", str), "reasoning"))
    elif fmt == "medical-o1":
        msgs = [{"role": "user", "content": _field(obj, "Question", str)},
                _assistant(obj.get("Complex_CoT"), _field(obj, "Response", str), "Complex_CoT")]
    elif fmt == "magpie":
        msgs = [{"role": "user", "content": _field(obj, "instruction", str)},
                {"role": "assistant", "content": _field(obj, "response", str).strip()}]
    elif fmt == "alpaca":
        extra = obj.get("input") or ""
        if not isinstance(extra, str):
            raise BadRecord(f"field 'input' must be a string, got {type(extra).__name__}")
        prompt = _field(obj, "instruction", str) + (f"\n\n{extra.strip()}" if extra.strip() else "")
        msgs = [{"role": "user", "content": prompt},
                {"role": "assistant", "content": _field(obj, "output", str).strip()}]
    else:
        raise ValueError(f"unknown format {fmt!r}; valid: auto, {', '.join(FORMATS)}")
    while msgs and msgs[-1]["role"] != "assistant":  # a trailing prompt trains nothing
        msgs.pop()
    if not any(m["role"] == "assistant" for m in msgs):
        raise BadRecord("no assistant turn")
    if system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return msgs


def think_content(reasoning: str | None, answer: str) -> str:
    """`<think>\\n{reasoning}\\n</think>\\n{answer}`, keeping a think block the text already has."""
    answer = answer.strip()
    r = (reasoning or "").strip()
    if not r:
        return answer
    if "</think>" not in r:
        r = f"<think>\n{r}\n</think>"
    elif "<think>" not in r:  # some traces start inside the block
        r = f"<think>\n{r}"
    return f"{r}\n{answer}"


def _assistant(reasoning: Any, answer: str, name: str) -> dict[str, str]:
    if reasoning is not None and not isinstance(reasoning, str):
        raise BadRecord(f"field {name!r} must be a string, got {type(reasoning).__name__}")
    return {"role": "assistant", "content": think_content(reasoning, answer)}


def _field(obj: dict, key: str, typ: type) -> Any:
    if key not in obj or obj[key] is None:
        raise BadRecord(f"missing field {key!r} (keys: {sorted(obj)})")
    v = obj[key]
    if not isinstance(v, typ):
        raise BadRecord(f"field {key!r} must be {typ.__name__}, got {type(v).__name__}")
    if typ is str and not v.strip():
        raise BadRecord(f"field {key!r} is empty")
    if typ is list and not v:
        raise BadRecord(f"field {key!r} is an empty list")
    return v


def _chat(turns: list, role_key: str, text_key: str, roles: dict[str, str], name: str) -> list[dict[str, str]]:
    out = []
    for i, t in enumerate(turns):
        if not isinstance(t, dict):
            raise BadRecord(f"{name}[{i}] must be an object, got {type(t).__name__}")
        role, content = t.get(role_key), t.get(text_key)
        if role not in roles:
            raise BadRecord(f"{name}[{i}] has unknown {role_key} {role!r}; expected one of {sorted(roles)}")
        if not isinstance(content, str):
            raise BadRecord(f"{name}[{i}].{text_key} must be a string, got {type(content).__name__}")
        if not content.strip():
            raise BadRecord(f"{name}[{i}] ({role}) has empty content")
        role = roles[role]
        if role == "system" and out:
            raise BadRecord(f"{name}[{i}]: a system message is only allowed first")
        out.append({"role": role, "content": content})
    return out


def data_fingerprint(files: list[Path]) -> list[tuple[str, int, int]]:
    """(path, size, mtime_ns) of each file: the data part of the cache key."""
    out = []
    for f in files:
        st = os.stat(f)
        out.append((str(Path(f).resolve()), st.st_size, st.st_mtime_ns))
    return out
