"""The training core shared by LLM (:mod:`appliance.training`) and image (:mod:`appliance.diffusion`) fine-tuning.

Device choice (:mod:`.device`), checkpoint I/O and resume checks
(:mod:`.checkpoint`), the method and hyperparameter parsing machinery
(:mod:`.hyperparameters`), the recipe registry and capabilities
(:mod:`.registry`), progress events (:mod:`.events`) and the shared errors
(:mod:`.errors`). Each modality keeps its own field tables, recipes and
training loop. This package imports neither modality, nor anything above
:mod:`appliance.errors`: it is a low layer. Only :mod:`.device` and
:mod:`.checkpoint` load torch.
"""
