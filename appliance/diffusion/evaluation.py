"""Subject and prompt fidelity with learned encoders, as the DreamBooth paper measures them.

Ruiz et al., *DreamBooth* (CVPR 2023), section 4.1:

* **DINO**: mean pairwise cosine similarity between the ViT [CLS] embeddings (the paper
  uses DINO ViT-S/16) of generated and real images of the subject.
* **CLIP-I**: the same with CLIP image embeddings (the projected pooled output).
* **CLIP-T**: mean cosine similarity between each prompt's CLIP text embedding and the
  CLIP image embeddings of the images generated from it.

The real images are the job's instance images, all of them: DreamBooth datasets hold
3-5 images, too few to hold some out, and the paper compares to the subject's real
images the same way. The prompts are held out: none is trained on
(:func:`evaluation_prompts`). Encoders come from the model store
(:mod:`appliance.diffusion.evaluators`); nothing here downloads or writes anything.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from appliance.diffusion.evaluators import EVALUATOR_CLASSES, image_processor_class
from appliance.errors import InvalidRequestError

#: Held-out prompt templates after the DreamBooth paper's evaluation prompts (recontextualisation and
#: property changes; ``{}`` is the instance prompt). Four, to keep the generation cost bounded.
DEFAULT_PROMPT_TEMPLATES = (
    "{} on the beach",
    "{} in the snow",
    "{} with a city in the background",
    "a red {}",
)
#: Images generated per held-out prompt (the paper generates 4 for each of 25 prompts).
IMAGES_PER_PROMPT = 2
#: Images embedded per forward pass.
EMBED_BATCH = 8

#: How the learned figures are computed (stored with the metrics).
FIDELITY_METRIC = (
    "DreamBooth (Ruiz et al. 2023) metrics: CLIP-I and DINO are the mean pairwise cosine similarity of the "
    "generations' image embeddings (CLIP projected image embedding; DINO ViT [CLS]) with those of all the job's "
    "instance images (DreamBooth sets are too small to hold images out, and the paper compares with the subject's "
    "real images the same way); CLIP-T is the mean cosine similarity of each held-out prompt's CLIP text embedding "
    "with the images generated from it. Generations: the instance prompt's and the held-out prompts', same seeds "
    "before and after training."
)


def evaluation_prompts(instance_prompt: str, given: Sequence[str] | None) -> list[str]:
    """The held-out prompts: the job's ``evaluation_prompts``, else the default templates on the instance prompt."""
    if given:
        return list(given)
    return [t.format(instance_prompt) for t in DEFAULT_PROMPT_TEMPLATES]


def _mean_pairwise_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return float((a @ b.T).mean())


