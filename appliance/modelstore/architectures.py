"""The causal-LM architectures the appliance imports and trains.

One table, keyed by ``config.model_type``. An architecture is listed only when
its output head is a plain linear layer over the decoder's last hidden state,
optionally soft-capped by ``config.final_logit_softcapping`` as Gemma 2 does
(the training loop computes logits for labelled positions only and applies that
cap itself, which would be wrong for models that scale logits some other way),
when its attention variations are ones the packed attention reproduces (sliding
windows, Gemma 2's soft-capped scores; see :mod:`appliance.training.packing`),
and when vLLM serves LoRA on it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Architecture:
    """What training needs to know about one ``model_type``.

    Attributes:
        attention_projections: Linear layers inside self-attention.
        mlp_projections: Linear layers inside the feed-forward block.
    """

    attention_projections: tuple[str, ...]
    mlp_projections: tuple[str, ...]

    @property
    def default_target_modules(self) -> tuple[str, ...]:
        """LoRA targets when ``target_modules`` is ``"auto"``: every attention and MLP projection."""
        return self.attention_projections + self.mlp_projections


_LLAMA_LIKE = Architecture(
    attention_projections=("q_proj", "k_proj", "v_proj", "o_proj"),
    mlp_projections=("gate_proj", "up_proj", "down_proj"),
)

#: Phi-3 fuses the query, key and value projections into one layer, and the gate and up projections.
_PHI3 = Architecture(
    attention_projections=("qkv_proj", "o_proj"),
    mlp_projections=("gate_up_proj", "down_proj"),
)

SUPPORTED_ARCHITECTURES: dict[str, Architecture] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,  # Gemma3ForCausalLM; the multimodal ``gemma3`` is not a causal LM
    "phi3": _PHI3,
}

#: Module names that must never carry LoRA weights or be saved whole:
#: vLLM refuses adapters touching the output head or the embeddings.
FORBIDDEN_TARGET_MODULES: frozenset[str] = frozenset(
    {"lm_head", "embed_tokens", "embed_out", "wte", "wpe", "output", "embeddings", "word_embeddings"}
)
