"""Distillation: our KD recipe's training throughput next to TRL's, and what the CPU demo's student
keeps of its teacher (not a test).

A. Training throughput, ours vs TRL, in one run on the same tiny models and data. A word-level
   tokenizer with a ChatML template and a random 4-layer, 256-wide Llama teacher are built in
   code; the 2-layer student is cut from it (`distill.student.init_student`, layers 0 and 3) and
   every run starts from that same folder. Data: a synthetic chat set (a few hundred examples,
   a system turn in half of them, 6-30 word prompts, 8-48 word answers that are a fixed word
   mapping of the prompt), written as a shadow export. Same batch size, max_length, steps,
   learning rate, warmup + cosine schedule, AdamW (torch, no weight decay), clipping at 1.0,
   fp32, no gradient checkpointing, 2 CPU threads, on both sides.
   - sequence: ours = `distill.recipes.kd.KDRecipe` with strategy `sequence` (CE on the answer
     tokens); TRL = `trl.SFTTrainer` on the same chats as prompt/completion (completion-only loss).
   - logit: ours = strategy `logit` with kind forward, alpha 1, T 1 (KL(teacher || student) on the
     answer tokens, no CE term); TRL = `trl.experimental.gkd.GKDTrainer` with lmbda 0 (never
     samples from the student: off-policy), beta 0 (its generalised JSD is then exactly
     KL(teacher || student)), seq_kd off: the same loss.
   Runs alternate ours, TRL, ours, TRL, ... (`--repeats` each). Throughput = non-padding tokens
   (prompt + answer, the attention mask's ones; the same count on both sides) per second of
   training-loop wall time from the end of step `--warmup-steps` to the end of the last step:
   batching, forward, backward, clipping, optimizer and scheduler steps, the loop's own logging.
   Not counted: model loading, tokenising, the first steps, and ours' outputs (model,
   checkpoint, manifest, loss curve) or TRL's end of training. Reported as medians and ours/TRL;
   answer-token/s, positions/s (padding included: the raw compute rate) and the padding share
   are shown too (ours batches by length, TRL at random: padding is part of each design).
   `run s` is the whole run (setup to end), for scale only.
   A TRL trainer that cannot run offline on this CPU gets its reason in the table.
B. --demo (needs `make models`; ~15 min on 2 cores): examples/distill/demo.yaml (SmolLM2-135M
   fp32 teacher dequantized from the packaged GGUF, a 10-of-30-layer student, logit KD on the
   teacher's greedy answers to examples/prompts/enterprise.jsonl), trained for `--demo-steps`
   (default: the config's max_steps) into `--demo-out` (default: a temp folder) through
   `distill.recipes.kd.main`. Then, on the held-out prompts (the config's own hash split,
   `data.validation_share`: prompts the recipe never trained on; `--demo-validation-share`
   changes it for training and measuring alike), with the teacher's cached answers as the
   reference, for the teacher, the undistilled student (`student_init/`, layers cut, no
   training) and the distilled student (`model/`):
   - next-token top-1 agreement with the teacher and mean KL(teacher || model) per answer token
     (`distill.fidelity.fidelity_report`; the teacher against itself is 1 and 0 by definition);
   - perplexity of the teacher's answers under each model (the teacher's own is the floor);
   - greedy answers to the same prompts (max_new_tokens as the config's teacher answers) scored
     against the reference: ROUGE-L and semantic cosine (all-MiniLM-L6-v2 at
     models/scorer/all-MiniLM-L6-v2 via `shadow.embedder.SemanticEmbedder`, when present). The
     teacher's row is its own fresh greedy answers (one prompt at a time) against its cached
     (batched) ones: ~1.0, but it need not be exactly 1.
   retained = model score / teacher score (top-1: / 1.0; ROUGE-L, semantic: / the teacher's row);
   perplexity is shown as model / teacher (lower is better). Also: whether the distilled student
   beats the undistilled one on each metric, and the recipe's wall times.

    .venv/bin/python loadtests/bench_distill.py                   # A (about 6-8 min, 2 cores)
    .venv/bin/python loadtests/bench_distill.py --demo            # A and B (B about 15 min)
    .venv/bin/python loadtests/bench_distill.py --demo --skip-a --demo-out data/distill/bench
    .venv/bin/python loadtests/bench_distill.py --quick           # a smoke run of the script itself
    .venv/bin/python loadtests/bench_distill.py --demo --skip-a --quick --demo-steps 3   # B's path

--quick: A with few steps and 1 repeat; B (with --demo) on a prompt subset (the held-out prompts
plus 24 others, so the teacher answers ~35 prompts, not 346), 6 held-out prompts generated,
3 steps unless --demo-steps. Quick numbers measure nothing. Prints tables on stdout and writes
loadtests/out/bench_distill_<timestamp>.json; models and runs go to a temp dir unless --demo-out.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import logging
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import structlog
import torch
import yaml

from distill.config import RecipeConfig
from distill.recipes.kd import KDRecipe
from loadtests.bench_gateway import Meter, loadavg
from loadtests.bench_stats import fmt_num, fmt_ratio, median, ratio, table
from loadtests.benchrun import BenchRun

DEMO_CONFIG = REPO / "examples" / "distill" / "demo.yaml"
SCORER = REPO / "models" / "scorer" / "all-MiniLM-L6-v2"
IGNORE = -100
BUSY_CORES = 0.25  # A: a run during which other processes used more is flagged as noisy
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
ROLES = ["system", "user", "assistant"]


# -- A: tiny models and data built in code -------------------------------------------------------


def pseudo_words(n: int, seed: int) -> list[str]:
    """`n` distinct lowercase pseudo-words (two or three syllables), fixed by `seed`."""
    rng = random.Random(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    words: set[str] = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.choice((2, 3)))))
    return sorted(words)


def word_tokenizer(words: list[str]):
    """A word-level fast tokenizer (whitespace split) with ChatML specials and template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate([*SPECIALS, *ROLES, *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.model_max_length = 4096
    return fast


def synthetic_chats(words: list[str], n: int, seed: int) -> list[list[dict[str, str]]]:
    """`n` chats: an optional system turn, a 6-30 word prompt, an 8-48 word answer that maps
    each prompt word through one fixed permutation of the vocabulary (learnable, not random)."""
    rng = random.Random(seed)
    perm = words[:]
    random.Random(seed + 1).shuffle(perm)
    mapping = dict(zip(words, perm, strict=True))
    common = words[:64]  # a skewed choice of words, as text is
    chats = []
    for _ in range(n):
        prompt = [rng.choice(common if rng.random() < 0.5 else words)
                  for _ in range(rng.randint(6, 30))]
        answer = [mapping[prompt[i % len(prompt)]] for i in range(rng.randint(8, 48))]
        chat = []
        if rng.random() < 0.5:
            chat.append({"role": "system", "content": " ".join(rng.sample(common, 5))})
        chat += [{"role": "user", "content": " ".join(prompt)},
                 {"role": "assistant", "content": " ".join(answer)}]
        chats.append(chat)
    return chats


def build_zoo(root: Path, args) -> dict[str, Any]:
    """Teacher and student folders, the chats, and the shadow export ours trains on."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.student import init_student

    words = pseudo_words(args.vocab, args.seed)
    tok = word_tokenizer(words)
    hidden = args.hidden
    config = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=args.teacher_layers, num_attention_heads=4,
                         num_key_value_heads=4, max_position_embeddings=max(256, args.max_length),
                         bos_token_id=None, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(args.seed)
    teacher = LlamaForCausalLM(config)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)  # a peaky teacher: something to distil
    teacher_dir = root / "teacher"
    teacher.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    n, last = args.student_layers, args.teacher_layers - 1
    keep = [round(i * last / (n - 1)) for i in range(n)] if n > 1 else [0]  # first .. last
    student_dir = init_student(teacher_dir, root / "student", keep_layers=keep)
    chats = synthetic_chats(words, args.examples, args.seed)
    export = root / "train.jsonl"
    with open(export, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": f"s{i}", "messages": chat}) + "\n"
                     for i, chat in enumerate(chats))
    lengths = [len(tok(tok.apply_chat_template(c, tokenize=False),
                       add_special_tokens=False)["input_ids"]) for c in chats]
    return {"teacher": teacher_dir, "student": student_dir, "chats": chats, "export": export,
            "keep_layers": keep, "vocab": len(tok), "teacher_params": teacher.num_parameters(),
            "tokens_per_example": {"mean": statistics.mean(lengths), "min": min(lengths),
                                   "max": max(lengths)}}


class Clock:
    """Step-end marks: (time, non-pad tokens, answer tokens, padded positions) so far."""

    def __init__(self) -> None:
        self.start = time.perf_counter()  # reset where training starts
        self.tokens = self.answer = self.padded = 0
        self.marks: list[tuple[float, int, int, int]] = []

    def count(self, batch: dict[str, torch.Tensor]) -> None:
        mask = batch.get("attention_mask")
        ids = batch["input_ids"]
        self.tokens += int(mask.sum()) if mask is not None else ids.numel()
        self.answer += int((batch["labels"] != IGNORE).sum())
        self.padded += ids.numel()

    def mark(self) -> None:
        self.marks.append((time.perf_counter(), self.tokens, self.answer, self.padded))

    def steady(self, warmup: int) -> dict[str, float]:
        """Rates between the end of step `warmup` and the end of the last step."""
        if len(self.marks) <= warmup + 1:
            raise RuntimeError(f"only {len(self.marks)} steps recorded (warm-up {warmup})")
        t0, n0, a0, p0 = self.marks[warmup - 1] if warmup else (self.start, 0, 0, 0)
        t1, n1, a1, p1 = self.marks[-1]
        seconds = t1 - t0
        return {"steps": len(self.marks) - warmup, "seconds": seconds,
                "tokens_per_s": (n1 - n0) / seconds, "answer_tokens_per_s": (a1 - a0) / seconds,
                "positions_per_s": (p1 - p0) / seconds,
                "padding_share": 1 - (n1 - n0) / max(p1 - p0, 1),
                "step_ms": 1000 * seconds / (len(self.marks) - warmup)}


class TimedRecipe(KDRecipe):
    """`KDRecipe` with a step clock: counts each micro-batch and marks each step's end."""

    def setup(self) -> None:
        super().setup()
        self.clock = Clock()

    def _micro_step(self, index: int):
        out = super()._micro_step(index)
        self.clock.count(self.batches[index * self.world + self.rank])  # the same (cached) batch
        return out

    def _record(self, sums, seconds, bar) -> None:
        super()._record(sums, seconds, bar)
        self.clock.mark()


def ours_run(zoo: dict, strategy: str, steps: int, out: Path, args) -> dict[str, Any]:
    """One KD recipe run: setup, train, cleanup (what `distill.recipes.kd.main` does per stage)."""
    cfg = RecipeConfig.model_validate({
        "student": {"path": str(zoo["student"])},
        "teacher": {"path": str(zoo["teacher"])} if strategy != "sequence" else None,
        "data": {"train": str(zoo["export"]), "validation_share": 0.0,
                 "max_length": args.max_length, "packing": False},
        "strategy": strategy,
        "loss": {"kind": "forward", "alpha": 1.0, "temperature": 1.0},
        "optim": {"lr": args.lr, "max_steps": steps, "batch_size": args.batch_size,
                  "warmup_steps": args.lr_warmup, "weight_decay": 0.0, "max_grad_norm": 1.0,
                  "dtype": "fp32", "seed": args.seed, "grad_accum": 1},
        "eval_every": steps, "save_every": steps, "output_dir": str(out),
    }).resolved()
    t0 = time.perf_counter()
    recipe = TimedRecipe(cfg)
    try:
        recipe.setup()
        recipe.train()
        clock, history = recipe.clock, recipe.history
    finally:
        recipe.cleanup()
    wall = time.perf_counter() - t0
    every = max(1, steps // 10)  # as TRL logs
    first, last = loss_windows([h["loss"] for h in history["train"]], every)
    return {"clock": clock, "run_s": wall, "loss_first": first, "loss_last": last}


def trl_run(zoo: dict, strategy: str, steps: int, out: Path, args) -> dict[str, Any]:
    """One TRL run: SFTTrainer (sequence) or GKDTrainer, lmbda 0, beta 0 (logit)."""
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.trainer_callback import PrinterCallback

    t0 = time.perf_counter()
    clock = Clock()

    class Marks(TrainerCallback):
        def on_train_begin(self, *_a, **_k):
            clock.start = time.perf_counter()

        def on_step_end(self, *_a, **_k):
            clock.mark()

    common = {"output_dir": str(out), "max_steps": steps,
              "per_device_train_batch_size": args.batch_size, "gradient_accumulation_steps": 1,
              "learning_rate": args.lr, "lr_scheduler_type": "cosine",
              "warmup_steps": args.lr_warmup, "weight_decay": 0.0, "max_grad_norm": 1.0,
              "optim": "adamw_torch", "bf16": False, "fp16": False,
              "activation_checkpointing": False, "use_cpu": True, "report_to": "none",
              "save_strategy": "no", "logging_steps": max(1, steps // 10), "disable_tqdm": True,
              "dataloader_num_workers": 0, "seed": args.seed, "max_length": args.max_length}
    tokenizer = AutoTokenizer.from_pretrained(zoo["student"])
    student = AutoModelForCausalLM.from_pretrained(zoo["student"], dtype=torch.float32)
    if strategy == "sequence":
        from trl import SFTConfig, SFTTrainer

        rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in zoo["chats"]]
        base, config = SFTTrainer, SFTConfig(**common, packing=False, completion_only_loss=True)
        extra: dict[str, Any] = {}
    else:
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        rows = [{"messages": c} for c in zoo["chats"]]
        base = GKDTrainer
        config = GKDConfig(**common, lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0)
        teacher = AutoModelForCausalLM.from_pretrained(zoo["teacher"], dtype=torch.float32)
        extra = {"teacher_model": teacher}

    class Counting(base):
        def training_step(self, model, inputs, num_items_in_batch=None):
            clock.count(inputs)
            return super().training_step(model, inputs, num_items_in_batch)

    torch.manual_seed(args.seed)
    trainer = Counting(model=student, args=config, train_dataset=datasets.Dataset.from_list(rows),
                       processing_class=tokenizer, callbacks=[Marks()], **extra)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm prints every log line instead
    trainer.train()
    wall = time.perf_counter() - t0
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    del trainer
    return {"clock": clock, "run_s": wall, "loss_first": logged[0] if logged else None,
            "loss_last": logged[-1] if logged else None}


def part_a(args, tmp: Path, log) -> dict[str, Any]:
    log("A: building the tiny teacher, student and data...")
    zoo = build_zoo(tmp / "zoo", args)
    log(f"A: vocab {zoo['vocab']}, teacher {args.teacher_layers} layers x {args.hidden} "
        f"({zoo['teacher_params'] / 1e6:.1f}M params), student layers {zoo['keep_layers']}, "
        f"{len(zoo['chats'])} chats, tokens/example {zoo['tokens_per_example']}")
    impls = {"ours": ours_run, "trl": trl_run}
    runs: list[dict[str, Any]] = []
    broken: dict[tuple[str, str], str] = {}
    n = 0

    def one(strategy: str, impl: str, steps: int, rnd: int | None) -> None:
        nonlocal n
        n += 1
        if (strategy, impl) in broken:
            return
        meter = Meter()
        stderr = io.StringIO()  # progress bars and warnings, shown with --verbose or on failure
        try:
            with contextlib.redirect_stderr(sys.stderr if args.verbose else stderr):
                r = impls[impl](zoo, strategy, steps, tmp / f"run-{n}-{impl}-{strategy}", args)
        except Exception as e:  # noqa: BLE001 - reported in the table, not fatal
            reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:240]
            broken[strategy, impl] = reason
            log(f"A: {impl} {strategy} FAILED: {reason}")
            print(stderr.getvalue()[-2000:], file=sys.stderr)
            traceback.print_exc()
            return
        finally:
            torch.set_num_threads(args.threads)
        if rnd is None:
            log(f"A: warm-up {impl:4} {strategy:8} done in {r['run_s']:.1f} s")
            return
        s = r["clock"].steady(args.warmup_steps)
        marks = r["clock"].marks
        runs.append({"strategy": strategy, "impl": impl, "round": rnd, "run_s": r["run_s"],
                     **s, "loss_first": r["loss_first"], "loss_last": r["loss_last"],
                     "step_ms_each": [round(1000 * (b[0] - a[0]), 1)
                                      for a, b in itertools.pairwise(marks)],
                     "other_cores": meter.read()["other_cores"]})
        log(f"A: {strategy:8} round {rnd} {impl:4}: {s['tokens_per_s']:8.0f} tok/s "
            f"({s['step_ms']:.0f} ms/step, padding {s['padding_share']:.0%}), run "
            f"{r['run_s']:.1f} s, others {runs[-1]['other_cores']:.2f} cores")

    for strategy in args.strategies:
        for impl in impls:  # first use of each path in this process: imports, allocator, threads
            one(strategy, impl, max(args.warmup_steps + 2, 4), None)
        for rnd in range(args.repeats):
            for impl in impls:
                one(strategy, impl, args.steps, rnd)
    return {"zoo": {k: v for k, v in zoo.items() if k != "chats"}, "runs": runs,
            "failed": {f"{s}/{i}": why for (s, i), why in broken.items()}}


def loss_windows(losses: list[float], every: int) -> tuple[float | None, float | None]:
    """Mean loss of the first and the last full window of `every` steps (TRL logs such means)."""
    if len(losses) < every:
        return None, None
    n = len(losses) // every * every
    return statistics.mean(losses[:every]), statistics.mean(losses[n - every:n])


def _median(runs: list[dict], key: str) -> float | None:
    return median([r.get(key) for r in runs])


def a_table(a: dict, args) -> str:
    rows = []
    busy = [f"{r['strategy']}/{r['impl']} round {r['round']}" for r in a["runs"]
            if r["other_cores"] > BUSY_CORES]
    what = {("sequence", "ours"): "ours: KDRecipe sequence (CE)",
            ("sequence", "trl"): "TRL: SFTTrainer (completion-only CE)",
            ("logit", "ours"): "ours: KDRecipe logit (fwd KL, alpha 1, T 1)",
            ("logit", "trl"): "TRL: GKDTrainer (lmbda 0, beta 0 = fwd KL)"}
    for strategy in args.strategies:
        med = {}
        for impl in ("ours", "trl"):
            sel = [r for r in a["runs"] if (r["strategy"], r["impl"]) == (strategy, impl)]
            why = a["failed"].get(f"{strategy}/{impl}")
            med[impl] = _median(sel, "tokens_per_s")
            if not sel:
                rows.append([what[strategy, impl], "0", *["n/a"] * 9,
                             f"FAILED: {why}" if why else "not run"])
                continue
            loss = (f"{_median(sel, 'loss_first'):.2f} -> {_median(sel, 'loss_last'):.2f}"
                    if sel[0]["loss_first"] is not None else "n/a")
            rows.append([what[strategy, impl], len(sel), fmt_num(med[impl], 0),
                         " ".join(f"{r['tokens_per_s']:.0f}" for r in sel),
                         fmt_num(_median(sel, "answer_tokens_per_s"), 0),
                         fmt_num(_median(sel, "positions_per_s"), 0),
                         fmt_num(_median(sel, "step_ms"), 1),
                         f"{_median(sel, 'padding_share'):.0%}", loss,
                         fmt_num(_median(sel, "run_s"), 1),
                         fmt_num(max(r["other_cores"] for r in sel), 2),
                         f"partly failed: {why}" if why else ""])
        paired = {r["round"]: r["tokens_per_s"] for r in a["runs"]
                  if (r["strategy"], r["impl"]) == (strategy, "trl")}
        by_round = [fmt_ratio(r["tokens_per_s"], paired.get(r["round"])) for r in a["runs"]
                    if (r["strategy"], r["impl"]) == (strategy, "ours")]
        rows.append([f"  ratio ours/TRL ({strategy})", "", fmt_ratio(med["ours"], med["trl"]),
                     " ".join(by_round) if paired else "", *[""] * 8])
    return (table(["run", "n", "tok/s med", "tok/s by round", "answer tok/s", "positions/s",
                   "ms/step", "padding", "loss first -> last", "run s", "others max", "note"],
                  rows)
            + "\n\ntok/s: non-padding tokens (prompt + answer) per second of training loop after "
            f"{args.warmup_steps} warm-up steps, median over rounds (ratio row: ratio of the "
            "medians, then each round's own);\nanswer tok/s: the answer (loss) tokens only; "
            "positions/s: all positions incl. padding (raw compute rate); padding: padded "
            "positions / all positions in the measured steps;\nloss: mean train loss of the first "
            "and last logged tenth (TRL logs every tenth), median over rounds;\nrun s: setup to "
            "end of one run (ours also writes model, "
            "checkpoint, manifest, loss curve; TRL saves nothing); others max: cores used by "
            "processes not ours during a run."
            + ("" if not busy else f"\nNOISY: other processes used > {BUSY_CORES} cores during "
               f"{', '.join(busy)}: compare the by-round figures, or rerun on an idle machine."))


# -- B: the CPU demo ---------------------------------------------------------------------------


def quick_prompts(path: Path, share: float, others: int, out: Path) -> Path:
    """A prompt file: every held-out prompt of `path` plus its first `others` training prompts
    (the hash split keeps each prompt's side, so the held-out set is the full run's)."""
    from distill.data import split_by_hash

    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = [json.loads(line) for line in lines]
    keep, n_train = [], 0
    for line, row in zip(lines, rows, strict=True):
        messages = row.get("messages") or [{"role": "user", "content": row["prompt"]}]
        held = bool(split_by_hash([messages], share)[1])
        if held or n_train < others:
            keep.append(line)
            n_train += not held
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(keep) + "\n", encoding="utf-8")
    return out


def part_b(args, tmp: Path, log) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from distill.data import bucket_batches, load_prompts, split_by_hash, tokenize_example
    from distill.fidelity import fidelity_report
    from distill.recipes.kd import main as kd_main
    from distill.student import load_teacher

    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    gguf = (REPO / cfg["teacher"]["gguf"]).resolve()
    if not gguf.exists():
        raise SystemExit(f"B: {gguf} is missing: run `make models` first (or leave out --demo)")
    out = (args.demo_out or tmp / "demo").resolve()
    steps = args.demo_steps or (3 if args.quick else cfg["optim"]["max_steps"])
    share = (args.demo_validation_share if args.demo_validation_share is not None
             else cfg["data"].get("validation_share", 0.05))
    prompts_path = (REPO / cfg["data"]["prompts"]).resolve()
    if args.quick:
        prompts_path = quick_prompts(prompts_path, share, 24, out.parent / f"{out.name}-prompts"
                                     / "quick_prompts.jsonl")
    cfg["teacher"]["gguf"] = str(gguf)
    cfg["data"].update(prompts=str(prompts_path), validation_share=share)
    cfg["optim"]["max_steps"] = steps
    cfg["eval_every"] = min(cfg.get("eval_every", 50), steps)
    cfg["save_every"] = min(cfg.get("save_every", 100), steps)
    cfg["output_dir"] = str(out)
    out.mkdir(parents=True, exist_ok=True)
    if (out / "checkpoints").exists() and not args.demo_resume:
        raise SystemExit(f"B: {out} already holds a run: pass --demo-resume to continue (or "
                         "reuse) it, or give a new --demo-out")
    config_path = out / "bench_demo.yaml"
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    log(f"B: training the demo student: {steps} steps into {out} (teacher answers first; "
        f"{'resume' if args.demo_resume else 'fresh'})...")
    t0 = time.perf_counter()
    meter = Meter()
    kd_main(config_path, resume=args.demo_resume)
    main_s = time.perf_counter() - t0
    others = meter.read()["other_cores"]
    manifest = json.loads((out / "manifest.json").read_text())
    history = json.loads((out / "history.json").read_text())
    log(f"B: recipe done in {main_s:.0f} s; measuring on the held-out prompts...")

    t1 = time.perf_counter()
    teacher, tokenizer = load_teacher(gguf)
    prompts = load_prompts(prompts_path)
    answers = [json.loads(line)["answer"]
               for line in (out / "teacher_answers.jsonl").read_text().splitlines()]
    rows = [{"messages": [*p, {"role": "assistant", "content": a}]}
            for p, a in zip(prompts, answers, strict=True) if a]
    _, held = split_by_hash(rows, share)  # exactly the recipe's validation split
    max_length = cfg["data"]["max_length"]
    examples = [(r, tokenize_example(tokenizer, r["messages"], max_length=max_length))
                for r in held]
    examples = [(r, e) for r, e in examples if e is not None]
    if not examples:
        raise SystemExit(f"B: no held-out prompts at validation_share {share}")
    batches = bucket_batches([e for _, e in examples], batch_size=cfg["optim"]["batch_size"],
                             pad_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                             else tokenizer.eos_token_id, seed=0)
    gen_rows = [r for r, _ in examples][:6 if args.quick else None]
    gen_prompts = [r["messages"][:-1] for r in gen_rows]
    references = [r["messages"][-1]["content"] for r in gen_rows]
    embed = None
    if (SCORER / "config.json").exists() and not args.no_semantic:
        from shadow.embedder import SemanticEmbedder

        embed = SemanticEmbedder(SCORER)
    max_new = cfg["data"]["teacher_answers"]["max_new_tokens"]
    reports: dict[str, dict[str, Any]] = {}
    timing: dict[str, float] = {}
    for name, folder in (("teacher", None), ("undistilled student", out / "student_init"),
                         ("distilled student", out / "model")):
        s0 = time.perf_counter()
        model = teacher if folder is None else AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32)
        rep = fidelity_report(model, tokenizer, batches,
                              teacher=None if folder is None else teacher,
                              prompts=gen_prompts, teacher_texts=references,
                              max_new_tokens=max_new, embed=embed)
        if folder is None:  # the teacher against itself, by definition
            rep.update(top1_agreement=1.0, mean_kl=0.0,
                       teacher_perplexity=rep["student_perplexity"])
        rep["layers"] = model.config.num_hidden_layers
        rep["parameters"] = model.num_parameters()
        reports[name] = rep
        timing[name] = time.perf_counter() - s0
        log(f"B: {name}: top-1 {rep['top1_agreement']:.3f}, KL {rep['mean_kl']:.3f}, ppl "
            f"{rep['student_perplexity']:.2f}, ROUGE-L {rep['rouge_l']:.3f}, semantic "
            f"{fmt_num(rep['semantic'], 3)} ({timing[name]:.0f} s)")
        if folder is not None:
            del model
    return {"config": cfg, "output_dir": str(out), "steps": steps, "validation_share": share,
            "held_out": len(examples), "generated": len(gen_rows),
            "tokens": reports["teacher"]["tokens"],
            "semantic_model": str(SCORER) if embed else None,
            "main_s": main_s, "measure_s": time.perf_counter() - t1, "other_cores": others,
            "train_s": manifest["metrics"]["seconds"],
            "train_tokens": manifest["metrics"]["tokens"],
            "train_tokens_per_s": manifest["metrics"]["tokens_per_s"],
            "final": manifest["metrics"]["final"], "recipe_fidelity": manifest["metrics"].get(
                "fidelity"), "eval_history": history["eval"], "reports": reports, "timing": timing}


