"""The shared training core: a low layer, capabilities declared per method, one checkpoint format per modality."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

import appliance.trainkit
from appliance.diffusion.registry import REGISTRY as IMAGE_REGISTRY
from appliance.errors import InvalidRequestError
from appliance.jobs.recipes import capabilities
from appliance.trainkit.hyperparameters import FieldChecks
from appliance.trainkit.registry import RecipeCapabilities
from appliance.training.registry import REGISTRY as LLM_REGISTRY

FORBIDDEN = ("appliance.training", "appliance.diffusion", "appliance.jobs", "appliance.server", "appliance.files",
             "appliance.portal", "serving")


def test_trainkit_imports_no_modality_and_nothing_above_it():
    for path in Path(appliance.trainkit.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.name} has no docstring"
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(FORBIDDEN), f"{path.name} imports {name}"


@pytest.mark.parametrize(("kind", "method", "expected"), [
    ("llm", "lora", RecipeCapabilities(supports_dp=True, supports_fsdp=True, output="adapter")),
    ("llm", "qlora", RecipeCapabilities(supports_dp=False, supports_fsdp=False, output="adapter")),
    ("diffusion", "lora", RecipeCapabilities(output="adapter")),
    ("diffusion", "dreambooth", RecipeCapabilities(output="full_weights")),
    ("diffusion", "dreambooth_lora", RecipeCapabilities(output="adapter")),
])
def test_every_method_declares_what_it_supports(kind, method, expected):
    assert capabilities(kind, method) == expected
    registry = LLM_REGISTRY if kind == "llm" else IMAGE_REGISTRY
    assert registry.recipe(method).capabilities is registry.capabilities(method)


def test_unknown_methods_have_no_capabilities_and_the_registry_names_the_known_ones():
    assert capabilities("llm", "dreambooth") is None and capabilities("audio", "lora") is None
    with pytest.raises(InvalidRequestError, match="`method.type` must be one of 'lora', 'qlora'; got 'full'"):
        LLM_REGISTRY.recipe("full")


def test_field_checks_skip_fields_a_method_does_not_have():
    @dataclass(frozen=True)
    class Hp:
        steps: object = 0
        method = "demo"

    check = FieldChecks(Hp(), at_least="an integer from")
    check.int_in("steps", 2, 9)
    check.int_in("rank", 1, 9)
    assert check.problems == [("method.demo.hyperparameters.steps", 'must be an integer from 2 (at most 9) or "auto"; '
                                                                    "got 0")]


def test_checkpoint_formats_stay_apart_and_resume_checks_name_every_problem():
    from appliance.diffusion import checkpoint as image_ckpt
    from appliance.trainkit.checkpoint import check_resume
    from appliance.training import checkpoint as llm_ckpt

    blob = llm_ckpt.dump({"method": "lora", "hyperparameters": {"a": 1}, "data_fingerprint": "f", "step": 3})
    assert llm_ckpt.load(blob)["format"] == "appliance.training.checkpoint/1"
    with pytest.raises(InvalidRequestError, match="must be a checkpoint in format 'appliance.diffusion.checkpoint/1'"):
        image_ckpt.load(blob)

    class Hp:
        def to_dict(self):
            return {"a": 2}

    with pytest.raises(InvalidRequestError) as info:
        check_resume(llm_ckpt.CHECKPOINT, blob, method="qlora", hp=Hp(), data_fingerprint="g", total_steps=3,
                     other_data="it was trained on different data")
    assert info.value.message == (
        "`resume_from` cannot continue this run: it was made by method 'lora', not 'qlora'; its resolved "
        "hyperparameters differ from this job's; it was trained on different data; its step 3 is outside this "
        "run's 1..2")
