"""The model store: importing base models offline and describing them.

Heavy libraries (torch, transformers) are imported inside the functions, so
importing this package is cheap for the API process.
"""

from appliance.modelstore.architectures import FORBIDDEN_TARGET_MODULES, SUPPORTED_ARCHITECTURES, Architecture
from appliance.modelstore.demo import DemoModelMissingError, demo_gguf_path
from appliance.modelstore.importer import ModelInfo, hash_model_dir, import_model
from appliance.modelstore.tiny import TINY_MODEL_TYPES, build_tiny_causal_lm

__all__ = [
    "FORBIDDEN_TARGET_MODULES",
    "SUPPORTED_ARCHITECTURES",
    "TINY_MODEL_TYPES",
    "Architecture",
    "DemoModelMissingError",
    "ModelInfo",
    "build_tiny_causal_lm",
    "demo_gguf_path",
    "hash_model_dir",
    "import_model",
]
