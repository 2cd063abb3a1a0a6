"""Name -> folder resolution: presets, repo ids, folders; what is downloaded; actionable errors."""

import json

import pytest

import minidistill.hub as hub


class FakeHub:
    """Stands in for huggingface_hub.hf_hub_download over an in-memory repo (no network)."""

    def __init__(self, root, files: dict[str, str]):
        self.root, self.files, self.fetched = root, files, []

    def __call__(self, repo, filename, revision=None):
        from huggingface_hub.errors import EntryNotFoundError

        self.fetched.append(filename)
        if filename not in self.files:
            raise EntryNotFoundError(f"{filename} not in {repo}")
        path = self.root / repo.replace("/", "--") / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.files[filename])
        return str(path)


def test_sharded_repo_fetches_index_shards_only(tmp_path, monkeypatch):
    index = {"weight_map": {"a": "model-00001-of-000002.safetensors", "b": "model-00002-of-000002.safetensors"}}
    files = {"config.json": "{}", "tokenizer.json": "{}", "model.safetensors.index.json": json.dumps(index),
             "model-00001-of-000002.safetensors": "", "model-00002-of-000002.safetensors": "",
             "pytorch_model.bin": "", "modeling_x.py": ""}
    fake = FakeHub(tmp_path, files)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake)
    folder = hub.resolve_model_dir("r1-distill-llama-8b")
    assert folder == tmp_path / "deepseek-ai--DeepSeek-R1-Distill-Llama-8B"
    # The 6-digit shard names come from the index, never guessed; no pickles, no code.
    assert "model-00001-of-000002.safetensors" in fake.fetched and "model-00002-of-000002.safetensors" in fake.fetched
    assert not any(f.endswith((".bin", ".py", ".pth")) for f in fake.fetched)
    fake.fetched.clear()
    hub.resolve_model_dir("deepseek-ai/DeepSeek-R1-Distill-Llama-8B", weights=False)
    assert not any(f.endswith(".safetensors") or f.endswith("index.json") for f in fake.fetched)


def test_repo_without_safetensors_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr("huggingface_hub.hf_hub_download", FakeHub(tmp_path, {"config.json": "{}", "pytorch_model.bin": ""}))
    with pytest.raises(FileNotFoundError, match="safetensors weights only"):
        hub.resolve_model_dir("org/old-model")


def test_names_folders_and_errors(tmp_path):
    assert hub.resolve_model_dir(str(tmp_path)) == tmp_path  # an existing folder is used as is
    assert hub.repo_id_for("phi-4-mini") == "microsoft/Phi-4-mini-instruct"
    assert hub.repo_id_for("org/name") == "org/name"
    with pytest.raises(ValueError, match="unknown preset 'phi4mini'; valid presets: .*phi-4-mini"):
        hub.repo_id_for("phi4mini")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        hub.repo_id_for(str(tmp_path / "missing" / "folder"))


@pytest.mark.parametrize("kind,needle", [
    ("GatedRepoError", "HF_TOKEN"),
    ("RepositoryNotFoundError", "not found on the hub"),
    ("LocalEntryNotFoundError", "offline and not in the Hugging Face cache"),
])
def test_download_errors_say_what_to_do(tmp_path, monkeypatch, kind, needle):
    err = type(kind, (Exception,), {})

    def failing(repo, filename, revision=None):
        raise err("boom")
    monkeypatch.setattr("huggingface_hub.hf_hub_download", failing)
    with pytest.raises(RuntimeError, match=needle) as info:
        hub.resolve_model_dir("meta-llama/Llama-3.1-8B-Instruct")
    assert "local folder" in str(info.value)
