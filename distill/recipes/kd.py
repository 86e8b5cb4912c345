"""Knowledge distillation: a teacher's knowledge into a smaller student, as one readable recipe.

    main("examples/distill/demo.yaml", resume=False, workers=None) -> Path of the run's folder

`KDRecipe` is one run: `setup()` (seed, teacher, student, data, optimizer, resume), `train()`
(AdamW, warmup + cosine, grad accumulation and clipping, fp32/bf16 autocast, validation every
`eval_every` steps, checkpoints every `save_every`; rank 0 writes the outputs) and `cleanup()`.
Strategies (`RecipeConfig.strategy`):
- sequence: cross-entropy on the teacher's answers (any teacher, any tokenizer).
- logit: alpha * divergence(teacher || student logits) + (1 - alpha) * CE, same tokenizer.
- topk: the same with the teacher's top-k logprobs stored in a shadow export.
- on_policy: GKD; in an `lmbda` share of micro-batches the student writes the answer and the
  teacher scores it (divergence only); elsewhere as logit.
- layerwise: logit plus `layerwise.weight` * hidden-state matching through learned projections.
`workers > 1` runs the same loop in Ray Train data-parallel workers (gloo, CPU).

A run's folder: `model/` (a Hugging Face folder), `manifest.json` (teacher and data hashes, the
config, metrics, code version, lineage), `history.json`, `loss_curve.png`, `checkpoints/step-N/`
(the last two) and, for prompt data, `teacher_answers.jsonl`. Errors a user can fix raise
`RecipeError` with one line naming the fix. The per-step maths lives in `distill.train_loop`.
(Over 400 lines: a recipe is meant to be read top to bottom in one file.)
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog
import torch
from tqdm import tqdm

from core.hashing import sha256_file
from distill import train_loop as tl
from distill.config import NEEDS_TEACHER_LOGITS, RecipeConfig, RecipeError, load_recipe
from distill.data import load_chat_examples, load_prompts, split_by_hash, tokenize_example
from distill.fidelity import fidelity_report
from distill.losses import forward_kl, token_mask
from distill.student import INIT_FILE, init_student, load_teacher

log = structlog.get_logger(__name__)


class KDRecipe:
    """One distillation run. Rank 0 of `world_size` writes every file."""

    def __init__(self, cfg: RecipeConfig, *, resume: bool = False, rank: int = 0,
                 world_size: int = 1, stage: tuple[int, int] | None = None):
        self.cfg, self.resume, self.stage = cfg, resume, stage
        self.rank, self.world = rank, world_size
        self.out = Path(cfg.output_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.teacher = self.model = self.layer_map = None

    # --- setup -----------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg = self.cfg
        tl.seed_everything(cfg.optim.seed)
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // self.world))
        if self.ckpt_dir.exists() and tl.checkpoints(self.ckpt_dir) and not self.resume:
            raise RecipeError(f"{self.out} already holds checkpoints: resume with `--resume`, or "
                              "set output_dir to a new folder")
        self.teacher, self.teacher_tokenizer = self._load_teacher()
        self.student, self.tokenizer = self._load_student()
        self.teacher_logits = self._check_tokenizers()
        self.pad_id = tl.pad_token_id(self.tokenizer)
        train, validation = self._load_data()
        self.batches = tl.Batches(train, batch_size=cfg.optim.batch_size, pad_id=self.pad_id,
                                  seed=cfg.optim.seed, packing=cfg.data.packing,
                                  max_length=cfg.data.max_length)
        self.val_batches = tl.bucketed(validation, batch_size=cfg.optim.batch_size,
                                       pad_id=self.pad_id, seed=cfg.optim.seed)
        self.raw = tl.StudentModule(self.student, self._projections())
        self.model = self.raw
        if self.world > 1:
            from ray.train.torch import prepare_model

            self.model = prepare_model(self.raw)  # DDP over gloo: gradients averaged by rank
        o = cfg.optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=o.lr,
                                           weight_decay=o.weight_decay)
        from transformers import get_cosine_schedule_with_warmup

        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, o.warmup_steps,
                                                         o.max_steps)
        self.step, self.tokens, self.seconds = 0, 0, 0.0
        self.history: dict[str, list[dict[str, Any]]] = {"train": [], "eval": []}
        if self.resume and tl.checkpoints(self.ckpt_dir):
            path = tl.checkpoints(self.ckpt_dir)[-1]
            state = tl.load_checkpoint(path, self.raw, self.optimizer, self.scheduler)
            self.step, self.history = state["step"], state["history"]
            self.tokens, self.seconds = state["tokens"], state["seconds"]
            log.info("distill.checkpoint.restored", path=str(path), step=self.step)

    def _load_teacher(self):
        t = self.cfg.teacher
        if t is None:
            return None, None
        where = t.path if t.path is not None else t.gguf
        field = "teacher.path" if t.path is not None else "teacher.gguf"
        if not where.exists():
            raise RecipeError(f"{field}: {where} does not exist (fetch the model with `protege "
                              "models fetch`, or fix the path)")
        started = time.monotonic()
        try:
            teacher, tokenizer = load_teacher(where)  # a GGUF is dequantized to fp32
        except FileNotFoundError as e:
            raise RecipeError(f"{field}: {e}") from None
        teacher.requires_grad_(False)
        log.info("distill.teacher.loaded", teacher=str(where), seconds=round(
            time.monotonic() - started, 1), layers=teacher.config.num_hidden_layers)
        return teacher, tokenizer

    def _load_student(self):
        """The student from its folder, or cut from a teacher into `output_dir/student_init/`
        (by rank 0, once: a resumed run reuses it)."""
        s = self.cfg.student
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = s.path
        if s.path is None:
            folder = self.out / "student_init"
            if self.rank == 0 and not (folder / INIT_FILE).exists():
                shutil.rmtree(folder, ignore_errors=True)
                source = s.init_from.teacher or self.teacher
                try:
                    init_student(source, folder, keep_layers=s.init_from.keep_layers,
                                 tokenizer=None if s.init_from.teacher else self.teacher_tokenizer)
                except (ValueError, FileNotFoundError) as e:
                    raise RecipeError(f"student.init_from: {e}") from None
            self._barrier()
        elif s.path.suffix == ".gguf":  # a served student: dequantized to fp32 to train
            try:
                model, tokenizer = load_teacher(s.path)
            except FileNotFoundError as e:
                raise RecipeError(f"student.path: {e}") from None
            return model, tokenizer
        elif not (s.path / "config.json").exists():
            raise RecipeError(f"student.path: {s.path} is not a Hugging Face model folder (no "
                              "config.json); fix the path or use student.init_from")
        return (AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
                AutoTokenizer.from_pretrained(folder))

    def _check_tokenizers(self) -> bool:
        """Whether the teacher's logits line up with the student's vocabulary."""
        if self.teacher is None:
            return False
        mismatch = tl.tokenizer_mismatch(self.tokenizer, self.teacher_tokenizer)
        if mismatch and self.cfg.strategy in (*NEEDS_TEACHER_LOGITS, "topk"):
            raise RecipeError(f"the teacher's tokenizer differs from the student's ({mismatch}): "
                              f"strategy {self.cfg.strategy} needs the same tokenizer; use "
                              "`strategy: sequence` (or topk on an export with teacher_logprobs "
                              "from a same-tokenizer teacher)")
        return mismatch is None

    def _load_data(self) -> tuple[list[dict], list[dict]]:
        d = self.cfg.data
        try:
            if d.prompts is not None:
                rows = self._answered_prompts()
            else:
                rows = load_chat_examples(self._existing(d.train, "data.train"))
            if d.validation is not None:
                train = rows
                validation = load_chat_examples(self._existing(d.validation, "data.validation"))
            else:
                train, validation = split_by_hash(rows, d.validation_share)
            train, validation = self._tokenized(train), self._tokenized(validation)
        except ValueError as e:  # distill.data names the file and line
            raise RecipeError(str(e).splitlines()[0]) from None
        if not train:
            raise RecipeError(f"no training examples in {d.train or d.prompts} (empty, or every "
                              f"answer cut away by data.max_length={d.max_length}): add data or "
                              "raise data.max_length")
        if self.cfg.strategy == "topk":
            self._attach_topk(train, validation)
        self.data_counts = {"train": len(train), "validation": len(validation)}
        self.val_rows = [row for row, _ in validation]
        log.info("distill.data.loaded", **self.data_counts)
        return [e for _, e in train], [e for _, e in validation]

    def _tokenized(self, rows: list[dict]) -> list[tuple[dict, dict]]:
        """(row, example) for each row with an answer token left after `data.max_length`."""
        done = [(r, tokenize_example(self.tokenizer, r["messages"],
                                     max_length=self.cfg.data.max_length)) for r in rows]
        return [(r, e) for r, e in done if e is not None]

    def _existing(self, path: Path, field: str) -> Path:
        if not path.exists():
            raise RecipeError(f"{field}: {path} does not exist (fix the path)")
        return path

    def _answered_prompts(self) -> list[dict]:
        """The prompts with the teacher's answers (generated once by rank 0, then cached)."""
        d = self.cfg.data
        prompts = load_prompts(self._existing(d.prompts, "data.prompts"))
        cache = self.out / "teacher_answers.jsonl"
        key = {"prompts_sha256": sha256_file(d.prompts), "teacher": self.cfg.teacher.id,
               **d.teacher_answers.model_dump(), "seed": self.cfg.optim.seed}
        if self.rank == 0:
            tl.teacher_answers(self.teacher, self.teacher_tokenizer, prompts,
                               settings=d.teacher_answers, seed=self.cfg.optim.seed, cache=cache,
                               key=key, progress=tqdm)
        self._barrier()
        answers = [json.loads(line)["answer"] for line in cache.read_text().splitlines()]
        return [{"messages": [*p, {"role": "assistant", "content": a}]}
                for p, a in zip(prompts, answers, strict=True) if a]

    def _attach_topk(self, *splits: list[tuple[dict, dict]]) -> None:
        """Each example's stored top-k as `topk_ids` / `topk_logprobs`, aligned with its labels."""
        matched, total = tl.attach_topk(splits, self.tokenizer)
        if total == 0:
            raise RecipeError(f"{self.cfg.data.train}: no row has teacher_logprobs: export pairs "
                              "whose teacher returned logprobs, or use `strategy: sequence`")
        if matched < 0.5 * total:
            raise RecipeError(f"only {matched} of {total} stored teacher tokens match the "
                              "student's tokenization (the teacher used another tokenizer): use "
                              "`strategy: sequence`")

    def _projections(self) -> torch.nn.ModuleDict | None:
        if self.cfg.strategy != "layerwise":
            return None
        layer_map = self.cfg.layerwise.layer_map or tl.default_layer_map(
            self.cfg.student.init_from.keep_layers, self.teacher.config.num_hidden_layers)
        n_s, n_t = self.student.config.num_hidden_layers, self.teacher.config.num_hidden_layers
        if any(not (0 <= s <= n_s and 0 <= t <= n_t) for s, t in layer_map.items()):
            raise RecipeError(f"layerwise.layer_map: {layer_map} (hidden-state indices: student "
                              f"0..{n_s}, teacher 0..{n_t}; 0 = embeddings)")
        self.layer_map = layer_map
        return tl.projections_for(layer_map, self.student.config.hidden_size,
                                  self.teacher.config.hidden_size)

    # --- train -----------------------------------------------------------------------------------

    def train(self) -> None:
        cfg, o = self.cfg, self.cfg.optim
        bar = tqdm(total=o.max_steps, initial=self.step, unit="step", disable=self.rank != 0,
                   desc=f"distill {cfg.strategy}", mininterval=1.0)
        if self.step == 0:
            self._evaluate()  # where the student starts: the first point of the curve
        while self.step < o.max_steps:
            started = time.monotonic()
            self.model.train()
            sums = torch.zeros(5)  # total, soft, hard, hidden, tokens
            for a in range(o.grad_accum):
                losses, tokens = self._micro_step(self.step * o.grad_accum + a)
                sums += torch.stack([*(x.detach().float() for x in losses), tokens.float()])
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(),
                                                  o.max_grad_norm or float("inf"))
            sums = self._all_reduce(sums)
            if not (torch.isfinite(sums).all() and torch.isfinite(norm)):
                raise self._diverged(sums[0] / (o.grad_accum * self.world), norm)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self._record(sums, time.monotonic() - started, bar)
            if self.step % cfg.eval_every == 0 or self.step == o.max_steps:
                self._evaluate()
            if (self.step % cfg.save_every == 0 or self.step == o.max_steps) and self.rank == 0:
                tl.save_checkpoint(self.ckpt_dir, self.step, self.raw, self.optimizer,
                                   self.scheduler, {"history": self.history,
                                                    "tokens": self.tokens,
                                                    "seconds": self.seconds})
        bar.close()
        if self.rank == 0:
            self._write_outputs()

    def _micro_step(self, index: int) -> tuple[tl.StepLosses, torch.Tensor]:
        """Forward and backward of global micro-batch `index`'s share for this rank."""
        cfg = self.cfg
        batch = self.batches[index * self.world + self.rank]
        rollout = (cfg.strategy == "on_policy"
                   and tl.coin(cfg.optim.seed, index) < cfg.on_policy.lmbda)
        if rollout:
            self.raw.eval()
            with self._autocast():
                batch = tl.student_rollout(self.raw.model, batch, pad_id=self.pad_id,
                                           eos_id=self.tokenizer.eos_token_id,
                                           max_new_tokens=cfg.on_policy.max_new_tokens,
                                           temperature=cfg.on_policy.temperature)
            self.raw.train()
        hidden = cfg.strategy == "layerwise"
        with self._autocast():
            student_logits, student_hidden = self.model(batch, hidden=hidden)
            teacher_logits = teacher_hidden = None
            if cfg.strategy in NEEDS_TEACHER_LOGITS:
                teacher_logits, teacher_hidden = self._teacher_forward(batch, hidden)
            losses = tl.step_loss(cfg.strategy, student_logits, batch, cfg.loss,
                                  teacher_logits=teacher_logits, rollout=rollout,
                                  student_hidden=student_hidden, teacher_hidden=teacher_hidden,
                                  layer_map=self.layer_map,
                                  hidden_kind=cfg.layerwise.kind,
                                  hidden_weight=cfg.layerwise.weight)
        (losses.total / cfg.optim.grad_accum).backward()
        return losses, batch["attention_mask"].sum()

    @torch.no_grad()
    def _teacher_forward(self, batch: dict[str, torch.Tensor], hidden: bool = False):
        out = self.teacher(**tl.model_inputs(batch), output_hidden_states=hidden)
        return out.logits, (list(out.hidden_states) if hidden else None)

    def _autocast(self):
        if self.cfg.optim.dtype == "bf16":
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _record(self, sums: torch.Tensor, seconds: float, bar: tqdm) -> None:
        n = self.cfg.optim.grad_accum * self.world
        total, soft, hard, hidden = (float(x) / n for x in sums[:4])
        self.tokens += int(sums[4])
        self.seconds += seconds
        self.history["train"].append({"step": self.step, "loss": total, "soft": soft,
                                      "hard": hard, "hidden": hidden,
                                      "lr": self.scheduler.get_last_lr()[0]})
        bar.set_postfix(loss=f"{total:.4f}", tok_s=f"{int(sums[4]) / max(seconds, 1e-9):.0f}")
        bar.update(1)

    def _diverged(self, loss: torch.Tensor, norm: torch.Tensor) -> RecipeError:
        saved = tl.checkpoints(self.ckpt_dir) if self.ckpt_dir.exists() else []
        last = (f"the last good checkpoint is {saved[-1]}" if saved
                else "no checkpoint was saved before it")
        what = (f"the loss became {float(loss)}" if not torch.isfinite(loss)
                else f"the gradient norm became {float(norm)} (loss {float(loss):.4g})")
        return RecipeError(f"{what} at step {self.step + 1}; stopped without saving that step "
                           f"({last}): lower optim.lr (now {self.cfg.optim.lr}) or set "
                           "optim.max_grad_norm, then resume")

    @torch.no_grad()
    def _evaluate(self) -> None:
        """Validation CE on the teacher's answers; KL and top-1 agreement when the teacher's
        logits (or stored top-k) are there. Each rank scores its share; the sums are reduced."""
        if not self.val_batches:
            return
        self.raw.eval()
        sums = torch.zeros(5, dtype=torch.float64)  # ce*n, n, kl*n, agree, agree_n
        for batch in self.val_batches[self.rank::self.world]:
            with self._autocast():
                logits, _ = self.raw(batch)
                teacher = self._teacher_forward(batch)[0] if self.teacher_logits else None
            labels = batch["labels"]
            n = int(token_mask(labels[:, 1:]).sum())
            kl = 0.0
            if teacher is not None:
                s, t = tl.same_vocab(logits[:, :-1], teacher[:, :-1])
                kl = float(forward_kl(s, t, mask=token_mask(labels[:, 1:])))
            top1 = tl.teacher_top1(batch, teacher)
            agree = tl.top1_agreement(logits, top1, labels) if top1 is not None else (0, 0)
            ce = float(tl.cross_entropy(logits[:, :-1], labels[:, 1:]))
            sums += torch.tensor([ce * n, n, kl * n, *agree], dtype=torch.float64)
        sums = self._all_reduce(sums)
        n = max(float(sums[1]), 1.0)
        metrics = {"step": self.step, "val_loss": float(sums[0]) / n,
                   "val_kl": float(sums[2]) / n if self.teacher_logits else None,
                   "top1_agreement": float(sums[3] / sums[4]) if sums[4] else None}
        self.history["eval"].append(metrics)
        if self.rank == 0:
            log.info("distill.validation.completed", **metrics)

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(t)
        return t

    def _barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    # --- outputs ---------------------------------------------------------------------------------

    def _write_outputs(self) -> None:
        cfg = self.cfg
        tl.save_hf_model(self.student, self.tokenizer, self.out / "model")
        (self.out / "history.json").write_text(json.dumps(self.history, indent=1))
        tl.plot_loss_curve(self.history, self.out / "loss_curve.png",
                           f"{cfg.strategy} distillation -> {self.out.name}")
        manifest = self._manifest()
        manifest["metrics"]["fidelity"] = self._fidelity()
        (self.out / "manifest.json").write_text(json.dumps(manifest, indent=2))
        log.info("distill.run.completed", output=str(self.out), **manifest["metrics"]["final"])

    def _manifest(self) -> dict[str, Any]:
        cfg = self.cfg
        teacher = None
        if cfg.teacher is not None:
            source = Path(cfg.teacher.id)
            teacher = {"id": cfg.teacher.id, "sha256": tl.weight_hashes(source)}
        data_files = {"train": cfg.data.train or cfg.data.prompts, "validation": cfg.data.validation}
        if cfg.data.prompts is not None:
            data_files["teacher_answers"] = self.out / "teacher_answers.jsonl"
        dataset = {name: {"path": str(p), "sha256": sha256_file(p)}
                   for name, p in data_files.items() if p is not None}
        parent = self._parent_manifest()
        lineage = parent["lineage"] if parent else (
            [{"model": teacher["id"], "sha256": teacher["sha256"]}] if teacher else [])
        lineage = [*lineage, {"model": str(self.out / "model"), "strategy": cfg.strategy,
                              "teacher": teacher["id"] if teacher else None,
                              "manifest": str(self.out / "manifest.json")}]
        return {
            "created_at": datetime.now(UTC).isoformat(), **tl.code_version(),
            "strategy": cfg.strategy, "workers": self.world, "stage": self.stage and {
                "index": self.stage[0], "of": self.stage[1]},
            "teacher": teacher, "dataset": {**dataset, "examples": self.data_counts},
            "student": {"layers": self.student.config.num_hidden_layers,
                        "parameters": sum(p.numel() for p in self.student.parameters()),
                        "init": self._student_init()},
            "config": cfg.model_dump(mode="json"),
            "metrics": {"final": tl.final_metrics(self.history), "steps": self.step,
                        "tokens": self.tokens,
                        "seconds": round(self.seconds, 2),
                        "tokens_per_s": round(self.tokens / max(self.seconds, 1e-9), 1)},
            "parent": str(Path(cfg.teacher.id).parent / "manifest.json") if parent else None,
            "lineage": lineage,
        }

    def _fidelity(self) -> dict[str, Any] | None:
        """`distill.fidelity.fidelity_report` on the validation set (greedy answers to at most
        32 of its prompts, scored against the teacher's answers)."""
        if not self.val_batches:
            return None
        rows = self.val_rows[:32]
        return fidelity_report(
            self.student, self.tokenizer, self.val_batches,
            teacher=self.teacher if self.teacher_logits else None,
            prompts=[r["messages"][:-1] for r in rows],
            teacher_texts=[r["messages"][-1]["content"] for r in rows],
            max_new_tokens=self.cfg.data.teacher_answers.max_new_tokens)

    def _student_init(self) -> dict[str, Any] | None:
        """How `distill.student.init_student` cut the student from its teacher, if it did."""
        path = self.out / "student_init" / INIT_FILE
        return json.loads(path.read_text()) if self.cfg.student.init_from and path.exists() else None

    def _parent_manifest(self) -> dict[str, Any] | None:
        """The manifest of the run that produced the teacher (progressive stages, later loops)."""
        if self.cfg.teacher is None or self.cfg.teacher.path is None:
            return None
        path = self.cfg.teacher.path.parent / "manifest.json"
        return json.loads(path.read_text()) if path.exists() else None

    # --- cleanup ---------------------------------------------------------------------------------

    def cleanup(self) -> None:
        self.teacher = self.model = self.raw = self.student = None
        self.optimizer = self.scheduler = None
        gc.collect()


