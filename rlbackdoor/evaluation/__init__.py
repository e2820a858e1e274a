"""Evaluation of backdoored agents: rollouts on a run's clean env and trigger, metrics with bootstrap CIs.

:func:`evaluate` scores any agent with SB3's ``predict``; :func:`evaluate_run` loads a run directory.
Metric definitions are in :mod:`rlbackdoor.evaluation.metrics`; :class:`rlbackdoor.evaluation.callback.EvalCallback`
logs cheap ``eval/ctp`` and ``eval/asr`` curves during training.
"""

from rlbackdoor.evaluation.evaluate import attack_metrics, evaluate, evaluate_run

__all__ = ["attack_metrics", "evaluate", "evaluate_run"]
