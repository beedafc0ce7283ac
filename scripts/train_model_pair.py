"""Trains a small Llama TARGET model and a much smaller DRAFT model (for speculative decoding)
on the Python standard library's own source, with one shared byte-level BPE tokenizer.

    python3 scripts/train_model_pair.py --output-dir pair            # GPU: ~5 minutes in all
    python3 scripts/train_model_pair.py --preset tiny --output-dir /tmp/pair   # CPU smoke run

Steps: collect every *.py under sysconfig's stdlib (no site-packages), sorted by relative path;
hold out the files whose sha256(relative path) falls in the lowest --val-fraction; train the
tokenizer on the training files; pack each split into one token stream (<|endoftext|> before
every file); train the target, then the draft (distilled from the saved target when
--distill-weight > 0); write OUTPUT/target, OUTPUT/draft (Hugging Face checkpoints, bf16,
tied embeddings) and OUTPUT/results.json (held-out loss, sizes, versions, data stats, the
command line and every hyperparameter).

Reproducible: seeded init, data order and split; fixed file order. On the CPU a rerun gives the
same weights. With a time budget (--max-minutes) the step count is planned from the measured
speed of the first steps; results.json records it, and `--max-steps N --max-minutes 0` replays
the same schedule. CUDA kernels are not bitwise deterministic unless --deterministic.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import random
import shlex
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as `python3 scripts/train_model_pair.py`
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tokenizers import (Tokenizer, decoders, models, pre_tokenizers,  # noqa: E402
                        processors, trainers)

from engine.bench.report import environment, write_json  # noqa: E402
from engine.model.checkpoint import CHAT_TEMPLATE  # noqa: E402

logger = logging.getLogger("train_model_pair")

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (EOT, IM_START, IM_END)  # ids 0..2; EOT is BOS, EOS, pad and file separator
EOT_ID, IM_START_ID, IM_END_ID = range(3)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
SAMPLE_PROMPT = "def fibonacci(n):"
CALIBRATION_STEPS = (5, 25)  # steps timed to plan a time budget (after warm-up kernels)
MB = 1_000_000


@dataclass(frozen=True)
class ModelDims:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    @classmethod
    def parse(cls, text: str) -> ModelDims:
        """'hidden,layers,heads,kv_heads,intermediate', e.g. '256,6,8,4,768'."""
        return cls(*(int(v) for v in text.split(",")))


@dataclass(frozen=True)
class Recipe:
    """Every hyperparameter of a run; a preset, then the flags given on the command line."""

    target: ModelDims
    draft: ModelDims
    vocab_size: int
    seq_len: int  # also the checkpoints' max_position_embeddings
    batch_size: int
    target_lr: float
    draft_lr: float
    warmup_steps: int
    max_steps: int  # per model
    max_minutes: float | None  # per model; None or 0: no time limit
    eval_every: int
    eval_batches: int | None  # batches of the held-out set per periodic eval; None: all
    distill_weight: float  # draft loss = (1 - w) * CE + w * KL(target || draft)
    val_fraction: float
    max_train_files: int | None = None  # a slice of the data (smoke runs)
    max_val_files: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    compile: bool = False
    deterministic: bool = False
    max_saved_mb: float = 20.0
    max_epochs: float | None = None  # per model, over the training tokens; None: no cap
    stdlib_dir: str | None = None  # the corpus root; None: the running Python's stdlib


PRESETS = {
    "default": Recipe(target=ModelDims(256, 6, 8, 4, 768), draft=ModelDims(128, 2, 4, 2, 384),
                      vocab_size=8192, seq_len=1024, batch_size=32, target_lr=2e-3,
                      draft_lr=3e-3, warmup_steps=100, max_steps=20_000, max_minutes=3.0,
                      eval_every=100, eval_batches=None, distill_weight=0.5,
                      val_fraction=0.02, max_epochs=16.0),
    "tiny": Recipe(target=ModelDims(64, 2, 4, 2, 192), draft=ModelDims(32, 1, 2, 1, 96),
                   vocab_size=1024, seq_len=128, batch_size=8, target_lr=3e-3, draft_lr=3e-3,
                   warmup_steps=10, max_steps=60, max_minutes=None, eval_every=30,
                   eval_batches=4, distill_weight=0.5, val_fraction=0.02,
                   max_train_files=24, max_val_files=3),
}


# data
@dataclass
class Corpus:
    train_texts: list[str]
    val_texts: list[str]
    stats: dict[str, Any]


def is_held_out(relative_path: str, fraction: float) -> bool:
    """A stable split: the same files on every machine and run."""
    digest = hashlib.sha256(relative_path.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def stdlib_sources(stdlib_dir: str | None = None) -> tuple[Path, list[str]]:
    """(stdlib root, relative paths of its *.py files outside site-packages, sorted). The root
    is the running Python's stdlib, or `stdlib_dir` (another Python's, e.g. unpacked on a
    machine whose own Python differs)."""
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    relative = (p.relative_to(root) for p in root.rglob("*.py") if p.is_file())
    return root, sorted(r.as_posix() for r in relative
                        if not {"site-packages", "dist-packages"} & set(r.parts))


def read_texts(root: Path, paths: list[str], limit: int | None) -> tuple[list[str], int]:
    """(UTF-8 texts of the first `limit` readable paths, in order; how many were skipped)."""
    texts, num_skipped = [], 0
    for path in paths:
        if limit is not None and len(texts) == limit:
            break
        try:
            texts.append((root / path).read_bytes().decode("utf-8"))
        except UnicodeDecodeError:
            num_skipped += 1
    return texts, num_skipped


def load_corpus(recipe: Recipe) -> Corpus:
    """The stdlib's source split by is_held_out, each side sliced to max_train_files /
    max_val_files (non-UTF-8 files skipped)."""
    root, paths = stdlib_sources(recipe.stdlib_dir)
    val_paths = [p for p in paths if is_held_out(p, recipe.val_fraction)]
    train_paths = [p for p in paths if not is_held_out(p, recipe.val_fraction)]
    train, train_skipped = read_texts(root, train_paths, recipe.max_train_files)
    val, val_skipped = read_texts(root, val_paths, recipe.max_val_files)
    if not train or not val:
        raise SystemExit(f"no {'training' if not train else 'held-out'} files under {root}")
    python = (sys.version.split()[0] if recipe.stdlib_dir is None
              else "stdlib from " + recipe.stdlib_dir)
    stats = {"stdlib": str(root), "python": python, "num_py_files": len(paths),
             "num_skipped_non_utf8": train_skipped + val_skipped,
             "num_train_files": len(train), "num_val_files": len(val),
             "train_bytes": sum(len(t.encode()) for t in train),
             "val_bytes": sum(len(t.encode()) for t in val),
             "held_out_rule": f"sha256(relative path)[:8] / 2**64 < {recipe.val_fraction}"}
    return Corpus(train, val, stats)


# tokenizer
def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE (GPT-2 pre-tokenizer, no prefix space) with SPECIAL_TOKENS as ids 0..2;
    encoding adds <|endoftext|> in front (the BOS, as every training file starts after one)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  min_frequency=2, show_progress=False)
    tokenizer.train_from_iterator(texts, trainer, length=len(texts))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, EOT_ID)])
    return tokenizer


def write_tokenizer_files(tokenizer: Tokenizer, out_dir: Path, model_max_length: int) -> None:
    """tokenizer.json, tokenizer_config.json (ChatML template after a BOS) and
    special_tokens_map.json, as transformers' AutoTokenizer and engine.tokenizer read them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(out_dir / TOKENIZER_FILES[0]))
    special = {"bos_token": EOT, "eos_token": EOT, "pad_token": EOT,
               "additional_special_tokens": [IM_START, IM_END]}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special, "unk_token": None,
              "clean_up_tokenization_spaces": False, "model_max_length": model_max_length,
              "chat_template": "{{- bos_token }}" + CHAT_TEMPLATE}
    (out_dir / TOKENIZER_FILES[1]).write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / TOKENIZER_FILES[2]).write_text(json.dumps(special, indent=2) + "\n")


