"""The learning-rate schedule, and the time budget that sets its length under --max-time.

A run with --max-iters knows its length from the start. A run with --max-time does not: it first
takes a few dozen steps at the warm-up's first learning rate (a provisional schedule far too long
to leave it), measures their speed, and then plans a schedule that ends when the time runs out.
At each eval it plans again from the speed measured since, keeping the schedule's progress.
"""

import math
import time
import warnings

import torch

from llmb.errors import UserError

CALIBRATION_STEPS = 10**6  # --max-time: the provisional schedule's length, so calibration runs at its warm-up start


def make_scheduler(optimizer, schedule, lr, total_steps, pct_start=0.25):
    """onecycle: OneCycleLR (warm up to lr, anneal, beta1 cycles 0.95 -> 0.85 -> 0.95);
    cosine: linear warmup then cosine decay to lr/10; constant: lr throughout."""
    total_steps = max(2, total_steps)
    if schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=lr, total_steps=total_steps, pct_start=pct_start,
            cycle_momentum=True, base_momentum=0.85, max_momentum=0.95, div_factor=25, final_div_factor=1e3,
        )
    if schedule == "cosine":
        warmup = max(1, int(0.05 * total_steps))

        def factor(step):
            if step < warmup:
                return (step + 1) / warmup
            progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    if schedule == "constant":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    raise UserError(f"unknown schedule {schedule!r}; use onecycle, cosine or constant")


def advance(scheduler, steps):
    """Move a new scheduler `steps` steps along its curve (both schedules compute lr from the step)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "scheduler.step() before optimizer.step()": intended here
        for _ in range(steps):
            scheduler.step()


class Schedule:
    """The learning rate of every step: one curve from step `start` to step `total`.

    `start` is where the curve begins; it is not always 0: a --max-time run plans its curve after
    the calibration steps, and a replan moves the start so that the current step keeps its progress.
    Building a scheduler resets the optimizer's lr (and one-cycle's betas): on resume, restore the
    optimizer's state after planning.
    """

    def __init__(self, optimizer, kind, lr, pct_start):
        self.optimizer, self.kind, self.lr, self.pct_start = optimizer, kind, lr, pct_start
        self.start = 0
        self.total = None  # the step it ends at; None while --max-time is still measuring
        self.scheduler = None

    def plan(self, total, step):
        """The curve from self.start to `total`, moved on to `step` (on resume: where the run stopped)."""
        self.total = total
        self._build(total - self.start, step)

    def provisional(self, step):
        """--max-time before the speed is known: a curve too long to leave its warm-up's first lr."""
        self._build(CALIBRATION_STEPS, step)

    def progress(self, step):
        """The share of the curve done at `step`."""
        return (step - self.start) / (self.total - self.start)

    def stretch(self, total, step):
        """End at `total` instead, with the same progress at `step`: the lr goes on from where it is
        (still rising in the warm-up, still falling after it), and one-cycle never restarts."""
        self.start = total - round((total - step) / (1 - self.progress(step)))
        self.plan(total, step)

    def step(self):
        self.scheduler.step()

    def _build(self, length, step):
        self.scheduler = make_scheduler(self.optimizer, self.kind, self.lr, length, self.pct_start)
        advance(self.scheduler, step - self.start)


def plan_steps(step, step_time, eval_cost, time_left, eval_interval):
    """The step to end at so that the steps, an eval every eval_interval steps and one at the end
    fit in time_left (with 3% to spare): how --max-time sets the one-cycle length."""
    return step + max(2, int((time_left - eval_cost) / (step_time + eval_cost / eval_interval) * 0.97))


class TimeBudget:
    """--max-time: when the time is up, and the step the schedule should end at to use it.

    `agree(value)` makes every process of a DDP run take the same decision (the largest value any
    process has); a single process agrees with itself.
    """

    def __init__(self, seconds, eval_interval, max_iters=None, agree=lambda value: value):
        self.seconds, self.eval_interval, self.max_iters, self.agree = seconds, eval_interval, max_iters, agree
        self.start = None  # when this invocation's training began (time.perf_counter)
        self.measure_from = None  # (time, step) the first speed measurement starts from
        self.plan_from = None  # (time, step, eval_time) when the schedule was last planned
        self.eval_time = 0.0  # seconds spent in evals and saves so far
        self.eval_cost = 0.0  # seconds the last eval and save took

    def begin(self, now, step, planned):
        """Start the clock; `planned`: a resumed run whose schedule was planned already (replan from here)."""
        self.start = now
        if planned:
            self.plan_from = (now, step, 0.0)

    def out_of_time(self, now):
        return now - self.start >= self.seconds

    def measured_step_time(self, now, step):
        """Seconds per step, once measured over 2 s or 50 steps; None before.

        The first call only starts the measurement: the steps before it are slow (allocations, warm-up).
        """
        if self.measure_from is None:
            self.measure_from = (now, step)
            return None
        t0, step0 = self.measure_from
        if not self.agree(int(now - t0 > 2.0 or step - step0 >= 50)):
            return None
        return (now - t0) / (step - step0)

    def end_step(self, step, step_time, eval_cost):
        """The step to end at, from the speed and the time left (no later than --max-iters)."""
        time_left = self.seconds - (time.perf_counter() - self.start)
        total = self.agree(plan_steps(step, step_time, eval_cost, time_left, self.eval_interval))
        return min(total, self.max_iters or total)

    def due(self, now):
        """Time to plan again without an eval: 2% of the budget (at least 0.5 s) since the last plan. A run
        that evaluates rarely would otherwise keep a plan made on a busy start, and end far too early."""
        return bool(self.agree(int(now - self.plan_from[0] >= max(0.5, 0.02 * self.seconds))))

    def planned(self, step):
        """Remember when the schedule was planned: the next replan measures the speed from here."""
        self.plan_from = (time.perf_counter(), step, self.eval_time)

    def evaluated(self, seconds):
        """An eval and save took `seconds`: not training time, but part of the budget."""
        self.eval_cost = seconds
        self.eval_time += seconds

    def replan(self, schedule, step):
        """At an eval: (new end step, seconds per step) from the speed since the last plan, or None to
        keep the plan.

        A machine's speed drifts (by a third within one run here), so a single plan can leave a fifth
        of the time unused, or run out of it before the anneal ends. The last fifth of the schedule
        runs as planned (its 3% margin is not too thin), and a change under 2% is not worth making.
        """
        t0, step0, eval0 = self.plan_from
        if step - step0 < 10 or schedule.progress(step) > 0.8:
            return None
        step_time = (time.perf_counter() - t0 - (self.eval_time - eval0)) / (step - step0)
        total = self.end_step(step, step_time, self.eval_cost)
        if abs(total - schedule.total) < 0.02 * (schedule.total - step):
            return None
        return total, step_time