def b_table(b: dict) -> str:
    t, u, d = (b["reports"][k] for k in ("teacher", "undistilled student", "distilled student"))

    def better(key: str, lower: bool = False) -> str:
        if u.get(key) is None or d.get(key) is None:
            return "n/a"
        return "yes" if (d[key] < u[key] if lower else d[key] > u[key]) else "NO"

    def kept(r: dict, key: str) -> str:
        share = ratio(r.get(key), t.get(key))
        return "n/a" if share is None else f"{100 * share:.1f}%"

    def row(label: str, key: str, digits: int, *, lower: bool = False,
            shown: str = "share") -> list[str]:
        cells = [label, *(fmt_num(r.get(key), digits) for r in (t, u, d))]
        if shown == "share":  # the share of the teacher's score kept
            cells += [kept(u, key), kept(d, key)]
        elif shown == "times":  # how many times the teacher's (lower is better)
            cells += [fmt_ratio(u.get(key), t.get(key), 1), fmt_ratio(d.get(key), t.get(key), 1)]
        else:
            cells += ["", ""]
        return [*cells, better(key, lower)]

    rows = [
        row("top-1 agreement with the teacher", "top1_agreement", 3),
        row("mean KL(teacher || model), nats/token", "mean_kl", 3, lower=True, shown=""),
        row("perplexity of the teacher's answers", "student_perplexity", 2, lower=True,
            shown="times"),
        row("ROUGE-L of greedy answers vs reference", "rouge_l", 3),
        row("semantic cosine vs reference (MiniLM)", "semantic", 3),
    ]
    layers = [f"{r['layers']} layers, {r['parameters'] / 1e6:.0f}M" for r in (t, u, d)]
    out = table(["metric (held-out prompts)", "teacher", "undistilled", "distilled",
                 "undistilled retained", "distilled retained", "distilled beats undistilled?"],
                [["model", *layers, "", "", ""], *rows])
    f = b["final"]
    first = b["eval_history"][0] if b["eval_history"] else {}
    return (out + f"\n\nreference = the teacher's cached greedy answers to the {b['held_out']} "
            "held-out prompts (hash split, never trained on); logit metrics over their "
            f"{b['tokens']} answer tokens; ROUGE-L / semantic over {b['generated']} greedy "
            "answers.\nteacher column: top-1 1 and KL 0 by definition; its perplexity is the "
            "floor; its ROUGE-L / semantic are its fresh one-at-a-time greedy answers vs the "
            "cached batched ones.\nretained = model / teacher: for top-1, ROUGE-L and semantic the "
            "share of the teacher's score kept (%); for perplexity how many times the teacher's "
            "(x, lower is better).\n"
            f"\ntraining: {b['steps']} steps, {b['train_s']:.0f} s in the training loop "
            f"({b['train_tokens_per_s']:.0f} tokens/s, {b['train_tokens']} tokens); "
            f"distill.recipes.kd.main() end to end {b['main_s']:.0f} s (teacher load and "
            f"answers, student cut, training, validation, outputs); measuring here "
            f"{b['measure_s']:.0f} s; others used {b['other_cores']:.2f} cores meanwhile.\n"
            f"recipe's own validation: CE {fmt_num(first.get('val_loss'), 2)} -> "
            f"{fmt_num(f.get('val_loss'), 2)}, top-1 {fmt_num(first.get('top1_agreement'), 3)} "
            f"-> {fmt_num(f.get('top1_agreement'), 3)}, KL {fmt_num(first.get('val_kl'), 3)} -> "
            f"{fmt_num(f.get('val_kl'), 3)}")


