"""The image engine on the tiny seeded Stable Diffusion pipeline with real trained fine-tunes (no mocks)."""

from __future__ import annotations

import io
import threading

import pytest
import torch
from PIL import Image
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from appliance.diffusion import build_tiny_sd_pipeline, train_images
from appliance.diffusion.compat import text_encoder_lora_supported
from appliance.errors import ConflictError, InvalidRequestError, NotFoundError
from serving.diffusers_engine import DiffusersEngine, DiffusersEngineConfig
from serving.errors import AdapterLoadError, AdapterNotFoundError
from tests.unit.diffusion.conftest import QUICK, disc_dataset, make_spec, single_thread  # noqa: F401

BASE = "tiny-sd"
PROMPT = "a photo of sks disc"
LORA = "pytorch_lora_weights.safetensors"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_sd_pipeline(tmp_path_factory.mktemp("engine") / BASE, seed=0)


@pytest.fixture(scope="module")
def fine_tunes(tiny_dir):
    """Real artefacts from the trainer: two LoRAs, a DreamBooth UNet, a DreamBooth UNet + text encoder."""
    data = disc_dataset()

    def run(method, **hp):
        spec = make_spec(method, **{**QUICK, **hp})
        return train_images(spec, tiny_dir, data, sample_steps=1).artifacts

    return {
        "lora-a": run("dreambooth_lora", rank=4, seed=0),
        "lora-b": run("dreambooth_lora", rank=8, seed=1, learning_rate=2e-2),
        "db": run("dreambooth"),
        "db-te": run("dreambooth", train_text_encoder=True),
    }


@pytest.fixture
def engine(tiny_dir):
    with DiffusersEngine.from_pretrained(tiny_dir, name=BASE) as e:
        yield e


def images(engine, model=BASE, **kw) -> list[bytes]:
    kw = {"seed": 7, "num_inference_steps": 3, **kw}
    return engine.generate(PROMPT, model=model, **kw)


def test_generates_pngs_reproducibly(engine):
    out = images(engine, n=2)
    assert len(out) == 2 and all(b.startswith(b"\x89PNG") for b in out)
    assert Image.open(io.BytesIO(out[0])).size == (16, 16)  # the base's default size
    assert images(engine, n=2) == out
    assert images(engine, seed=8)[0] == out[1]  # image i uses seed + i, whatever n
    assert Image.open(io.BytesIO(images(engine, size="24x16")[0])).size == (24, 16)
    assert images(engine, guidance_scale=1.0, negative_prompt="blue") != out[:1]


@pytest.mark.parametrize(("kwargs", "param", "message"), [
    ({"prompt": ""}, "prompt", "`prompt` must be a non-empty string"),
    ({"n": 0}, "n", "`n` must be an integer from 1 to 10; got 0"),
    ({"n": 11}, "n", "got 11"),
    ({"size": "big"}, "size", "`size` must look like '512x512'"),
    ({"size": "20x16"}, "size", "multiples of 8"),
    ({"size": "2048x2048"}, "size", "at most 1048576"),
    ({"seed": -1}, "seed", "`seed` must be a non-negative integer"),
    ({"num_inference_steps": 0}, "num_inference_steps", "from 1 to 150; got 0"),
    ({"guidance_scale": float("nan")}, "guidance_scale", "from 0 to 30"),
    ({"negative_prompt": 3}, "negative_prompt", "must be a string"),
])
def test_bad_parameters_name_the_parameter(engine, kwargs, param, message):
    kw = {"model": BASE, **kwargs}
    prompt = kw.pop("prompt", PROMPT)
    with pytest.raises(InvalidRequestError, match=message) as info:
        engine.generate(prompt, **kw)
    assert info.value.param == param


def test_lora_load_switch_unload(engine, fine_tunes):
    base = images(engine)
    info = engine.load_adapter("lora-a", fine_tunes["lora-a"])
    assert (info.rank, info.alpha, info.target_modules, info.resident) == (4, 4.0, ("unet",), True)
    engine.load_adapter("lora-b", fine_tunes["lora-b"])
    a, b = images(engine, "lora-a"), images(engine, "lora-b")
    assert len({base[0], a[0], b[0]}) == 3
    # Switching back and forth reproduces each exactly, and the base is untouched by resident adapters.
    assert [images(engine, m) for m in (BASE, "lora-a", "lora-b", "lora-a", BASE)] == [base, a, b, a, base]
    assert engine.stats["switches"] >= 4 and engine.stats["switch_ms"]
    assert {i.name for i in engine.adapters()} == {"lora-a", "lora-b"}
    engine.unload_adapter("lora-a")
    with pytest.raises(AdapterNotFoundError) as info_err:
        images(engine, "lora-a")
    assert isinstance(info_err.value, NotFoundError) and info_err.value.param == "model"
    assert images(engine, "lora-b") == b and images(engine) == base
    assert set(engine.pipe.get_list_adapters().get("unet", [])) == {engine._registry._entries["lora-b"].handle.key}
    with pytest.raises(AdapterNotFoundError):
        engine.unload_adapter("lora-a")


