"""Static ConPET (EMR/EMR*, EA-EMR/EA-EMR*, CRL/CRL*) and the EWC/LwF baselines through the real task loop.

Every run is a shipped experiment on the shipped (capped) FewRel data with a tiny random BERT. One run per
configuration is shared by all tests of this module (``runs``); a ``Recorder`` callback rides along and keeps what
the tests check: the indices of every training batch, snapshots at task boundaries and, for every test batch, the
predictions next to ones recomputed from the module's own pieces.

The runs use one torch thread: on a 2-core machine that is busy with anything else, 2 intra-op threads of a tiny
model spend most of their time waiting for each other (about 100x slower per step).
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.callbacks.memory import EpisodicMemoryCallback
from conpet_lightning.callbacks.replay import DynamicReplayCallback
from conpet_lightning.loop import TaskLoop
from conpet_lightning.methods.static.crl import CRLModule
from conpet_lightning.methods.static.eaemr import EAEMRModule
from conpet_lightning.methods.static.regularized import EWCModule, LwFModule
from conpet_lightning.passes import encode_records, eval_mode
from conpet_lightning.policies import DynamicReplayPolicy
from conpet_lightning.policies.memory import select_exemplars
from conpet_lightning.policies.sampling import decimal_ceil, decimal_floor
from tests.helpers import run_world, tiny_loop

STATIC = ["emr", "emr_star", "eaemr", "eaemr_star", "crl", "crl_star", "ewc", "lwf"]

#: name -> (experiment file, number of tasks, overrides). The shipped experiments come first (test 1 runs them all).
RUNS: dict[str, tuple[str, int, list[str]]] = {
    # 8 training samples per class, so a memory of ceil(0.8 x 5) = 4 per class is a real selection
    "emr": ("emr", 3, ["data.max_train_per_class=8"]),
    # 2 epochs and a limit of 10: 2 x floor(0.8 x 10) = 16 steps from task 2 on, 2 x 4 = 8 on task 1
    "emr_star": ("emr_star", 3, ["train.epochs=2", "callbacks.replay.batch_limit=10"]),
    # a larger lr, so that the random tiny model's LoRA drifts measurably and the alignment has work to do
    "eaemr": ("eaemr", 2, ["train.lr=0.1"]),
    "eaemr_star": ("eaemr_star", 2, ["train.lr=0.1"]),
    "crl": ("crl", 3, ["data.max_train_per_class=8"]),
    "crl_star": ("crl_star", 3, ["train.epochs=2"]),
    "ewc": ("ewc", 2, []),
    "lwf": ("lwf", 3, []),
    # ablations: config overrides only
    "eaemr_star_unapplied": ("eaemr_star", 2, ["train.lr=0.1", "method.apply_alignment=false"]),
    "emr_herding": ("emr", 2, ["data.max_train_per_class=8", "callbacks.memory.selection=herding"]),
    "emr_star_policy1": ("emr_star", 3, ["callbacks.replay.policy=1"]),
}


def seen_argmax(logits: torch.Tensor, seen: list[int]) -> torch.Tensor:
    mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
    mask[seen] = True
    return logits.masked_fill(~mask.to(logits.device), float("-inf")).argmax(-1)


def state_of(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Recorder(TaskCallback):
    """Keeps the training batches, task-boundary snapshots and recomputed test predictions of a run."""

    def __init__(self) -> None:
        self.served: dict[tuple[int, str], list[tuple[int, list[int]]]] = defaultdict(list)
        """(task, stage) -> (epoch, flat indices) of every training batch, in order."""
        self.at_start: dict[int, dict[str, Any]] = {}
        self.at_end: dict[int, dict[str, Any]] = {}
        self.tests: dict[int, list[dict[str, torch.Tensor]]] = defaultdict(list)
        self.penalty: dict[int, list[tuple[str, float]]] = defaultdict(list)
        self.test_align: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}
        """EA-EMR: (A before, A) as the test of each task used them."""
        self.run_callbacks: list[TaskCallback] = []
        """The run's callbacks (set by the fixture), to find the episodic memory."""

    # ------------------------------------------------------------------------------------------------ training
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.served[(pl_module.task, pl_module.stage)].append((trainer.current_epoch, batch["index"].tolist()))
        if isinstance(pl_module, EWCModule):
            self.penalty[pl_module.task].append(("before", float(pl_module.penalty().detach())))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if isinstance(pl_module, EWCModule):
            self.penalty[pl_module.task].append(("after", float(pl_module.penalty().detach())))

    # ------------------------------------------------------------------------------------------ task boundaries
    def on_task_start(self, loop, task):
        m, snap = loop.method, {}
        if isinstance(m, LwFModule) and task > 0:
            snap["teacher"] = m.encoder.adapter_state("teacher")
            snap["teacher_head"] = state_of(m.teacher_head)
            snap["teacher_requires_grad"] = [
                p.requires_grad for n, p in m.named_parameters() if ".teacher." in n or n.endswith(".teacher")
            ]
        self.at_start[task] = snap

    def on_task_end(self, loop, task):
        """Runs after the method's end_task and after the memory callback picked this task's memory."""
        m, dm, snap = loop.method, loop.datamodule, {}
        snap["shared"] = m.encoder.adapter_state("shared")
        if hasattr(m, "head"):
            snap["head"] = state_of(m.head)
        if isinstance(m, EAEMRModule):
            snap["align"] = state_of(m.align)
        if isinstance(m, CRLModule):
            snap["prototypes"] = m.prototypes.clone()
            snap["proto_classes"] = m.proto_classes.tolist()
            snap["stage_pool"] = m.stage_pool.copy()
            if m.options.prototypes == "memory":
                pool = m.memory_pool
                hidden = encode_records(m, dm, "train", pool, m.represent)
                labels = torch.tensor([dm.item("train", int(i))["label"] for i in pool])
                snap["memory_means"] = {int(c): hidden[labels == c].mean(0) for c in labels.unique()}
        memory = next((cb for cb in self.run_callbacks if isinstance(cb, EpisodicMemoryCallback)), None)
        if memory is not None and not isinstance(m, (CRLModule, EAEMRModule)):  # mid-task pick; A refitted after
            snap["expected_memory"] = {
                part: self.expected_exemplars(loop, memory, part, task, n)
                for part, n in zip(("train", "valid"), memory.sizes, strict=True)
            }
        if isinstance(m, LwFModule) and task > 0:
            snap["teacher"] = m.encoder.adapter_state("teacher")
            snap["teacher_head"] = state_of(m.teacher_head)
            snap["teacher_check"] = self.teacher_check(loop, task)
        self.at_end[task] = snap

    @staticmethod
    def expected_exemplars(loop, memory, part, task, n):
        """Recompute the selection from the features of the model as the task ended."""
        dm, m, o = loop.datamodule, loop.method, memory.options
        idx = dm.indices(part, task)
        if n == 0:
            return np.empty(0, dtype=np.int64)
        feats = encode_records(m, dm, part, idx, lambda b: m.memory_features(b, o.feature)).numpy()
        labels = np.asarray([dm.item(part, int(i))["label"] for i in idx])
        return idx[select_exemplars(feats, labels, n, method=o.selection, seed=loop.cfg.seed)]

    def teacher_check(self, loop, task):
        """Cached distillation targets vs the frozen copy recomputed now, and vs the trained model."""
        m, dm = loop.method, loop.datamodule
        last_epoch = max(e for e, _ in self.served[(task, "train")])
        idx = sorted({i for e, b in self.served[(task, "train")] if e == last_epoch for i in b})
        cached, frozen, live = [], [], []
        with torch.no_grad(), eval_mode(m):
            for batch in dm.loader_for("train", idx):
                hidden = m.represent(batch, adapter_names=["teacher"] * len(batch["keys"]))
                frozen.append(m.teacher_head(hidden)[:, m.old_classes()])
                live.append(m.logits(batch)[:, m.old_classes()])
                cached.append(torch.stack([m.teacher.outputs[k] for k in batch["keys"]]))
        return torch.cat(cached), torch.cat(frozen), torch.cat(live)

    # ---------------------------------------------------------------------------------------------------- test
    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        m, seen = pl_module, pl_module.seen_classes
        out = {"preds": outputs["preds"].clone(), "labels": batch["labels"].clone(), "tasks": batch["task_ids"].clone()}
        if isinstance(m, EAEMRModule):
            z = m.represent(batch)
            out["z"], out["head_input"] = z.clone(), m.head_input(batch).clone()
            out["post"] = seen_argmax(m.head(m.align(z)), seen)
            out["pre"] = seen_argmax(m.head(m.align_before(z)), seen)
            out["raw"] = seen_argmax(m.head(z), seen)
            out["raw_logits"], out["post_logits"] = m.head(z).clone(), m.head(m.align(z)).clone()
            self.test_align[m.task] = (state_of(m.align_before), state_of(m.align))
        if isinstance(m, CRLModule):
            z = m.represent(batch).double()
            protos = m.prototypes.double().to(z.device)
            out["dist"] = ((z[:, None, :] - protos[None, :, :]) ** 2).sum(-1)
            out["proto_classes"] = m.proto_classes.clone()
        self.tests[m.task].append(out)

    def test_cat(self, task: int) -> dict[str, torch.Tensor]:
        keys = [k for k in self.tests[task][0] if k != "proto_classes"]
        return {k: torch.cat([b[k] for b in self.tests[task]]) for k in keys}