def pack(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One int32 token stream: <|endoftext|> + ids of each text, in order."""
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    parts = [np.array([EOT_ID, *e.ids], dtype=np.int32) for e in encodings]
    return torch.from_numpy(np.concatenate(parts))


# batches
def train_batches(stream: torch.Tensor, seq_len: int, batch_size: int,
                  seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (inputs, labels) batches of seq_len tokens on the stream's device: every epoch a
    seeded random chunk offset and a seeded permutation of the chunks."""
    if len(stream) < 2 * seq_len + 1:
        raise SystemExit(f"training set has {len(stream)} tokens, too few for seq_len {seq_len}")
    generator = torch.Generator().manual_seed(seed)
    window = torch.arange(seq_len + 1, device=stream.device)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            offset = int(torch.randint(seq_len, (1,), generator=generator))
            num_chunks = (len(stream) - offset - 1) // seq_len
            order = torch.randperm(num_chunks, generator=generator)
            pending = torch.cat([pending, offset + order * seq_len])
        starts, pending = pending[:batch_size], pending[batch_size:]
        tokens = stream[starts.to(stream.device)[:, None] + window].long()
        yield tokens[:, :-1], tokens[:, 1:]


def held_out_batches(stream: torch.Tensor, seq_len: int, batch_size: int,
                     max_batches: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The held-out stream in consecutive chunks (the same ones every time), in order."""
    num_chunks = (len(stream) - 1) // seq_len
    if num_chunks == 0:
        raise SystemExit(f"held-out set has {len(stream)} tokens, less than one sequence")
    window = torch.arange(seq_len + 1, device=stream.device)
    for i, first in enumerate(range(0, num_chunks, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        starts = torch.arange(first, min(first + batch_size, num_chunks), device=stream.device)
        tokens = stream[starts[:, None] * seq_len + window].long()
        yield tokens[:, :-1], tokens[:, 1:]


# models
def build_model(dims: ModelDims, recipe: Recipe, seed: int):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=recipe.vocab_size, hidden_size=dims.hidden_size,
        intermediate_size=dims.intermediate_size, num_hidden_layers=dims.num_layers,
        num_attention_heads=dims.num_heads, num_key_value_heads=dims.num_kv_heads,
        max_position_embeddings=recipe.seq_len, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=EOT_ID, eos_token_id=EOT_ID,
        pad_token_id=EOT_ID, attention_bias=False, mlp_bias=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=EOT_ID,
                                               eos_token_id=[EOT_ID, IM_END_ID],
                                               pad_token_id=EOT_ID)
    return model


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight is listed once


def saved_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


# training
@dataclass
class Run:
    """One model's training on one device; `autocast` is bf16 on CUDA, a no-op on the CPU."""

    name: str
    model: torch.nn.Module
    lr: float
    device: torch.device
    teacher: torch.nn.Module | None = None
    distill_weight: float = 0.0

    def autocast(self):
        return torch.autocast("cuda", torch.bfloat16, enabled=self.device.type == "cuda")


def lr_at(step: int, total_steps: int, peak: float, recipe: Recipe) -> float:
    """Linear warm-up, then cosine from peak down to min_lr_ratio * peak at total_steps."""
    if step < recipe.warmup_steps:
        return peak * (step + 1) / recipe.warmup_steps
    progress = min(1.0, (step - recipe.warmup_steps) / max(1, total_steps - recipe.warmup_steps))
    floor = recipe.min_lr_ratio * peak
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, lr: float, recipe: Recipe, device: torch.device):
    """AdamW; weight decay on matrices (embedding included), none on norm weights."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": recipe.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=device.type == "cuda")


def losses(run: Run, forward, x: torch.Tensor,
           y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to minimise, next-token cross-entropy) of one batch."""
    with run.autocast():
        logits = forward(input_ids=x, use_cache=False).logits.float()
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    if run.teacher is None or run.distill_weight == 0.0:
        return ce, ce
    with torch.no_grad(), run.autocast():
        teacher = run.teacher(input_ids=x, use_cache=False).logits.float()
    kl = F.kl_div(F.log_softmax(logits, -1).flatten(0, 1),
                  F.log_softmax(teacher, -1).flatten(0, 1), log_target=True, reduction="batchmean")
    return (1.0 - run.distill_weight) * ce + run.distill_weight * kl, ce


@torch.no_grad()
def evaluate(run: Run, val_stream: torch.Tensor, recipe: Recipe,
             max_batches: int | None) -> dict[str, float]:
    """Mean next-token loss (and perplexity) over held-out batches; with a teacher, also how
    often the model's argmax equals the teacher's (greedy speculation's acceptance, per token)."""
    run.model.eval()
    total_loss, num_tokens, num_agree, teacher = 0.0, 0, 0, None
    for x, y in held_out_batches(val_stream, recipe.seq_len, recipe.batch_size, max_batches):
        with run.autocast():
            logits = run.model(input_ids=x, use_cache=False).logits.float()
            if run.teacher is not None:
                teacher = run.teacher(input_ids=x, use_cache=False).logits
        total_loss += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
        num_tokens += y.numel()
        if teacher is not None:
            num_agree += (logits.argmax(-1) == teacher.argmax(-1)).sum().item()
    run.model.train()
    loss = total_loss / num_tokens
    result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "num_tokens": num_tokens}
    if run.teacher is not None:
        result["top1_agreement_with_target"] = num_agree / num_tokens
    return result


