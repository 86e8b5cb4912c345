"""The KD recipe end to end on tiny random Llamas and a word-level ChatML tokenizer built in code.

Every run goes through `distill.recipes.kd.main(config_path)` (what `protege distill` calls) on a
tiny, repeated dataset, so each strategy's loss must fall within a few steps.
"""

import hashlib
import json
import math
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from distill import train_loop as tl
from distill.config import LossConfig, RecipeError, load_recipe
from distill.recipes import kd

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["system", "user", "assistant", "you", "are", "helpful", "what", "is", "the", "capital",
         "of", "france", "paris", "red", "green", "blue", "one", "two", "three", "four", "five",
         "six", "seven", "eight", "nine", "ten", "sun", "moon", "star", "river", "stone", "tree"]
QA = [("what is the capital of france", "paris is the capital"),
      ("one two three", "four five six"),
      ("red green", "blue sun moon star"),
      ("river stone", "tree river stone tree")]


def word_tokenizer(extra: tuple[str, ...] = ()) -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<unk>", "<|im_start|>", "<|im_end|>", *WORDS, *extra])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|im_end|>",
                                   pad_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    return fast


def save_llama(path, tokenizer, *, layers: int, hidden: int, seed: int):
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden,
                         intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=None, eos_token_id=2, pad_token_id=0,
                         tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # a peaky teacher: something to distil
        model.lm_head.weight[2] = 0  # never ends early when it answers prompts
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    tok = word_tokenizer()
    return {
        "teacher": save_llama(root / "teacher", tok, layers=2, hidden=64, seed=0),
        "student": save_llama(root / "student", tok, layers=1, hidden=64, seed=1),
        "narrow": save_llama(root / "narrow", tok, layers=1, hidden=32, seed=2),
        "other": save_llama(root / "other", word_tokenizer(("zebra",)), layers=1, hidden=64,
                            seed=3),
    }


def logprobs_for(answer: str) -> list[dict]:
    """What a same-tokenizer teacher would have stored: each word, then the end-of-turn token."""
    tokens = [*answer.split(), "<|im_end|>"]
    return [{"token": t, "logprob": -0.1, "top": [[t, -0.1], ["sun", -2.5], ["tree", -3.0]]}
            for t in tokens]


def write_export(path, rows: int = 16, *, logprobs=logprobs_for):
    with open(path, "w") as f:
        for i in range(rows):
            q, a = QA[i % len(QA)]
            f.write(json.dumps({"id": f"p{i}", "messages": [
                {"role": "system", "content": "you are helpful"}, {"role": "user", "content": q},
                {"role": "assistant", "content": a}], "teacher_logprobs": logprobs(a)}) + "\n")
    return path


@pytest.fixture
def export(tmp_path):
    return write_export(tmp_path / "train.jsonl")


@pytest.fixture
def validation(tmp_path):
    return write_export(tmp_path / "validation.jsonl", rows=4)


def recipe(tmp_path, zoo, export, validation, **overrides) -> dict:
    cfg = {
        "student": {"path": str(zoo["student"])},
        "teacher": {"path": str(zoo["teacher"])},
        "data": {"train": str(export), "validation": str(validation), "max_length": 64},
        "strategy": "logit",
        "loss": {"kind": "forward", "alpha": 0.5, "temperature": 2.0},
        "optim": {"lr": 3e-3, "max_steps": 8, "batch_size": 4, "warmup_steps": 1, "seed": 0},
        "eval_every": 4, "save_every": 4,
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in overrides.items():
        cfg[key] = {**cfg[key], **value} if isinstance(value, dict) and key in cfg else value
    return cfg


def run(tmp_path, cfg: dict, **kwargs):
    path = tmp_path / f"recipe-{len(list(tmp_path.glob('recipe-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return kd.main(path, **kwargs)


def losses(out) -> list[float]:
    return [h["loss"] for h in json.loads((out / "history.json").read_text())["train"]]


# --- strategies ----------------------------------------------------------------------------------

STRATEGIES = {
    "sequence": {"strategy": "sequence", "teacher": None},
    "logit-forward": {},
    "logit-reverse": {"loss": {"kind": "reverse"}},
    "logit-jsd": {"loss": {"kind": "jsd", "beta": 0.5}},
    "topk": {"strategy": "topk", "teacher": None},
    "on_policy": {"strategy": "on_policy", "on_policy": {"lmbda": 0.5, "max_new_tokens": 6}},
    "layerwise": {"strategy": "layerwise", "layerwise": {"layer_map": {1: 2}, "weight": 1.0}},
}


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_each_strategy_lowers_the_loss(tmp_path, zoo, export, validation, name):
    overrides = dict(STRATEGIES[name])
    if name == "layerwise":  # 32 wide against 64: a learned projection in between
        overrides["student"] = {"path": str(zoo["narrow"])}
    cfg = recipe(tmp_path, zoo, export, validation, **overrides)
    out = run(tmp_path, cfg)
    curve = losses(out)
    assert len(curve) == 8 and all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0], curve
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["strategy"] == cfg["strategy"]
    final = manifest["metrics"]["final"]
    assert final["val_loss"] > 0
    if name != "sequence":  # a teacher's logits or stored top-k: agreement is measured
        assert 0.0 <= final["top1_agreement"] <= 1.0
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 1


