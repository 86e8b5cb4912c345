"""The checks, each run on the real engines: edge cases, fidelity, calibration (the student's
token probabilities), latency on this machine, the task suite, champion vs challenger, A/B
feedback. Each returns its result and its stated failures; the numbers are `checks`'s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from distill import paired
from distill.answers import Answer, answer_one, chat_messages, engine_config_for, open_engine
from distill.fidelity import text_fidelity
from distill.gate import checks as gc
from distill.gate.config import EdgeCase, LatencyConfig, Messages
from distill.gate.machine import gpu_peak_mb, mb, reset_peak_memory, status_kb
from distill.gate.plan import Plan, skipped
from distill.tasks import score as score_tasks
from distill.tasks import summary as task_summary
from serving.engines import AnswerScores, Engine, PromptTooLong
from serving.engines.config import LlamaCppEngine, TransformersEngine
from shadow.embedder import SemanticEmbedder
from shadow.scoring import exact_match, rouge_l
from shadow.store import SqliteStore, open_store


def check_edge_cases(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.edge_cases
    if plan.cases is None:
        return skipped("no suite (set edge_cases.suite)")
    items = [(c.messages, c.max_tokens or cfg.max_tokens) for c in plan.cases]
    sides = {"student": plan.answers(plan.student, items)}
    if plan.champion is not None:
        sides["champion"] = plan.answers(plan.champion, items)
    if plan.teacher is not None:
        sides["teacher"] = plan.answers(plan.teacher, items)
    rows, rates = [], {}
    for i, case in enumerate(plan.cases):
        row = {"id": case.id, "kind": case.expect.kind, "prompt": case.messages[-1]["content"],
               "expect": case.expect.model_dump(by_alias=True, exclude_defaults=True)}
        for side, answers in sides.items():
            ok, why = gc.check_answer(answers[i].text, case.expect, cfg.refusal_patterns)
            row[side] = {"answer": answers[i].text, "passed": ok, "why": why}
        rows.append(row)
    for side in sides:
        rates[side] = sum(r[side]["passed"] for r in rows) / len(rows)
    if plan.champion is not None:
        plan.compare("edge_cases.pass_rate", [r["champion"]["passed"] for r in rows],
                     [r["student"]["passed"] for r in rows])
    failures = [gc.below("edge_cases.pass_rate", rates["student"], cfg.min_pass_rate)]
    notes = []
    if cfg.max_teacher_gap is not None:
        if "teacher" in rates:
            gap = rates["teacher"] - rates["student"]
            failures.append(gc.above("edge_cases.teacher_gap", gap, cfg.max_teacher_gap,
                                     f" (student {gc.fmt(rates['student'])}, teacher "
                                     f"{gc.fmt(rates['teacher'])})"))
        else:
            notes.append("max_teacher_gap not checked: no teacher")
    n = len(rows)
    summary = ", ".join(f"{s} {sum(r[s]['passed'] for r in rows)}/{n}" for s in sides)
    return ({"status": "", "summary": summary, "cases": n, "pass_rate": rates, "rows": rows,
             "notes": notes}, [f for f in failures if f])


def check_fidelity(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.fidelity
    rows = plan.heldout
    if not rows:
        return skipped("no held-out pairs (set heldout.examples or heldout.prompts)")
    answers = [a.text for a in plan.answers(plan.student, [(m, plan.config.heldout.max_tokens)
                                                           for _, m, _, _ in rows])]
    references = [ref for _, _, ref, _ in rows]
    embed, notes = None, []
    if cfg.semantic_model is not None and (cfg.semantic_model / "config.json").is_file():
        embed = SemanticEmbedder(cfg.semantic_model)
    elif cfg.min_semantic is not None:
        notes.append(f"no semantic model at {cfg.semantic_model}")
    scores = text_fidelity(answers, references, embed=embed)
    scores["exact_match"] = sum(exact_match(a, r) for a, r in zip(answers, references)) / len(rows)
    pairs = [{"id": i, "prompt": m[-1]["content"], "student": a, "teacher": r,
              "rouge_l": rouge_l(a, r)} for (i, m, r, _), a in zip(rows, answers)]
    if plan.champion is not None:
        held = [a.text for a in plan.answers(plan.champion, [
            (m, plan.config.heldout.max_tokens) for _, m, _, _ in rows])]
        for pair, a in zip(pairs, held):
            pair |= {"champion": a, "champion_rouge_l": rouge_l(a, pair["teacher"])}
        plan.compare("fidelity.rouge_l", [p["champion_rouge_l"] for p in pairs],
                     [p["rouge_l"] for p in pairs])
    failures = [gc.below(f"fidelity.{k}", scores[k], getattr(cfg, f"min_{k}"))
                for k in ("rouge_l", "exact_match", "semantic")]
    if cfg.min_semantic is not None and scores["semantic"] is None:
        failures.append(f"fidelity.semantic: not measured ({notes[0]}) but min_semantic is set")
    summary = ", ".join(f"{k} {gc.fmt(v)}" for k, v in scores.items() if v is not None)
    return ({"status": "", "summary": f"{summary} over {len(rows)} pairs", "pairs": len(rows),
             **scores, "rows": pairs, "notes": notes}, [f for f in failures if f])


def _scored(model: str, plan: Plan, label_cases: list[EdgeCase]
            ) -> tuple[list[AnswerScores | None], list[dict[str, Any]]] | None:
    """`model`'s teacher-forced scores of each held-out reference (None: longer than
    calibration.n_ctx) and its label probabilities for `label_cases`, from the engine that
    serves it; None when that engine has no token probabilities (remote, fake)."""
    config = engine_config_for(model, n_ctx=plan.config.calibration.n_ctx,
                               n_threads=plan.config.n_threads)
    if not isinstance(config, (LlamaCppEngine, TransformersEngine)):
        return None
    config = config.model_copy(update={"n_parallel": 1})  # scoring decodes no answers

    async def run() -> tuple[list[AnswerScores | None], list[dict[str, Any]]]:
        async with open_engine(config) as engine:
            scores: list[AnswerScores | None] = []
            for _, messages, reference, complete in plan.heldout:
                try:
                    scores.append(await engine.score(chat_messages(messages), reference,
                                                     end=complete))
                except PromptTooLong:
                    scores.append(None)
            return scores, [await _label_probs(engine, case) for case in label_cases]

    return asyncio.run(run())


def _ece_of(scores: list[AnswerScores], bins: int) -> Callable[[np.ndarray], float]:
    """ECE over the tokens of the chosen cases (for the paired bootstrap)."""
    def ece(index: np.ndarray) -> float:
        c = np.concatenate([scores[i].confidence for i in index])
        k = np.concatenate([scores[i].correct for i in index])
        return gc.expected_calibration_error(c, k, bins) if len(c) else float("nan")
    return ece


def check_calibration(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.calibration
    engine = engine_config_for(plan.student)
    label_cases = [c for c in plan.cases or () if c.expect.kind == "label"] if cfg.labels else []
    if engine.engine not in ("llamacpp", "transformers"):
        return skipped("needs the student's token probabilities: a .gguf file or a model "
                        f"folder (not {engine.engine})")
    if not plan.heldout and not label_cases:
        return skipped("no held-out pairs and no label edge cases")
    scores, labels = _scored(plan.student, plan, label_cases)
    confidence = [x for s in scores if s is not None for x in s.confidence.tolist()]
    correct = [x for s in scores if s is not None for x in s.correct.tolist()]
    too_long = sum(s is None for s in scores)
    notes = []
    if plan.champion is not None and plan.heldout:
        champion = _scored(plan.champion, plan, [])
        if champion is None:
            notes.append("calibration.ece not compared: the champion has no token "
                         "probabilities")
        else:
            theirs, _ = champion
            both = [(a, b) for a, b in zip(theirs, scores)
                    if a is not None and b is not None and len(a.tokens) and len(b.tokens)]
            if both:
                plan.compare("calibration.ece", both, both, higher_is_better=False, by_index=(
                    _ece_of([a for a, _ in both], cfg.bins),
                    _ece_of([b for _, b in both], cfg.bins)))
    result: dict[str, Any] = {"status": "", "tokens": len(confidence), "too_long": too_long,
                              "labels": labels, "notes": notes}
    failures: list[str | None] = []
    if confidence:
        result |= {"ece": gc.expected_calibration_error(confidence, correct, cfg.bins),
                   "accuracy": float(np.mean(correct)),
                   "mean_confidence": float(np.mean(confidence)),
                   "overconfident_wrong": gc.overconfident_wrong(confidence, correct,
                                                                 cfg.overconfident_at),
                   "reliability": gc.reliability(confidence, correct, cfg.bins)}
        failures = [gc.above("calibration.ece", result["ece"], cfg.max_ece),
                    gc.above("calibration.overconfident_wrong", result["overconfident_wrong"],
                             cfg.max_overconfident_wrong)]
        result["summary"] = (f"ECE {gc.fmt(result['ece'])}, top-1 {gc.fmt(result['accuracy'])}, "
                             f"wrong at >= {cfg.overconfident_at}: "
                             f"{gc.fmt(result['overconfident_wrong'])} over {len(confidence)} "
                             "tokens")
    else:
        result["summary"] = "no held-out tokens scored"
    if labels:
        conf = [max(r["probs"].values()) for r in labels]
        hits = [r["predicted"] == r["expected"] for r in labels]
        result["label_ece"] = gc.expected_calibration_error(conf, hits, cfg.bins)
        result["label_accuracy"] = sum(hits) / len(hits)
        result["summary"] += (f"; labels: accuracy {gc.fmt(result['label_accuracy'])}, "
                              f"ECE {gc.fmt(result['label_ece'])} over {len(labels)} cases")
    return result, [f for f in failures if f]


async def _label_probs(engine: Engine, case: EdgeCase) -> dict[str, Any]:
    """P(label | prompt) over the case's label set, from each label's sequence logprob."""
    scores = [(await engine.score(chat_messages(case.messages), label)).total
              for label in case.expect.labels]
    probs = dict(zip(case.expect.labels, gc.softmax(scores)))
    return {"id": case.id, "expected": case.expect.label, "probs": probs,
            "predicted": max(probs, key=probs.get)}


def check_latency(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.latency
    baseline_kb = reset_peak_memory()
    cells, ttft = _grid(plan.student, plan)
    memory = {"baseline_rss_mb": mb(baseline_kb), "peak_rss_mb": mb(status_kb("VmHWM")),
              "gpu_peak_mb": gpu_peak_mb()}
    result: dict[str, Any] = {"status": "", "cells": cells, "memory": memory}
    if plan.champion is not None:
        plan.say("latency: the same grid on the champion")
        result["champion_cells"], theirs = _grid(plan.champion, plan)
        timed = [(a, b) for a, b in zip(theirs, ttft) if a is not None and b is not None]
        if timed:
            champion_s, student_s = (np.array([t[i] for t in timed]) for i in (0, 1))
            plan.compare("latency.p95_ttft_s", champion_s, student_s, higher_is_better=False,
                         by_index=(lambda ix: float(np.percentile(champion_s[ix], 95)),
                                   lambda ix: float(np.percentile(student_s[ix], 95))))
    failures = []
    for c in cells:
        where = f" (batch {c['batch']} x concurrency {c['concurrency']})"
        p95 = c["ttft_ms"]["p95"]
        failures += [gc.above("latency.p95_ttft_s", None if p95 is None else p95 / 1000,
                              cfg.max_p95_ttft_s, where),
                     gc.below("latency.tokens_per_s", c["tokens_per_s"], cfg.min_tokens_per_s,
                              where)]
    p95s = [c["ttft_ms"]["p95"] for c in cells if c["ttft_ms"]["p95"] is not None]
    tps = [c["tokens_per_s"] for c in cells if c["tokens_per_s"] is not None]
    result["summary"] = (f"{len(cells)} cells: p95 TTFT {gc.fmt(min(p95s, default=None))}-"
                         f"{gc.fmt(max(p95s, default=None))} ms, "
                         f"{gc.fmt(min(tps, default=None))}-{gc.fmt(max(tps, default=None))} "
                         f"tok/s, peak RSS {gc.fmt(memory['peak_rss_mb'])} MB")
    return result, [f for f in failures if f]


def _grid(model: str, plan: Plan) -> tuple[list[dict[str, Any]], list[float | None]]:
    """The latency grid of `model`: one summary per cell, and every request's time to first
    token in a fixed order (cell, client, round, slot), so two models pair request by request."""
    cfg = plan.config.latency
    engine = engine_config_for(model, n_ctx=plan.config.n_ctx, n_threads=plan.config.n_threads)
    prompts = plan.latency_prompts
    cells, ttft = [], []

    async def run() -> None:
        async with open_engine(engine) as e:
            await answer_one(e, prompts[0], max_tokens=cfg.max_tokens)  # warm-up, not counted
            for batch in cfg.batch_sizes:
                for clients in cfg.concurrency:
                    plan.say(f"latency: batch {batch} x concurrency {clients}")
                    summary, answers = await _cell(e, prompts, batch, clients, cfg)
                    cells.append({"batch": batch, "concurrency": clients, **summary})
                    ttft.extend(a.ttft_s for a in answers)

    asyncio.run(run())
    return cells, ttft


async def _cell(engine: Any, prompts: list[Messages], batch: int, clients: int,
                cfg: LatencyConfig) -> tuple[dict[str, Any], list[Answer]]:
    """`clients` in parallel, each sending `rounds` groups of `batch` prompts at once; the
    summary and the answers in slot order."""
    answers: dict[int, Answer] = {}

    async def client(k: int) -> None:
        for r in range(cfg.rounds):
            start = (k * cfg.rounds + r) * batch
            group = [prompts[(start + j) % len(prompts)] for j in range(batch)]
            got = await asyncio.gather(*(answer_one(engine, p, max_tokens=cfg.max_tokens)
                                         for p in group))
            answers.update((start + j, a) for j, a in enumerate(got))

    t0 = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.perf_counter() - t0
    ordered = [answers[i] for i in sorted(answers)]
    return (gc.latency_summary([a.ttft_s for a in ordered], [a.inter_token_s for a in ordered],
                               [a.completion_tokens for a in ordered], wall), ordered)


def check_tasks(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.tasks
    cases = plan.tasks or []
    items = [(c.messages, c.max_tokens, c.conditions()) for c in cases]
    sides = {"student": plan.answers(plan.student, items, "tasks: student")}
    if plan.champion is not None:
        sides["champion"] = plan.answers(plan.champion, items, "tasks: champion")
    if plan.teacher is not None and cfg.teacher:
        sides["teacher"] = plan.answers(plan.teacher, items, "tasks: teacher")
    scored = {side: score_tasks(cases, [a.text for a in answers])
              for side, answers in sides.items()}
    summaries = {side: task_summary(rows, plan.config.champion.confidence)
                 for side, rows in scored.items()}
    rows = [{"id": c.id, "family": c.family, "kind": c.kind, "prompt": c.messages[-1]["content"],
             **{side: {k: scored[side][i][k] for k in ("answer", "passed", "why")}
                for side in sides}} for i, c in enumerate(cases)]
    if plan.champion is not None:
        ours, theirs = scored["student"], scored["champion"]
        plan.compare("tasks.pass_rate", [r["passed"] for r in theirs],
                     [r["passed"] for r in ours])
        for family in summaries["student"]["families"]:
            pick = [i for i, c in enumerate(cases) if c.family == family]
            plan.compare(f"tasks.{family}.pass_rate", [theirs[i]["passed"] for i in pick],
                         [ours[i]["passed"] for i in pick])
    rate = summaries["student"]["overall"]["rate"]
    failures = [gc.below("tasks.pass_rate", rate, cfg.min_pass_rate)]
    summary = ", ".join(f"{side} {s['overall']['passed']}/{s['overall']['n']} "
                        f"({gc.fmt(s['overall']['rate'])})" for side, s in summaries.items())
    return ({"status": "", "summary": summary, "cases": len(cases),
             "splits": plan.config.tasks.splits, "suite": sorted({c.suite for c in cases}),
             "pass_rate": summaries, "rows": rows}, [f for f in failures if f])


def check_champion(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    """The paired verdict over every metric compared: no worse than the champion beyond each
    margin, and significantly better on the primary metric."""
    cfg = plan.config.champion
    rows = plan.comparisons
    passed, reasons = paired.verdict(rows)
    if cfg.primary is None:
        reasons = [r for r in reasons if not r.startswith("no primary metric")]
        passed = not reasons
    elif cfg.primary not in {r["metric"] for r in rows}:
        reasons = [f"champion.primary: {cfg.primary} was not measured (is its check enabled?)",
                   *[r for r in reasons if not r.startswith("no primary metric")]]
        passed = False
    better = [r["metric"] for r in rows if r["decision"] == "better"]
    worse = [r["metric"] for r in rows if r["decision"] == "worse"]
    summary = (f"{'promote' if passed else 'keep the champion'}: {len(rows)} metrics compared"
               + (f"; better: {', '.join(better)}" if better else "")
               + (f"; worse: {', '.join(worse)}" if worse else ""))
    return ({"status": "passed" if passed else "failed", "summary": summary,
             "champion": plan.champion, "primary": cfg.primary,
             "confidence": cfg.confidence, "rows": rows},
            [f"champion: {r}" for r in reasons])


def check_ab(plan: Plan) -> tuple[dict[str, Any], list[str]]:
    cfg = plan.config.ab
    if cfg.candidate.variant is None and cfg.candidate.version is None:
        return skipped("no candidate (set ab.candidate.variant or .version)")
    types: dict[str, str] = {}
    if plan.ab_settings is not None:
        s = plan.ab_settings
        if s.shadow.store == "sqlite" and not (s.base_dir / s.shadow.store_path).is_file():
            return skipped(f"no store at {s.shadow.store_path}")
        store = open_store(s.shadow, s.base_dir)
        types = {name: m.type for name, m in s.feedback.items()}
    elif cfg.store is not None:
        if not cfg.store.is_file():
            return skipped(f"no store at {cfg.store}")

        store = SqliteStore(cfg.store)
    else:
        return skipped("no store (set ab.settings or ab.store)")
    candidate = {"route": cfg.route, **cfg.candidate.model_dump()}
    control = None if cfg.control is None else {"route": cfg.route, **cfg.control.model_dump()}
    metrics = gc.ab_summary(store.iter_feedback(since=cfg.since), candidate, control, types=types,
                            confidence=cfg.confidence)
    if not any(m["candidate"] for m in metrics.values()):
        return skipped("no feedback for the candidate yet")
    failures, notes = [], []
    for name, th in cfg.thresholds.items():
        m = metrics.get(name) or {"candidate": None, "control": None}
        cand, ctrl = m["candidate"], m["control"]
        if cand is None or ctrl is None or cand["low"] is None:
            notes.append(f"{name}: not checked (too little feedback on an arm)")
            continue
        if th.higher_is_better and cand["low"] < ctrl["mean"] - th.max_drop:
            failures.append(f"ab.{name} candidate lower bound {gc.fmt(cand['low'])} < control "
                            f"mean {gc.fmt(ctrl['mean'])} - {gc.fmt(th.max_drop)}")
        if not th.higher_is_better and cand["high"] > ctrl["mean"] + th.max_drop:
            failures.append(f"ab.{name} candidate upper bound {gc.fmt(cand['high'])} > control "
                            f"mean {gc.fmt(ctrl['mean'])} + {gc.fmt(th.max_drop)}")
    summary = "; ".join(
        f"{k}: " + " vs ".join(f"{arm} {gc.fmt(v[arm]['mean'])} (n={v[arm]['n']})"
                               for arm in ("candidate", "control") if v[arm])
        for k, v in metrics.items())
    return {"status": "", "summary": summary, "metrics": metrics, "notes": notes}, failures
