"""The composition-aware joint stage: descendants trained together, as they are served.

Per-block feature distillation trains every descendant to imitate its original block *given
the teacher's input*. At run time a descendant sits behind other pruned blocks, whose errors
compound, and its BatchNorm statistics no longer match what it sees. The joint stage closes
that gap: each step it samples compositions of descendants (a random one per step plus the
"sandwich" extremes), runs them end to end, and trains the sampled descendants to match the
teacher's logits (`T^2 * KL`, Hinton distillation) and the teacher's output at every block
boundary (MSE).

Invariants the rest of the system relies on:

* The teacher is the original `"0.0"` blocks of the `ScalableModel`. They are frozen and stay
  in eval mode, so neither their parameters nor their BatchNorm running statistics move, also
  when a student composition samples `"0.0"` for a block.
* Only the descendants sampled in a step get gradients and are in train mode for that step.
  Gradients are zeroed with `set_to_none=True` and Adam and SGD skip parameters whose
  `.grad` is None, so an unsampled descendant is bit-identical before and after a step (Adam's
  moments never touch it, weight decay included).
* Everything random (the batch and the compositions) is derived from `(cfg.seed, step)`, so
  the full training state is the step counter, the optimizer state and the descendants'
  weights: `JointTrainer.get_state()` is a plain dict of tensors, numbers and strings that
  `torch.save` writes and `torch.load(..., weights_only=True)` reads back, and a run resumed
  from it continues exactly where it stopped. `run(num_steps=k)` advances in chunks, so a
  Ray Train loop can checkpoint between chunks.

Data parallel (e.g. inside a Ray Train `TorchTrainer` with the gloo backend): construct the
trainer on every worker with the same config and `rank`/`world_size` from
`torch.distributed`. Every worker derives the same compositions and the same global batch from
`(seed, step)` and processes its own shard `batch[rank::world_size]`; after the backward pass
the gradients of the sampled parameters (the same set on every worker) are averaged with one
flattened `all_reduce` (`allreduce_grads`, the default when `world_size > 1`), then each worker
applies the identical Adam step, so the replicas stay in sync without `DistributedDataParallel`
(whose fixed parameter set does not fit a model that changes shape every step). BatchNorm
layers in train mode normalise with per-shard batch statistics, as in plain DDP; their running
statistics are averaged over the workers after each step (`allreduce_buffers`), so every
replica holds the same descendants and only rank 0 needs to save checkpoints.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import Dataset

from legoblocks.batches import index_batches
from legoblocks.choices import ORIGINAL

log = logging.getLogger(__name__)

STATE_FORMAT = 1
# Both skip parameters whose .grad is None (unsampled descendants): no step, no decay, no
# momentum update. "sgd" is the uniform-pruning baseline's optimizer (Nesterov momentum 0.9).
OPTIMIZERS = ("adam", "sgd")

GradSync = Callable[[list[nn.Parameter]], None]
BufferSync = Callable[[list[nn.Module]], None]


@dataclass
class JointConfig:
    """Hyperparameters of the joint stage; every field is a plain value (numbers, a string, a
    list of numbers), so a YAML file or Optuna can set it.

    `steps` counts optimizer steps; each step trains `random_compositions` random compositions
    plus the smallest (and optionally the largest trainable) one on one batch, and, when
    `anchor_budgets` (FLOPs fractions of the original model) are given, the even composition
    of one of those budgets in turn (`legoblocks.anchors`): budgets a deployment is known to
    serve get compositions trained for them, as the smallest one is. `sandwich_floor` (a
    FLOPs fraction) makes the sandwich's small end the even composition of that budget
    instead of the smallest composition: when the lowest budget served is known, the
    composition trained every step is one a device will run. The learning rate
    decays from `lr` to `lr * min_lr_fraction` on a cosine over `steps`; `optimizer` is
    "adam" or "sgd" (Nesterov momentum 0.9, the uniform baseline's fine-tuning optimizer).
    `freeze_bn` keeps the sampled descendants in eval mode too: their BatchNorm layers normalise with the
    running statistics from per-block distillation and never update them, so a composition
    behaves at run time exactly as it was trained (no train/eval statistics mismatch); on full
    Fashion-MNIST it measured 0.3-1.1 points worse than training-mode BatchNorm, so it is off.

    The defaults are the recipe `bench/accuracy.py` measured (docs/benchmarks/accuracy.md): the
    logit loss is 0.5 KD + 0.5 cross-entropy, the same mix the uniform-pruning baseline
    fine-tunes with, so neither method is favoured by its loss.
    """

    steps: int = 500
    lr: float = 1e-3
    batch_size: int = 128
    temperature: float = 4.0
    kd_weight: float = 0.5
    feature_weight: float = 1.0
    ce_weight: float = 0.5
    sandwich_smallest: bool = True
    sandwich_largest: bool = False
    random_compositions: int = 1
    weight_decay: float = 0.0
    min_lr_fraction: float = 0.0
    freeze_bn: bool = False
    anchor_budgets: list[float] = field(default_factory=list)
    optimizer: str = "adam"
    sandwich_floor: float | None = None
    seed: int = 0

    def trained_budgets(self) -> list[float]:
        """The FLOPs budgets whose even composition this stage trains: the anchors and the
        sandwich floor (serving prefers these measured compositions, `profiling.serving`)."""
        floor = [self.sandwich_floor] if self.sandwich_floor is not None else []
        return [*self.anchor_budgets, *floor]

    def validate(self) -> None:
        problems = []
        if self.steps < 0:
            problems.append(f"steps must be >= 0 (got {self.steps})")
        if self.lr <= 0:
            problems.append(f"lr must be > 0 (got {self.lr})")
        if self.batch_size < 1:
            problems.append(f"batch_size must be >= 1 (got {self.batch_size})")
        if self.temperature <= 0:
            problems.append(f"temperature must be > 0 (got {self.temperature})")
        for name in ("kd_weight", "feature_weight", "ce_weight", "weight_decay"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0 (got {getattr(self, name)})")
        if self.random_compositions < 0:
            problems.append(f"random_compositions must be >= 0 (got {self.random_compositions})")
        if not 0.0 <= self.min_lr_fraction <= 1.0:
            problems.append(f"min_lr_fraction must be in [0, 1] (got {self.min_lr_fraction})")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {sorted(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.sandwich_floor is not None and not 0 < self.sandwich_floor <= 1:
            problems.append(f"sandwich_floor must be a FLOPs fraction in (0, 1] or None (got {self.sandwich_floor})")
        bad = [b for b in self.anchor_budgets if not (isinstance(b, (int, float)) and 0 < b <= 1)]
        if bad:
            problems.append(f"anchor_budgets must be FLOPs fractions in (0, 1] (got {bad})")
        if self.random_compositions == 0 and not (
            self.sandwich_smallest or self.sandwich_largest or self.anchor_budgets
        ):
            problems.append(
                "nothing to train: set random_compositions >= 1, enable sandwich_smallest "
                "or sandwich_largest, or give anchor_budgets"
            )
        if self.kd_weight == 0 and self.feature_weight == 0 and self.ce_weight == 0:
            problems.append("all loss weights are 0: set kd_weight, feature_weight or ce_weight > 0")
        if problems:
            raise ValueError("invalid JointConfig: " + "; ".join(problems))


@dataclass
class StepInfo:
    """What one step did: passed to `on_step` (metrics, tests that need to know what was sampled)."""

    step: int  # steps completed, 1-based after the first step
    loss: float  # total loss summed over this step's compositions
    kd: float
    feature: float
    lr: float
    selections: list[list[str]]  # the compositions trained, one choice id per block


@dataclass
class JointReport:
    steps: int
    losses: list[float] = field(default_factory=list)  # one per completed step
    seconds: float = 0.0  # wall time across all runs of this state (resumes included)


def _sparsity(choice: str) -> float:
    try:
        return float(choice)
    except ValueError as exc:
        raise ValueError(f"joint stage: choice id {choice!r} is not a sparsity like '0.4'") from exc


def _seed_for(seed: int, stream: int, index: int) -> int:
    """An independent, reproducible seed per (stream, index): batches and compositions of step t
    are a pure function of (seed, t), so resuming needs no RNG state."""
    return int(np.random.SeedSequence([seed, stream, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def _allreduce_mean(tensors: Sequence[Tensor]) -> None:
    """Replace each tensor by its mean over all `torch.distributed` ranks, in one collective."""
    import torch.distributed as dist

    if not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def allreduce_grads(params: Sequence[nn.Parameter]) -> None:
    """Average the gradients of `params` over all ranks (the data-parallel gradient)."""
    _allreduce_mean([p.grad for p in params if p.grad is not None])


def allreduce_buffers(modules: Sequence[nn.Module]) -> None:
    """Average the floating-point buffers (BatchNorm running statistics) of `modules` over all
    ranks: each rank updated them from its own shard, and the replicas must stay identical."""
    _allreduce_mean([b for m in modules for b in m.buffers() if b.is_floating_point()])


class JointTrainer:
    """Runs the joint stage on a `ScalableModel`'s variants in place, step by step.

    `rank`/`world_size` select this worker's shard of each batch; `grad_sync` is called with
    the parameters that received gradients before every optimizer step, `buffer_sync` with the
    descendants trained in the step after it (defaults: nothing for one worker,
    `allreduce_grads` and `allreduce_buffers` for several).

    `teacher_outputs` (optional): the teacher's output at every block boundary for every
    sample of `train_ds`, in its order, e.g. `[d.outputs for d in collect_block_io(...)]`
    with `train_ds` built from the same samples (`block_io_indices`). Steps then read their
    targets instead of running the frozen teacher (about a tenth of the stage's time on
    ResNet-20); the teacher is deterministic in eval mode, so the targets are the ones it
    would compute. The trade: the stage sees only those samples (on full Fashion-MNIST,
    14,000 of 59,000 images cost up to 0.3 points at 50% FLOPs, docs/benchmarks/accuracy.md).
    """

    def __init__(
        self,
        model,
        train_ds: Dataset,
        cfg: JointConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        grad_sync: GradSync | None = None,
        buffer_sync: BufferSync | None = None,
        teacher_outputs: Sequence[Tensor] | None = None,
        num_workers: int = 0,
    ) -> None:
        cfg.validate()
        if not 0 <= rank < world_size:
            raise ValueError(f"joint stage: rank {rank} is outside world_size {world_size}")
        size = len(train_ds)  # type: ignore[arg-type]
        if size < cfg.batch_size:
            raise ValueError(
                f"joint stage: the training set has {size} samples, fewer than batch_size "
                f"{cfg.batch_size}; lower JointConfig.batch_size or pass more data"
            )
        if cfg.batch_size < world_size:
            raise ValueError(
                f"joint stage: batch_size {cfg.batch_size} is smaller than world_size {world_size}; "
                "every worker needs at least one sample per step"
            )
        self.model = model
        self.cfg = cfg
        self.train_ds = train_ds
        self.num_workers = num_workers
        self.teacher_outputs = self._checked_teacher_outputs(model, size, teacher_outputs)
        self.rank = rank
        self.world_size = world_size
        several = world_size > 1
        self.grad_sync = grad_sync if grad_sync is not None else (allreduce_grads if several else None)
        self.buffer_sync = buffer_sync if buffer_sync is not None else (allreduce_buffers if several else None)
        self.block_names: list[str] = list(model.block_names)
        # The ScalableModel's own modules (not copies): the joint stage trains them in place.
        self.variants: dict[str, dict[str, nn.Module]] = model.variants
        self.choices: dict[str, list[str]] = {b: list(model.choices(b)) for b in self.block_names}
        self.teacher = [self.variants[b][ORIGINAL] for b in self.block_names]
        # Trainable = every non-original descendant, in a fixed order (the optimizer state is
        # keyed by position, so the order must be the same when a state is loaded).
        self.trainable: list[tuple[str, str]] = [
            (b, c) for b in self.block_names for c in self.choices[b] if c != ORIGINAL
        ]
        if not self.trainable:
            raise ValueError(
                "joint stage: the model has no descendants to train (every block offers only "
                "'0.0'); run make_descendants on its scalable blocks first"
            )
        self.params: list[nn.Parameter] = [
            p for b, c in self.trainable for p in self.variants[b][c].parameters()
        ]
        for p in self.params:
            p.requires_grad_(True)
        self.smallest: list[str] = list(model.smallest_selection())
        if cfg.sandwich_floor is not None:
            from legoblocks.anchors import anchor_selections

            (self.smallest,) = anchor_selections(model, [cfg.sandwich_floor])
        self.largest: list[str] = self._largest_trainable_selection()
        self.anchors: list[list[str]] = []
        if cfg.anchor_budgets:
            from legoblocks.anchors import anchor_selections

            self.anchors = anchor_selections(model, cfg.anchor_budgets)
        if cfg.optimizer == "sgd":
            self.optimizer: torch.optim.Optimizer = torch.optim.SGD(
                self.params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
        else:
            self.optimizer = torch.optim.Adam(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.device = self.params[0].device if self.params else torch.device("cpu")
        self.step_count = 0
        self.losses: list[float] = []
        self.seconds = 0.0
        self._perm_epoch = -1
        self._perm: Tensor | None = None
        self._all_eval()

    @staticmethod
    def _checked_teacher_outputs(model, size: int, outputs: Sequence[Tensor] | None) -> list[Tensor] | None:
        if outputs is None:
            return None
        names = list(model.block_names)
        if len(outputs) != len(names):
            raise ValueError(
                f"joint stage: teacher_outputs holds {len(outputs)} tensors, the model has {len(names)} "
                "blocks: pass the teacher's output of every block (e.g. [d.outputs for d in "
                "collect_block_io(...)])"
            )
        short = [names[i] for i, t in enumerate(outputs) if len(t) != size]
        if short:
            raise ValueError(
                f"joint stage: teacher_outputs of block(s) {short} do not have one row per training "
                f"sample ({size}): build train_ds from the same samples, in the same order"
            )
        return list(outputs)

    # ----------------------------------------------------------------- sampling
    def _all_eval(self) -> None:
        for block in self.block_names:
            for module in self.variants[block].values():
                module.eval()

    def _largest_trainable_selection(self) -> list[str]:
        """The least pruned descendant per block (the original where a block has none):
        the all-original composition is the teacher itself and has nothing to learn."""
        out = []
        for b in self.block_names:
            pruned = [c for c in self.choices[b] if c != ORIGINAL]
            out.append(min(pruned, key=_sparsity) if pruned else ORIGINAL)
        return out

    def selections_for(self, step: int) -> list[list[str]]:
        """The compositions step `step` trains (0-based; identical on every worker)."""
        gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, 1, step))
        picked: list[list[str]] = []
        for _ in range(self.cfg.random_compositions):
            picked.append(
                [self.choices[b][int(torch.randint(len(self.choices[b]), (1,), generator=gen))]
                 for b in self.block_names]
            )
        if self.anchors:
            picked.append(self.anchors[step % len(self.anchors)])
        if self.cfg.sandwich_smallest:
            picked.append(self.smallest)
        if self.cfg.sandwich_largest:
            picked.append(self.largest)
        unique: list[list[str]] = []
        for sel in picked:
            if sel not in unique and any(c != ORIGINAL for c in sel):
                unique.append(sel)
        return unique

    def batch_index(self, step: int) -> Tensor:
        """This worker's sample indices for step `step`: epochs of seeded permutations,
        sharded `[rank::world_size]`."""
        size = len(self.train_ds)  # type: ignore[arg-type]
        bs = self.cfg.batch_size
        per_epoch = size // bs
        epoch, k = divmod(step, per_epoch)
        if epoch != self._perm_epoch:
            gen = torch.Generator().manual_seed(_seed_for(self.cfg.seed, 0, epoch))
            self._perm = torch.randperm(size, generator=gen)
            self._perm_epoch = epoch
        assert self._perm is not None
        return self._perm[k * bs : (k + 1) * bs][self.rank :: self.world_size]

    def epoch_of(self, step: int) -> int:
        return step // (len(self.train_ds) // self.cfg.batch_size)  # type: ignore[arg-type]

    def _prefetch(self, first: int, count: int):
        """The samples of steps first..first+count-1, decoded ahead by `num_workers` processes
        (one pass per epoch, so an augmenting dataset sees each step's epoch)."""
        step = first
        while step < first + count:
            epoch = self.epoch_of(step)
            last = min(first + count, (epoch + 1) * (len(self.train_ds) // self.cfg.batch_size))  # type: ignore[arg-type]
            yield from index_batches(self.train_ds, [self.batch_index(t) for t in range(step, last)], epoch=epoch,
                                     num_workers=self.num_workers)
            step = last

    def _batch(self, step: int, samples: Sequence[Tensor] | None = None) -> tuple[Tensor, Tensor, list[Tensor] | None]:
        """(inputs, labels, the teacher's block outputs when they were given) of this step."""
        index = self.batch_index(step)
        if samples is None:
            (samples,) = index_batches(self.train_ds, [index], epoch=self.epoch_of(step))
        x, y = samples[0], torch.as_tensor(samples[1])
        cached = None
        if self.teacher_outputs is not None:
            cached = [t[index].to(self.device) for t in self.teacher_outputs]
        return x.to(self.device), y.to(self.device), cached

    def _teacher_forward(self, x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            out = []
            h = x
            for module in self.teacher:
                h = module(h)
                out.append(h)
        return out

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        floor = cfg.lr * cfg.min_lr_fraction
        progress = min(1.0, step / max(1, cfg.steps))
        return floor + 0.5 * (cfg.lr - floor) * (1.0 + math.cos(math.pi * progress))

    # ----------------------------------------------------------------- training
    def _composition_loss(
        self, sel: list[str], x: Tensor, y: Tensor, teacher_out: list[Tensor]
    ) -> tuple[Tensor, float, float]:
        cfg = self.cfg
        first = next(i for i, c in enumerate(sel) if c != ORIGINAL)
        # Up to the first pruned block the student *is* the teacher: reuse its activations.
        h = x if first == 0 else teacher_out[first - 1]
        last = len(sel) - 1
        feature = h.new_zeros(())
        for i in range(first, len(sel)):
            module = self.variants[self.block_names[i]][sel[i]]
            h = module(h)
            if i < last:
                feature = feature + F.mse_loss(h, teacher_out[i])
        t = cfg.temperature
        kd = F.kl_div(
            F.log_softmax(h / t, dim=1), F.softmax(teacher_out[last] / t, dim=1), reduction="batchmean"
        ) * (t * t)
        loss = cfg.kd_weight * kd + cfg.feature_weight * feature
        if cfg.ce_weight:
            loss = loss + cfg.ce_weight * F.cross_entropy(h, y)
        return loss, float(kd.detach()), float(feature.detach())

    def step(self, samples: Sequence[Tensor] | None = None) -> StepInfo:
        """One optimizer step (on `samples`, this step's batch, when prefetched); raises once
        `cfg.steps` steps are done."""
        if self.step_count >= self.cfg.steps:
            raise RuntimeError(f"joint stage: all {self.cfg.steps} steps are done")
        started = time.perf_counter()
        step = self.step_count
        lr = self.lr_at(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, y, cached = self._batch(step, samples)
        selections = self.selections_for(step)
        originals = [p for m in self.teacher for p in m.parameters()]
        flags = [p.requires_grad for p in originals]
        self._all_eval()
        self.optimizer.zero_grad(set_to_none=True)
        total = kd_sum = feat_sum = 0.0
        try:
            # Frozen originals: no .grad on the teacher, but gradients still flow *through* a
            # sampled original block to the pruned blocks in front of it.
            for p in originals:
                p.requires_grad_(False)
            teacher_out = cached if cached is not None else self._teacher_forward(x)
            for sel in selections:
                active = [self.variants[b][c] for b, c in zip(self.block_names, sel) if c != ORIGINAL]
                for module in active:
                    module.train(not self.cfg.freeze_bn)
                try:
                    loss, kd, feat = self._composition_loss(sel, x, y, teacher_out)
                    loss.backward()
                finally:
                    for module in active:
                        module.eval()
                total += float(loss.detach())
                kd_sum += kd
                feat_sum += feat
            with_grad = [p for p in self.params if p.grad is not None]
            if self.grad_sync is not None:
                self.grad_sync(with_grad)
            self.optimizer.step()
            if self.buffer_sync is not None:
                trained = {(b, c) for sel in selections for b, c in zip(self.block_names, sel) if c != ORIGINAL}
                self.buffer_sync([self.variants[b][c] for b, c in self.trainable if (b, c) in trained])
        finally:
            for p, flag in zip(originals, flags):
                p.requires_grad_(flag)
        self.optimizer.zero_grad(set_to_none=True)
        self.step_count += 1
        self.losses.append(total)
        self.seconds += time.perf_counter() - started
        return StepInfo(self.step_count, total, kd_sum, feat_sum, lr, selections)

    def run(
        self,
        num_steps: int | None = None,
        *,
        progress: bool = True,
        on_step: Callable[[StepInfo], None] | None = None,
    ) -> JointReport:
        """Advance `num_steps` steps (default: to the end), calling `on_step` after each."""
        remaining = self.cfg.steps - self.step_count
        todo = remaining if num_steps is None else max(0, min(num_steps, remaining))
        bar = None
        if progress and todo:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=self.step_count, desc="joint stage", unit="step")
        try:
            for samples in self._prefetch(self.step_count, todo):
                info = self.step(samples)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}")
                if on_step is not None:
                    on_step(info)
        finally:
            if bar is not None:
                bar.close()
        return self.report()

    @property
    def done(self) -> bool:
        return self.step_count >= self.cfg.steps

    def report(self) -> JointReport:
        return JointReport(steps=self.step_count, losses=list(self.losses), seconds=self.seconds)

    # ----------------------------------------------------------------- checkpoint
    def get_state(self) -> dict:
        """Everything needed to resume: plain containers of tensors, numbers and strings
        (loadable with `torch.load(..., weights_only=True)`). Tensors are copies."""
        return {
            "format": STATE_FORMAT,
            "step": self.step_count,
            "total_steps": self.cfg.steps,
            "seed": self.cfg.seed,
            "config": asdict(self.cfg),
            "trainable": [[b, c] for b, c in self.trainable],
            "variants": {
                f"{b}/{c}": {k: v.detach().clone() for k, v in self.variants[b][c].state_dict().items()}
                for b, c in self.trainable
            },
            "optimizer": _clone_tree(self.optimizer.state_dict()),
            "losses": torch.tensor(self.losses, dtype=torch.float64),
            "seconds": float(self.seconds),
        }

    def load_state(self, state: dict) -> None:
        """Resume from `get_state()` output: the descendants' weights, optimizer and step."""
        if state.get("format") != STATE_FORMAT:
            raise ValueError(
                f"joint stage: state format {state.get('format')!r} is not {STATE_FORMAT}; it was "
                "written by another version - restart the joint stage without a state"
            )
        trainable = [tuple(pair) for pair in state["trainable"]]
        if trainable != self.trainable:
            raise ValueError(
                "joint stage: the state was saved for other descendants "
                f"({len(trainable)} vs {len(self.trainable)} block/choice pairs); resume it with the "
                "same ScalableModel, or start without a state"
            )
        if state["seed"] != self.cfg.seed or state["total_steps"] != self.cfg.steps:
            log.warning(
                "joint stage: resuming a state saved with seed=%s steps=%s under seed=%s steps=%s; "
                "batches, compositions and the lr schedule follow the new config",
                state["seed"], state["total_steps"], self.cfg.seed, self.cfg.steps,
            )
        for b, c in self.trainable:
            self.variants[b][c].load_state_dict(state["variants"][f"{b}/{c}"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step_count = int(state["step"])
        self.losses = [float(v) for v in state["losses"].tolist()]
        self.seconds = float(state["seconds"])


def _clone_tree(obj):
    if isinstance(obj, Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    return obj


def save_state(state: dict, path) -> None:
    """Write a `get_state()` dict (torch.save; read back safely with `load_state_file`)."""
    torch.save(state, path)


def load_state_file(path) -> dict:
    """Read a joint-stage state without unpickling code (`weights_only=True`)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def train_joint(
    model,
    train_ds: Dataset,
    cfg: JointConfig,
    *,
    state: dict | None = None,
    progress: bool = True,
    on_step: Callable[[StepInfo], None] | None = None,
    teacher_outputs: Sequence[Tensor] | None = None,
) -> JointReport:
    """Run the joint stage on `model` (a ScalableModel) to `cfg.steps`, updating its variants
    in place; `state` (from `JointTrainer.get_state`) resumes an interrupted run;
    `teacher_outputs` as in `JointTrainer`."""
    trainer = JointTrainer(model, train_ds, cfg, teacher_outputs=teacher_outputs)
    if state is not None:
        trainer.load_state(state)
    return trainer.run(progress=progress, on_step=on_step)
