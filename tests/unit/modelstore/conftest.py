from pathlib import Path

import pytest

from appliance.modelstore import build_tiny_causal_lm


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_causal_lm(tmp_path_factory.mktemp("tiny") / "model", seed=0)