def per_task_accuracy(preds: torch.Tensor, labels: torch.Tensor, tasks: torch.Tensor, upto: int) -> list[float]:
    return [100.0 * float((preds[tasks == j] == labels[tasks == j]).float().mean()) for j in range(upto + 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Callable[[str], tuple[TaskLoop, Recorder, dict[str, Any]]]:
    """``runs(name)`` runs RUNS[name] once per module and returns (loop, recorder, metrics.json content)."""
    threads = torch.get_num_threads()
    cache: dict[str, tuple[TaskLoop, Recorder, dict[str, Any]]] = {}

    def get(name: str) -> tuple[TaskLoop, Recorder, dict[str, Any]]:
        if name not in cache:
            experiment, num_tasks, overrides = RUNS[name]
            root = tmp_path_factory.mktemp(name)
            loop = tiny_loop(experiment, root, "train.num_threads=1", *overrides, num_tasks=num_tasks)
            recorder = Recorder()
            recorder.run_callbacks = loop.callbacks
            loop.callbacks.append(recorder)
            returned = loop.run()
            saved = json.loads((loop.run_dir / "metrics.json").read_text())
            assert saved == json.loads(json.dumps(returned))
            cache[name] = (loop, recorder, saved)
        return cache[name]

    yield get
    torch.set_num_threads(threads)


def replay_callback(loop: TaskLoop) -> DynamicReplayCallback:
    return next(cb for cb in loop.callbacks if isinstance(cb, DynamicReplayCallback))


def memory_callback(loop: TaskLoop) -> EpisodicMemoryCallback:
    return next(cb for cb in loop.callbacks if isinstance(cb, EpisodicMemoryCallback))


def independent_plan(loop: TaskLoop, task: int, epochs: int) -> list[list[list[int]]]:
    """The dynamic replay plan of a task, drawn again from the options alone (a fresh policy object)."""
    o, dm = replay_callback(loop).options, loop.datamodule
    policy = DynamicReplayPolicy(
        policy=o.policy,
        batch_limit=o.batch_limit,
        train_fraction=o.train_fraction,
        new_old_ratio=o.new_old_ratio,
        resample_every_epoch=o.resample_every_epoch,
        seed=loop.cfg.seed,
    )
    pools = [dm.indices("train", t) for t in range(task + 1)]
    return [policy.train_plan(task, pools, dm.batch_size, e) for e in range(epochs)]


def epochs_of(served: list[tuple[int, list[int]]]) -> list[list[list[int]]]:
    by_epoch: dict[int, list[list[int]]] = defaultdict(list)
    for epoch, batch in served:
        by_epoch[epoch].append(batch)
    return [by_epoch[e] for e in sorted(by_epoch)]


# ------------------------------------------------------------------------------------------------------ 1. all runs
@pytest.mark.parametrize("name", STATIC)
def test_static_experiment_runs_end_to_end(runs, name):
    loop, rec, saved = runs(name)
    num_tasks = RUNS[name][1]
    dm = loop.datamodule
    assert saved["experiment"] == name and [t["task"] for t in saved["per_task"]] == list(range(num_tasks))
    R = saved["accuracy_matrix"]
    assert len(R) == num_tasks and all(R[i][j] is None for i in range(num_tasks) for j in range(i + 1, num_tasks))
    for k, record in enumerate(saved["per_task"]):
        # optimiser steps: per stage and in total, exactly the training batches the Trainers served
        stages = record["stages"]
        assert record["train_steps"] == sum(s["steps"] for s in stages.values()) > 0
        for stage, info in stages.items():
            assert info["steps"] == len(rec.served[(k, stage)]), (k, stage)
        assert set(stages) == {s for t, s in rec.served if t == k}
        # R is the per-task accuracy of the predictions the test produced
        t = rec.test_cat(k)
        assert per_task_accuracy(t["preds"], t["labels"], t["tasks"], k) == pytest.approx(R[k][: k + 1], abs=1e-3)
        # the replay composition is recorded and adds up
        if "replay" in loop.cfg.callbacks:
            comp = record["replay"]
            assert comp["new_per_epoch"] + comp["old_per_epoch"] == comp["samples_per_epoch"] > 0
            assert sum(comp["old_per_task"].values()) == comp["old_per_epoch"]
            assert (comp["old_per_epoch"] > 0) == (k > 0)
        elif "memory" in loop.cfg.callbacks:
            assert record["memory"]["train"] > 0
            for comp in record["replay"].values():
                assert comp["new_per_epoch"] + comp["old_per_epoch"] == comp["samples_per_epoch"] > 0
                assert sum(comp["old_per_task"].values()) == comp["old_per_epoch"]
        else:  # EWC, LwF: replay-free, every training sample is the current task's
            assert record["train_data"] == "current task" and "replay" not in record
            current = set(dm.indices("train", k).tolist())
            assert all(set(b) <= current for _, b in rec.served[(k, "train")])


def test_emr_star_fixed_budget_and_cached_replay(runs):
    loop, rec, saved = runs("emr_star")
    o, dm, epochs = replay_callback(loop).options, loop.datamodule, loop.cfg.train.epochs
    assert (epochs, o.policy, o.batch_limit, o.resample_every_epoch) == (2, 2, 10, False)
    per_epoch = decimal_floor(o.train_fraction, o.batch_limit)
    steps = [t["train_steps"] for t in saved["per_task"]]
    assert steps[0] == epochs * math.ceil(len(dm.indices("train", 0)) / dm.batch_size)  # task 1: full epochs
    assert steps[1:] == [epochs * per_epoch] * 2 and steps[1] != steps[0]
    n_new, n_old = dm.batch_size // 2, dm.batch_size - dm.batch_size // 2  # ratio 1
    for k in (1, 2):
        served = epochs_of(rec.served[(k, "train")])
        assert served == independent_plan(loop, k, epochs)  # the plan, drawn again from the options alone
        assert served[0] != served[1]  # cache mode still draws every epoch anew ...
        current = set(dm.indices("train", k).tolist())
        for batch in served[0] + served[1]:
            assert len(batch) == dm.batch_size and sum(i in current for i in batch) == n_new
        comp, flat = saved["per_task"][k]["replay"], [i for b in served[0] for i in b]
        assert comp["train_batches_per_epoch"] == per_epoch and comp["policy"] == 2
        assert comp["new_per_epoch"] == per_epoch * n_new and comp["old_per_epoch"] == per_epoch * n_old
        for t in range(k):
            assert comp["old_per_task"][str(t)] == sum(i in set(dm.indices("train", t).tolist()) for i in flat)
        valid_batches = o.batch_limit - decimal_ceil(o.train_fraction, o.batch_limit)  # floor(0.2 x limit)
        assert comp["valid_samples"] == valid_batches * (o.valid_batch_size or dm.eval_batch_size)
    assert o.valid_batch_size == 32  # the preset: ConPET validates on batches of 32
    # ... and re-iterating the installed plan replays the same epochs (the datamodule still serves task 3's plan)
    assert [dm.train_plan(e) for e in range(epochs)] == epochs_of(rec.served[(2, "train")])


def check_memory_matches_selection(loop, rec, saved):
    """Memory per class = min(M share, class size); the exemplars are the selection rule's picks."""
    memory, dm = memory_callback(loop), loop.datamodule
    n_train, n_valid = memory.sizes
    o = memory.options
    assert (n_train, n_valid) == (decimal_ceil(o.train_fraction, o.per_class), o.per_class - n_train)
    for k in range(len(saved["per_task"])):
        for part, n in (("train", n_train), ("valid", n_valid)):
            picked = memory.memory[part][k]
            assert np.array_equal(np.sort(picked), rec.at_end[k]["expected_memory"][part]), (k, part)
            idx = dm.indices(part, k)
            assert len(set(picked.tolist())) == len(picked) and set(picked.tolist()) <= set(idx.tolist())
            have = Counter(dm.item(part, int(i))["label"] for i in idx)
            kept = Counter(dm.item(part, int(i))["label"] for i in picked)
            assert kept == {c: min(n, size) for c, size in have.items() if min(n, size)}, (k, part)
            assert n_train < min(have.values()) or part == "valid"  # a real selection, not the whole class
        record = saved["per_task"][k]["memory"]
        assert record["selection"] == o.selection
        assert record["train"] == sum(len(memory.memory["train"][t]) for t in range(k + 1))
        assert record["valid"] == sum(len(memory.memory["valid"][t]) for t in range(k + 1))


def test_emr_memory_and_replay_frequency(runs):
    loop, rec, saved = runs("emr")
    memory, dm, epochs = memory_callback(loop), loop.datamodule, loop.cfg.train.epochs
    o = memory.options
    assert o.selection == "kmeans" and o.feature == "logits"
    check_memory_matches_selection(loop, rec, saved)
    for k in range(1, 3):
        comp = saved["per_task"][k]["replay"]["train"]
        stored = [memory.memory["train"][t] for t in range(k)]
        mem_size = sum(len(s) for s in stored)
        n_new = len(dm.indices("train", k))
        old_classes = sum(len(loop.benchmark.tasks[t]) for t in range(k))
        room = math.ceil(o.budget_fraction * o.batch_limit) * dm.batch_size - n_new  # 0.8 x 50 = 40 exactly
        r = o.base_frequency if room <= 0 else math.ceil(room / (memory.sizes[0] * old_classes))
        assert r > 1 and comp["replay_frequency"] == r
        assert comp["old_per_epoch"] == r * mem_size and comp["new_per_epoch"] == n_new
        assert comp["old_per_task"] == {str(t): r * len(stored[t]) for t in range(k)}
        expected = Counter(np.concatenate([np.tile(s, r) for s in stored] + [dm.indices("train", k)]).tolist())
        for epoch in epochs_of(rec.served[(k, "train")]):
            assert Counter(i for b in epoch for i in b) == expected  # the memory r times + the current task, once
        steps = epochs * math.ceil((r * mem_size + n_new) / dm.batch_size)
        assert saved["per_task"][k]["train_steps"] == steps
    # task 2 has more old classes than task 1, so each is repeated fewer times (the budget stays filled)
    r1, r2 = (saved["per_task"][k]["replay"]["train"]["replay_frequency"] for k in (1, 2))
    assert r2 < r1


# --------------------------------------------------------------------------------------------------- 2. EA-EMR
@pytest.mark.parametrize("name", ["eaemr", "eaemr_star"])
def test_eaemr_alignment_is_fitted_applied_and_recorded(runs, name):
    loop, rec, saved = runs(name)
    m = loop.method
    h = m.hidden_size
    eye = {"weight": torch.eye(h), "bias": torch.zeros(h)}
    assert same(rec.at_end[0]["align"], eye)  # task 1 is plain EMR
    moved = rec.at_end[1]["align"]
    assert not same(moved, eye) and (moved["weight"] - eye["weight"]).abs().max() > 1e-4
    for k, record in enumerate(saved["per_task"]):
        align = record["alignment"]
        t = rec.test_cat(k)
        assert torch.equal(t["preds"], t["post"])  # the accuracy matrix is the post-alignment result
        pre = per_task_accuracy(t["pre"], t["labels"], t["tasks"], k)
        assert align["pre_alignment"]["per_task"] == pytest.approx(pre, abs=1e-3)
        assert align["pre_alignment"]["acc_macro"] == pytest.approx(sum(pre) / len(pre), abs=1e-3)
        before, after = rec.test_align[k]
        assert same(after, rec.at_end[k]["align"])  # post: A_k, fitted after this task
        assert same(before, rec.at_end[k - 1]["align"] if k else eye)  # pre: A_{k-1}, as the task started
        if k == 0:
            assert torch.equal(t["pre"], t["post"])
            continue
        fit = align["fit"]
        assert fit["samples"] > 0 and 0 < fit["mse_after"] < fit["mse_before"]
    # after task 2 the head reads A(z), which is not z
    last = rec.test_cat(1)
    assert not torch.allclose(last["head_input"], last["z"], atol=1e-5)
    assert not torch.allclose(last["post_logits"], last["raw_logits"], atol=1e-5)
    if name == "eaemr":  # the alignment is fitted on the whole training memory
        assert saved["per_task"][1]["alignment"]["fit"]["samples"] == saved["per_task"][1]["memory"]["train"]
    else:  # ... or on every sample of the task's replay stream
        stream = {i for _, b in rec.served[(1, "train")] for i in b}
        assert saved["per_task"][1]["alignment"]["fit"]["samples"] == len(stream)


def test_eaemr_with_alignment_off_the_head_reads_the_raw_hidden_state(runs):
    loop, rec, saved = runs("eaemr_star_unapplied")
    assert loop.method.options.apply_alignment is False
    for k, record in enumerate(saved["per_task"]):
        t = rec.test_cat(k)
        assert torch.equal(t["head_input"], t["z"])
        assert torch.equal(t["preds"], t["raw"])
        assert record["alignment"]["pre_alignment"]["per_task"] == pytest.approx(saved["accuracy_matrix"][k][: k + 1])


# ------------------------------------------------------------------------------------------------------ 3. CRL
@pytest.mark.parametrize("name", ["crl", "crl_star"])
def test_crl_predicts_the_nearest_prototype_of_every_seen_class(runs, name):
    loop, rec, saved = runs(name)
    m = loop.method
    for k in range(len(saved["per_task"])):
        snap = rec.at_end[k]
        seen = [c for t in range(k + 1) for c in loop.benchmark.tasks[t]]
        assert sorted(snap["proto_classes"]) == sorted(seen)
        assert snap["prototypes"].shape == (len(seen), m.hidden_size) and torch.isfinite(snap["prototypes"]).all()
        t = rec.test_cat(k)
        classes = rec.tests[k][0]["proto_classes"]
        dist, preds = t["dist"], t["preds"]
        # the predicted class is the one of the nearest prototype (float32 cdist there, float64 here; the nearest
        # and second-nearest distances differ by > 5e-4 relative on this data, so the argmin is unambiguous)
        assert torch.equal(classes[dist.argmin(-1)], preds)
        assert set(preds.tolist()) <= set(seen)
    if name == "crl":  # prototypes are class means of the memory's hidden states
        for k in range(len(saved["per_task"])):
            snap = rec.at_end[k]
            means = snap["memory_means"]
            assert sorted(means) == sorted(snap["proto_classes"])
            for row, c in enumerate(snap["proto_classes"]):
                assert torch.allclose(snap["prototypes"][row], means[c], atol=1e-5)


def test_crl_memory_stages(runs):
    loop, rec, saved = runs("crl")
    memory, dm = memory_callback(loop), loop.datamodule
    o = memory.options
    assert (o.feature, o.train_fraction, o.frequency, o.replay_times) == ("hidden", 1.0, "fixed", 1)
    for k in range(3):
        labels = Counter(dm.item("train", int(i))["label"] for i in memory.memory["train"][k])
        assert labels == dict.fromkeys(loop.benchmark.tasks[k], o.per_class)  # 5 of 8 per class, all train
        current = dm.indices("train", k).tolist()
        for epoch in epochs_of(rec.served[(k, "contrast")]):
            assert sorted(i for b in epoch for i in b) == current
        if k:  # stage 2 replays the memory of every seen task once (the current task's picked after stage 1)
            stored = np.concatenate([memory.memory["train"][t] for t in range(k + 1)]).tolist()
            for epoch in epochs_of(rec.served[(k, "replay")]):
                assert sorted(i for b in epoch for i in b) == sorted(stored)


def test_crl_star_stage1_current_task_stage2_dynamic_plan(runs):
    loop, rec, saved = runs("crl_star")
    dm, epochs, o = loop.datamodule, loop.cfg.train.epochs, replay_callback(loop).options
    assert o.train_fraction == 1.0 and not o.resample_every_epoch
    assert saved["per_task"][0]["stage_data"] == {"contrast": "current"}
    for k in range(3):
        current = dm.indices("train", k).tolist()
        for epoch in epochs_of(rec.served[(k, "contrast")]):
            assert sorted(i for b in epoch for i in b) == current  # stage 1: one pass over the current task
        if k == 0:
            assert rec.at_end[0]["stage_pool"].tolist() == current
            continue
        assert saved["per_task"][k]["stage_data"] == {"contrast": "current", "replay": "memory"}
        served = epochs_of(rec.served[(k, "replay")])
        assert served == independent_plan(loop, k, epochs)  # stage 2: the dynamic plan
        assert saved["per_task"][k]["stages"]["replay"]["steps"] == epochs * o.batch_limit  # no 80/20 split
        flat = {i for epoch in served for b in epoch for i in b}
        assert flat - set(current)  # old tasks are replayed
        assert rec.at_end[k]["stage_pool"].tolist() == sorted(flat)  # prototypes' pool: what stage 2 served


# ----------------------------------------------------------------------------------------------- 4. EWC / LwF
def test_ewc_penalty_is_zero_at_the_anchor_and_grows_away_from_it(runs):
    loop, rec, _ = runs("ewc")
    m = loop.method
    assert all(v == 0.0 for _, v in rec.penalty[0])  # no Fisher yet
    task2 = rec.penalty[1]
    assert task2[0] == ("before", 0.0)  # task 2 starts at the anchor ...
    assert task2[-1][0] == "after" and task2[-1][1] > 0  # ... and training moves away from it
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert set(m.fisher) == trainable and any("lora_B" in n for n in trainable) and any("head" in n for n in trainable)
    assert all(bool((f >= 0).all()) for f in m.fisher.values())
    assert float(m.penalty().detach()) == 0.0  # the run ended at the newest anchor
    name = next(n for n in m.fisher if "lora_B" in n and float(m.fisher[n].sum()) > 0)
    param = dict(m.named_parameters())[name]
    delta = 0.01
    with torch.no_grad():
        param.add_(delta)
    try:
        expected = 0.5 * m.options.ewc_lambda * delta**2 * float(m.fisher[name].sum())
        assert float(m.penalty().detach()) == pytest.approx(expected, rel=1e-3) and expected > 0
    finally:
        with torch.no_grad():
            param.sub_(delta)


def test_lwf_distils_from_a_frozen_copy_of_the_previous_model(runs):
    loop, rec, saved = runs("lwf")
    for t in (1, 2):  # the teacher's forwards are in the budget: each training row computed or served from the cache
        (budget,) = [stage["budget"] for stage in saved["per_task"][t]["stages"].values()]
        assert budget["frozen_cache_misses"] > 0
        assert budget["frozen_cache_hits"] + budget["frozen_cache_misses"] == budget["samples_trainable"]
    for k in (1, 2):
        start, end, before = rec.at_start[k], rec.at_end[k], rec.at_end[k - 1]
        assert same(start["teacher"], before["shared"]) and same(start["teacher_head"], before["head"])
        assert start["teacher_requires_grad"] and not any(start["teacher_requires_grad"])
        assert same(end["teacher"], start["teacher"]) and same(end["teacher_head"], start["teacher_head"])
        assert not same(end["shared"], before["shared"])  # the student did train
        cached, frozen, live = end["teacher_check"]
        assert torch.allclose(cached, frozen, atol=1e-5)  # the targets are the frozen copy's outputs
        assert not torch.allclose(cached, live, atol=1e-4)  # ... not the trained model's


# ----------------------------------------------------------------------------------------------- 5. ablations
def test_ablation_herding_selection_is_a_config_override(runs):
    loop, rec, saved = runs("emr_herding")
    assert memory_callback(loop).options.selection == "herding"
    check_memory_matches_selection(loop, rec, saved)
    assert "herding" in saved["per_task"][1]["train_data"]


def test_ablation_policy1_budget_grows_with_the_task(runs):
    loop, _, saved = runs("emr_star_policy1")
    o = replay_callback(loop).options
    assert o.policy == 1
    steps = [t["train_steps"] for t in saved["per_task"]]
    assert steps[2] > steps[1] > 0
    assert steps[1:] == [decimal_floor(o.train_fraction, o.batch_limit * (k + 1)) for k in (1, 2)]
    assert [t["replay"]["policy"] for t in saved["per_task"]] == [1, 1, 1]


# ------------------------------------------------------------------------------------------------------ 6. DDP
# Only strategy "ddp" works with the task loop on CPU (gloo), and only from a script run in its own process:
# - "ddp" (Lightning's subprocess-script launcher) re-runs the command line with LOCAL_RANK=1, so every rank runs the
#   whole loop; the first Trainer starts the process group and the later, fresh Trainers of the loop reuse it
#   (teardown does not destroy it, and LOCAL_RANK=0 is left in the parent's environment, so nothing is relaunched).
#   From inside pytest the relaunched command would be pytest itself, hence the driver script below.
# - "ddp_spawn" fails at the first fit: the datamodule's installed plan is a lambda (DynamicReplayCallback), which
#   spawn cannot pickle ("Can't pickle local object 'DynamicReplayCallback.on_task_start.<locals>.<lambda>'").
# - "ddp_fork" trains and tests in forked children, so the parent's loop never sees the test result
#   ("'ContinualMetricsCallback' object has no attribute 'last'"), nor any state the hooks set.
DDP_DRIVER = """
import json, os, sys
from pathlib import Path

repo, out, devices = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, str(repo))
import torch
from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.loop import TaskLoop
from tests.helpers import tiny_config

rank = int(os.environ.get("LOCAL_RANK", "0"))
writes = []
original_write = Path.write_text
def write_text(self, *args, **kwargs):
    writes.append(self.name)
    return original_write(self, *args, **kwargs)
Path.write_text = write_text
original_replace = os.replace
def replace(src, dst):  # run files are written atomically: a temp file renamed over the target
    writes.append(Path(dst).name)
    return original_replace(src, dst)
os.replace = replace

class Dump(TaskCallback):
    def __init__(self):
        self.served = []
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.served.append([pl_module.task, trainer.current_epoch, trainer.global_rank, trainer.world_size,
                            batch["index"].tolist()])
    def on_run_end(self, loop, metrics):
        params = [p.detach().flatten() for p in loop.method.parameters() if p.requires_grad]
        dump = {"served": self.served, "R": metrics["accuracy_matrix"], "writes": writes,
                "params": torch.cat(params).tolist()}
        original_write(out / f"rank{rank}.json", json.dumps(dump))

strategy = "ddp" if devices > 1 else "auto"
cfg = tiny_config("emr_star", out, "train.num_threads=1", "train.epochs=2", f"train.devices={devices}",
                  f"train.strategy={strategy}", num_tasks=2)
loop = TaskLoop(cfg, out / "run")
loop.callbacks.append(Dump())
loop.run()
if torch.distributed.is_initialized():
    torch.distributed.barrier()  # rank 0 (the launcher's process) exits only after every rank wrote its dump
"""


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """emr_star on 2 CPU processes (gloo) and on 1, each as its own script: {world size: [per-rank dumps]}."""
    root = tmp_path_factory.mktemp("ddp")
    out = {}
    for world in (2, 1):
        folder = root / f"ws{world}"
        run_world(DDP_DRIVER, folder, world, timeout=600)
        out[world] = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(world)]
        out[f"metrics{world}"] = (folder / "run" / "metrics.json").read_text()  # parsed by the tests
    return out


@pytest.mark.slow
def test_ddp_two_cpu_ranks_shard_one_global_plan(ddp_runs):
    (rank0, rank1), (single,) = ddp_runs[2], ddp_runs[1]
    assert len(rank0["served"]) == len(rank1["served"]) == len(single["served"]) > 0
    for a, b, one in zip(rank0["served"], rank1["served"], single["served"], strict=True):
        assert a[:2] == b[:2] == one[:2]  # the same (task, epoch) step by step
        assert (a[2], a[3], b[2], b[3], one[3]) == (0, 2, 1, 2, 1)
        assert len(a[4]) == len(b[4]) == len(one[4]) // 2
        assert a[4] + b[4] == one[4]  # contiguous shards of the 1-process plan's global batch
    assert {s[0] for s in single["served"]} == {0, 1} and {s[1] for s in single["served"]} == {0, 1}
    # one result: R and the trained parameters are identical on both ranks. (Not equal to the 1-process run's: the
    # backbone's dropout is on in training and draws different masks for 4 + 4 samples than for 8.)
    assert rank0["R"] == rank1["R"]
    assert rank0["params"] == rank1["params"]
    assert json.loads(ddp_runs["metrics1"])["accuracy_matrix"] == single["R"]


@pytest.mark.slow
def test_ddp_metrics_are_written_by_rank0_only(ddp_runs):
    rank0, rank1 = ddp_runs[2]
    assert "metrics.json" in rank0["writes"]
    assert "metrics.json" not in rank1["writes"]
    assert json.loads(ddp_runs["metrics2"])["accuracy_matrix"] == rank0["R"]