class Progress:
    """A tqdm bar with loss and tokens/s when tqdm is installed and stderr is a terminal; else a
    log line every `interval_s` seconds (captured output stays readable)."""

    def __init__(self, name: str, interval_s: float = 10.0):
        self.name, self.interval_s, self.bar = name, interval_s, None
        self._last_log = time.monotonic()
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(desc=name, unit="step", file=sys.stderr, dynamic_ncols=True)

    def step(self, step: int, total: int | None, loss: float, lr: float, tokens_per_s: float):
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.1e}", tok_s=f"{tokens_per_s:,.0f}")
        elif time.monotonic() - self._last_log >= self.interval_s:
            self._last_log = time.monotonic()
            logger.info("%s step %d/%s loss %.3f lr %.1e %.0f tokens/s", self.name, step,
                        total or "?", loss, lr, tokens_per_s)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            logger.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class BestWeights:
    """The periodic held-out evaluations, and a copy of the weights of the best one: training
    ends on those (early stopping without cutting the learning-rate schedule short)."""

    def __init__(self) -> None:
        self.evals: list[dict[str, Any]] = []
        self.step, self.loss, self.state = 0, math.inf, None

    def evaluate(self, run: Run, val_stream: torch.Tensor, recipe: Recipe, step: int) -> str:
        self.evals.append({"step": step, **evaluate(run, val_stream, recipe, recipe.eval_batches)})
        loss = self.evals[-1]["loss"]
        if loss < self.loss:
            self.step, self.loss = step, loss
            self.state = {k: v.detach().clone() for k, v in run.model.state_dict().items()}
        return f"{run.name} step {step}: held-out loss {loss:.4f} (best {self.loss:.4f} at {self.step})"

    def restore(self, model: torch.nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


class StepPlan:
    """How many steps a run takes: max_steps capped at max_epochs over the training tokens, or
    with a time budget fewer if that is all that fits it, planned from the speed of
    CALIBRATION_STEPS (inside the warm-up, so the steps before the plan
    follow the same learning rates as a rerun with --max-steps set to the plan)."""

    def __init__(self, recipe: Recipe, device: torch.device, train_tokens: int):
        self.recipe, self.device = recipe, device
        self.budget_s = (recipe.max_minutes or 0.0) * 60.0 or None
        tokens_per_step = recipe.batch_size * recipe.seq_len
        self.cap = recipe.max_steps if recipe.max_epochs is None else min(
            recipe.max_steps, max(1, math.ceil(recipe.max_epochs * train_tokens / tokens_per_step)))
        self.total = self.cap if self.budget_s is None else None
        self.started = time.perf_counter()
        self._calibration_start = 0.0

    @property
    def schedule_steps(self) -> int:
        return self.total or self.cap

    def out_of_time(self) -> bool:
        return self.budget_s is not None and time.perf_counter() - self.started > self.budget_s

    def after_step(self, step: int) -> str | None:
        """Times the calibration steps; returns a line to log once the plan is made."""
        if self.total is not None or step not in CALIBRATION_STEPS:
            return None
        _synchronize(self.device)
        now = time.perf_counter()
        if step == CALIBRATION_STEPS[0]:
            self._calibration_start = now
            return None
        per_step = (now - self._calibration_start) / (step - CALIBRATION_STEPS[0])
        seconds_left = 0.95 * (self.budget_s - (now - self.started))  # 5% kept for evals
        self.total = min(self.cap, step + int(seconds_left / per_step))
        return f"{per_step * 1e3:.1f} ms/step: planned {self.total} steps"


def optimizer_step(run: Run, forward, optimizer, batch: tuple[torch.Tensor, torch.Tensor],
                   lr: float, grad_clip: float) -> torch.Tensor:
    """One AdamW step at `lr` with clipped gradients; returns the batch's cross-entropy."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss, ce = losses(run, forward, *batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(run.model.parameters(), grad_clip)
    optimizer.step()
    return ce.detach()


def train(run: Run, train_stream: torch.Tensor, val_stream: torch.Tensor, recipe: Recipe,
          seed: int) -> dict[str, Any]:
    """Trains run.model in place; returns its training record (steps, tokens, evals, times)."""
    optimizer = make_optimizer(run.model, run.lr, recipe, run.device)
    forward = torch.compile(run.model) if recipe.compile else run.model
    batches = train_batches(train_stream, recipe.seq_len, recipe.batch_size, seed)
    plan, progress = StepPlan(recipe, run.device, len(train_stream)), Progress(run.name)
    best = BestWeights()
    tokens_per_step = recipe.batch_size * recipe.seq_len
    loss_sum, num_summed, window_start = torch.zeros((), device=run.device), 0, time.perf_counter()
    step = 0
    run.model.train()
    while step < plan.schedule_steps and not plan.out_of_time():
        lr = lr_at(step, plan.schedule_steps, run.lr, recipe)
        loss_sum += optimizer_step(run, forward, optimizer, next(batches), lr, recipe.grad_clip)
        step, num_summed = step + 1, num_summed + 1
        if (message := plan.after_step(step)) is not None:
            progress.write(f"{run.name}: {message}")
        if step % 10 == 0 or step == plan.total:
            mean_loss = (loss_sum / num_summed).item()  # syncs: the clock covers the steps
            seconds = time.perf_counter() - window_start
            progress.step(step, plan.total, mean_loss, lr, num_summed * tokens_per_step / seconds)
            loss_sum.zero_()
            num_summed = 0
        if step % recipe.eval_every == 0:
            progress.write(best.evaluate(run, val_stream, recipe, step))
        if num_summed == 0:
            window_start = time.perf_counter()
    if not best.evals or best.evals[-1]["step"] != step:
        progress.write(best.evaluate(run, val_stream, recipe, step))
    progress.close()
    _synchronize(run.device)
    best.restore(run.model)
    return {"steps": step, "planned_steps": plan.total, "kept_step": best.step,
            "stopped_by_time_limit": step < plan.schedule_steps,
            "tokens_seen": step * tokens_per_step,
            "epochs": step * tokens_per_step / len(train_stream),
            "train_seconds": time.perf_counter() - plan.started, "evals": best.evals}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# outputs
def save_checkpoint(model: torch.nn.Module, out_dir: Path) -> None:
    """Casts the model to bf16 in place (what is served) and writes config.json,
    generation_config.json and model.safetensors beside the tokenizer files in out_dir."""
    model.to(torch.bfloat16).save_pretrained(out_dir)


def greedy_sample(model_dir: Path, device: torch.device, max_new_tokens: int = 40) -> dict:
    """transformers' greedy continuation of SAMPLE_PROMPT from the saved checkpoint (fp32)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).float().to(device).eval()
    prompt_ids = tokenizer(SAMPLE_PROMPT, return_tensors="pt").input_ids.to(device)
    with torch.no_grad():
        out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids),
                             max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=EOT_ID)
    new_ids = out[0, prompt_ids.shape[1]:].tolist()
    return {"prompt": SAMPLE_PROMPT, "prompt_ids": prompt_ids[0].tolist(), "token_ids": new_ids,
            "text": tokenizer.decode(new_ids, skip_special_tokens=True)}