def test_names_conflicts_and_replace(engine, fine_tunes):
    engine.load_adapter("x", fine_tunes["lora-a"])
    with pytest.raises(ConflictError, match="already loaded"):
        engine.load_adapter("x", fine_tunes["lora-b"])
    a = images(engine, "x")
    assert engine.load_adapter("x", fine_tunes["lora-b"], replace=True).loads == 2
    assert images(engine, "x") != a
    with pytest.raises(InvalidRequestError, match="base model's name"):
        engine.load_adapter(BASE, fine_tunes["lora-a"])


def test_dreambooth_pipelines_share_the_base_components(engine, fine_tunes, tiny_dir, tmp_path):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    base = images(engine)
    engine.load_adapter("db", fine_tunes["db"])
    info = engine.load_adapter("db-te", fine_tunes["db-te"])
    assert info.rank == 0 and info.target_modules == ("text_encoder", "unet")
    db = engine._registry._entries["db"].handle.pipeline
    db_te = engine._registry._entries["db-te"].handle.pipeline
    assert db.vae is engine.pipe.vae and db.tokenizer is engine.pipe.tokenizer
    assert db.text_encoder is engine.pipe.text_encoder and db.unet is not engine.pipe.unet
    assert db_te.vae is engine.pipe.vae and db_te.text_encoder is not engine.pipe.text_encoder
    assert db.scheduler is not engine.pipe.scheduler  # schedulers hold per-call state
    # The engine's DreamBooth output is what stock diffusers makes of the artefact.
    for name, data in fine_tunes["db"].items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    stock = StableDiffusionPipeline.from_pretrained(tiny_dir, local_files_only=True)
    stock.unet = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    stock.set_progress_bar_config(disable=True)
    png = io.BytesIO()
    stock(PROMPT, num_inference_steps=3, generator=[torch.Generator().manual_seed(7)]).images[0].save(png, "PNG")
    assert images(engine, "db") == [png.getvalue()]
    # A LoRA on the shared base does not leak into a DreamBooth pipeline.
    engine.load_adapter("lora-a", fine_tunes["lora-a"])
    lora = images(engine, "lora-a")
    assert images(engine, "db") == [png.getvalue()] and images(engine, "lora-a") == lora
    assert images(engine, "db-te") not in (base, lora, [png.getvalue()])
    engine.unload_adapter("db")
    assert images(engine) == base


def _tamper(raw: bytes, change) -> bytes:
    tensors = load_safetensors(raw)
    change(tensors)
    return save_safetensors(tensors)


def _first(tensors, part):
    return next(k for k in sorted(tensors) if part in k)


@pytest.mark.parametrize(("make", "message"), [
    (lambda f: {LORA: b"garbage"}, "not a readable safetensors file"),
    (lambda f: {"adapter_model.bin": b"x"}, "pickle file, which is refused"),
    (lambda f: {"notes.txt": b"x"}, "neither a LoRA"),
    (lambda f: {LORA: _tamper(f["lora-a"][LORA], lambda t: t.update({"unet.up.lora_A.weight": t.pop(
        _first(t, "lora.down"))}))}, "has no lora_[AB] weight"),
    (lambda f: {LORA: _tamper(f["lora-a"][LORA], lambda t: t.__setitem__(_first(t, "lora.up"), t[_first(
        t, "lora.up")] * float("nan")))}, "NaN or infinite"),
    (lambda f: {LORA: _tamper(f["lora-a"][LORA], lambda t: t.__setitem__(_first(t, "lora.down"), torch.zeros(
        4, 5)))}, "base model 'tiny-sd' expects"),
    (lambda f: {LORA: _tamper(f["lora-a"][LORA], lambda t: t.update({"lora_unet_down_blocks_0.alpha": torch.tensor(
        1.0)}))}, "not a diffusers-format LoRA weight"),
    (lambda f: {"unet/config.json": f["db"]["unet/config.json"]}, "unet/diffusion_pytorch_model.safetensors is "
                                                                   "missing"),
    (lambda f: {**f["db"], "unet/diffusion_pytorch_model.safetensors": _tamper(
        f["db"]["unet/diffusion_pytorch_model.safetensors"], lambda t: t.pop(_first(t, "conv_in")))}, "lacks"),
    (lambda f: {**f["db"], "vae/config.json": b"{}"}, "unexpected file 'vae/config.json'"),
], ids=["garbage", "pickle", "unknown", "unknown-module", "nan", "shape", "kohya", "db-missing", "db-lacks", "db-extra"])
def test_broken_adapters_are_refused_and_nothing_changes(engine, fine_tunes, make, message):
    engine.load_adapter("good", fine_tunes["lora-a"])
    base, good = images(engine), images(engine, "good")
    listed = engine.pipe.get_list_adapters()
    with pytest.raises(AdapterLoadError, match=message):
        engine.load_adapter("bad", make(fine_tunes))
    assert not engine.has_adapter("bad") and engine.pipe.get_list_adapters() == listed
    with pytest.raises(AdapterNotFoundError):  # unknown (never loaded) is not "broken"
        images(engine, "bad")
    assert images(engine) == base and images(engine, "good") == good