# -- main ---------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None,
                   help="A: optimizer steps per run (default 300; quick: 12)")
    p.add_argument("--repeats", type=int, default=None,
                   help="A: runs per implementation and strategy, alternating (default 3; quick 1)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="A: first steps left out of the throughput (default 10; quick 2)")
    p.add_argument("--strategies", nargs="+", choices=["sequence", "logit"],
                   default=["sequence", "logit"], help="A: which comparisons")
    p.add_argument("--batch-size", type=int, default=8, help="A: examples per step, both sides")
    p.add_argument("--max-length", type=int, default=128, help="A: tokens per example, both sides")
    p.add_argument("--examples", type=int, default=320, help="A: synthetic chats")
    p.add_argument("--vocab", type=int, default=2000, help="A: words in the tokenizer")
    p.add_argument("--hidden", type=int, default=256, help="A: model width")
    p.add_argument("--teacher-layers", type=int, default=4, help="A: teacher depth")
    p.add_argument("--student-layers", type=int, default=2, help="A: student depth")
    p.add_argument("--lr", type=float, default=1e-3, help="A: peak learning rate, both sides")
    p.add_argument("--lr-warmup", type=int, default=5, help="A: linear warmup steps (schedule)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="A: torch CPU threads (ours sets the CPU count itself)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-a", action="store_true", help="skip A")
    p.add_argument("--demo", action="store_true", help="run B (needs `make models`; ~15 min)")
    p.add_argument("--demo-steps", type=int, default=None,
                   help="B: training steps (default: the config's max_steps; quick: 3)")
    p.add_argument("--demo-out", type=Path, default=None,
                   help="B: the run's folder (default: in a temp dir, deleted at exit)")
    p.add_argument("--demo-resume", action="store_true",
                   help="B: resume the run in --demo-out (a finished one is reused as it is)")
    p.add_argument("--demo-validation-share", type=float, default=None,
                   help="B: held-out share of the prompts, for training and measuring (default: "
                   "the config's data.validation_share, 0.05 = 10 prompts; 0.08 = 25)")
    p.add_argument("--no-semantic", action="store_true", help="B: skip the MiniLM scorer")
    p.add_argument("--quick", action="store_true",
                   help="small counts: checks the script works, measures nothing useful")
    p.add_argument("--verbose", action="store_true", help="the recipe's logs and tracebacks")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.steps = args.steps or (12 if args.quick else 300)
    args.repeats = args.repeats or (1 if args.quick else 3)
    if args.warmup_steps is None:
        args.warmup_steps = 2 if args.quick else 10
    if not 1 <= args.student_layers <= args.teacher_layers:
        p.error("--student-layers must be from 1 to --teacher-layers")
    if args.warmup_steps >= args.steps - 1:
        p.error(f"--warmup-steps {args.warmup_steps} leaves too few of --steps {args.steps}")
    return args


def quiet() -> None:
    """Warnings and errors only from structlog (the recipe), transformers, datasets and TRL."""
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    for name in ("transformers", "datasets", "trl", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    with contextlib.suppress(Exception):
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    with contextlib.suppress(Exception):
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.verbose:
        quiet()
    torch.set_num_threads(args.threads)
    run = BenchRun("bench_distill", args.out)
    stamp, log = run.stamp, run.log

    import transformers
    import trl

    result: dict[str, Any] = {
        "started": stamp, "argv": sys.argv[1:], "args": {k: str(v) for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "torch_threads": torch.get_num_threads(),
                    "transformers": transformers.__version__, "trl": trl.__version__},
        "loadavg_before": loadavg()}
    log(f"load average before: {result['loadavg_before']}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, trl {trl.__version__}")
    with tempfile.TemporaryDirectory(prefix="protege-bench-distill-") as tmp:
        if not args.skip_a:
            result["a"] = part_a(args, Path(tmp), log)
        if args.demo:
            result["b"] = part_b(args, Path(tmp), log)
    result["loadavg_after"] = loadavg()
    result["seconds"] = time.time() - run.started

    print(f"\nprotege distillation benchmark ({stamp}, {os.cpu_count()} CPUs, load avg before "
          f"{result['loadavg_before']}, after {result['loadavg_after']}, "
          f"{result['seconds']:.0f} s{'; QUICK: counts too small to mean much' * args.quick})")
    if "a" in result:
        z = result["a"]["zoo"]
        print(f"\nA. Training throughput, ours vs TRL {trl.__version__}: tiny Llama teacher "
              f"({args.teacher_layers} layers x {args.hidden}, {z['teacher_params'] / 1e6:.1f}M "
              f"params, vocab {z['vocab']}) -> student (its layers {z['keep_layers']}), "
              f"{args.examples} synthetic chats\n   ({z['tokens_per_example']['mean']:.0f} "
              f"tokens/example, {z['tokens_per_example']['min']}-"
              f"{z['tokens_per_example']['max']}), batch {args.batch_size}, max_length "
              f"{args.max_length}, {args.steps} steps, fp32, {args.threads} threads, "
              f"{args.repeats} rounds alternating ours/TRL\n")
        print(a_table(result["a"], args))
    if "b" in result:
        b = result["b"]
        print(f"\nB. Demo fidelity before vs after distillation ({DEMO_CONFIG.relative_to(REPO)}, "
              f"{b['steps']} steps{', QUICK prompt subset' * args.quick}): teacher "
              "SmolLM2-135M fp32 (from the Q4_1 GGUF) vs its layer-cut student\n")
        print(b_table(b))
    return run.write(result)


if __name__ == "__main__":
    sys.exit(main())
