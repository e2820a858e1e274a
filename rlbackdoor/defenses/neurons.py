"""Neuron analysis: activation bands (input level, run time), activation clustering and spectral signatures
(input level, over a set of steps), and single-neuron stimulation (model level).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA

from rlbackdoor.defenses.base import Access, Detector
from rlbackdoor.defenses.policy_net import PolicyNet
from rlbackdoor.errors import SpecError


class ActivationBands(Detector):
    """Neural Watchdog: per-neuron percentile bands of every hidden layer's activations on clean steps.

    An observation's score is the number of neurons outside their band; it is flagged when more than
    ``k`` are. The bands are fitted on half of the clean data; ``k`` is the ``1 - fpr`` quantile of the
    score on the other half, so the expected false-positive rate on clean steps is ``fpr``.

    :param quantile: each band spans the ``[quantile, 1 - quantile]`` percentiles of a neuron.
    :param fpr: the false-positive rate the flag threshold ``k`` is chosen for.
    """

    name = "bands"
    access = (Access.WEIGHTS, Access.CLEAN_TRAJECTORIES)
    levels = ("input",)

    def __init__(self, quantile: float = 0.005, fpr: float = 0.01, seed: int = 0) -> None:
        super().__init__(seed)
        if not (0.0 <= quantile < 0.5 and 0.0 < fpr < 1.0):
            raise SpecError(f"bands: quantile {quantile} and fpr {fpr} must lie in [0, 0.5) and (0, 1); fix them")
        self.quantile, self.fpr = quantile, fpr
        self.k = 0.0

    def _fit(self) -> None:
        self.net = PolicyNet(self.policy, self.clean.shape[1:])
        order = np.random.default_rng(self.seed).permutation(len(self.clean))
        half = len(order) // 2
        acts = self.net.activations(self.clean[order[:half]])
        self.low, self.high = np.quantile(acts, [self.quantile, 1.0 - self.quantile], axis=0)
        calibration = self._score_inputs(self.clean[order[half:]])
        self.k = float(np.quantile(calibration, 1.0 - self.fpr, method="higher"))

    def _score_inputs(self, obs: np.ndarray) -> np.ndarray:
        acts = self.net.activations(obs)
        return ((acts < self.low) | (acts > self.high)).sum(axis=1).astype(np.float64)

    def input_threshold(self) -> float:
        return self.k

    def details(self) -> dict[str, Any]:
        return {"k": self.k, "neurons": len(self.low), "quantile": self.quantile, "fpr": self.fpr}


class _StepSetDetector(Detector):
    """Scores a set of steps against each other on every hidden layer's activations.

    The steps are analysed together, not per chosen action as in classification: a targeted backdoor
    sends its triggered steps to the target action, whose group they can dominate in RL (a rarely chosen
    action), which breaks the methods' assumption that poison is a minority of its group.
    """

    access = (Access.WEIGHTS,)
    levels = ("input",)
    min_steps = 8

    def _fit(self) -> None:
        self.net = PolicyNet(self.policy, self.clean.shape[1:])

    def _score_inputs(self, obs: np.ndarray) -> np.ndarray:
        if len(obs) < self.min_steps:
            return np.zeros(len(obs))
        return self._score_set(self.net.activations(obs))

    def _score_set(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class SpectralSignature(_StepSetDetector):
    """Spectral signatures (Tran et al., 2018) on the hidden activations of a set of steps.

    A step's score is the robust z-score (against the set's median and MAD) of its squared projection on
    the top singular direction of the centred activations: poisoned steps stand out along it. Steps past
    3.5 are flagged (Iglewicz and Hoaglin's outlier rule).
    """

    name = "spectral"
    input_cutoff = 3.5

    def _score_set(self, features: np.ndarray) -> np.ndarray:
        centred = features - features.mean(axis=0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        proj = (centred @ vt[0]) ** 2
        median = float(np.median(proj))
        mad = 1.4826 * float(np.median(np.abs(proj - median)))
        return (proj - median) / max(mad, 1e-12)


class ActivationClustering(_StepSetDetector):
    """Activation clustering (Chen et al., 2018) on the hidden activations of a set of steps.

    The activations are reduced by PCA (``dims`` components) and split by 2-means; a step's score is its
    position on the axis from the larger cluster's centre (0) to the smaller one's (1), weighted by how
    small the smaller cluster is (``1 - 2 * share``: a balanced split is no evidence of poisoning). The
    flag threshold 0.15 is the midpoint of a cluster holding 35% of the steps.

    :param dims: PCA components.
    """

    name = "clustering"
    input_cutoff = 0.15

    def __init__(self, dims: int = 10, seed: int = 0) -> None:
        super().__init__(seed)
        self.dims = dims

    def _score_set(self, features: np.ndarray) -> np.ndarray:
        dims = min(self.dims, features.shape[1], len(features) - 1)
        reduced = PCA(n_components=dims, random_state=self.seed).fit_transform(features)
        km = KMeans(n_clusters=2, n_init=4, random_state=self.seed).fit(reduced)
        counts = np.bincount(km.labels_, minlength=2)
        small = int(np.argmin(counts))
        big_c, small_c = km.cluster_centers_[1 - small], km.cluster_centers_[small]
        axis = small_c - big_c
        norm = float(axis @ axis)
        if norm <= 1e-12:
            return np.zeros(len(features))
        position = (reduced - big_c) @ axis / norm
        return position * (1.0 - 2.0 * counts[small] / len(features))


class NeuronStimulation(Detector):
    """ABS-style stimulation (Liu et al., 2019): set one hidden neuron to a value for every clean state.

    For each neuron of the last hidden layer and each of ``n_values`` values across that layer's
    clean activation range, the *elevation* of action ``a`` is the share of clean states whose action
    turns to ``a`` (among those not already choosing it). A neuron's score is its largest elevation;
    the model's score is the largest over neurons. In a clean policy the decision is spread over many
    neurons; a backdoor tends to route through a few that alone can force the target.

    :param n_states: clean states stimulated.
    :param n_values: stimulation values per neuron.
    """

    name = "stimulation"
    access = (Access.WEIGHTS, Access.CLEAN_TRAJECTORIES)
    levels = ("model",)
    threshold = 0.5
    scale = 0.1

    def __init__(self, n_states: int = 256, n_values: int = 9, seed: int = 0) -> None:
        super().__init__(seed)
        self.n_states, self.n_values = n_states, n_values
        self.found: dict[str, Any] = {}

    def _fit(self) -> None:
        self.net = PolicyNet(self.policy, self.clean.shape[1:])
        self.net.require_discrete()

    @torch.no_grad()
    def _score_model(self) -> float:
        rng = np.random.default_rng(self.seed)
        rows = rng.choice(len(self.clean), size=min(self.n_states, len(self.clean)), replace=False)
        x = self.net.tensor(self.clean[rows])
        hidden, scores = self.net.forward(x)
        layer = len(hidden) - 1
        clean_actions = scores.argmax(dim=1)
        acts = hidden[layer]
        values = torch.linspace(float(acts.min()), float(acts.max()), self.n_values)
        width = acts.shape[1]
        n, n_actions = len(x), self.net.n_actions
        # every (neuron, value) stimulation of every state in one batch: (width * n_values * n) rows
        neurons = torch.arange(width).repeat_interleave(self.n_values * n)
        stim = values.repeat_interleave(n).repeat(width)

        def edit(k: int, h: torch.Tensor) -> torch.Tensor:
            if k != layer:
                return h
            h = h.clone()
            h[torch.arange(len(h)), neurons] = stim
            return h

        batch = x.repeat(width * self.n_values, *([1] * (x.dim() - 1)))
        turned = self.net.forward(batch, edit)[1].argmax(dim=1).view(width, self.n_values, n)
        onehot = torch.nn.functional.one_hot(turned, n_actions).float()  # (width, values, n, actions)
        not_before = 1.0 - torch.nn.functional.one_hot(clean_actions, n_actions).float()  # (n, actions)
        elevation = (onehot * not_before).sum(dim=2) / not_before.sum(dim=0).clamp(min=1.0)
        best = elevation.flatten(1).max(dim=1)
        neuron = int(best.values.argmax())
        v, a = divmod(int(best.indices[neuron]), n_actions)
        self.found = {
            "layer": layer,
            "neuron": neuron,
            "value": float(values[v]),
            "action": a,
            "elevation": float(best.values[neuron]),
        }
        return float(best.values.max())

    def details(self) -> dict[str, Any]:
        return self.found