def test_a_failure_inside_diffusers_is_rolled_back(engine, fine_tunes, monkeypatch):
    """Fault injection: diffusers' real loader runs, then fails; the engine must delete what it added."""
    base = images(engine)
    real = engine.pipe.load_lora_weights

    def load_then_fail(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("injected failure after loading")

    monkeypatch.setattr(engine.pipe, "load_lora_weights", load_then_fail)
    with pytest.raises(AdapterLoadError, match="injected failure"):
        engine.load_adapter("half", fine_tunes["lora-a"])
    monkeypatch.undo()
    assert engine.pipe.get_list_adapters().get("unet", []) == [] and not engine.has_adapter("half")
    assert images(engine) == base


def test_text_encoder_lora_is_gated_on_the_installed_peft(engine):
    path, q = next((n, m) for n, m in engine.pipe.text_encoder.named_modules() if n.endswith("q_proj"))
    raw = save_safetensors({
        f"text_encoder.{path}.lora.down.weight": torch.zeros(4, q.in_features),
        f"text_encoder.{path}.lora.up.weight": torch.zeros(q.out_features, 4),
    })
    supported, _ = text_encoder_lora_supported()
    if supported:
        assert engine.load_adapter("te", {LORA: raw}).target_modules == ("text_encoder",)
    else:
        with pytest.raises(AdapterLoadError, match="needs peft >= "):
            engine.load_adapter("te", {LORA: raw})


def test_concurrent_requests_match_sequential_ones(engine, fine_tunes):
    engine.load_adapter("lora-a", fine_tunes["lora-a"])
    engine.load_adapter("lora-b", fine_tunes["lora-b"])
    engine.load_adapter("db", fine_tunes["db"])
    models = [BASE, "lora-a", "lora-b", "db"]
    expected = {m: images(engine, m) for m in models}
    results: list[tuple[str, list[bytes]]] = []
    errors: list[BaseException] = []

    def client(i: int) -> None:
        try:
            for k in range(3):
                m = models[(i + k) % len(models)]
                results.append((m, images(engine, m)))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(results) == 12
    assert all(out == expected[m] for m, out in results)


def test_lru_eviction_reloads_through_adapter_source(tiny_dir, fine_tunes):
    fetched = []

    def source(name):
        fetched.append(name)
        return fine_tunes[name]

    config = DiffusersEngineConfig(max_resident_adapters=2)
    with DiffusersEngine.from_pretrained(tiny_dir, name=BASE, config=config, adapter_source=source) as engine:
        engine.load_adapter("lora-a")
        first = images(engine, "lora-a")
        engine.load_adapter("lora-b")
        engine.load_adapter("db")
        assert engine.resident_adapters() == ["lora-b", "db"] and engine.has_adapter("lora-a")
        assert images(engine, "lora-a") == first  # reloaded on demand
        assert fetched == ["lora-a", "lora-b", "db", "lora-a"]
        assert len(engine.pipe.get_list_adapters()["unet"]) <= 2
    with DiffusersEngine.from_pretrained(tiny_dir, name=BASE, config=config) as engine:
        engine.load_adapter("a", fine_tunes["lora-a"])
        engine.load_adapter("b", fine_tunes["lora-b"])
        with pytest.raises(ConflictError, match="no adapter_source"):
            engine.load_adapter("c", fine_tunes["db"])


def test_hotswap_mode_serves_the_same_images(tiny_dir, fine_tunes, engine):
    engine.load_adapter("lora-a", fine_tunes["lora-a"])
    engine.load_adapter("lora-b", fine_tunes["lora-b"])
    expected = {m: images(engine, m) for m in (BASE, "lora-a", "lora-b")}
    config = DiffusersEngineConfig(lora_mode="hotswap", max_lora_rank=8)
    with DiffusersEngine.from_pretrained(tiny_dir, name=BASE, config=config) as hot:
        hot.load_adapter("lora-a", fine_tunes["lora-a"])
        hot.load_adapter("lora-b", fine_tunes["lora-b"])  # another rank: padded to the slot's target rank
        for m in (BASE, "lora-a", "lora-b", "lora-a", BASE):
            assert images(hot, m) == expected[m]
        assert hot.pipe.get_list_adapters()["unet"] == ["slot"]
        subset = _tamper(fine_tunes["lora-a"][LORA], lambda t: [t.pop(k) for k in list(t) if "attn2" in k])
        with pytest.raises(AdapterLoadError, match="same modules as the first one"):
            hot.load_adapter("subset", {LORA: subset})
