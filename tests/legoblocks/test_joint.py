"""The joint stage: only sampled descendants learn, it resumes exactly, and it helps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from legoblocks.anchors import anchor_selections
from legoblocks.compose import ScalableModel
from legoblocks.data import split
from legoblocks.detect import detect_blocks
from legoblocks.joint import (
    JointConfig,
    JointTrainer,
    load_state_file,
    save_state,
    train_joint,
)
from legoblocks.retrain import RetrainConfig, block_io_indices, collect_block_io, retrain_descendants
from legoblocks.train import evaluate, train_teacher

LADDER = (0.0, 0.5, 0.75)


def _scalable(teacher: nn.Module) -> ScalableModel:
    blocked = detect_blocks(teacher, (1, 28, 28))
    return ScalableModel.from_blocked(blocked, ladder=LADDER)


def _snapshot(model: ScalableModel) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    return {
        (b, c): {k: v.clone() for k, v in m.state_dict().items()}
        for b in model.block_names for c, m in model.variants[b].items()
    }


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def data(fmnist_test_split):
    """(train, held-out) = 2048 and 512 real images: enough for a teacher worth distilling."""
    return tuple(split(fmnist_test_split, [2048, 512], seed=1))


@pytest.fixture(scope="module")
def scalable(make_tiny_resnet, data) -> ScalableModel:
    torch.manual_seed(0)
    teacher = make_tiny_resnet()
    train_teacher(teacher, data[0], epochs=10, lr=0.1, batch_size=128, weight_decay=5e-4, seed=0, progress=False)
    assert evaluate(teacher, data[1]) > 0.6, "the test teacher did not learn"
    model = _scalable(teacher.eval())
    assert sum(len(model.choices(b)) > 1 for b in model.block_names) >= 2, "need two scalable blocks"
    return model


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_only_sampled_descendants_move(scalable: ScalableModel, data, optimizer: str) -> None:
    train, _ = data
    model = copy.deepcopy(scalable)
    # Weight decay and momentum are the trap: a descendant trained in step 1 must not
    # drift in step 2 when step 2 does not sample it.
    cfg = JointConfig(steps=2, batch_size=32, weight_decay=0.01, random_compositions=1,
                      sandwich_smallest=False, optimizer=optimizer, seed=0)
    trainer = JointTrainer(model, train, cfg)
    # Pick a seed whose step 2 leaves out a descendant that step 1 trained.
    for seed in range(50):
        trainer.cfg.seed = seed
        first, second = (
            {(b, c) for sel in trainer.selections_for(s) for b, c in zip(model.block_names, sel) if c != "0.0"}
            for s in (0, 1)
        )
        if first - second:
            break
    assert first - second, "no seed separates the two steps"

    before = _snapshot(model)
    sampled: list[set[tuple[str, str]]] = []
    trainer.run(1, progress=False, on_step=lambda info: sampled.append(
        {(b, c) for sel in info.selections for b, c in zip(model.block_names, sel) if c != "0.0"}))
    middle = _snapshot(model)
    trainer.run(progress=False, on_step=lambda info: sampled.append(
        {(b, c) for sel in info.selections for b, c in zip(model.block_names, sel) if c != "0.0"}))
    after = _snapshot(model)

    assert sampled == [first, second]
    for key in before:
        block, choice = key
        if choice == "0.0":
            assert _same(before[key], after[key]), f"original {key} (weights or BN buffers) moved"
            continue
        assert _same(before[key], middle[key]) != (key in first), f"step 1 and {key} disagree"
        assert _same(middle[key], after[key]) != (key in second), f"step 2 and {key} disagree"
    assert all(not m.training for v in model.variants.values() for m in v.values())
    assert all(p.requires_grad for p in model.variants["1"]["0.0"].parameters()), "flags not restored"
    assert all(p.grad is None for v in model.variants.values() for m in v.values() for p in m.parameters())


def test_a_resumed_run_equals_an_uninterrupted_one(scalable: ScalableModel, data, tmp_path) -> None:
    train, _ = data
    cfg = JointConfig(steps=4, batch_size=32, seed=3, weight_decay=1e-4)
    straight = copy.deepcopy(scalable)
    full = JointTrainer(straight, train, cfg).run(progress=False)

    first = copy.deepcopy(scalable)
    part = JointTrainer(first, train, cfg)
    part.run(2, progress=False)
    save_state(part.get_state(), tmp_path / "joint.pt")
    del part, first  # a "killed" worker: only the checkpoint survives

    resumed_model = copy.deepcopy(scalable)
    resumed = JointTrainer(resumed_model, train, cfg)
    resumed.load_state(load_state_file(tmp_path / "joint.pt"))
    assert resumed.step_count == 2
    report = resumed.run(progress=False)

    assert report.steps == full.steps == 4
    assert report.losses == full.losses
    a, b = _snapshot(straight), _snapshot(resumed_model)
    assert all(_same(a[k], b[k]) for k in a)
    with pytest.raises(RuntimeError, match="steps are done"):
        resumed.step()


def test_shards_partition_the_batch_and_bad_input_is_named(scalable: ScalableModel, data) -> None:
    train, _ = data
    cfg = JointConfig(steps=3, batch_size=32, seed=1)
    whole = JointTrainer(copy.deepcopy(scalable), train, cfg).batch_index(1)
    shards = [JointTrainer(copy.deepcopy(scalable), train, cfg, rank=r, world_size=2).batch_index(1) for r in (0, 1)]
    assert sorted(torch.cat(shards).tolist()) == sorted(whole.tolist())
    both = JointTrainer(copy.deepcopy(scalable), train, JointConfig(steps=1, sandwich_largest=True, random_compositions=0))
    assert both.selections_for(0) == [scalable.smallest_selection(), both.largest]
    assert all(c != "0.0" for c, n in zip(both.largest, scalable.block_names) if len(scalable.choices(n)) > 1)
    # A sandwich floor replaces the smallest composition by the even one of that budget.
    floored = JointTrainer(copy.deepcopy(scalable), train,
                           JointConfig(steps=1, random_compositions=0, sandwich_floor=0.7))
    (floor,) = anchor_selections(scalable, [0.7])
    assert floored.selections_for(0) == [floor] and floor != scalable.smallest_selection()
    assert JointConfig(anchor_budgets=[0.5], sandwich_floor=0.2).trained_budgets() == [0.5, 0.2]
    assert JointConfig(anchor_budgets=[0.5]).trained_budgets() == [0.5]
    with pytest.raises(ValueError, match="batch_size"):
        JointTrainer(scalable, train, JointConfig(batch_size=10_000))
    with pytest.raises(ValueError, match="lr must be > 0"):
        JointConfig(lr=0).validate()
    with pytest.raises(ValueError, match=r"optimizer must be one of \['adam', 'sgd'\] \(got 'lbfgs'\)"):
        JointConfig(optimizer="lbfgs").validate()
    state = JointTrainer(copy.deepcopy(scalable), train, cfg).get_state()
    state["trainable"] = state["trainable"][:-1]
    with pytest.raises(ValueError, match="other descendants"):
        JointTrainer(copy.deepcopy(scalable), train, cfg).load_state(state)


def test_cached_teacher_outputs_replace_the_teacher_pass(scalable: ScalableModel, data) -> None:
    train, _ = data
    teacher_blocks = [scalable.variants[b]["0.0"] for b in scalable.block_names]
    io = collect_block_io(teacher_blocks, train, limit=600, batch_size=256, seed=3)
    index = block_io_indices(len(train), 600, seed=3)
    labels = torch.tensor([int(train[int(i)][1]) for i in index])
    ds = TensorDataset(io[0].inputs, labels)
    cfg = JointConfig(steps=3, batch_size=64, anchor_budgets=[0.6], random_compositions=1, seed=2)
    plain = JointTrainer(copy.deepcopy(scalable), ds, cfg)
    cached = JointTrainer(copy.deepcopy(scalable), ds, cfg, teacher_outputs=[d.outputs for d in io])

    def no_teacher_pass(x):
        raise AssertionError("the teacher ran although its outputs were given")

    cached._teacher_forward = no_teacher_pass
    a = [plain.step().loss for _ in range(3)]
    b = [cached.step().loss for _ in range(3)]
    # Same targets up to float rounding (the cache ran in batches of 256, the steps in 64).
    assert a == pytest.approx(b, rel=1e-4)
    for name in scalable.block_names:
        for choice, module in plain.variants[name].items():
            other = cached.variants[name][choice].state_dict()
            for key, value in module.state_dict().items():
                assert torch.allclose(value.float(), other[key].float(), atol=1e-4), (name, choice, key)
    with pytest.raises(ValueError, match="holds 1 tensors"):
        JointTrainer(copy.deepcopy(scalable), ds, cfg, teacher_outputs=[io[0].outputs])
    with pytest.raises(ValueError, match="one row per training sample"):
        JointTrainer(copy.deepcopy(scalable), ds, cfg, teacher_outputs=[d.outputs[:10] for d in io])


def test_joint_stage_makes_the_smallest_composition_more_accurate(scalable: ScalableModel, data) -> None:
    train, held_out = data
    model = copy.deepcopy(scalable)
    teacher_blocks = [model.variant(b, "0.0") for b in model.block_names]
    data = collect_block_io(teacher_blocks, train, limit=None, batch_size=256, seed=0)
    for name, block_data in zip(model.block_names, data):  # the per-block stage comes first
        retrain_descendants(model.variants[name], block_data, RetrainConfig(epochs=1, lr=1e-3), progress=False)
    smallest = model.smallest_selection()
    before = evaluate(model.compose(smallest), held_out)

    report = train_joint(model, train, JointConfig(steps=60, batch_size=64, lr=5e-3, seed=0), progress=False)

    after = evaluate(model.compose(smallest), held_out)
    assert report.steps == len(report.losses) == 60
    assert after > before, f"smallest composition: {before:.3f} before, {after:.3f} after the joint stage"


_WORKER = """
import os, sys, torch
from safetensors.torch import load_file, save_file
from torch.utils.data import TensorDataset
import torch.distributed as dist
from legoblocks.compose import ScalableModel
from legoblocks.joint import JointConfig, JointTrainer

