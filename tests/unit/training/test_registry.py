import subprocess
import sys

from appliance.training import HYPERPARAMETERS
from appliance.training.registry import RECIPES, get_recipe


def test_every_method_has_a_recipe_and_hyperparameters():
    assert set(RECIPES) == set(HYPERPARAMETERS) == {"lora", "qlora"}
    for name, recipe in RECIPES.items():
        assert recipe.method == name and callable(recipe.setup) and callable(recipe.save)
    assert get_recipe("qlora") is RECIPES["qlora"]


def test_validating_a_job_does_not_load_torch():
    code = (
        "import sys; from appliance.training import TrainingSpec, TrainResult; "
        "TrainingSpec.from_method({'type': 'qlora', 'qlora': {'hyperparameters': {'lora_r': 8}}}); "
        "import appliance.modelstore; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'heavy import'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
