"""Poisoned and clean SB3 training: presets, training envs, outer-loop poisoning, callbacks, artifacts.

:func:`rlbackdoor.training.loop.train` runs an :class:`~rlbackdoor.specs.ExperimentSpec`;
:func:`rlbackdoor.training.artifacts.load_policy` rebuilds a trained policy without unpickling.
"""
