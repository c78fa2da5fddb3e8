import pytest

from appliance.diffusion import (
    HYPERPARAMETERS,
    DreamBoothHyperparameters,
    DreamBoothLoraHyperparameters,
    HyperparameterError,
    ImageLoraHyperparameters,
    ImageTrainingSpec,
    resolve,
)
from appliance.errors import InvalidRequestError


def test_every_problem_is_reported_at_once_naming_field_and_value():
    with pytest.raises(HyperparameterError) as info:
        ImageTrainingSpec.from_method({"type": "dreambooth", "dreambooth": {"hyperparameters": {
            "rank": 4, "learning_rate": 0, "resolution": 500, "num_class_images": 5, "mixed_precision": "fp8",
            "snr_gamma": -1, "train_text_encoder": 1, "seed": -3, "max_train_steps": "many",
            "checkpoint_every_steps": -1, "instance_prompt": "",
        }}})
    problems = dict(info.value.problems)
    p = "method.dreambooth.hyperparameters."
    assert "not a known hyperparameter of 'dreambooth'" in problems[p + "rank"]
    assert problems[p + "learning_rate"].endswith("got 0")
    assert problems[p + "resolution"] == 'must be a multiple of 8 from 8 to 4096 pixels or "auto"; got 500'
    assert "has no effect without class_prompt" in problems[p + "num_class_images"]
    assert problems[p + "mixed_precision"] == "must be one of 'auto', 'no', 'fp16', 'bf16'; got 'fp8'"
    assert problems[p + "snr_gamma"].endswith("got -1")
    assert problems[p + "train_text_encoder"] == "must be true or false; got 1"
    assert problems[p + "seed"].endswith("got -3")
    assert problems[p + "max_train_steps"].endswith("got 'many'")
    assert problems[p + "checkpoint_every_steps"].endswith("got -1")
    assert problems[p + "instance_prompt"].endswith("got ''")
    assert len(problems) == 11
    assert isinstance(info.value, InvalidRequestError) and info.value.param == info.value.problems[0][0]


def test_method_object_parsing():
    assert ImageTrainingSpec.from_method(None) == ImageTrainingSpec("lora", ImageLoraHyperparameters())
    spec = ImageTrainingSpec.from_method({"type": "dreambooth_lora", "dreambooth_lora": {"hyperparameters": {
        "rank": 8, "class_prompt": "a photo of a dog", "prior_loss_weight": 0.5}}})
    assert spec.hyperparameters == DreamBoothLoraHyperparameters(rank=8, class_prompt="a photo of a dog",
                                                                 prior_loss_weight=0.5)
    with pytest.raises(HyperparameterError, match="method.type: must be one of 'lora', 'dreambooth', "
                                                  "'dreambooth_lora'; got 'textual_inversion'"):
        ImageTrainingSpec.from_method({"type": "textual_inversion"})
    with pytest.raises(HyperparameterError) as info:
        ImageTrainingSpec.from_method({"type": "lora", "dreambooth": {}, "lora": {"hyperparameters": {
            "class_prompt": "x"}}})
    assert [p for p, _ in info.value.problems] == ["method.dreambooth", "method.lora.hyperparameters.class_prompt"]
    assert set(HYPERPARAMETERS) == {"lora", "dreambooth", "dreambooth_lora"}


def test_defaults_follow_the_diffusers_scripts():
    def auto(hp, n=4, **kw):
        return resolve(hp, n_images=n, default_resolution=512, **kw)

    lora = auto(ImageLoraHyperparameters(), n=40)
    assert (lora.learning_rate, lora.rank, lora.train_batch_size, lora.resolution) == (1e-4, 4, 16, 512)
    assert lora.max_train_steps == 100 * 3  # num_train_epochs 100 over ceil(40 / 16) steps
    db = auto(DreamBoothHyperparameters())
    assert (db.learning_rate, db.train_batch_size, db.max_train_steps) == (5e-6, 4, 400)
    assert (db.prior_loss_weight, db.num_class_images) == (None, None)  # no class_prompt: no prior preservation
    dbl = auto(DreamBoothLoraHyperparameters(class_prompt="a dog"))
    assert (dbl.learning_rate, dbl.rank, dbl.max_train_steps) == (5e-4, 4, 500)
    assert (dbl.prior_loss_weight, dbl.num_class_images) == (1.0, 100)
    for hp in (lora, db, dbl):
        assert hp.gradient_accumulation_steps == 1 and hp.snr_gamma is None and hp.seed == 0
        assert (hp.checkpoint_every_steps, hp.validation_every_steps, hp.mixed_precision) == (500, 100, "no")
        assert "auto" not in hp.to_dict().values()
        assert type(hp)(**hp.to_dict()) == hp
    assert auto(DreamBoothHyperparameters(), device_type="cuda", bf16_supported=True).mixed_precision == "bf16"
    assert auto(DreamBoothHyperparameters(), device_type="cuda").mixed_precision == "no"


def test_resolution_checks_against_the_model_and_device():
    with pytest.raises(HyperparameterError, match="resolution: must be a multiple of 16 for this model; got 24"):
        resolve(DreamBoothHyperparameters(resolution=24), n_images=4, default_resolution=512, size_multiple=16)
    with pytest.raises(HyperparameterError, match="mixed_precision: 'fp16' needs a CUDA device"):
        resolve(DreamBoothHyperparameters(mixed_precision="fp16"), n_images=4, default_resolution=512)


def test_importable_without_torch():
    import subprocess
    import sys

    code = ("import sys; import appliance.diffusion as d; d.ImageTrainingSpec.from_method(None); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
