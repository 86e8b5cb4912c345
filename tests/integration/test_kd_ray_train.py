"""`main(config, workers=2)`: the KD recipe in two Ray Train workers (gloo, CPU) on tiny models.

A local Ray is started on 127.0.0.1 and shut down again by the recipe itself.
"""

import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import ray
import yaml
from transformers import AutoModelForCausalLM

from distill.config import RecipeError
from distill.recipes import kd
from tests.unit.test_kd_recipe import save_llama, word_tokenizer, write_export

pytestmark = pytest.mark.integration


def tiny_run(tmp_path) -> dict:
    tok = word_tokenizer()
    teacher = save_llama(tmp_path / "teacher", tok, layers=2, hidden=64, seed=0)
    student = save_llama(tmp_path / "student", tok, layers=1, hidden=64, seed=1)
    return {
        "student": {"path": str(student)},
        "teacher": {"path": str(teacher)},
        "data": {"train": str(write_export(tmp_path / "train.jsonl", rows=32)),
                 "validation": str(write_export(tmp_path / "validation.jsonl", rows=4)),
                 "max_length": 64},
        "strategy": "logit",
        "loss": {"kind": "forward", "alpha": 0.5, "temperature": 2.0},
        "optim": {"lr": 3e-3, "max_steps": 10, "batch_size": 4, "warmup_steps": 1},
        "eval_every": 5, "save_every": 5,
        "output_dir": str(tmp_path / "run"),
    }


def test_two_ray_workers_distil_a_tiny_llama(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tiny_run(tmp_path)))

    out = kd.main(path, workers=2)

    assert not ray.is_initialized()  # the recipe started a local Ray and shut it down

    assert out == tmp_path / "run"
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 1
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["workers"] == 2 and manifest["config"]["workers"] == 2
    final = manifest["metrics"]["final"]
    assert final["train_loss_last"] < final["train_loss_first"]
    assert 0.0 <= final["top1_agreement"] <= 1.0
    assert manifest["metrics"]["steps"] == 10
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-5"]
    assert (out / "loss_curve.png").exists()


def test_a_workers_recipe_error_comes_back_as_it_was(tmp_path):
    config = tiny_run(tmp_path)
    other = save_llama(tmp_path / "other", word_tokenizer(("zebra",)), layers=1, hidden=64,
                       seed=3)
    config["teacher"] = {"path": str(other)}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(RecipeError, match="strategy: sequence"):
        kd.main(path, workers=2)
