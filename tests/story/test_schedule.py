import pytest
import torch

import llmb.story.schedule as schedule_module
from llmb.story.schedule import Schedule, TimeBudget, make_scheduler


def test_one_cycle_shape():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sched = make_scheduler(opt, "onecycle", 1e-2, 100, pct_start=0.25)
    lrs, betas = [], []
    for _ in range(100):
        lrs.append(opt.param_groups[0]["lr"])
        betas.append(opt.param_groups[0]["betas"][0])
        opt.step()
        sched.step()
    peak = lrs.index(max(lrs))
    assert 20 <= peak <= 26 and max(lrs) == pytest.approx(1e-2)
    assert lrs[0] == pytest.approx(1e-2 / 25) and lrs[-1] < lrs[0] / 10
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rises ...
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # ... then anneals
    assert betas[0] == pytest.approx(0.95) and betas[peak] == pytest.approx(0.85) and betas[-1] > 0.94


def lr_of(schedule):
    return schedule.optimizer.param_groups[0]["lr"]


def take_step(schedule):
    schedule.optimizer.step()
    schedule.step()


def new_schedule(kind="onecycle"):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    return Schedule(opt, kind, 1e-2, 0.25)


def test_a_plan_moved_on_to_a_step_gives_that_steps_lr():
    walked, jumped = new_schedule(), new_schedule()
    walked.plan(100, 0)
    for _ in range(40):
        take_step(walked)
    jumped.plan(100, 40)  # as on resume: rebuilt, then moved on to the step the run is at
    assert lr_of(jumped) == lr_of(walked)


@pytest.mark.parametrize("kind, step, rising", [("onecycle", 10, True), ("onecycle", 40, False),
                                               ("cosine", 40, False)])
def test_stretching_keeps_the_progress_and_the_lr_goes_on_from_where_it_is(kind, step, rising):
    schedule = new_schedule(kind)
    schedule.plan(100, step)
    before, progress = lr_of(schedule), schedule.progress(step)
    schedule.stretch(180, step)
    assert schedule.total == 180 and schedule.progress(step) == pytest.approx(progress, abs=0.01)
    assert lr_of(schedule) == pytest.approx(before, rel=0.05)
    lrs = []
    for _ in range(180 - step):
        lrs.append(lr_of(schedule))
        take_step(schedule)
    if rising:  # still in the warm-up: up to the peak, once
        assert max(lrs) == pytest.approx(1e-2, rel=1e-3) and lrs[0] < lrs[1]
    else:  # past it: it goes on falling
        assert all(a >= b for a, b in zip(lrs, lrs[1:]))


def test_the_provisional_schedule_stays_at_the_warm_ups_start():
    schedule = new_schedule()
    schedule.provisional(0)
    for _ in range(200):
        take_step(schedule)
    assert schedule.total is None and lr_of(schedule) < 1e-2 / 24


class Clock:
    """time.perf_counter for the schedule module, moved by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_time_budget_measures_after_the_first_steps_then_plans_to_use_the_time(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    votes = []
    budget = TimeBudget(60.0, eval_interval=100, agree=lambda v: votes.append(v) or v)
    budget.begin(clock.now, step=0, planned=False)
    assert budget.measured_step_time(clock.now + 1.0, 3) is None and votes == []  # starts measuring only
    assert budget.measured_step_time(clock.now + 1.5, 20) is None and votes == [0]  # 0.5 s, 17 steps: too few
    assert budget.measured_step_time(clock.now + 2.0, 53) == pytest.approx(0.02) and votes == [0, 1]  # 50 steps
    clock.now += 2.0
    end = budget.end_step(53, step_time=0.02, eval_cost=1.0)  # 58 s left: (58 - 1) / (0.02 + 0.01) * 0.97 steps
    assert end == 53 + int(57 / 0.03 * 0.97) and votes[-1] == end
    capped = TimeBudget(60.0, eval_interval=100, max_iters=500)
    capped.begin(clock.now - 2.0, 0, planned=False)
    assert capped.end_step(53, 0.02, 1.0) == 500  # --max-iters still ends the run


def planned_to(total):
    schedule = new_schedule()
    schedule.plan(total, 0)
    return schedule


def test_the_time_budget_replans_only_when_it_matters(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(schedule_module.time, "perf_counter", clock)
    budget = TimeBudget(100.0, eval_interval=50)
    budget.begin(clock.now, 0, planned=False)
    budget.planned(0)
    clock.now += 5.0
    assert budget.replan(planned_to(1000), 5) is None  # too few steps since the plan to measure
    clock.now += 45.0
    budget.evaluated(10.0)  # 40 s of training for 400 steps: 0.1 s/step; 50 s left, and a 10 s eval per 50 steps
    end = 400 + int((50 - 10) / (0.1 + 10 / 50) * 0.97)
    assert budget.replan(planned_to(1000), 400) == (end, pytest.approx(0.1))
    assert budget.replan(planned_to(end + 2), 400) is None  # under 2% of the rest: the plan stays
    assert budget.replan(planned_to(480), 400) is None  # the last fifth runs as planned
    assert budget.out_of_time(200.0) and not budget.out_of_time(199.9)