def test_on_policy_rollout_labels_only_the_students_answer(zoo):
    tok = word_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(zoo["student"])
    batch = tl.collate([{"input_ids": [1, 5, 6, 2, 1, 4, 9, 2], "labels": [-100] * 6 + [9, 2]},
                        {"input_ids": [1, 7, 2], "labels": [-100, -100, 2]}], 0)
    torch.manual_seed(0)
    out = tl.student_rollout(model, batch, pad_id=0, eos_id=tok.eos_token_id, max_new_tokens=3,
                             temperature=1.0)
    assert out["input_ids"][0, :6].tolist() == [1, 5, 6, 2, 1, 4]  # the prompts, kept
    assert out["input_ids"][1, :2].tolist() == [1, 7]
    assert out["labels"][0, :6].tolist() == [-100] * 6
    new = out["labels"][0, 6:]
    assert 1 <= int((new != -100).sum()) <= 3  # the student's own answer is what is learned


# --- step maths and batches ----------------------------------------------------------------------

def test_sequence_loss_is_the_models_own_shifted_loss(zoo):
    model = AutoModelForCausalLM.from_pretrained(zoo["student"])
    batch = tl.collate([{"input_ids": [1, 5, 6, 2, 1, 4, 9, 10, 2],
                         "labels": [-100] * 6 + [9, 10, 2]},
                        {"input_ids": [1, 7, 8, 2], "labels": [-100, -100, 8, 2]}], pad_id=0)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ours = tl.step_loss("sequence", logits, batch, LossConfig()).total
    theirs = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "labels")}).loss
    torch.testing.assert_close(ours, theirs)


