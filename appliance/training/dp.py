"""Differentially private LoRA training: DP-SGD through Opacus.

How a DP step differs from the trainer's packed step:

* Batches are Poisson-sampled: each training example joins a step
  independently with probability ``q = batch_size / n``, so a batch varies in
  size and may be empty (the step then adds noise only). The RDP accountant's
  subsampling bound assumes exactly this.
* Examples are right-padded into rows, one example per row: per-example
  gradients need rows that hold one example each, so no packing. Under causal
  attention a real token never attends to the padding after it, so each row
  computes exactly what its example computes alone, with no attention mask.
* Each example's loss is the mean over its own target tokens (the reported
  training loss is the mean of those, not a mean over all tokens). Opacus'
  :class:`~opacus.grad_sample.GradSampleHooks` compute each example's gradient
  of the LoRA weights (hooks, no wrapper module, so parameter names and
  adapter saving stay as they are); :class:`~opacus.optimizers.DPOptimizer`
  clips each to ``max_grad_norm``, sums them, adds Gaussian noise of standard
  deviation ``noise_multiplier * max_grad_norm``, divides by the expected batch
  size and lets AdamW step. ``gradient_accumulation_steps`` micro-batches add
  their clipped sums before the step's one draw of noise, as Opacus'
  ``BatchMemoryManager`` does. No global gradient clipping on top.
* The noise multiplier is the smallest for which the RDP accountant says the
  run's ``total_steps`` steps at rate ``q`` spend at most ``epsilon`` at
  ``delta``; :meth:`DpTraining.report` gives the epsilon actually spent.

Noise and sampling draw from generators seeded with OS entropy, never from the
job's ``seed``: the seed is in the job and the manifest, and noise anyone can
regenerate can be subtracted again. DP runs are therefore not bit-reproducible,
and a resumed run continues with fresh noise; the checkpoint carries the
accountant's history (noise multiplier, rate, steps spent). The noise is drawn
in Opacus' ``secure_mode`` (robust to floating-point attacks).

Opacus with peft has been reported to leave LoRA weights untrained, silently
(opacus#820: parameters replaced after the hooks and the optimizer took their
references). :class:`DpTraining` refuses to start unless hooks, optimizer and
model hold the same parameter objects, fails any step in which a LoRA weight
got no per-example gradient, and after training checks that the adapter bytes
equal the live weights and that every weight moved.

What epsilon covers: the adapter weights (and the checkpoints' adapters), per
training record. Not covered: the validation records and their losses, and the
figures computed from the training data without noise (training loss, token
and example counts in the metrics and events).
"""

from __future__ import annotations

import math
import secrets
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from opacus.grad_sample import GradSampleHooks
from opacus.optimizers import DPOptimizer
from safetensors.torch import load as load_safetensors

from appliance.errors import InvalidRequestError
from appliance.training.adapter import ADAPTER_WEIGHTS
from appliance.training.data import IGNORE_INDEX, Example
from appliance.training.hyperparameters import HyperparameterError, LoraHyperparameters
from appliance.training.packing import linear_cross_entropy, output_head
from appliance.training.protocol import Setup

ACCOUNTANT = "rdp"
#: Opacus' Renyi orders plus higher ones: short runs (few steps) find their tightest bound above order 63.
RDP_ALPHAS = RDPAccountant.DEFAULT_ALPHAS + list(range(64, 129, 8)) + [160, 192, 256]
PAD_TOKEN_ID = 0  # any id: under causal attention no real token sees the padding


def _fresh_seed() -> int:
    """63 bits of OS entropy for the noise and sampling generators (tests replace this to reproduce a run)."""
    return secrets.randbits(63)