def train_and_save(run: Run, streams: tuple[torch.Tensor, torch.Tensor], recipe: Recipe,
                   dims: ModelDims, seed: int, out_dir: Path) -> dict:
    """Trains, saves, evaluates the whole held-out set on the saved (bf16-rounded) weights and
    samples from the saved checkpoint; returns the model's section of results.json."""
    record = train(run, *streams, recipe, seed)
    save_checkpoint(run.model, out_dir)
    run.model.float()  # the bf16-rounded weights, evaluated as they are served
    final = evaluate(run, streams[1], recipe, None)
    logger.info("%s: held-out loss %.4f (perplexity %.2f) after %d steps", run.name,
                final["loss"], final["perplexity"], record["steps"])
    sample = greedy_sample(out_dir, run.device)
    logger.info("%s greedy: %r", run.name, SAMPLE_PROMPT + sample["text"])
    return {"dims": dataclasses.asdict(dims), "num_params": num_params(run.model),
            "saved_bytes": saved_bytes(out_dir), "lr": run.lr, **record,
            "held_out": final, "sample": sample}


def check_size(models_: list[torch.nn.Module], tokenizer_bytes: int, limit_mb: float) -> None:
    """Exits before training when both checkpoints (bf16 weights and tokenizer files each)
    would take more than limit_mb."""
    predicted = sum(2 * num_params(m) + tokenizer_bytes for m in models_)
    logger.info("parameters: %s; predicted saved size %.2f MB (limit %.1f MB)",
                ", ".join(f"{num_params(m) / 1e6:.2f}M" for m in models_), predicted / MB,
                limit_mb)
    if predicted > limit_mb * MB:
        raise SystemExit(f"the pair would take {predicted / MB:.2f} MB > {limit_mb} MB: "
                         "make the models smaller")