def test_batches_shard_by_rank_and_reshuffle_each_epoch():
    examples = [{"input_ids": [1] * (i + 2), "labels": [-100] + [1] * (i + 1)} for i in range(10)]
    batches = tl.Batches(examples, batch_size=2, pad_id=0, seed=0, packing=False, max_length=64)
    assert batches.n == 5

    def lengths(g):
        return tuple(batches[g]["attention_mask"].sum(1).tolist())

    world = 2
    seen = [lengths(step * world + rank) for step in range(5) for rank in range(world)]
    epoch0, epoch1 = seen[:5], seen[5:]
    assert sorted(epoch0) == sorted(epoch1) == [(2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]
    assert epoch0 != epoch1  # a new order each epoch, fixed by the seed
    assert [lengths(g) for g in range(10)] == seen  # any g, in any order: resumable


def test_align_topk_maps_pieces_and_stops_at_the_first_mismatch():
    tok = word_tokenizer()
    pieces = tl.token_pieces(tok)
    ids = tok("one two three", add_special_tokens=False)["input_ids"]
    example = {"input_ids": [1, *ids], "labels": [-100, *ids]}
    stored = [{"token": "one", "logprob": -0.1, "top": [["one", -0.1], ["zebra", -1.0],
                                                         ["sun", -2.0]]},
              {"token": "nine", "logprob": -0.2, "top": [["nine", -0.2]]},  # not what follows
              {"token": "three", "logprob": -0.3, "top": [["three", -0.3]]}]
    topk_ids, topk_lps, matched = tl.align_topk(example, stored, *pieces, 3)
    assert matched == 1
    assert topk_ids[1] == [ids[0], tok.convert_tokens_to_ids("sun"), -1]  # zebra: not a word
    assert topk_lps[1][:2] == [-0.1, -2.0]
    assert topk_ids[0] == topk_ids[2] == topk_ids[3] == [-1, -1, -1]


# --- resume, checkpoints, outputs ----------------------------------------------------------------

def test_resume_continues_exactly(tmp_path, zoo, export, validation, monkeypatch):
    straight = recipe(tmp_path / "a", zoo, export, validation,
                      optim={"max_steps": 6, "grad_accum": 2}, save_every=1, eval_every=3)
    (tmp_path / "a").mkdir()
    a = run(tmp_path / "a", straight)

    interrupted = {**straight, "output_dir": str(tmp_path / "b" / "run")}
    (tmp_path / "b").mkdir()
    save = tl.save_checkpoint

    def save_then_stop(root, step, *args, **kwargs):
        path = save(root, step, *args, **kwargs)
        if step == 3:
            raise KeyboardInterrupt  # killed right after step 3's checkpoint
        return path

    monkeypatch.setattr(tl, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", interrupted)
    monkeypatch.setattr(tl, "save_checkpoint", save)
    with pytest.raises(RecipeError, match="--resume"):
        run(tmp_path / "b", interrupted)  # checkpoints there: refuses to start over
    b = run(tmp_path / "b", interrupted, resume=True)

    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" /
                                                                     "model.safetensors")
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-5, atol=1e-6)
    assert losses(a) == pytest.approx(losses(b), rel=1e-5)


def test_checkpoints_keep_the_last_two(tmp_path, zoo, export, validation):
    out = run(tmp_path, recipe(tmp_path, zoo, export, validation, optim={"max_steps": 5},
                               save_every=2))
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-4", "step-5"]  # step 2 deleted; the last step always saved
    step = out / "checkpoints" / "step-5"
    assert {p.name for p in step.iterdir()} == {"model.safetensors", "state.pt"}
    state = torch.load(step / "state.pt", weights_only=False)
    assert state["step"] == 5 and {"optimizer", "scheduler", "rng", "history"} <= state.keys()
    assert set(state["rng"]) == {"python", "numpy", "torch"}


def test_manifest_hashes_and_outputs(tmp_path, zoo, export, validation):
    out = run(tmp_path, recipe(tmp_path, zoo, export, validation))
    manifest = json.loads((out / "manifest.json").read_text())
    sha = hashlib.sha256((zoo["teacher"] / "model.safetensors").read_bytes()).hexdigest()
    assert manifest["teacher"] == {"id": str(zoo["teacher"]), "sha256": {"model.safetensors": sha}}
    assert manifest["dataset"]["train"] == {
        "path": str(export), "sha256": hashlib.sha256(export.read_bytes()).hexdigest()}
    assert manifest["dataset"]["examples"] == {"train": 16, "validation": 4}
    assert manifest["config"]["optim"]["max_steps"] == 8
    assert manifest["strategy"] == "logit" and manifest["workers"] == 1
    assert manifest["protege_version"] and "git_commit" in manifest
    metrics = manifest["metrics"]
    assert metrics["steps"] == 8 and metrics["tokens"] > 0
    assert metrics["final"]["train_loss_last"] < metrics["final"]["train_loss_first"]
    assert [e["model"] for e in manifest["lineage"]] == [str(zoo["teacher"]), str(out / "model")]
    assert manifest["parent"] is None
    assert (out / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {p.name for p in (out / "model").iterdir()} >= {
        "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"}


def test_prompts_are_answered_by_the_teacher_once(tmp_path, zoo, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q, _ in QA * 3))
    cfg = recipe(tmp_path, zoo, None, None, data={
        "train": None, "validation": None, "prompts": str(prompts), "validation_share": 0.0,
        "teacher_answers": {"max_new_tokens": 4, "batch_size": 5}}, optim={"max_steps": 3})
    out = run(tmp_path, cfg)
    answers = (out / "teacher_answers.jsonl").read_text().splitlines()
    assert len(answers) == 12 and all(len(json.loads(a)["answer"].split()) == 4 for a in answers)
    assert json.loads((out / "manifest.json").read_text())["dataset"]["teacher_answers"]

    def no_generation(*args, **kwargs):
        raise AssertionError("the cached answers should be reused")

    monkeypatch.setattr(tl.generation, "_generate", no_generation)
    cfg["optim"]["max_steps"] = 4
    run(tmp_path, cfg, resume=True)
    assert len(losses(out)) == 4