class DpTraining:
    """DP-SGD for one :func:`appliance.training.train` call: hooks, noisy optimizer, sampler and accountant.

    Args:
        setup: The recipe's model; only LoRA weights require grad.
        optimizer: The AdamW over those weights (the learning-rate schedule stays on it).
        hp: Resolved LoRA hyperparameters with ``dp`` set.
        n_train: Training examples (after truncation drops).
        total_steps: Optimizer steps the run takes.

    Raises:
        HyperparameterError: ``batch_size`` above ``n_train``, or an epsilon no noise reaches.
    """

    def __init__(
        self, setup: Setup, optimizer: torch.optim.Optimizer, hp: LoraHyperparameters, *, n_train: int, total_steps: int
    ) -> None:
        prefix = f"method.{hp.method}.hyperparameters"
        if hp.batch_size > n_train:
            raise HyperparameterError([(
                f"{prefix}.batch_size",
                f"must not exceed the {n_train} training examples when `dp` is set (each step samples every example "
                f"with probability batch_size / {n_train}); got {hp.batch_size}",
            )])
        self.config = hp.dp
        self.n_train = n_train
        self.sample_rate = hp.batch_size / n_train
        self.total_steps = total_steps
        self.micro_batches = hp.gradient_accumulation_steps
        try:
            self.noise_multiplier = get_noise_multiplier(
                target_epsilon=self.config.epsilon,
                target_delta=self.config.delta,
                sample_rate=self.sample_rate,
                steps=total_steps,
                accountant=ACCOUNTANT,
                epsilon_tolerance=min(0.01, self.config.epsilon / 100),
                alphas=RDP_ALPHAS,
            )
        except ValueError as exc:  # opacus: "The privacy budget is too low."
            raise HyperparameterError([(
                f"{prefix}.dp.epsilon",
                f"is out of reach for {total_steps} steps at sampling rate {self.sample_rate:.4g} ({exc}); "
                f"raise it, or train fewer steps; got {self.config.epsilon!r}",
            )]) from exc
        self.accountant = RDPAccountant()
        self._params = {name: p for name, p in setup.model.named_parameters() if p.requires_grad}
        self._hooks = GradSampleHooks(setup.model, batch_first=True, loss_reduction="sum", strict=True)
        self.optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.config.max_grad_norm,
            expected_batch_size=hp.batch_size,
            loss_reduction="mean",
            generator=torch.Generator(setup.device).manual_seed(_fresh_seed()),
            secure_mode=True,
        )
        self._sampler = torch.Generator().manual_seed(_fresh_seed())
        self._check_references(setup)
        self._snapshot()

    @property
    def steps(self) -> int:
        """Noisy steps accounted so far (this call and any resumed ones)."""
        return sum(n for _, _, n in self.accountant.history)

    def message(self) -> str:
        """A one-line summary for the job's events."""
        c = self.config
        return (
            f"Differential privacy on (DP-SGD, Opacus): noise multiplier {self.noise_multiplier:.4g}, per-example "
            f"gradients clipped to {c.max_grad_norm:g}, each example sampled with probability {self.sample_rate:.4g} "
            f"per step; budget epsilon={c.epsilon:g} at delta={c.delta:.3g} over {self.total_steps} steps"
        )

    def sample(self) -> list[int]:
        """Indices of this step's Poisson batch (each example in with probability ``sample_rate``)."""
        drawn = torch.rand(self.n_train, generator=self._sampler) < self.sample_rate
        return drawn.nonzero().flatten().tolist()

    def step(
        self,
        setup: Setup,
        examples: list[Example],
        scheduler: Any,
        autocast: Callable[[], AbstractContextManager[Any]],
    ) -> tuple[float | None, int]:
        """One noisy optimizer step over ``examples`` (possibly none).

        Returns:
            The mean per-example loss (``None`` for an empty batch) and the batch's tokens.
        """
        self._lr_applied += scheduler.get_last_lr()[0]
        loss = None
        if not examples:
            for p in self._params.values():
                p.grad_sample = p.new_zeros((0, *p.shape))
            self.optimizer.step()
        else:
            examples = sorted(examples, key=len)  # micro-batches of similar lengths pad less
            size = math.ceil(len(examples) / min(self.micro_batches, len(examples)))
            chunks = [examples[i : i + size] for i in range(0, len(examples), size)]
            total = 0.0
            for i, chunk in enumerate(chunks):
                with autocast():
                    losses = example_losses(setup.model.get_base_model(), chunk, setup.device)
                total += losses.detach().sum().item()
                with warnings.catch_warnings():
                    # lora_A of the first layer gets an input without grad; Opacus needs only its output's grad.
                    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                    losses.sum().backward()
                self._check_grad_samples(len(chunk))
                if i < len(chunks) - 1:
                    self.optimizer.signal_skip_step(True)  # clip and add up; noise and step after the last chunk
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            loss = total / len(examples)
        self.optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return loss, sum(len(e) for e in examples)

    def report(self) -> dict[str, Any]:
        """What the run spent, for ``TrainResult.privacy["dp"]`` and the adapter manifest."""
        steps = self.steps
        spent = self.accountant.get_epsilon(delta=self.config.delta, alphas=RDP_ALPHAS) if steps else 0.0
        return {
            "epsilon_target": self.config.epsilon,
            "epsilon_spent": float(spent),
            "delta": self.config.delta,
            "max_grad_norm": self.config.max_grad_norm,
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "steps": steps,
            "accountant": ACCOUNTANT,
        }

    def state(self) -> dict[str, Any]:
        """The accountant's history, for a checkpoint."""
        return {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": self.steps}

    def restore(self, saved: dict[str, Any] | None, step: int) -> None:
        """Continue the accounting of a checkpoint taken at ``step`` (call after the weights are restored).

        Raises:
            InvalidRequestError: The checkpoint's accounting does not match this run.
        """
        expected = {"noise_multiplier": self.noise_multiplier, "sample_rate": self.sample_rate, "steps": step}
        if saved != expected:
            raise InvalidRequestError(
                f"`resume_from` cannot continue this run: its privacy accounting {saved!r} does not match "
                f"this run's {expected!r}",
                param="resume_from",
            )
        self.accountant.history = [(self.noise_multiplier, self.sample_rate, step)]
        self._snapshot()

    def verify(self, adapter: dict[str, bytes]) -> None:
        """Check that ``adapter`` holds the trained weights and that training moved every one of them.

        Raises:
            RuntimeError: The adapter is not what was trained (opacus#820-like corruption; a bug).
        """
        saved = load_safetensors(adapter[ADAPTER_WEIGHTS])
        live = {name.replace(".default.", "."): p.detach().to("cpu") for name, p in self._params.items()}
        if saved.keys() != live.keys():
            raise RuntimeError(f"the adapter's tensors {sorted(saved)[:3]} are not the trained {sorted(live)[:3]}")
        differs = [k for k in saved if not torch.equal(saved[k], live[k])]
        if differs:
            raise RuntimeError(
                f"the adapter differs from the trained weights in {len(differs)} tensor(s): {differs[:3]}"
            )
        if self._lr_applied > 0:
            still = [n for n, p in self._params.items() if torch.equal(p.detach(), self._initial[n])]
            if still:
                raise RuntimeError(
                    f"{len(still)} LoRA weight(s) never changed during DP training ({still[:3]}): their updates were "
                    "lost (see opacus#820), so the adapter would be untrained"
                )

    def close(self) -> None:
        """Remove Opacus' hooks and the attributes it put on the parameters."""
        self._hooks.cleanup()

    def _snapshot(self) -> None:
        self._initial = {n: p.detach().clone() for n, p in self._params.items()}
        self._lr_applied = 0.0

    def _check_references(self, setup: Setup) -> None:
        """Hooks, optimizer and model must hold the very same parameters (opacus#820 broke exactly this)."""
        model = {id(p) for p in self._params.values()}
        hooked = {
            id(p)
            for module in self._hooks.iterate_submodules(setup.model)
            for p in module.parameters(recurse=False)
            if p.requires_grad
        }
        optimized = {id(p) for p in self.optimizer.params}
        misplaced = [n for n, p in self._params.items() if p.device.type != setup.device.type or p.is_meta]
        if not model or model != hooked or model != optimized or misplaced:
            raise RuntimeError(
                f"DP training would not update the LoRA weights it saves: {len(model)} trainable, {len(hooked)} "
                f"hooked, {len(optimized)} optimised, off-device: {misplaced[:3]}"
            )

    def _check_grad_samples(self, batch: int) -> None:
        lost = [n for n, p in self._params.items() if p.grad_sample is None or p.grad_sample.shape[0] != batch]
        if lost:
            raise RuntimeError(
                f"no per-example gradient of the batch's {batch} example(s) reached {len(lost)} LoRA weight(s) "
                f"({lost[:3]}): Opacus' hooks are not on the layers the model runs (see opacus#820)"
            )


def example_losses(causal_lm: torch.nn.Module, examples: list[Example], device: torch.device) -> torch.Tensor:
    """Each example's mean loss over its target tokens, ``[len(examples)]``, on right-padded rows.

    ``causal_lm`` is the transformers model with LoRA layers injected; only
    target positions go through the (frozen) output head.
    """
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), PAD_TOKEN_ID, dtype=torch.long)
    for row, example in enumerate(examples):
        input_ids[row, : len(example)] = torch.tensor(example.input_ids)
    hidden = causal_lm.get_decoder()(
        input_ids=input_ids.to(device), attention_mask=None, use_cache=False
    ).last_hidden_state
    weight, softcap = output_head(causal_lm)
    losses = []
    for row, example in enumerate(examples):
        targets = torch.tensor(example.labels[1:], device=device)
        keep = targets != IGNORE_INDEX
        token_losses = linear_cross_entropy(
            hidden[row, : len(example) - 1][keep], weight, targets[keep], softcap=softcap
        )
        losses.append(token_losses / example.n_targets)
    return torch.stack(losses)
