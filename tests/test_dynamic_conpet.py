"""Dynamic ConPET on a tiny model: frozen experts, selector growth, teacher forcing, exact skipping, fixed budget."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conpet_lightning.callbacks.base import TaskCallback
from conpet_lightning.callbacks.routing import apply_teacher_forcing
from conpet_lightning.config import ConfigError, load_config
from conpet_lightning.methods.distill import soft_target_loss
from conpet_lightning.methods.dynamic import expert_name
from conpet_lightning.passes import take_rows
from tests.helpers import tiny_loop


class Recorder(TaskCallback):
    """Snapshots adapters and heads at task boundaries, and the routes of training batches."""

    def __init__(self) -> None:
        self.experts: dict[int, dict[int, dict[str, torch.Tensor]]] = {}
        self.selector_rows: dict[int, torch.Tensor] = {}
        self.selector_end: dict[int, torch.Tensor] = {}
        self.routes: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        self.expert_start: dict[int, dict[str, torch.Tensor]] = {}

    def on_task_start(self, loop, task):
        if loop.method.selector_head is not None:
            self.selector_rows[task] = loop.method.selector_head.weight.detach().clone()

    def on_stage_start(self, ctx, task, stage):
        if stage.name == "expert":
            self.expert_start[task] = {
                **ctx.method.encoder.adapter_state(expert_name(task)),
                "head": ctx.method.expert_heads[task].weight.detach().clone(),
            }

    def on_task_end(self, loop, task):
        m = loop.method
        self.experts[task] = {
            t: {**m.encoder.adapter_state(expert_name(t)), "head": m.expert_heads[t].weight.detach().clone()}
            for t in range(task + 1)
        }
        if m.selector_head is not None:
            self.selector_end[task] = m.selector_head.weight.detach().clone()

    def on_run_start(self, ctx):
        """Wrap the attached router: every training route is recorded with the gold tasks."""
        router, method = ctx.method.router, ctx.method
        recorder = self

        class Recording:
            def route(self, m, batch, *, train):
                out = router.route(m, batch, train=train)
                if train and method.stage == "expert":
                    recorder.routes.append((method.task, out.clone(), batch["task_ids"].clone()))
                return out

        method.attach_router(Recording())


@pytest.fixture(scope="module")
def dynamic_run(tmp_path_factory):
    loop = tiny_loop("dynamic_conpet", tmp_path_factory.mktemp("dyn"), "callbacks.routing=selector", num_tasks=4)
    recorder = Recorder()
    loop.callbacks.append(recorder)
    out = loop.run()
    return loop, recorder, out


def test_earlier_experts_are_bit_identical_after_later_tasks(dynamic_run):
    _, rec, _ = dynamic_run
    for k in range(1, 4):
        for t in range(k):
            before, after = rec.experts[t][t], rec.experts[k][t]
            assert before.keys() == after.keys()
            assert all(torch.equal(before[name], after[name]) for name in before), (t, k)
    # and training did change each expert in its own stage (the check above is not vacuous)
    for k in range(4):
        start, end = rec.expert_start[k], rec.experts[k][k]
        assert not torch.equal(start["head"], end["head"]), k
        assert any(not torch.equal(start[n], end[n]) for n in start if n != "head"), k  # its LoRA too


def test_selector_head_grows_by_one_row_with_old_rows_copied(dynamic_run):
    _, rec, _ = dynamic_run
    for k in (2, 3):
        grown, previous = rec.selector_rows[k], rec.selector_end[k - 1]
        assert grown.shape[0] == k + 1 and previous.shape[0] == k
        assert torch.equal(grown[:k], previous)


def test_teacher_forcing_sends_training_samples_to_their_own_expert(dynamic_run):
    _, rec, _ = dynamic_run
    assert rec.routes, "no routed training batch was seen"
    for _, route, gold in rec.routes:
        assert route.shape[1] == 1
        assert torch.equal(route[:, 0], gold)


def test_teacher_forcing_replaces_the_lowest_pick_only_when_gold_is_missing():
    route = torch.tensor([[2, 0], [1, 2], [0, 1]])
    gold = torch.tensor([1, 2, 0])
    assert apply_teacher_forcing(route, gold).tolist() == [[2, 1], [1, 2], [0, 1]]


def test_budgeted_tasks_run_the_same_number_of_steps(dynamic_run):
    _, _, out = dynamic_run
    sel = [t["stages"]["selector"]["steps"] for t in out["per_task"][1:]]
    exp = [t["stages"]["expert"]["steps"] for t in out["per_task"][1:]]
    assert len(set(sel)) == 1 and len(set(exp)) == 1 and sel[0] > 0
    assert "selector" not in out["per_task"][0]["stages"]  # task 1 trains expert 1 alone


def test_selector_panel_is_in_metrics(dynamic_run):
    loop, _, out = dynamic_run
    panel = out["per_task"][3]["selector"]
    assert 0 <= panel["acc_macro"] <= 100 and 0 <= panel["topk_hit_rate"] <= 100
    confusion = torch.tensor(panel["confusion"])
    assert confusion.shape == (4, 4)
    assert confusion.sum(dim=1).tolist() == [t["n_test"] for t in out["tasks"]]
    assert panel["oracle_gap_macro"] == pytest.approx(
        panel["oracle_acc_macro"] - out["per_task"][3]["test"]["macro"], abs=1e-3
    )
    # recency bias: the share of old-task (tasks 1-3) test samples the selector sent to the newest expert (task 4)
    assert panel["recency_bias"] == pytest.approx(100 * confusion[:3, 3].sum().item() / confusion[:3].sum().item())
    assert panel["passes_per_sample"] == 2.0 and panel["test_samples_per_s"] > 0


class SkipCheck(TaskCallback):
    """On the first expert-stage batch of task 2, computes loss and gradients with and without skipping."""

    def __init__(self) -> None:
        self.result: dict[bool, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}
        self.batch_tasks: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage != "expert" or pl_module.task != 1 or self.result:
            return
        self.batch_tasks = batch["task_ids"].clone()
        pl_module.eval()  # no dropout, so both paths see the same function
        calls = []
        # count the rows of trainable (grad-enabled) encoder passes only: frozen experts run under no_grad
        handle = pl_module.encoder.register_forward_hook(
            lambda mod, args, out: calls.append(out.shape[0]) if torch.is_grad_enabled() else None
        )
        for skip in (True, False):
            pl_module.options.skip_frozen = skip
            pl_module.zero_grad()
            calls.clear()
            loss = pl_module.expert_loss(batch)
            loss.backward()
            grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.requires_grad}
            self.result[skip] = (loss.detach(), grads, sum(calls))
        handle.remove()
        pl_module.options.skip_frozen = True
        pl_module.zero_grad()
        pl_module.train()


def test_skipping_replayed_samples_is_exact(tmp_path):
    loop = tiny_loop("dynamic_conpet", tmp_path, num_tasks=2)
    check = SkipCheck()
    loop.callbacks.append(check)
    loop.run()
    assert check.batch_tasks is not None and (check.batch_tasks == 0).any() and (check.batch_tasks == 1).any()
    (loss_skip, grads_skip, rows_skip), (loss_full, grads_full, rows_full) = check.result[True], check.result[False]
    assert torch.allclose(loss_skip, loss_full, atol=1e-6)
    assert grads_skip.keys() == grads_full.keys() and len(grads_skip) > 0
    for name in grads_skip:
        assert torch.allclose(grads_skip[name], grads_full[name], atol=1e-6), name
    # the replayed samples never entered the trainable forward pass
    assert rows_skip == int((check.batch_tasks == 1).sum()) and rows_full == len(check.batch_tasks)


def test_no_selector_routes_every_sample_to_every_expert(tmp_path):
    loop = tiny_loop("dynamic_no_selector", tmp_path, num_tasks=2)
    out = loop.run()
    assert "selector" not in out["per_task"][1]["stages"]
    assert "selector" not in out["per_task"][1]  # no routing panel without a selector
    assert len(out["accuracy_matrix"]) == 2


def test_selector_without_routing_callback_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match="method.selector=true needs a router callback"):
        load_config("dynamic_conpet", ["callbacks.routing=null"])


class OldOnlyCheck(TaskCallback):
    """On the first expert-stage batch of task 2, the loss of its replayed (task 1) samples alone."""

    def __init__(self) -> None:
        self.loss: torch.Tensor | None = None
        self.grads: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if pl_module.stage != "expert" or pl_module.task != 1 or self.loss is not None:
            return
        old = take_rows(batch, (batch["task_ids"] == 0).nonzero(as_tuple=True)[0])
        pl_module.zero_grad()
        loss = pl_module.expert_loss(old)
        loss.backward()
        self.loss = loss.detach()
        self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        pl_module.zero_grad()


def test_a_batch_of_replayed_samples_only_gives_zero_gradients_and_still_steps(tmp_path):
    # Limitless passes over the whole history, so some batches hold no current-task sample at all.
    loop = tiny_loop("dynamic_conpet", tmp_path, num_tasks=2)
    check = OldOnlyCheck()
    loop.callbacks.append(check)
    loop.run()
    assert check.loss is not None and torch.isfinite(check.loss) and check.loss > 0
    assert check.grads and all(torch.count_nonzero(g) == 0 for g in check.grads.values())


def test_class_level_selector_scores_tasks_by_the_log_sum_exp_of_their_classes(tmp_path):
    loop = tiny_loop("dynamic_conpet", tmp_path, "method.selector_target=class", num_tasks=3)
    out = loop.run()
    m = loop.method
    assert m.selector_head.out_features == len(m.seen_classes)  # one row per seen class, not per task
    batch = next(iter(loop.datamodule.test_dataloader()))
    logits = m.selector_logits(batch)
    scores = m.task_scores(batch)
    assert scores.shape == (len(batch["keys"]), 3)
    first = len(m.task_classes[0])
    assert torch.allclose(scores[:, 0], torch.logsumexp(logits[:, :first], dim=-1))
    assert out["per_task"][2]["selector"]["confusion"]


def test_a_routed_batch_costs_one_encoder_pass_whatever_experts_it_reaches(dynamic_run):
    loop, _, _ = dynamic_run
    method, dm = loop.method, loop.datamodule
    method.eval()
    batch = method.transfer_batch_to_device(next(iter(dm.test_dataloader())), method.device, 0)
    n = len(batch["keys"])
    route = (torch.arange(n) % (method.task + 1))[:, None].to(method.device)  # rows spread over every expert
    assert len(torch.unique(route)) == 4
    calls: list[int] = []
    forward = method.encoder.forward

    def counting(*args, **kwargs):
        calls.append(int(args[0].shape[0]))
        return forward(*args, **kwargs)

    method.expert_cache.clear()
    method.encoder.forward = counting
    try:
        routed = method.assemble_logits(batch, route, trainable=None)
    finally:
        del method.encoder.forward
    assert calls == [n], calls  # one mixed-adapter pass over the batch, not one per expert
    # the same values as each expert alone on its rows
    for expert in range(4):
        rows = (route[:, 0] == expert).nonzero(as_tuple=True)[0]
        method.expert_cache.clear()
        cols = method.class_index[method.task_classes[expert]].to(method.device)
        alone = method.frozen_expert_logits(batch, rows, expert)
        assert torch.allclose(routed[rows][:, cols], alone, atol=1e-5), expert


class PlanRecorder(TaskCallback):
    """The first-epoch training plan each stage is served (listed after the replay callback, so after it installs)."""

    def __init__(self) -> None:
        self.plans: dict[tuple[int, str], list[list[int]]] = {}
        self.info: dict[tuple[int, str], str] = {}

    def on_task_start(self, ctx, task):
        self.plans[(task, "task")] = ctx.datamodule.train_plan(0)

    def on_stage_start(self, ctx, task, stage):
        self.plans[(task, stage.name)] = ctx.datamodule.train_plan(0)
        self.info[(task, stage.name)] = ctx.datamodule.train_plan_info


def test_a_task_balanced_selector_stage_leaves_the_expert_stage_its_mixed_plan(tmp_path):
    loop = tiny_loop("dynamic_conpet", tmp_path, "callbacks.replay.balanced_stages=[selector]", num_tasks=3)
    rec = PlanRecorder()
    loop.callbacks.append(rec)
    loop.run()
    dm = loop.datamodule
    task_of = {int(i): t for t in range(3) for i in dm.indices("train", t)}
    for task in (1, 2):
        selector = Counter(task_of[i] for b in rec.plans[(task, "selector")] for i in b)
        expert = Counter(task_of[i] for b in rec.plans[(task, "expert")] for i in b)
        assert sorted(selector) == list(range(task + 1))
        assert max(selector.values()) - min(selector.values()) <= 1, selector
        assert expert[task] == sum(expert.values()) // 2, expert  # ratio 1: the new task is half of every batch
        assert rec.plans[(task, "expert")] == rec.plans[(task, "task")]  # exactly the plan it has without the option
        assert "task-balanced" in rec.info[(task, "selector")] and "task-balanced" not in rec.info[(task, "expert")]


def test_balanced_stages_must_name_stages_of_the_method_and_need_a_budget(tmp_path):
    loop = tiny_loop("dynamic_conpet", tmp_path, "callbacks.replay.balanced_stages=[selectr]", num_tasks=2)
    with pytest.raises(ConfigError, match=r"balanced_stages: \['selectr'\] are not stages of this method"):
        loop.run()
    with pytest.raises(ConfigError, match="balanced_stages"):
        load_config("dynamic_conpet", ["callbacks.replay.policy=0", "callbacks.replay.balanced_stages=[selector]"])


class DistillCheck(TaskCallback):
    """Selector states at task ends; at the first selector batch of task 3, the loss with and without distillation."""

    def __init__(self) -> None:
        self.selector_end: dict[int, dict[str, torch.Tensor]] = {}
        self.teacher_start: dict[str, torch.Tensor] | None = None
        self.losses: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.first_keys: list[str] = []

    def on_task_end(self, loop, task):
        m = loop.method
        if m.selector_head is not None:
            self.selector_end[task] = {**m.encoder.adapter_state("selector"), "head": m.selector_head.weight.clone()}

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        if m.task != 2 or m.stage != "selector" or self.losses is not None:
            return
        self.teacher_start = {
            **m.encoder.adapter_state("selector_teacher"),
            "head": m.selector_teacher_head.weight.clone(),
        }
        self.first_keys = list(batch["keys"])
        m.eval()  # no dropout: the two losses differ only by the distillation term
        with torch.no_grad():
            weight = m.options.selector_distill
            with_term = m.training_step(batch, batch_idx)
            m.options.selector_distill = 0.0
            without = m.training_step(batch, batch_idx)
            m.options.selector_distill = weight
            student = m.selector_logits(batch, trainable=True)[:, :2]
            teacher = m.selector_teacher(batch, m.device)
            expected = weight * soft_target_loss(student, teacher, m.options.selector_distill_temperature)
        m.train()
        self.losses = (with_term, without, expected)


def test_selector_distillation_targets_the_frozen_selector_of_the_previous_task(tmp_path):
    loop = tiny_loop("dynamic_conpet", tmp_path, "method.selector_distill=0.5", num_tasks=3)
    check = DistillCheck()
    loop.callbacks.append(check)
    out = loop.run()
    m = loop.method
    # the teacher's forwards are in the selector stage's budget: every row computed (a sample drawn twice into one
    # batch is computed twice) or served by the cache. The test's own two training steps above count two batches more.
    budget = out["per_task"][2]["stages"]["selector"]["budget"]
    batch_rows = len(check.first_keys)
    assert budget["frozen_cache_misses"] >= len(m.selector_teacher.outputs) > 0 and budget["frozen_cache_hits"] > 0
    assert budget["frozen_cache_hits"] + budget["frozen_cache_misses"] == budget["samples_trainable"] + 2 * batch_rows
    assert check.teacher_start is not None and check.losses is not None
    for key, value in check.selector_end[1].items():  # the teacher is the selector as task 2 ended...
        assert torch.equal(check.teacher_start[key], value), key
    assert not torch.equal(check.selector_end[2]["head"][:2], check.selector_end[1]["head"])  # ...the student moved
    assert "selector_teacher" in m.encoder.frozen_adapters and not m.selector_teacher_head.weight.requires_grad
    with_term, without, expected = check.losses
    assert expected > 0 and torch.allclose(with_term - without, expected, atol=1e-5)
    # the cached targets are the frozen teacher's outputs, recomputed now
    batch = m.transfer_batch_to_device(next(iter(loop.datamodule.train_dataloader())), m.device, 0)
    cached = torch.stack([m.selector_teacher.outputs[k] for k in batch["keys"] if k in m.selector_teacher.outputs])
    assert len(cached) > 0
    seen = [k for k in batch["keys"] if k in m.selector_teacher.outputs]
    assert torch.allclose(cached, m._selector_teacher_outputs(_take_keys(batch, seen)).float(), atol=1e-5)


def test_no_selector_teacher_without_distillation(dynamic_run):
    loop, _, _ = dynamic_run
    assert "selector_teacher" not in loop.method.encoder.adapters and loop.method.selector_teacher_head is None


def _take_keys(batch, keys):
    rows = torch.tensor([batch["keys"].index(k) for k in keys], device=batch["input_ids"].device)
    return take_rows(batch, rows)


class HeadStageCheck(TaskCallback):
    """In the selector_head stage: what trains, and the selector LoRA before and after it."""

    def __init__(self) -> None:
        self.trainable: set[str] = set()
        self.lora: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
        self.keys: set[str] = set()

    def on_stage_start(self, ctx, task, stage):
        if stage.name == "selector_head":
            self.lora[(task, "start")] = ctx.method.encoder.adapter_state("selector")

    def on_stage_end(self, ctx, task, stage):
        if stage.name == "selector_head":
            self.lora[(task, "end")] = ctx.method.encoder.adapter_state("selector")

    def on_train_batch_start(self, trainer, m, batch, batch_idx):
        if m.stage == "selector_head":
            self.trainable |= {n for n, p in m.named_parameters() if p.requires_grad}
            if m.task == 2:
                self.keys |= set(batch["keys"])


def test_selector_head_stage_retrains_the_head_alone_on_cached_features(tmp_path):
    loop = tiny_loop(
        "dynamic_conpet",
        tmp_path,
        "method.selector_head_epochs=1",
        "callbacks.replay.balanced_stages=[selector_head]",
        num_tasks=3,
    )
    check = HeadStageCheck()
    loop.callbacks.append(check)
    out = loop.run()
    m = loop.method
    for task in (1, 2):
        assert list(out["per_task"][task]["stages"]) == ["selector", "selector_head", "expert"]
        for key, value in check.lora[(task, "start")].items():
            assert torch.equal(check.lora[(task, "end")][key], value), key
    assert check.trainable == {"selector_head.weight", "selector_head.bias"}
    assert set(m.selector_feature_cache.outputs) == check.keys  # one feature row per sample the stage trained on
    # the budget counts the frozen selector's forwards: one per sample computed, the rest served from the cache
    budget = out["per_task"][2]["stages"]["selector_head"]["budget"]
    assert budget["frozen_cache_misses"] == len(check.keys) > 0
    assert budget["frozen_cache_hits"] + budget["frozen_cache_misses"] == budget["samples_trainable"]
    shares = m.step_shares(1, [s for s in m.stages(1)])
    assert shares is None  # selector_step_share unset: the loop splits by epochs
    m.options.selector_step_share = 0.5
    assert m.step_shares(1, m.stages(1)) == pytest.approx([0.5 * 4 / 5, 0.5 * 1 / 5, 0.5])


def test_selector_options_are_checked(tmp_path):
    for bad in ("selector_distill=-1", "selector_head_epochs=-1", "selector_distill_temperature=0"):
        with pytest.raises(ConfigError, match=bad.split("=")[0]):
            load_config("dynamic_conpet", [f"method.{bad}"])