def main(config_path: str | Path, *, resume: bool = False, workers: int | None = None) -> Path:
    """Run the recipe in `config_path` (each stage in turn); the last run's output folder."""
    cfg = load_recipe(config_path, **({"workers": workers} if workers is not None else {}))
    runs = [run.resolved() for run in cfg.stage_configs()]
    for i, run in enumerate(runs, 1):
        stage = (i, len(runs)) if cfg.stages else None
        if resume and _finished(run):
            log.info("distill.stage.skipped", output=str(run.output_dir), reason="finished")
            continue
        if run.workers > 1:  # the same run in Ray Train workers (data-parallel, gloo, CPU)
            tl.fit_with_ray(_ray_worker, {"config": run.model_dump(mode="json"),
                                          "resume": resume, "stage": stage},
                            workers=run.workers, storage=Path(run.output_dir) / "ray")
        else:
            recipe = KDRecipe(run, resume=resume, stage=stage)
            try:
                recipe.setup()
                recipe.train()
            finally:
                recipe.cleanup()
    return Path(runs[-1].output_dir)


def _finished(cfg: RecipeConfig) -> bool:
    manifest = Path(cfg.output_dir) / "manifest.json"
    return manifest.exists() and json.loads(manifest.read_text())["metrics"]["steps"] >= (
        cfg.optim.max_steps)


def _ray_worker(loop_config: dict[str, Any]) -> None:
    import ray.train

    ctx = ray.train.get_context()
    recipe = KDRecipe(RecipeConfig.model_validate(loop_config["config"]),
                      resume=loop_config["resume"], rank=ctx.get_world_rank(),
                      world_size=ctx.get_world_size(), stage=loop_config["stage"])
    try:
        recipe.setup()
        recipe.train()
    finally:
        recipe.cleanup()
