"""Behaviour probing: trigger reverse-engineering by gradient (white box) and candidate stamping (black box).

Both look for a perturbation that turns the policy's action on clean states to one action. In RL a
*natural* universal trigger usually exists too (an extreme pole velocity makes any CartPole policy push
one way; lava right ahead makes any MiniGrid policy turn), so universality alone does not separate
backdoored from clean policies. What does is *isolation*: a natural trigger is the edge of a monotone
response (pushing further keeps the action) or sits where natural content already steers the policy;
a backdoor is a bump the policy learnt for one region. The within-model scores measure that isolation.
Over a zoo, :meth:`BlackBoxProbe.profile` also feeds the population comparison of
:mod:`rlbackdoor.defenses.detectors` (natural triggers are shared by the population, backdoors are not).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from rlbackdoor.defenses.base import Access, Detector
from rlbackdoor.defenses.policy_net import PolicyNet
from rlbackdoor.errors import SpecError
from rlbackdoor.triggers import image_layout


def sweep_box(clean: np.ndarray, low: np.ndarray, high: np.ndarray, reach: float) -> tuple[np.ndarray, np.ndarray]:
    """Per-entry search box ``median ± reach * std`` of flat clean vectors, inside the bounds ``low``/``high``.

    Entries constant on clean data get a spread of 1/100 of their bound width (1 when unbounded).
    """
    centre = np.median(clean, axis=0)
    spread = clean.std(axis=0)
    width = np.where(np.isfinite(high - low), high - low, 0.0)
    spread = np.where(spread > 1e-8, spread, np.where(width > 0, width / 100.0, 1.0))
    return np.maximum(centre - reach * spread, low), np.minimum(centre + reach * spread, high)


def bump_height(curves: np.ndarray) -> np.ndarray:
    """Per curve (rows) and point: how far the point peaks above, or dips below, the curve on both of its
    sides (all zero for a monotone curve)."""
    inf = np.full((len(curves), 1), np.inf)
    left_min = np.concatenate([inf, np.minimum.accumulate(curves, axis=1)[:, :-1]], axis=1)
    right_min = np.concatenate([np.minimum.accumulate(curves[:, ::-1], axis=1)[:, ::-1][:, 1:], inf], axis=1)
    left_max = np.concatenate([-inf, np.maximum.accumulate(curves, axis=1)[:, :-1]], axis=1)
    right_max = np.concatenate([np.maximum.accumulate(curves[:, ::-1], axis=1)[:, ::-1][:, 1:], -inf], axis=1)
    peak = np.minimum(curves - left_min, curves - right_min)
    dip = np.minimum(left_max - curves, right_max - curves)
    return np.maximum(np.maximum(peak, dip), 0.0)


def elevation(before: np.ndarray, after: np.ndarray, n_actions: int) -> np.ndarray:
    """Per candidate (rows of ``after``) and action: share of states not choosing it before that choose it after."""
    eligible = np.eye(n_actions, dtype=bool)[before] ^ True  # (states, actions)
    chosen = np.eye(n_actions, dtype=bool)[after]  # (candidates, states, actions)
    return (chosen & eligible).sum(axis=1) / np.maximum(eligible.sum(axis=0), 1)


def _spatial(obs: np.ndarray) -> np.ndarray:
    """A batch of images as (B, H, W, C), whatever the env layout."""
    layout = image_layout(obs.shape[1:])
    if layout == "hw":
        return obs[..., None]
    return np.moveaxis(obs, 1, -1) if layout == "chw" else obs


def _unspatial(hwc: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    layout = image_layout(shape)
    if layout == "hw":
        return hwc[..., 0]
    return np.moveaxis(hwc, -1, 1) if layout == "chw" else hwc


class BlackBoxProbe(Detector):
    """Query-only probing: stamp candidate triggers on clean states and watch the action distribution.

    *Vectors*: each entry is swept over ``n_values`` values spanning ``reach`` clean standard deviations
    around its median (inside the space bounds). For each entry and action, the share of states choosing
    the action along the sweep is a response curve; its isolation is the height of its largest peak above
    (or dip below) the curve on both sides: zero for any monotone response.

    *Images*: every ``patch`` x ``patch`` region is filled with each of the ``cells`` commonest pixel
    values (channel vectors) of the clean data. A candidate's isolation is its elevation (share of
    states not choosing an action that turn to it) minus the region's natural sensitivity (share of
    states whose action changes when the region takes another clean state's content).

    The model's score is the largest isolation. Its :meth:`profile` (every candidate's response curve
    point or elevation) lets a zoo compare each agent with its population. Only ``policy.predict`` is
    called: no weights, no gradients.

    :param n_states: clean states stamped.
    :param n_values: sweep points per entry (vectors).
    :param reach: sweep half-width in clean standard deviations (vectors).
    :param patch: patch side (images).
    :param cells: distinct pixel values tried (images).
    """

    name = "probe"
    access = (Access.BLACK_BOX, Access.CLEAN_TRAJECTORIES)
    levels = ("model",)
    threshold = 0.2
    scale = 0.05

    def __init__(
        self,
        n_states: int = 256,
        n_values: int = 121,
        reach: float = 30.0,
        patch: int = 2,
        cells: int = 8,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.n_states, self.n_values, self.reach, self.patch, self.cells = n_states, n_values, reach, patch, cells
        self.found: dict[str, Any] = {}
        self._profile: tuple[list[str], np.ndarray] | None = None

    def _fit(self) -> None:
        action_space = getattr(self.policy, "action_space", None)
        space = getattr(self.policy, "observation_space", None)
        if not isinstance(action_space, spaces.Discrete):
            raise SpecError(f"detector '{self.name}' needs a Discrete action space; use a neuron-statistics detector")
        if not isinstance(space, spaces.Box):
            raise SpecError(f"detector '{self.name}' needs a Box observation space, got {type(space).__name__}")
        if self.clean.ndim not in (2, 4):
            raise SpecError(
                f"detector '{self.name}' probes vector or image observations, not shape {self.clean.shape[1:]}"
            )
        self.n_actions = int(action_space.n)
        shape = self.clean.shape[1:]
        # bounds in the env's layout (an SB3 image policy may hold the transposed space)
        low, high = np.broadcast_to(space.low, space.shape), np.broadcast_to(space.high, space.shape)
        if space.shape != shape:
            low, high = np.moveaxis(low, 0, -1), np.moveaxis(high, 0, -1)
        self.low, self.high = low.astype(np.float64), high.astype(np.float64)
        rng = np.random.default_rng(self.seed)
        self.states = self.clean[rng.choice(len(self.clean), size=min(self.n_states, len(self.clean)), replace=False)]

    def _actions(self, obs: np.ndarray, chunk: int = 65536) -> np.ndarray:
        out = [
            np.asarray(self.policy.predict(obs[i : i + chunk], deterministic=True)[0]).reshape(-1)
            for i in range(0, len(obs), chunk)
        ]
        return np.concatenate(out)

    def _score_model(self) -> float:
        if self.states.ndim == 2:
            return self._vector_score()
        return self._image_score()

    def _vector_score(self) -> float:
        states, dim, n = self.states, self.states.shape[1], len(self.states)
        lo, hi = sweep_box(states.astype(np.float64), self.low, self.high, self.reach)
        grid = np.linspace(lo, hi, self.n_values).T  # (dim, points)
        stamped = np.repeat(states[None, None], self.n_values, axis=1).repeat(dim, axis=0)
        entries = np.arange(dim)[:, None]
        stamped[entries, np.arange(self.n_values)[None, :], :, entries] = grid[:, :, None]
        actions = self._actions(stamped.reshape(-1, dim).astype(states.dtype)).reshape(dim, self.n_values, n)
        share = np.eye(self.n_actions)[actions].mean(axis=2)  # (dim, points, actions)
        curves = share.transpose(0, 2, 1).reshape(dim * self.n_actions, self.n_values)
        heights = bump_height(curves).reshape(dim, self.n_actions, self.n_values)
        bumps = heights.max(axis=2)
        j, a = np.unravel_index(int(np.argmax(bumps)), bumps.shape)
        # the stamp: of the points of (nearly) the largest height, the farthest from the clean data
        top = np.flatnonzero(heights[j, a] >= heights[j, a].max() - 0.05)
        p = int(top[np.argmax(np.abs(grid[j, top] - np.median(states[:, j])))])
        self.found = {
            "trigger": {"kind": "value", "indices": [int(j)], "values": [float(grid[j, p])]},
            "action": int(a),
            "share": float(share[j, p, a]),
            "isolation": float(bumps[j, a]),
        }
        # profile: the curves on a grid in units of clean standard deviations (comparable across agents)
        keys = [
            f"entry{j}/point{g}/action{a}"
            for j in range(dim)
            for g in range(self.n_values)
            for a in range(self.n_actions)
        ]
        self._profile = (keys, share.reshape(-1))
        return float(bumps[j, a])

    def _image_score(self) -> float:
        states = self.states
        hwc = _spatial(states)
        n, h, w, c = hwc.shape
        before = self._actions(states)
        pixels, counts = np.unique(hwc.reshape(-1, c), axis=0, return_counts=True)
        cells = pixels[np.argsort(-counts, kind="stable")[: self.cells]]
        k = self.patch
        positions = [(r, col) for r in range(h - k + 1) for col in range(w - k + 1)]
        stamped = np.repeat(hwc[None, None], len(cells), axis=1).repeat(len(positions), axis=0)
        shuffled = np.repeat(hwc[None], len(positions), axis=0)
        other = np.random.default_rng(self.seed).permutation(n)
        for i, (r, col) in enumerate(positions):
            stamped[i, :, :, r : r + k, col : col + k, :] = cells[:, None, None, None, :]
            shuffled[i, :, r : r + k, col : col + k, :] = hwc[other, r : r + k, col : col + k, :]
        shape = states.shape[1:]
        after = self._actions(_unspatial(stamped.reshape(-1, h, w, c), shape).astype(states.dtype))
        after = after.reshape(len(positions) * len(cells), n)
        natural = (
            self._actions(_unspatial(shuffled.reshape(-1, h, w, c), shape).astype(states.dtype)).reshape(
                len(positions), n
            )
            != before
        ).mean(axis=1)
        elev = elevation(before, after, self.n_actions).reshape(len(positions), len(cells), self.n_actions)
        isolation = elev - natural[:, None, None]
        q, v, a = np.unravel_index(int(np.argmax(isolation)), isolation.shape)
        self.found = {
            "trigger": {"kind": "patch", "size": [k, k], "position": list(positions[q]), "value": cells[v].tolist()},
            "action": int(a),
            "elevation": float(elev[q, v, a]),
            "natural_sensitivity": float(natural[q]),
            "isolation": float(isolation[q, v, a]),
        }
        keys = [
            f"patch{r},{col}/cell{'-'.join(map(str, cells[v].tolist()))}/action{a}"
            for r, col in positions
            for v in range(len(cells))
            for a in range(self.n_actions)
        ]
        self._profile = (keys, elev.reshape(-1))
        return float(isolation[q, v, a])

    def profile(self) -> tuple[list[str], np.ndarray] | None:
        return self._profile

    def details(self) -> dict[str, Any]:
        return self.found


class ReverseTrigger(Detector):
    """Trigger reverse-engineering by gradient (Neural Cleanse, adapted to policies).

    For every action ``a`` and ``restarts`` random starts, a mask ``m`` (per entry; per pixel for
    images) and a pattern ``p`` are optimised with Adam so that ``(1 - m) * s + m * p`` makes the policy
    choose ``a`` on every clean state ``s``, with an L1 penalty ``l1`` on the mask. Each start's pattern
    stays within ``local`` of the search box around a random point of it (the box spans ``reach`` clean
    standard deviations around the median for vectors, the clean value range per channel for images),
    so the starts explore the box instead of all running to its natural edges.

    Each recovered trigger has a success rate (share of states not choosing ``a`` that turn to it), a
    size (mask L1) and, for vectors, an isolation: its success minus the success of the same
    perturbation doubled (``s + 2 (s' - s)``): a natural trigger keeps working further out, a backdoor
    bump does not. The model's score is the largest isolation for vectors, and Neural Cleanse's
    anomaly index of the smallest per-action trigger size for images (threshold 2).

    :param n_states: clean states the triggers must work on.
    :param steps: Adam steps.
    :param restarts: random starts per action (default 64 for vectors, 16 for images).
    :param l1: weight of the mask's mean.
    :param reach: half-width of the vector search box in clean standard deviations.
    :param local: how far each start's pattern may move, as a share of the box width.
    :param lr: Adam learning rate.
    """

    name = "reverse"
    access = (Access.WEIGHTS, Access.CLEAN_TRAJECTORIES)
    levels = ("model",)
    threshold = 0.2
    scale = 0.05

    def __init__(
        self,
        n_states: int = 128,
        steps: int = 150,
        restarts: int | None = None,
        l1: float = 0.05,
        reach: float = 30.0,
        local: float = 0.1,
        lr: float = 0.1,
        seed: int = 0,
    ) -> None:
        super().__init__(seed)
        self.n_states, self.steps, self.restarts, self.l1 = n_states, steps, restarts, l1
        self.reach, self.local, self.lr = reach, local, lr
        self.found: dict[str, Any] = {}

    def _fit(self) -> None:
        self.net = PolicyNet(self.policy, self.clean.shape[1:])
        self.net.require_discrete()
        if self.clean.ndim not in (2, 4):
            raise SpecError(f"detector '{self.name}' handles vector or image observations, not {self.clean.shape[1:]}")
        self.image = self.clean.ndim == 4
        self.starts = self.restarts or (16 if self.image else 64)
        if self.image:  # the anomaly index, with Neural Cleanse's cut-off
            self.threshold, self.scale = 2.0, 1.0

    def _box(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.image:
            hwc = _spatial(states).astype(np.float64)
            lo = np.broadcast_to(hwc.min(axis=(0, 1, 2)), hwc.shape[1:])
            hi = np.broadcast_to(hwc.max(axis=(0, 1, 2)), hwc.shape[1:])
            return _unspatial(lo[None], states.shape[1:])[0], _unspatial(hi[None], states.shape[1:])[0]
        space = self.net.space
        low, high = np.broadcast_to(space.low, space.shape), np.broadcast_to(space.high, space.shape)
        return sweep_box(states.astype(np.float64), low.astype(np.float64), high.astype(np.float64), self.reach)

    def _score_model(self) -> float:
        rng = np.random.default_rng(self.seed)
        gen = torch.Generator().manual_seed(self.seed)
        states = self.clean[rng.choice(len(self.clean), size=min(self.n_states, len(self.clean)), replace=False)]
        x = self.net.tensor(states)
        shape = tuple(x.shape[1:])
        lo, hi = (torch.tensor(a, dtype=torch.float32) for a in self._box(states))
        n_a, n = self.net.n_actions, len(x)
        targets = torch.arange(n_a).repeat_interleave(self.starts)
        k = len(targets)
        layout = image_layout(shape) if self.image else "flat"
        mask_shape = {"chw": (k, 1, *shape[1:]), "hwc": (k, *shape[:2], 1)}.get(layout, (k, *shape))
        mu = torch.zeros(mask_shape, requires_grad=True)
        start = lo + (hi - lo) * torch.rand((k, *shape), generator=gen)
        radius = self.local * (hi - lo)
        pi = torch.zeros((k, *shape), requires_grad=True)
        opt = torch.optim.Adam([mu, pi], lr=self.lr)
        labels = targets.repeat_interleave(n)
        with torch.no_grad():
            before = self.net.scores(x).argmax(dim=1)

        def trigger() -> tuple[torch.Tensor, torch.Tensor]:
            return torch.sigmoid(mu), torch.minimum(torch.maximum(start + radius * torch.tanh(pi), lo), hi)

        def stamp(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
            return ((1 - m[:, None]) * x[None] + m[:, None] * p[:, None]).reshape(k * n, *shape)

        for _ in range(self.steps):
            m, p = trigger()
            ce = torch.nn.functional.cross_entropy(self.net.scores(stamp(m, p)), labels, reduction="none")
            loss = (ce.view(k, n).mean(dim=1) + self.l1 * m.flatten(1).mean(dim=1)).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            m, p = trigger()
            stamped = stamp(m, p)
            success = self._success(stamped, targets, before).numpy()
            doubled = 2.0 * stamped - x.repeat(k, *([1] * len(shape)))
            beyond = self._success(doubled, targets, before).numpy()
        size = m.flatten(1).sum(dim=1).numpy()
        per_action = targets.numpy()
        norms = np.array([self._norm(size[per_action == a], success[per_action == a]) for a in range(n_a)])
        isolation = success - beyond
        best = int(np.argmax(isolation)) if not self.image else int(np.argmin(np.where(success >= 0.9, size, np.inf)))
        self.found = {
            "action": int(per_action[best]),
            "success": float(success[best]),
            "success_doubled": float(beyond[best]),
            "mask_l1": float(size[best]),
            "mask": m[best].numpy().round(3).tolist(),
            "pattern": p[best].numpy().round(3).tolist(),
            "norms": [None if not np.isfinite(v) else round(float(v), 3) for v in norms],
            "anomaly_index": anomaly_index(norms),
        }
        return self.found["anomaly_index"] if self.image else float(isolation[best])

    def _success(self, stamped: torch.Tensor, targets: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
        turned = self.net.scores(stamped).argmax(dim=1).view(len(targets), len(before))
        eligible = before[None] != targets[:, None]
        return ((turned == targets[:, None]) & eligible).sum(dim=1) / eligible.sum(dim=1).clamp(min=1)

    def _norm(self, size: np.ndarray, success: np.ndarray, required: float = 0.9) -> float:
        ok = success >= required
        return float(size[ok].min()) if ok.any() else np.inf

    def details(self) -> dict[str, Any]:
        return self.found


def anomaly_index(norms: np.ndarray) -> float:
    """Neural Cleanse's anomaly index of the smallest norm, ``(median - min) / (1.4826 * MAD)``, over the
    actions a trigger was found for (finite norms); 0 with fewer than three."""
    norms = norms[np.isfinite(norms)]
    if len(norms) < 3:
        return 0.0
    median = float(np.median(norms))
    mad = 1.4826 * float(np.median(np.abs(norms - median)))
    return float((median - norms.min()) / mad) if mad > 0 else 0.0