def test_student_cut_from_the_teacher_and_bf16_packing(tmp_path, zoo, export, validation):
    cfg = recipe(tmp_path, zoo, export, validation, strategy="sequence",
                 student={"path": None, "init_from": {"keep_layers": [1]}},
                 data={"packing": True}, optim={"dtype": "bf16", "max_steps": 4})
    out = run(tmp_path, cfg)
    student = AutoModelForCausalLM.from_pretrained(out / "model")
    teacher = AutoModelForCausalLM.from_pretrained(zoo["teacher"])
    assert student.config.num_hidden_layers == 1
    assert losses(out)[-1] < losses(out)[0]
    init = json.loads((out / "manifest.json").read_text())["student"]["init"]
    assert init["kept_layers"] == [1] and init["teacher_layers"] == 2
    # the embeddings started as the teacher's and only moved by a few small steps
    delta = (student.model.embed_tokens.weight - teacher.model.embed_tokens.weight).abs().max()
    assert 0 < delta < 0.1


# --- errors --------------------------------------------------------------------------------------

def test_tokenizer_mismatch_points_to_sequence(tmp_path, zoo, export, validation):
    cfg = recipe(tmp_path, zoo, export, validation, teacher={"path": str(zoo["other"])})
    with pytest.raises(RecipeError, match="strategy: sequence") as err:
        run(tmp_path, cfg)
    assert "vocabularies differ" in str(err.value) and "\n" not in str(err.value)
    cfg["strategy"] = "sequence"  # a different tokenizer is fine for sequence-level KD
    cfg["optim"]["max_steps"] = 2
    assert (run(tmp_path, cfg) / "model").is_dir()


def test_topk_refuses_logprobs_from_another_tokenizer(tmp_path, zoo, validation):
    def subwords(answer):  # a teacher whose tokens are pieces of words
        return [{"token": t[:2], "logprob": -0.1, "top": [[t[:2], -0.1]]} for t in answer.split()]

    export = write_export(tmp_path / "sub.jsonl", logprobs=subwords)
    cfg = recipe(tmp_path, zoo, export, validation, strategy="topk", teacher=None)
    with pytest.raises(RecipeError, match=r"another tokenizer.*strategy: sequence"):
        run(tmp_path, cfg)


def test_layer_map_out_of_range(tmp_path, zoo, export, validation):
    cfg = recipe(tmp_path, zoo, export, validation, strategy="layerwise",
                 layerwise={"layer_map": {1: 5}})
    with pytest.raises(RecipeError, match=r"^layerwise.layer_map: \{1: 5\} .*teacher 0..2"):
        run(tmp_path, cfg)


def test_empty_dataset(tmp_path, zoo, validation):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(RecipeError, match="no examples in .*empty.jsonl"):
        run(tmp_path, recipe(tmp_path, zoo, empty, validation))


