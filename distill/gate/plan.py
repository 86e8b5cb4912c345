"""What the checks share (`Plan`): the models, the config, and the suite, held-out pairs and
prompts loaded before any model runs (`prepare` refuses bad input with a `GateError`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

from distill import paired
from distill.answers import Answer, answer_one, engine_config_for, open_engine
from distill.data import load_chat_examples, load_prompts
from distill.gate.config import EdgeCase, GateConfig, GateError, Messages, Progress, load_edge_cases
from distill.tasks import TaskCase, load_suite, spread


@dataclass
class Plan:
    """What the checks share: models, config, the loaded suite and held-out data."""

    student: str
    teacher: str | None
    config: GateConfig
    say: Progress
    champion: str | None = None
    cases: list[EdgeCase] | None = None
    tasks: list[TaskCase] | None = None
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # paired.compare rows
    # (id, prompt messages, the teacher's answer or None until it answers, answer complete?)
    heldout_rows: list[tuple[str, Messages, str | None, bool]] = field(default_factory=list)
    latency_prompts: list[Messages] = field(default_factory=list)
    ab_settings: Any = None

    def answers(self, model: str, items: Sequence[tuple[Messages, int]],
                what: str | None = None) -> list[Answer]:
        """Greedy answers of `model`, one at a time, through its serving engine; with `what`,
        a progress line every 50 answers."""
        cfg = engine_config_for(model, n_ctx=self.config.n_ctx, n_threads=self.config.n_threads)

        async def run() -> list[Answer]:
            out = []
            async with open_engine(cfg) as engine:
                for m, k, *conditions in items:  # conditions: (response_format, tools)
                    fmt, tools = conditions[0] if conditions else (None, None)
                    out.append(await answer_one(engine, m, max_tokens=k, response_format=fmt,
                                                tools=tools))
                    if what and (len(out) % 50 == 0 or len(out) == len(items)):
                        self.say(f"{what}: {len(out)}/{len(items)} answered")
            return out

        return asyncio.run(run())

    def compare(self, metric: str, champion: Sequence[Any], challenger: Sequence[Any],
                **options: Any) -> None:
        """Record the paired comparison of one metric (champion vs the student)."""
        cfg = self.config.champion
        common = {"margin": cfg.margin(metric), "primary": metric == cfg.primary,
                  "confidence": cfg.confidence, "n_resamples": cfg.resamples}
        if "by_index" in options:
            champion_stat, challenger_stat = options.pop("by_index")
            row = paired.compare_by_index(metric, len(champion), champion_stat, challenger_stat,
                                          **common, **options)
        else:
            row = paired.compare(metric, champion, challenger, **common, **options)
        self.comparisons.append(row)

    @cached_property
    def heldout(self) -> list[tuple[str, Messages, str, bool]]:
        """(id, prompt messages, the teacher's answer, whether it ended rather than being cut);
        the teacher answers a prompt file here, once."""
        rows = self.heldout_rows
        if rows and rows[0][2] is None:
            self.say(f"heldout: the teacher answers {len(rows)} prompts")
            answers = self.answers(self.teacher, [(m, self.config.heldout.max_tokens)
                                                  for _, m, _, _ in rows])
            rows = [(i, m, a.text, a.finish_reason == "stop")
                    for (i, m, _, _), a in zip(rows, answers)]
        return rows


def prepare(student: str, teacher: str | None, champion: str | None, config: GateConfig,
             say: Progress, load_settings: Callable[[Path], Any] | None) -> Plan:
    if champion is None and config.champion.required:
        raise GateError("champion.required: name the version serving now (--champion); a "
                        "candidate is only promoted when measured against it")
    for role, model in (("student", student), ("teacher", teacher), ("champion", champion)):
        if model is not None:
            try:
                engine_config_for(model)
            except ValueError as e:
                raise GateError(f"{role}: {e}") from None
    plan = Plan(student, teacher, config, say, champion=champion)
    if config.edge_cases.enabled and config.edge_cases.suite is not None:
        plan.cases = load_edge_cases(config.edge_cases.suite)
    if config.tasks.enabled:
        t = config.tasks
        try:
            plan.tasks = load_suite(t.suite, splits=t.splits, limit=t.limit)
        except ValueError as e:
            raise GateError(f"tasks: {e}") from None
    h = config.heldout
    try:
        if h.examples is not None:
            rows = spread(load_chat_examples(h.examples), h.limit)
            plan.heldout_rows = [(str(r.get("id") or i), r["messages"][:-1],
                                  r["messages"][-1]["content"],
                                  r.get("teacher_finish_reason") != "length")
                                 for i, r in enumerate(rows, 1)]
        elif h.prompts is not None:
            if teacher is None:
                raise GateError("heldout.prompts: the teacher answers these prompts; pass "
                                "--teacher, or give heldout.examples (answered pairs)")
            plan.heldout_rows = [(str(i), m, None, False) for i, m in
                                 enumerate(spread(load_prompts(h.prompts), h.limit), 1)]
        if config.latency.enabled and config.latency.prompts is not None:
            plan.latency_prompts = load_prompts(config.latency.prompts)
    except (ValueError, OSError) as e:
        raise GateError(str(e)) from None
    if not plan.latency_prompts:
        plan.latency_prompts = ([m for _, m, _, _ in plan.heldout_rows]
                                or [c.messages for c in plan.cases or ()]
                                or [[{"role": "user", "content": "Say hello in one sentence."}]])
    if config.ab.enabled and config.ab.settings is not None:
        if load_settings is None:
            raise GateError("ab.settings: this caller cannot read gateway settings; "
                            "give ab.store (the SQLite store file) instead")
        try:
            plan.ab_settings = load_settings(config.ab.settings)
        except ValueError as e:
            raise GateError(f"ab.settings: {config.ab.settings}: {e}") from None
    return plan


def skipped(reason: str) -> tuple[dict[str, Any], list[str]]:
    return {"status": "skipped", "summary": reason}, []
