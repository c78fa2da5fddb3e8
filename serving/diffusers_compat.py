"""What the installed library versions can do, checked once where it matters (serving and training).

Imported by the diffusers engine here and, through :mod:`appliance.diffusion.compat`, by the trainer.
"""

from __future__ import annotations


def text_encoder_lora_supported() -> tuple[bool, str]:
    """Whether LoRA can be attached to a transformers text encoder with the installed peft.

    transformers' adapter integration (used by diffusers to load text-encoder
    LoRA, and by the trainer to attach it) requires a minimum peft version.
    """
    from importlib.metadata import version

    from packaging.version import Version
    from transformers.integrations import peft as peft_integration

    needed = getattr(peft_integration, "MIN_PEFT_VERSION", "0")
    installed = version("peft")
    if Version(installed) < Version(needed):
        return False, (f"transformers {version('transformers')} needs peft >= {needed} for text-encoder adapters "
                       f"and peft {installed} is installed")
    return True, ""