def pairwise_similarity(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Mean cosine similarity over every (generated, real) pair of embeddings ``(N, D)`` and ``(M, D)``."""
    return _mean_pairwise_cosine(generated, real)


def matched_similarity(images: torch.Tensor, texts: torch.Tensor) -> float:
    """Mean cosine similarity of row ``i`` of ``images`` with row ``i`` of ``texts`` (CLIP-T)."""
    a = torch.nn.functional.normalize(images.float(), dim=-1)
    b = torch.nn.functional.normalize(texts.float(), dim=-1)
    return float((a * b).sum(-1).mean())


@dataclass
class _Encoder:
    name: str
    model: Any
    processor: Any
    tokenizer: Any = None


class Evaluators:
    """The job's CLIP model and DINO ViT, loaded once, kept on the CPU between evaluations.

    Args:
        clip_dir: An imported ``CLIPModel`` folder, or None.
        dino_dir: An imported ``ViTModel``/``Dinov2Model`` folder, or None.
        device: Where embeddings are computed (the training device).
        dtype: Weight dtype (the training dtype: a ViT-L/14 CLIP is 430M parameters).
    """

    def __init__(self, clip_dir: Path | None, dino_dir: Path | None, device: torch.device,
                 dtype: torch.dtype = torch.float32,
                 on_error: Callable[[str, Path, Exception], None] | None = None) -> None:
        self.device, self.dtype = device, dtype
        self.clip = self._try(clip_dir, dtype, True, on_error)
        self.dino = self._try(dino_dir, dtype, False, on_error)

    @staticmethod
    def _try(folder: Path | None, dtype: torch.dtype, clip: bool,
             on_error: Callable[[str, Path, Exception], None] | None) -> _Encoder | None:
        """The encoder in ``folder``; with ``on_error``, one that cannot be loaded is reported and left out
        (the run's other figures go on) instead of failing the run."""
        if folder is None:
            return None
        try:
            return _load(Path(folder), dtype, clip=clip)
        except Exception as exc:
            if on_error is None:
                raise
            on_error("clip" if clip else "dino", Path(folder), exc)
            return None

    @property
    def names(self) -> dict[str, str]:
        """``{"clip": name, "dino": name}`` for the encoders loaded."""
        return {k: e.name for k, e in (("clip", self.clip), ("dino", self.dino)) if e is not None}

    def score(self, generated: Sequence, real: Sequence, prompted: Sequence[tuple[str, Any]]) -> dict[str, float]:
        """``clip_i``, ``dino`` (``generated`` vs ``real`` images) and ``clip_t`` (``(prompt, image)`` pairs).

        Only the figures of the encoders loaded are present.
        """
        out: dict[str, float] = {}
        if self.clip is not None:
            with self._on_device(self.clip.model):
                gen = self._images(self.clip, generated)
                out["clip_i"] = pairwise_similarity(gen, self._images(self.clip, real))
                if prompted:
                    out["clip_t"] = self._clip_t(prompted)
        if self.dino is not None:
            with self._on_device(self.dino.model):
                out["dino"] = pairwise_similarity(self._images(self.dino, generated), self._images(self.dino, real))
        return out

    def clip_t(self, prompted: Sequence[tuple[str, Any]]) -> float:
        """CLIP-T of ``(prompt, image)`` pairs alone, as :meth:`score` measures it (evaluations of image models).

        Raises:
            ValueError: No CLIP model is loaded, or no pairs are given.
        """
        if self.clip is None or not prompted:
            raise ValueError("CLIP-T needs a CLIP model and at least one (prompt, image) pair")
        with self._on_device(self.clip.model):
            return self._clip_t(prompted)

    def _clip_t(self, prompted: Sequence[tuple[str, Any]]) -> float:
        images = self._images(self.clip, [im for _, im in prompted])
        return matched_similarity(images, self._texts([p for p, _ in prompted]))

    @contextmanager
    def _on_device(self, model) -> Iterator[None]:
        model.to(self.device)
        try:
            yield
        finally:
            model.to("cpu")  # off the accelerator while training runs

    @torch.no_grad()
    def _images(self, encoder: _Encoder, images: Sequence) -> torch.Tensor:
        out = []
        for start in range(0, len(images), EMBED_BATCH):
            batch = [im.convert("RGB") for im in images[start:start + EMBED_BATCH]]
            pixels = encoder.processor(images=batch, return_tensors="pt")["pixel_values"]
            pixels = pixels.to(self.device, dtype=self.dtype)
            if encoder.tokenizer is not None:  # CLIP: the projected pooled output (get_image_features)
                pooled = encoder.model.vision_model(pixel_values=pixels).pooler_output
                out.append(encoder.model.visual_projection(pooled).float().cpu())
            else:  # DINO: the [CLS] token of the last (normalised) hidden state
                out.append(encoder.model(pixel_values=pixels).last_hidden_state[:, 0].float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def _texts(self, prompts: Sequence[str]) -> torch.Tensor:
        clip = self.clip
        out = []
        for start in range(0, len(prompts), EMBED_BATCH):
            tokens = clip.tokenizer(list(prompts[start:start + EMBED_BATCH]), padding=True, truncation=True,
                                    max_length=clip.model.config.text_config.max_position_embeddings,
                                    return_tensors="pt").to(self.device)
            pooled = clip.model.text_model(input_ids=tokens["input_ids"],
                                           attention_mask=tokens["attention_mask"]).pooler_output
            out.append(clip.model.text_projection(pooled).float().cpu())
        return torch.cat(out)


def _load(folder: Path, dtype: torch.dtype, *, clip: bool) -> _Encoder:
    """An evaluator from its store folder, on the CPU in ``dtype``, offline; the allow-lists are checked again."""
    import transformers

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    model_class = (config.get("architectures") or [None])[0]
    family = EVALUATOR_CLASSES.get(model_class, (None, None))[1]
    if family != ("clip" if clip else "dino"):
        raise InvalidRequestError(f"evaluator {folder.name!r} is a {model_class}, not a "
                                  f"{'CLIP model' if clip else 'DINO ViT'}", param="evaluator")
    processor_name = image_processor_class(json.loads((folder / "preprocessor_config.json").read_text()),
                                           folder / "preprocessor_config.json")
    # The PIL implementation where there is one: the same figures with or without torchvision.
    processor_cls = getattr(transformers, processor_name + "Pil", None) or getattr(transformers, processor_name)
    processor = processor_cls.from_pretrained(folder, local_files_only=True)
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, "dtype": dtype}
    if model_class == "ViTModel":
        kwargs["add_pooling_layer"] = False  # DINO takes [CLS]; a checkpoint may lack the pooler
    model = getattr(transformers, model_class).from_pretrained(folder, **kwargs).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, local_files_only=True) if clip else None
    return _Encoder(folder.name, model, processor, tokenizer)


def describe(scores: dict[str, float], names: dict[str, str]) -> str:
    """``"CLIP-I 0.812, DINO 0.620, CLIP-T 0.291 (clip-vit-b-32, dino-vits16)"``; empty without figures."""
    parts = [f"{label} {scores[key]:.3f}" for key, label in (("clip_i", "CLIP-I"), ("dino", "DINO"),
                                                             ("clip_t", "CLIP-T")) if key in scores]
    return f"{', '.join(parts)} ({', '.join(names.values())})" if parts else ""

