"""What the installed library versions can do: moved to :mod:`serving.diffusers_compat`.

The serving engine needs the check and serving imports nothing from the
appliance, so it lives there; this module re-exports it for the trainer and recipes.
"""

from __future__ import annotations

from serving.diffusers_compat import text_encoder_lora_supported

__all__ = ["text_encoder_lora_supported"]
