"""scripts/train_model_pair.py end to end with its tiny preset (CPU, a few seconds): the pair it
writes loads in transformers with one shared tokenizer, Tandem serves the target token for
token like transformers, the run is recorded in results.json and a rerun gives the same bytes."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from tests.engine_loop import build_reference, generate
from tests.reference import hf_greedy

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "train_model_pair.py"
CHECKPOINT_FILES = {"config.json", "generation_config.json", "model.safetensors",
                    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
PROMPTS = ("def fibonacci(n):", "import os\n\n\nclass Path:\n    def __init__(self")


@pytest.fixture(scope="module")
def script():
    """The script, imported as the module `train_model_pair`."""
    spec = importlib.util.spec_from_file_location("train_model_pair", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pair(tmp_path_factory, script) -> tuple[Path, dict]:
    """(output dir, results) of one tiny run."""
    out = tmp_path_factory.mktemp("pair")
    return out, script.main(["--preset", "tiny", "--output-dir", str(out)])


def test_both_checkpoints_load_in_transformers_with_one_tokenizer(pair):
    out, _ = pair
    for name in ("target", "draft"):
        assert CHECKPOINT_FILES <= {p.name for p in (out / name).iterdir()}, name
        model = transformers.AutoModelForCausalLM.from_pretrained(out / name)
        assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
        tokenizer = transformers.AutoTokenizer.from_pretrained(out / name)
        assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    shared = {(out / name / "tokenizer.json").read_bytes() for name in ("target", "draft")}
    assert len(shared) == 1


def test_tandem_tokenizer_matches_transformers(pair):
    out, _ = pair
    hf = transformers.AutoTokenizer.from_pretrained(out / "target")
    ours = Tokenizer.from_dir(out / "target")
    for prompt in PROMPTS:
        ids = hf(prompt).input_ids
        assert ids[0] == hf.bos_token_id == 0  # every encoded text starts like a training file
        assert ours.encode(prompt) == ids
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == prompt
    chat = [{"role": "user", "content": "Write a function."}]
    assert ours.apply_chat_template(chat) == hf.apply_chat_template(chat, tokenize=False,
                                                                    add_generation_prompt=True)
    assert ours.eos_token_ids == [0, 2]  # <|endoftext|>, then <|im_end|> for chats


def test_results_record_a_smaller_draft_and_finite_held_out_losses(pair):
    out, results = pair
    assert json.loads((out / "results.json").read_text()) == results
    target, draft = results["target"], results["draft"]
    assert draft["num_params"] < target["num_params"] / 2
    assert draft["saved_bytes"] < target["saved_bytes"]
    assert results["total_saved_bytes"] == sum(
        p.stat().st_size for name in ("target", "draft") for p in (out / name).iterdir())
    for record in (target, draft):
        assert record["steps"] == results["recipe"]["max_steps"] > 0
        assert math.isfinite(record["held_out"]["loss"])
        assert record["held_out"]["loss"] < math.log(results["tokenizer"]["vocab_size"])  # learnt
        assert len(record["sample"]["token_ids"]) > 0
    assert 0.0 <= draft["held_out"]["top1_agreement_with_target"] <= 1.0
    data = results["data"]
    assert data["python"] == sys.version.split()[0]
    assert data["num_train_files"] > 0 and data["num_val_files"] > 0 and data["val_tokens"] > 0
    assert results["command"].startswith("python3 scripts/train_model_pair.py --preset tiny")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_tandem_serves_the_target_like_transformers(pair, prompt):
    out, results = pair
    target = out / "target"
    prompt_ids = transformers.AutoTokenizer.from_pretrained(target)(prompt).input_ids
    expected = hf_greedy(target, prompt_ids, 24)
    if prompt == PROMPTS[0]:
        assert expected == results["target"]["sample"]["token_ids"][:len(expected)]
    parts = build_reference(target)  # dtype float32: the bf16 weights upcast, as transformers
    assert generate(parts, prompt_ids, SamplingParams(24, temperature=0.0)) == expected


def test_a_rerun_writes_the_same_pair(pair, tmp_path):
    out, _ = pair
    subprocess.run([sys.executable, str(SCRIPT), "--preset", "tiny", "--output-dir",
                    str(tmp_path)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    for name in ("target", "draft"):
        for file in ("model.safetensors", "tokenizer.json", "config.json"):
            assert (tmp_path / name / file).read_bytes() == (out / name / file).read_bytes(), file
    again = json.loads((tmp_path / "results.json").read_text())
    first = json.loads((out / "results.json").read_text())
    assert again["draft"]["held_out"] == first["draft"]["held_out"]


def test_a_pair_over_the_size_limit_stops_before_training(script, tmp_path):
    with pytest.raises(SystemExit, match="would take"):
        script.main(["--preset", "tiny", "--output-dir", str(tmp_path), "--max-saved-mb", "0.1"])
    assert not (tmp_path / "target" / "model.safetensors").exists()


def test_held_out_split_is_pinned_and_nested(script):
    # the rule is part of the recipe: these stdlib files are held out on every machine
    assert all(script.is_held_out(p, 0.02) for p in ("chunk.py", "copyreg.py", "email/__init__.py"))
    assert not any(script.is_held_out(p, 0.02) for p in ("os.py", "json/decoder.py", "typing.py"))
    paths = [f"pkg{i}/mod{j}.py" for i in range(50) for j in range(20)]
    small = {p for p in paths if script.is_held_out(p, 0.02)}
    assert len(small) == 16  # of 1000: ~2%
    assert small < {p for p in paths if script.is_held_out(p, 0.1)}


def test_the_epoch_cap_bounds_the_step_plan(script):
    recipe = script.PRESETS["tiny"]  # batch 8 x 128 tokens = 1,024 a step, 60 steps at most
    plan = script.StepPlan(script.dataclasses.replace(recipe, max_epochs=2.0), None, 10_000)
    assert plan.total == plan.schedule_steps == 20  # ceil(2 x 10,000 / 1,024)
    assert script.StepPlan(recipe, None, 10_000).total == 60  # no cap: max_steps
    many = script.StepPlan(script.dataclasses.replace(recipe, max_epochs=100.0), None, 10_000)
    assert many.total == 60  # max_steps still bounds it


def test_training_ends_on_the_weights_of_the_best_held_out_evaluation(script, monkeypatch):
    import torch
    model = torch.nn.Linear(2, 2)
    run = script.Run("m", model, 1e-3, torch.device("cpu"))
    losses = iter([3.0, 2.0, 2.5])
    monkeypatch.setattr(script, "evaluate", lambda *args: {"loss": next(losses)})
    best, weights = script.BestWeights(), []
    for step in (10, 20, 30):
        with torch.no_grad():
            model.weight.fill_(step)
        weights.append(model.weight.clone())
        best.evaluate(run, None, script.PRESETS["tiny"], step)
    best.restore(model)
    assert best.step == 20 and best.loss == 2.0
    assert torch.equal(model.weight, weights[1])
    assert [e["step"] for e in best.evals] == [10, 20, 30]