torch.set_num_threads(1)
root = sys.argv[1]
dist.init_process_group("gloo", init_method="env://")
rank, world = dist.get_rank(), dist.get_world_size()
model = ScalableModel.load(os.path.join(root, "scalable"))
t = load_file(os.path.join(root, "train.safetensors"))
trainer = JointTrainer(model, TensorDataset(t["x"], t["y"]), JointConfig(steps=3, batch_size=32, seed=5),
                       rank=rank, world_size=world)
trainer.run(progress=False)
save_file({f"{k[0]}/{k[1]}/{n}": v.contiguous() for k in trainer.trainable
           for n, v in model.variants[k[0]][k[1]].state_dict().items()},
          os.path.join(root, f"rank{rank}.safetensors"))
dist.destroy_process_group()
"""


def test_data_parallel_workers_stay_in_sync(scalable: ScalableModel, data, tmp_path) -> None:
    """Two gloo workers, each on half of every batch, end with identical descendants."""
    import os
    import socket
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    train, _ = data
    scalable.save(tmp_path / "scalable")
    x, y = train.tensors
    save_file({"x": x[:256].contiguous(), "y": y[:256].contiguous()}, str(tmp_path / "train.safetensors"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
               GLOO_SOCKET_IFNAME="lo")
    procs = [
        subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path)], env=dict(env, RANK=str(r)))
        for r in (0, 1)
    ]
    try:
        codes = [p.wait(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert codes == [0, 0]
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0), "replicas diverged"
    start = {f"{b}/{c}/{n}": v for b in scalable.block_names for c, m in scalable.variants[b].items()
             if c != "0.0" for n, v in m.state_dict().items()}
    assert any(not torch.equal(start[k], r0[k]) for k in r0), "nothing trained"
