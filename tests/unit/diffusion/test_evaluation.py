"""The learned fidelity evaluation (CLIP-I, DINO, CLIP-T) on tiny random evaluators, and their import.

The tiny models' similarities are meaningless; these tests check the wiring, the metric definitions and
that the same seed gives the same figures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from appliance.diffusion.evaluation import (
    DEFAULT_PROMPT_TEMPLATES,
    IMAGES_PER_PROMPT,
    Evaluators,
    evaluation_prompts,
    matched_similarity,
    pairwise_similarity,
)
from appliance.diffusion.evaluators import import_evaluator_model, is_evaluator_folder
from appliance.diffusion.tiny import build_tiny_clip_model, build_tiny_dino_model
from appliance.diffusion.trainer import train_images
from appliance.errors import InvalidRequestError
from tests.unit.diffusion.conftest import PROMPT, QUICK, make_spec, red_disc


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluator-sources")
    return {"clip": build_tiny_clip_model(root / "clip", seed=0), "vit": build_tiny_dino_model(root / "vit", seed=0),
            "dinov2": build_tiny_dino_model(root / "dinov2", seed=0, model_class="Dinov2Model")}


@pytest.fixture(scope="module")
def store(sources, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evaluator-store")
    out = {}
    for name, src in sources.items():
        import_evaluator_model(src, root / name, name)
        out[name] = root / name
    return out


def images(*colours: str) -> list[Image.Image]:
    return [Image.new("RGB", (16, 16), c) for c in colours]


# --------------------------------------------------------------------------- metric definitions


def test_similarities_follow_the_paper_definitions():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert pairwise_similarity(a, a) == pytest.approx(0.5)  # two identical pairs (1) and two orthogonal (0)
    assert pairwise_similarity(a[:1], torch.tensor([[3.0, 0.0]])) == pytest.approx(1.0)
    assert matched_similarity(a, torch.tensor([[2.0, 0.0], [0.0, -1.0]])) == pytest.approx(0.0)  # 1 and -1


def test_identical_images_score_one_and_scores_are_deterministic(store):
    ev = Evaluators(store["clip"], store["vit"], torch.device("cpu"))
    assert ev.names == {"clip": "clip", "dino": "vit"}
    same = ev.score(images("red"), images("red"), [])
    assert same["clip_i"] == pytest.approx(1.0, abs=1e-5) and same["dino"] == pytest.approx(1.0, abs=1e-5)
    assert "clip_t" not in same  # no prompts: no CLIP-T
    scores = ev.score(images("red", "blue", "green"), images("red", "white"),
                      [("a red disc", images("red")[0]), ("a blue disc", images("blue")[0])])
    assert set(scores) == {"clip_i", "dino", "clip_t"} and all(-1 <= v <= 1 for v in scores.values())
    again = Evaluators(store["clip"], store["vit"], torch.device("cpu")).score(
        images("red", "blue", "green"), images("red", "white"),
        [("a red disc", images("red")[0]), ("a blue disc", images("blue")[0])])
    assert again == scores


def test_a_dinov2_evaluator_alone_gives_dino_only(store):
    ev = Evaluators(None, store["dinov2"], torch.device("cpu"))
    scores = ev.score(images("red", "blue"), images("red"), [("a red disc", images("red")[0])])
    assert set(scores) == {"dino"}


def test_a_clip_folder_is_not_taken_for_a_dino_model(store):
    with pytest.raises(InvalidRequestError, match="not a DINO ViT"):
        Evaluators(None, store["clip"], torch.device("cpu"))


def test_held_out_prompts_default_to_the_templates_on_the_instance_prompt():
    assert evaluation_prompts(PROMPT, None) == [t.format(PROMPT) for t in DEFAULT_PROMPT_TEMPLATES]
    assert evaluation_prompts(PROMPT, ["a sks disc in space"]) == ["a sks disc in space"]
    assert all(p != PROMPT for p in evaluation_prompts(PROMPT, None))


# --------------------------------------------------------------------------- import


def test_import_accepts_clip_vit_and_dinov2_folders(sources, tmp_path):
    for name, family, cls in (("clip", "clip", "CLIPModel"), ("vit", "dino", "ViTModel"),
                              ("dinov2", "dino", "Dinov2Model")):
        assert is_evaluator_folder(sources[name])
        info = import_evaluator_model(sources[name], tmp_path / name, name)
        assert (info.family, info.model_class) == (family, cls)
        assert info.content_hash.startswith("sha256:") and info.parameter_count > 0
        assert not list((tmp_path / name).glob("*.py"))


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def test_import_refuses_pickles_unknown_classes_and_code(sources, tmp_path):
    pickled = _copy(sources["vit"], tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(InvalidRequestError, match="pytorch_model.bin are pickle files"):
        import_evaluator_model(pickled, tmp_path / "out1", "x")

    unknown = _copy(sources["vit"], tmp_path / "unknown")
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["ViTForMaskedImageModeling"]}))
    with pytest.raises(InvalidRequestError, match="ViTForMaskedImageModeling") as err:
        import_evaluator_model(unknown, tmp_path / "out2", "x")
    assert "config.json" in str(err.value)

    remote = _copy(sources["vit"], tmp_path / "remote")
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModel": "m.Model"}}))
    with pytest.raises(InvalidRequestError, match="auto_map"):
        import_evaluator_model(remote, tmp_path / "out3", "x")

    code = _copy(sources["vit"], tmp_path / "code")
    (code / "modeling_evil.py").write_text("raise SystemExit\n")
    with pytest.raises(InvalidRequestError, match="modeling_evil.py"):
        import_evaluator_model(code, tmp_path / "out4", "x")

    processor = _copy(sources["vit"], tmp_path / "processor")
    (processor / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "EvilProcessor"}))
    with pytest.raises(InvalidRequestError, match="EvilProcessor"):
        import_evaluator_model(processor, tmp_path / "out5", "x")

    no_tokenizer = _copy(sources["clip"], tmp_path / "no-tokenizer")
    for f in ("tokenizer.json", "vocab.json", "merges.txt"):
        (no_tokenizer / f).unlink(missing_ok=True)
    with pytest.raises(InvalidRequestError, match="tokenizer"):
        import_evaluator_model(no_tokenizer, tmp_path / "out6", "x")
    assert not any(p.name.startswith("out") for p in tmp_path.iterdir())  # nothing left behind


# --------------------------------------------------------------------------- in a training run


def test_train_images_reports_clip_and_dino_before_and_after_reproducibly(tiny_sd, store):
    from appliance.diffusion import build_dataset_zip

    dataset = build_dataset_zip([red_disc(i) for i in range(3)], None, PROMPT)
    spec = make_spec("dreambooth_lora", **QUICK, evaluation_prompts=["a photo of sks disc in the snow"])

    def run():
        events = []
        result = train_images(spec, tiny_sd, dataset, device="cpu", sample_steps=2, on_event=events.append,
                              clip_model=store["clip"], dino_model=store["vit"])
        return result, events

    result, events = run()
    m = result.metrics
    for key in ("clip_i", "dino", "clip_t"):
        for when in ("before", "after"):
            assert isinstance(getattr(m, f"{key}_{when}"), float), f"{key}_{when}"
    assert m.fidelity_evaluators == {"clip": "clip", "dino": "vit"} and "DreamBooth" in m.fidelity_metric
    assert m.subject_fidelity_proxy_color_histogram_after is not None  # the proxy stays, labelled
    assert result.details["fidelity"]["evaluation_prompts"] == ["a photo of sks disc in the snow"]
    assert result.details["fidelity"]["images_per_prompt"] == IMAGES_PER_PROMPT
    messages = [e.message for e in events]
    assert any(msg.startswith("after training: CLIP-I ") and "(clip, vit)" in msg for msg in messages)
    assert any("fidelity evaluation" in msg and " s to the run" in msg for msg in messages)

    again, _ = run()
    assert again.metrics.to_dict() | {"train_seconds": 0, "images_per_second": 0} == \
        m.to_dict() | {"train_seconds": 0, "images_per_second": 0}


def test_a_broken_evaluator_costs_its_figures_not_the_job(tiny_sd, discs, store, tmp_path):
    import shutil

    broken = shutil.copytree(store["vit"], tmp_path / "vit-broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a damaged store copy
    events = []
    result = train_images(make_spec("dreambooth_lora", **QUICK), tiny_sd, discs, device="cpu", sample_steps=2,
                          on_event=events.append, clip_model=store["clip"], dino_model=broken)
    m = result.metrics
    assert result.status == "succeeded" and isinstance(m.clip_i_after, float) and m.dino_after is None
    assert m.fidelity_evaluators == {"clip": "clip"}
    warning = next(e.message for e in events if e.type == "warning" and "vit-broken" in e.message)
    assert "(DINO) could not be loaded" in warning and "re-import it" in warning


def test_without_evaluators_only_the_labelled_proxy_is_reported(tiny_sd, discs):
    result = train_images(make_spec("dreambooth_lora", **QUICK), tiny_sd, discs, device="cpu", sample_steps=2)
    m = result.metrics
    assert m.clip_i_after is None and m.dino_after is None and m.fidelity_evaluators is None
    assert m.subject_fidelity_metric.startswith("proxy:") and "no CLIP or DINO evaluator" in m.fidelity_metric
    assert result.details["fidelity"]["evaluators"] is None


def test_a_resumed_run_keeps_before_figures_only_from_the_same_evaluators():
    from types import SimpleNamespace

    from appliance.diffusion.trainer import _Fidelity

    warnings = []
    before = {"color_histogram": 0.5, "mean_color_distance": 0.1, "clip_i": 0.7, "dino": 0.6, "clip_t": 0.2,
              "evaluators": {"clip": "clip-a", "dino": "dino-a"}}
    same = _Fidelity(SimpleNamespace(names={"clip": "clip-a", "dino": "dino-a"}), None, [], [], 16,
                     lambda *a, **k: warnings.append(k["message"]))
    assert same.resumed(before) == before and not warnings
    other = _Fidelity(SimpleNamespace(names={"clip": "clip-b"}), None, [], [], 16,
                      lambda *a, **k: warnings.append(k["message"]))
    assert other.resumed(before) == {"color_histogram": 0.5, "mean_color_distance": 0.1}
    assert "clip-b" in warnings[0]
    none = _Fidelity(None, None, [], [], 16, lambda *a, **k: warnings.append(k["message"]))
    assert "clip_i" not in none.resumed(before) and len(warnings) == 1  # no evaluator now: nothing to warn about
