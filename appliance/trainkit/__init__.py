"""The training core shared by LLM (:mod:`appliance.training`) and image (:mod:`appliance.diffusion`) fine-tuning.

==========================  ==================================================================
module                      owns
==========================  ==================================================================
:mod:`.device`              device choice (``auto``, ``cpu``, ``cuda``, ``cuda:N``)
:mod:`.checkpoint`          checkpoint I/O per format, resume checks, RNG state, whole or
                            sharded (FSDP) weights and optimizer state
:mod:`.hyperparameters`     ``method`` parsing against a modality's table, field checks
:mod:`.registry`            :class:`~.registry.RecipeRegistry` and the capabilities a method
                            declares (``supports_dp``, ``supports_fsdp``, ``output``)
:mod:`.events`              the progress window between ``train`` events, ``to_dict`` records
:mod:`.errors`              ``HyperparameterError``, ``TrainingDivergedError``, cancellation
:mod:`.lazy`                package attributes imported on first use
==========================  ==================================================================

Each modality keeps its field tables, recipes and its own training loop
(``trainer.py``). This package imports neither modality, nor anything above
:mod:`appliance.errors`: it is a low layer. Only :mod:`.device` and
:mod:`.checkpoint` load torch.
"""