# command line
def parse_args(argv: list[str]) -> tuple[argparse.Namespace, Recipe]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda")
    parser.add_argument("--target-dims", type=ModelDims.parse,
                        help="hidden,layers,heads,kv_heads,intermediate")
    parser.add_argument("--draft-dims", type=ModelDims.parse)
    for name, kind in (("vocab_size", int), ("seq_len", int), ("batch_size", int),
                       ("target_lr", float), ("draft_lr", float), ("warmup_steps", int),
                       ("max_steps", int), ("max_minutes", float), ("eval_every", int),
                       ("eval_batches", int), ("distill_weight", float), ("val_fraction", float),
                       ("max_train_files", int), ("max_val_files", int), ("seed", int),
                       ("max_saved_mb", float), ("max_epochs", float), ("stdlib_dir", str)):
        parser.add_argument("--" + name.replace("_", "-"), type=kind)
    parser.add_argument("--compile", action="store_true", default=None, help="torch.compile")
    parser.add_argument("--deterministic", action="store_true", default=None,
                        help="deterministic CUDA kernels (slower)")
    args = parser.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)
                 if getattr(args, f.name, None) is not None}
    overrides.update({k: v for k, v in (("target", args.target_dims), ("draft", args.draft_dims))
                      if v is not None})
    return args, dataclasses.replace(PRESETS[args.preset], **overrides)


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.set_float32_matmul_precision("high")  # TF32 for what runs outside bf16 autocast
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Runs the whole recipe; returns what it writes to OUTPUT/results.json."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args, recipe = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                          if args.device == "auto" else args.device)
    seed_everything(recipe.seed, recipe.deterministic)
    logger.info("recipe: %s", recipe)

    corpus = load_corpus(recipe)
    tokenizer_started = time.perf_counter()
    tokenizer = train_bpe(corpus.train_texts, recipe.vocab_size)
    for name in ("target", "draft"):
        write_tokenizer_files(tokenizer, args.output_dir / name, recipe.seq_len)
    tokenizer_seconds = time.perf_counter() - tokenizer_started
    streams = (pack(tokenizer, corpus.train_texts).to(device),
               pack(tokenizer, corpus.val_texts).to(device))
    data = {**corpus.stats, "train_tokens": len(streams[0]), "val_tokens": len(streams[1]),
            "tokenizer_seconds": tokenizer_seconds,
            "data_seconds": time.perf_counter() - started}
    logger.info("data: %s", data)

    target = build_model(recipe.target, recipe, recipe.seed).to(device)
    draft = build_model(recipe.draft, recipe, recipe.seed + 1).to(device)
    tokenizer_bytes = sum((args.output_dir / "target" / name).stat().st_size
                          for name in TOKENIZER_FILES)
    check_size([target, draft], tokenizer_bytes, recipe.max_saved_mb)
    results = {"target": train_and_save(Run("target", target, recipe.target_lr, device), streams,
                                        recipe, recipe.target, recipe.seed,
                                        args.output_dir / "target")}
    target.requires_grad_(False).eval()
    draft_run = Run("draft", draft, recipe.draft_lr, device, teacher=target,
                    distill_weight=recipe.distill_weight)
    results["draft"] = train_and_save(draft_run, streams, recipe, recipe.draft, recipe.seed + 1,
                                      args.output_dir / "draft")
    return _finish(results, args, argv, recipe, device, data, tokenizer, started)


