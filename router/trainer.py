"""MoERLTrainer: the router learns as a contextual bandit, with checkpoint and exact resume.

An **episode** is one generation context: the environment draws it, the trainer draws a
priority, and then

- ``mode="sweep"``: every expert runs on the context (sample-efficient; the training node);
- ``mode="bandit"``: only the router's pick runs, drawn with ``temperature``; its row is
  weighted by ``min(1 / propensity, propensity_clip)`` (what ordinary use produces).

The reward of a run is ``quality - lambda(priority) * cost`` (:mod:`.policy`). The scorer is
trained by weighted regression on quality and cost separately (a replay buffer, a few Adam
steps per episode), so the utility for *any* priority follows without retraining.

With ``checkpoint_path`` the trainer saves weights, optimiser state, RNG states, the replay
buffer, the episode counter and history atomically (temp file + ``os.replace``) as safetensors
plus JSON metadata (never pickle), and a new trainer on the same path resumes from it: an
interrupted run ends bitwise identical to an uninterrupted one with the same seed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import save_file
from torch import Tensor

from ..experts.base import Expert, features_of
from .environment import Environment, Outcome
from .features import FEATURE_VERSION, STATE_DIM
from .model import Router, RouterLoadError, read_safetensors
from .policy import cost_from_nfe, lambda_from_priority

logger = logging.getLogger(__name__)

MODES = ("sweep", "bandit")
CHECKPOINT_FORMAT = "moe_sampler.trainer_checkpoint"
_BUFFER_KEYS = ("state", "descriptor", "quality", "cost", "weight")
_HISTORY_KEYS = ("reward", "oracle_reward", "loss", "priority", "pick")

__all__ = ["MoERLTrainer", "TrainingResult"]


@dataclass(frozen=True)
class TrainingResult:
    """Per-episode history of a training run (all episodes so far, resumed ones included).

    ``oracle_rewards`` is the best reward on the context (sweep mode; NaN in bandit mode);
    ``rewards`` is the reward of the router's own pick (greedy in sweep mode).
    """

    episodes: int
    stopped: bool
    rewards: tuple[float, ...]
    oracle_rewards: tuple[float, ...]
    losses: tuple[float, ...]


class MoERLTrainer:
    """Trains a :class:`Router` on an :class:`Environment` over a pool of experts.

    Args:
        environment: an :class:`~.environment.Environment` (e.g. ``AnalyticEnvironment``,
            ``DenoiserEnvironment``).
        router: the router to train in place (``Router.default()`` when None).
        experts: the pool (``default_pool()`` when None).
        mode: ``"sweep"`` or ``"bandit"``.
        seed: seeds contexts, priorities, draws and minibatches.
        checkpoint_path: where to checkpoint; an existing checkpoint there is resumed.
        temperature: exploration temperature of bandit picks.
        propensity_clip: largest importance weight ``1 / propensity``.

    The original API's ``MoERLTrainer(mdp, reward_func, selector, state_dim=64)`` is
    :class:`moe_sampler.router.compat.MoERLTrainer`, a subclass.
    """

    def __init__(self, environment: Environment, router: Router | None = None, experts: Sequence[Expert] | None = None,
                 *, mode: str = "sweep", seed: int = 0, checkpoint_path: str | os.PathLike | None = None,
                 learning_rate: float = 3e-3, temperature: float = 0.1, propensity_clip: float = 10.0,
                 updates_per_episode: int = 4, batch_size: int = 64, buffer_size: int = 20_000,
                 checkpoint_every: int = 10) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not (temperature >= 0 and propensity_clip >= 1 and updates_per_episode >= 0 and batch_size >= 1):
            raise ValueError(f"need temperature >= 0, propensity_clip >= 1, updates_per_episode >= 0, batch_size >= 1;"
                             f" got {temperature}, {propensity_clip}, {updates_per_episode}, {batch_size}")
        if experts is None:
            from ..experts import default_pool

            experts = default_pool()
        if not experts:
            raise ValueError("expert pool is empty: nothing to train on")
        self.environment, self.experts, self.mode, self.seed = environment, list(experts), mode, seed
        self.router = router if router is not None else Router.default()
        self.temperature, self.propensity_clip = temperature, propensity_clip
        self.updates_per_episode, self.batch_size, self.buffer_size = updates_per_episode, batch_size, buffer_size
        self.checkpoint_every = checkpoint_every
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path is not None else None
        self.optimizer = torch.optim.Adam(self.router.scorer.parameters(), lr=learning_rate)
        self.rng = random.Random(seed)
        self.generator = torch.Generator().manual_seed(seed)
        self.episode = 0
        self.buffer = {k: torch.zeros((0, *shape)) for k, shape in
                       zip(_BUFFER_KEYS, [(STATE_DIM,), (self.descriptors.shape[1],), (), (), ()])}
        self.history: dict[str, list[float]] = {k: [] for k in _HISTORY_KEYS}
        if self.checkpoint_path is not None and self.checkpoint_path.exists():
            self.load_checkpoint(self.checkpoint_path)

    @property
    def descriptors(self) -> Tensor:
        """Descriptor features of the pool, [n_experts, 16]."""
        return features_of(self.experts)

    def train(self, episodes: int, progress: Callable[[int, int, dict], None] | None = None,
              should_stop: Callable[[], bool] | None = None) -> TrainingResult:
        """Train until ``episodes`` episodes in total are done (a resumed trainer counts its
        checkpointed ones). ``progress(episode, total, info)`` after each episode;
        ``should_stop()`` is checked between episodes and ends training early (checkpointed)."""
        stopped = False
        while self.episode < episodes:
            if should_stop is not None and should_stop():
                stopped = True
                break
            info = self._run_episode()
            self.episode += 1
            if self.checkpoint_path is not None and self.episode % self.checkpoint_every == 0:
                self.save_checkpoint(self.checkpoint_path)
            if progress is not None:
                progress(self.episode, episodes, info)
        if self.checkpoint_path is not None:
            self.save_checkpoint(self.checkpoint_path)
        return self.result(stopped)

    def result(self, stopped: bool = False) -> TrainingResult:
        rewards, oracle, losses = (tuple(self.history[k]) for k in ("reward", "oracle_reward", "loss"))
        return TrainingResult(self.episode, stopped, rewards, oracle, losses)

    def reward(self, outcome: Outcome, priority: float) -> float:
        """``quality - lambda(priority) * cost`` of a run (the reported reward; the scorer
        learns quality and cost separately)."""
        return outcome.quality - lambda_from_priority(priority) * cost_from_nfe(outcome.nfe)

    def _run_episode(self) -> dict:
        context = self.environment.sample_context(self.rng)
        priority = self.rng.random()
        state = self.environment.state(context, priority).float()
        if self.mode == "sweep":
            outcomes = self.environment.evaluate(context, self.experts)
            indices, weights = list(range(len(self.experts))), [1.0] * len(self.experts)
            pick = self.router.select(state, self.experts, priority=priority).index
            rewards = [self.reward(o, priority) for o in outcomes]
            reward, oracle = rewards[pick], max(rewards)
        else:
            selection = self.router.select(state, self.experts, priority=priority, temperature=self.temperature,
                                           seed=self.rng.randrange(1 << 31))
            pick = selection.index
            outcomes = self.environment.evaluate(context, [self.experts[pick]])
            indices, weights = [pick], [min(1.0 / selection.propensity, self.propensity_clip)]
            reward, oracle = self.reward(outcomes[0], priority), math.nan
        descriptors = self.descriptors
        self.add_rows(state.expand(len(indices), -1), descriptors[indices],
                      torch.tensor([o.quality for o in outcomes]),
                      torch.tensor([float(cost_from_nfe(o.nfe)) for o in outcomes]), torch.tensor(weights))
        loss = self.fit(self.updates_per_episode)
        self.router.training["contexts"] = self.router.training.get("contexts", 0) + 1
        self.router.training["runs"] = self.router.training.get("runs", 0) + len(indices)
        self.router.descriptors = tuple(e.descriptor for e in self.experts)
        info = {"reward": reward, "oracle_reward": oracle, "loss": loss, "priority": priority, "pick": pick,
                "expert": self.experts[pick].name}
        for k in _HISTORY_KEYS:
            self.history[k].append(float(info[k]))
        return info

    def add_rows(self, state: Tensor, descriptor: Tensor, quality: Tensor, cost: Tensor, weight: Tensor) -> None:
        """Append rows (state [R, 64], descriptor [R, 16], quality/cost/weight [R]) to the replay buffer."""
        rows = dict(zip(_BUFFER_KEYS, (state, descriptor, quality, cost, weight)))
        for k, v in rows.items():
            self.buffer[k] = torch.cat([self.buffer[k], v.float()])[-self.buffer_size:]

    def fit(self, steps: int) -> float:
        """``steps`` Adam steps of weighted MSE on quality and cost over minibatches of the buffer."""
        n = len(self.buffer["quality"])
        if n == 0 or steps <= 0:
            return math.nan
        total = 0.0
        for _ in range(steps):
            idx = torch.randint(n, (min(self.batch_size, n),), generator=self.generator)
            q_pred, c_pred = self.router.scorer(self.buffer["state"][idx], self.buffer["descriptor"][idx])
            w = self.buffer["weight"][idx]
            err = (q_pred - self.buffer["quality"][idx]).square() + (c_pred - self.buffer["cost"][idx]).square()
            loss = (w * err).sum() / w.sum()
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach())
        return total / steps

    def learn_from_records(self, records: Sequence[Any], steps: int = 200) -> float:
        """Learn from logged runs (``RunRecord`` with state, expert, quality, nfe, propensity),
        weighted by ``min(1 / propensity, propensity_clip)``; rows for experts outside the pool,
        without state or quality, or failed, are skipped. Returns the mean loss."""
        by_name = {e.name: i for i, e in enumerate(self.experts)}
        descriptors = self.descriptors
        rows = [r for r in records if r.expert in by_name and r.state is not None and r.quality is not None]
        if rows:
            self.add_rows(torch.tensor([list(r.state) for r in rows], dtype=torch.float32),
                          descriptors[[by_name[r.expert] for r in rows]],
                          torch.tensor([r.quality if r.success else 0.0 for r in rows]),
                          torch.tensor([float(cost_from_nfe(r.nfe)) for r in rows]),
                          torch.tensor([min(1.0 / (r.propensity or 1.0), self.propensity_clip) for r in rows]))
        logger.info("learning from %d of %d logged runs", len(rows), len(records))
        return self.fit(steps)

    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """Atomically write the whole training state (safetensors + JSON metadata)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"scorer.{k}": v.detach().clone().contiguous() for k, v in self.router.scorer.state_dict().items()}
        optim = self.optimizer.state_dict()
        for index, state in optim["state"].items():
            for k, v in state.items():
                tensors[f"optim.{index}.{k}"] = torch.as_tensor(v).clone().contiguous()
        tensors["rng.torch"] = self.generator.get_state()
        tensors.update({f"buffer.{k}": v.contiguous() for k, v in self.buffer.items()})
        tensors.update({f"history.{k}": torch.tensor(v, dtype=torch.float64) for k, v in self.history.items()})
        metadata = {
            "format": CHECKPOINT_FORMAT, "feature_version": str(FEATURE_VERSION), "episode": str(self.episode),
            "mode": self.mode, "seed": str(self.seed), "experts": json.dumps([e.name for e in self.experts]),
            "rng.python": json.dumps(self.rng.getstate()), "param_groups": json.dumps(optim["param_groups"]),
            "router_name": self.router.name, "training": json.dumps(self.router.training),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)

    def load_checkpoint(self, path: str | os.PathLike) -> None:
        """Restore the state written by :meth:`save_checkpoint` (same pool, mode and seed)."""
        path = Path(path)
        tensors, meta = read_safetensors(path, what="training checkpoint")
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise RouterLoadError(f"{path} is not a MoE training checkpoint")
        if int(meta.get("feature_version", -1)) != FEATURE_VERSION:
            raise RouterLoadError(f"checkpoint {path} was written for feature version {meta.get('feature_version')}; "
                                  f"this pack uses {FEATURE_VERSION}; delete it to start over")
        names = json.loads(meta["experts"])
        if names != [e.name for e in self.experts] or meta["mode"] != self.mode or int(meta["seed"]) != self.seed:
            raise ValueError(f"checkpoint {path} is for pool {names}, mode {meta['mode']!r}, seed {meta['seed']}; "
                             f"this trainer has {[e.name for e in self.experts]}, {self.mode!r}, {self.seed}")
        self.router.scorer.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("scorer.")})
        state: dict[int, dict[str, Tensor]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        self.optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
        self.generator.set_state(tensors["rng.torch"])
        version, internal, gauss = json.loads(meta["rng.python"])
        self.rng.setstate((version, tuple(internal), gauss))
        self.buffer = {k: tensors[f"buffer.{k}"] for k in _BUFFER_KEYS}
        self.history = {k: tensors[f"history.{k}"].tolist() for k in _HISTORY_KEYS}
        self.episode = int(meta["episode"])
        self.router.training = json.loads(meta["training"])
        logger.info("resumed training from %s at episode %d", path, self.episode)