def test_missing_teacher(tmp_path, zoo, export, validation):
    cfg = recipe(tmp_path, zoo, export, validation, teacher={"path": str(tmp_path / "nope")})
    with pytest.raises(RecipeError, match=r"^teacher.path: .*nope does not exist"):
        run(tmp_path, cfg)
    cfg["teacher"] = {"gguf": str(tmp_path / "t.gguf")}
    with pytest.raises(RecipeError, match=r"^teacher.gguf: .*t.gguf does not exist"):
        run(tmp_path, cfg)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, zoo, export, validation,
                                                           monkeypatch):
    calls = []

    def poisoned(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 3:  # step 3's only micro-batch
            losses = losses._replace(total=losses.total * float("nan"))
        return losses

    real = tl.step_loss
    monkeypatch.setattr(tl, "step_loss", poisoned)
    cfg = recipe(tmp_path, zoo, export, validation, save_every=1)
    with pytest.raises(RecipeError, match=r"loss became nan at step 3.*checkpoints/step-2"):
        run(tmp_path, cfg)
    out = tmp_path / "run"
    assert [p.name for p in tl.checkpoints(out / "checkpoints")] == ["step-1", "step-2"]
    assert not (out / "model").exists()


def test_huge_learning_rate_diverges(tmp_path, zoo, export, validation):
    cfg = recipe(tmp_path, zoo, export, validation, save_every=1,
                 optim={"lr": 1e30, "warmup_steps": 0, "max_grad_norm": None})
    diverged = r"(loss|gradient norm) became (nan|inf).* at step 2;.*step-1\).*lower optim.lr"
    with pytest.raises(RecipeError, match=diverged):
        run(tmp_path, cfg)


def test_config_errors_one_line_per_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({
        "student": {"path": "s"}, "data": {"train": "t.csv", "max_length": 2},
        "strategy": "distil", "optim": {"lr": -1, "dtype": "fp16"}, "colour": "red"}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    lines = str(err.value).splitlines()
    assert lines == [
        "data.max_length: 2 (Input should be greater than or equal to 8)",
        ("strategy: 'distil' (Input should be 'sequence', 'logit', 'topk', 'on_policy' or "
         "'layerwise')"),
        "optim.lr: -1 (Input should be greater than 0)",
        "optim.dtype: 'fp16' (Input should be 'fp32' or 'bf16')",
        "output_dir: missing (required)",
        "colour: 'red' (Extra inputs are not permitted)",
    ]
    path.write_text(yaml.safe_dump({"student": {"path": "s"}, "data": {"train": "t.csv"},
                                    "strategy": "logit", "output_dir": "o"}))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert str(err.value).splitlines() == [
        "data.train: 't.csv' (must end with .jsonl or .parquet)"]
    path.write_text(yaml.safe_dump({"student": {"path": "s"}, "data": {"train": "t.jsonl"},
                                    "strategy": "logit", "output_dir": "o"}))
    with pytest.raises(RecipeError, match=r"^teacher: missing .*`strategy: sequence`"):
        load_recipe(path)


# --- progressive ---------------------------------------------------------------------------------

def test_progressive_two_stages_record_lineage(tmp_path, zoo, export, validation):
    cfg = recipe(tmp_path, zoo, export, validation, optim={"max_steps": 3}, stages=[
        {"student": {"init_from": {"keep_layers": [1]}}},  # teacher -> intermediate
        {"student": {"path": str(zoo["narrow"])}, "optim": {"lr": 1e-2}},  # -> student
    ])
    cfg["student"] = {"path": str(zoo["student"])}
    last = run(tmp_path, cfg)
    first = tmp_path / "run" / "stage-1"
    assert last == tmp_path / "run" / "stage-2"
    m1 = json.loads((first / "manifest.json").read_text())
    m2 = json.loads((last / "manifest.json").read_text())
    assert m1["stage"] == {"index": 1, "of": 2} and m2["stage"] == {"index": 2, "of": 2}
    assert m2["teacher"]["id"] == str(first / "model")
    assert m2["parent"] == str(first / "manifest.json")
    assert [e["model"] for e in m2["lineage"]] == [
        str(zoo["teacher"]), str(first / "model"), str(last / "model")]
    assert m2["config"]["optim"]["lr"] == 1e-2 and m1["config"]["optim"]["lr"] == 3e-3
    assert AutoModelForCausalLM.from_pretrained(last / "model").config.hidden_size == 32


def test_cli_runs_resumes_and_reports_errors(tmp_path, zoo, export, validation):
    from typer.testing import CliRunner

    from ops.cli import app

    cfg = recipe(tmp_path, zoo, export, validation, optim={"max_steps": 4})
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(cfg))
    runner = CliRunner()
    result = runner.invoke(app, ["distill", "run", "--config", str(path)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "run" / "model" / "config.json").exists()
    assert "manifest.json" in result.output
    again = runner.invoke(app, ["distill", "run", "--config", str(path)])
    assert again.exit_code == 2 and "--resume" in again.output  # a run is never overwritten
    assert runner.invoke(app, ["distill", "run", "--config", str(path), "--resume"]).exit_code == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**cfg, "optim": {**cfg["optim"], "lr": -1}}))
    result = runner.invoke(app, ["distill", "run", "--config", str(bad)])
    assert result.exit_code == 2 and "optim.lr: -1" in result.output