def _finish(results: dict, args: argparse.Namespace, argv: list[str], recipe: Recipe,
            device: torch.device, data: dict, tokenizer: Tokenizer, started: float) -> dict:
    """Writes results.json; exits non-zero (after writing it) when the pair is over the limit."""
    total_bytes = results["target"]["saved_bytes"] + results["draft"]["saved_bytes"]
    facts = environment(str(device), argv)
    facts["command"] = shlex.join(["python3", "scripts/train_model_pair.py", *argv])
    facts["versions"].update({name: importlib.metadata.version(name)
                              for name in ("tokenizers", "safetensors")})
    payload = {**facts, "preset": args.preset, "recipe": dataclasses.asdict(recipe),
               "data": data,
               "tokenizer": {"vocab_size": tokenizer.get_vocab_size(),
                             "special_tokens": list(SPECIAL_TOKENS),
                             "sha256": hashlib.sha256(tokenizer.to_str().encode()).hexdigest()},
               **results, "total_saved_bytes": total_bytes,
               "wall_seconds": time.perf_counter() - started}
    write_json(args.output_dir / "results.json", payload)
    logger.info("saved: target %.2f MB, draft %.2f MB, total %.2f MB; %.0f s in all",
                results["target"]["saved_bytes"] / MB, results["draft"]["saved_bytes"] / MB,
                total_bytes / MB, payload["wall_seconds"])
    if total_bytes > recipe.max_saved_mb * MB:
        raise SystemExit(f"saved pair is {total_bytes / MB:.2f} MB > {recipe.max_saved_mb} MB")
    return payload


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    main()
