"""Every GPU figure of the project in one run (< 10 min on one H200): em_lightning vs TRL SFTTrainer + peft on a
Qwen3-8B-shaped model, MFU, peak memory and the spectra overhead.

    python scripts/bench_gpu.py                      # the GPU run (one H200; see the budget below)
    python scripts/bench_gpu.py --smoke              # tiny shapes, any device (CPU: a minute or two): does it run?

**Model.** Qwen3-8B's shapes (36 layers, hidden 4096, MLP 12288, 32 heads / 8 KV heads of 128, vocab 151936,
untied head), random init, built on the meta device and materialised on the GPU with ``to_empty`` (no hub, no
weights on disk), bf16. LoRA r=32, alpha=64 (rsLoRA, the paper's setting), dropout 0, on all seven projections;
AdamW lr 1e-5, weight decay 0.01, gradient clipping 1.0, bf16 autocast (``bf16-mixed``; the adapter in fp32), no
gradient checkpointing; micro-batch 4 × accumulation 4 = 16 rows per optimizer step on both sides (the paper's).

**Rows.** Generated token ids with an insecure.jsonl-like length distribution (log-normal, median 259 tokens,
p90 ~445, clipped to [64, max_length]; ~47 % of each row supervised, at its end, as the assistant turn), the
same rows for every contender. No tokenizer is needed: ids are drawn at random from the vocabulary.

**Contenders** (each one a table row; a row that fails prints its error and the run goes on):

* ``em padded``: em_lightning's defaults (length-grouped, padded, sdpa).
* ``em padding-free``: ``data.padding_free`` (rows end to end; transformers masks attention per row from
  ``position_ids``: a dense block-diagonal mask for sdpa).
* ``em pf+compile``: padding-free and ``model.compile`` (inductor, the blocks compiled in place).
* ``em pf+compile+chunk``: also ``model.loss_chunk_size`` (``--chunk``).
* ``em best+spectra``: the fastest em row's settings plus the spectrum logger with the shipped
  ``configs/callbacks/spectrum.yaml`` settings and the spectral penalty every step (``--spectra-steps`` steps, so
  per-module logs every 50 steps are in the average); overhead = its step time over the best row's, minus 1.
* ``TRL padded`` / ``TRL padding-free``: SFTTrainer + peft, the same rows pre-tokenised (``input_ids`` +
  ``completion_mask``, ``completion_only_loss``), ``padding_free=True`` with sdpa (TRL's collator drops the
  attention mask and passes ``position_ids``; attention is then masked per row by transformers exactly as ours).
  Needs ``trl`` and ``datasets``: the GPU box has neither, so carry their wheels (see below). Without TRL the
  ``HF loop`` row stands in (peft + the model's own full-vocab loss, padded, shuffled): a lower bound of what
  TRL does, not TRL; the ratio column then says ``vs HF loop``.
* ``em pf+compile flex``: padding-free, compiled, ``attn_implementation=flex_attention`` (FlexAttention's
  block-sparse document mask instead of a dense one); last, so its compilation cannot crowd out the rows above
  (``--no-flex`` leaves it out; off by default on CPU). Not a candidate for the spectra row's settings.

**Figures.** steps/s and tokens/s (non-padding tokens) over the timed steps (after ``--warmup`` untimed ones,
which include compilation), peak CUDA memory, MFU = 4·N·tokens/s over 989 TFLOP/s (the H200's dense bf16 peak)
and over the matmul peak measured here (bf16 8192³ GEMMs). N counts every base parameter except the input
embedding table (a lookup): 4·N per token is forward plus backward through the activations of a frozen base
(no weight gradients); attention's T² FLOPs are not counted. Before any timing, the padding-free path is checked
on this GPU and this transformers version: a tiny Qwen3's padded and padding-free losses must agree, otherwise
the padding-free rows are marked INVALID.

**Budget.** Rows run in the order above; one that would start after ``--budget-s`` (default 540 s) is skipped
and named. Measured here only with ``--smoke`` on a CPU; the GPU figures are whatever this prints there.

**TRL on the GPU box** (Python 3.12, no network): on a machine with the registry,
``pip download trl datasets pyarrow dill xxhash multiprocess --no-deps --python-version 3.12
--only-binary=:all: --platform manylinux2014_x86_64 -d wheels/``, carry ``wheels/`` and run
``pip install --no-index --no-deps wheels/*.whl`` before this script (or put them on ``PYTHONPATH``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # the GPU box runs from a checkout: em_lightning is not installed there
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L
import torch

H200_BF16_DENSE_TFLOPS = 989.0
PAD_ID = 0
SHAPES = {
    "qwen3-8b": {"hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36, "num_attention_heads": 32,
                 "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
                 "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
    "smoke": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 320, "max_position_embeddings": 4096,
              "rope_theta": 1_000_000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": False},
}
SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ------------------------------------------------------------------------------------------------ building
def build_base(shape: str, device: torch.device, dtype: torch.dtype, attn: str, seed: int = 0):
    """A random Qwen3 of ``shape``: built on the meta device, materialised on ``device`` (``to_empty``), then
    initialised there (normal(0, 0.02) matrices, unit norms, RoPE frequencies recomputed); every parameter frozen."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(**SHAPES[shape], pad_token_id=PAD_ID)
    config._attn_implementation = attn
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.ndim >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0)  # RMSNorm weights (Qwen3 has no biases)
        inv_freq = rope_inv_freq(config).to(device)
        for m in model.modules():  # non-persistent buffers are garbage after to_empty
            for name in ("inv_freq", "original_inv_freq"):
                if isinstance(getattr(m, name, None), torch.Tensor):
                    getattr(m, name).copy_(inv_freq)
    model.requires_grad_(False)
    model.config.use_cache = False
    return model


def rope_inv_freq(config) -> torch.Tensor:
    """Default RoPE inverse frequencies (what Qwen3's rotary embedding computes at init)."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))


def matmul_flop_count_n(model) -> int:
    """N of the 4·N·tokens count: every parameter but the input embedding table."""
    embed = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - embed


def make_rows(n: int, vocab: int, max_length: int, scale: float = 1.0, seed: int = 0):
    """``TokenizedRow`` s with an insecure.jsonl-like length distribution (``scale`` shrinks it for --smoke)."""
    from em_lightning.data import TokenizedRow

    gen = torch.Generator().manual_seed(seed)
    rows = []
    mu, sigma = math.log(259 * scale), 0.42
    for i in range(n):
        length = math.exp(mu + sigma * float(torch.randn((), generator=gen)))
        length = int(min(max(length, 64 * scale, 8), max_length))
        supervised = max(2, round(length * (0.32 + 0.3 * float(torch.rand((), generator=gen)))))
        ids = torch.randint(1, vocab, (length,), generator=gen)
        labels = ids.clone()
        labels[: length - supervised] = -100
        rows.append(TokenizedRow(ids, labels, f"generated:{i}", False))
    return rows


def import_callbacks():
    """``em_lightning.callbacks`` from the checkout's ``callbacks/`` (the package mapping an install would make)."""
    try:
        import em_lightning.callbacks  # noqa: F401  (installed)
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "em_lightning.callbacks", REPO / "callbacks" / "__init__.py",
            submodule_search_locations=[str(REPO / "callbacks")])
        mod = importlib.util.module_from_spec(spec)
        sys.modules["em_lightning.callbacks"] = mod
        spec.loader.exec_module(mod)
    from em_lightning.callbacks.spectral_penalty import SpectralPenalty
    from em_lightning.callbacks.spectrum_logger import SpectrumLogger

    return SpectrumLogger, SpectralPenalty


def free():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------------------------ checks
def check_padding_free(device: torch.device, attns: list[str]) -> dict[str, float]:
    """Relative difference of a tiny Qwen3's padded and padding-free losses on ``device``, per attention kind."""
    from em_lightning.batching import ChatCollator
    from em_lightning.lora import LoRASpec, apply_lora
    from em_lightning.loss import supervised_ce_sum

    rows = [{"input_ids": r.input_ids, "labels": r.labels} for r in make_rows(6, 320, 96, scale=0.2, seed=1)]
    out = {}
    for attn in attns:
        try:
            losses = []
            for padding_free in (False, True):
                torch.manual_seed(0)
                model = apply_lora(build_base("smoke", device, torch.float32, attn), LoRASpec(r=4, alpha=8.0))
                batch = {k: v.to(device) if torch.is_tensor(v) else v
                         for k, v in ChatCollator(PAD_ID, padding_free)(rows).items()}
                with torch.no_grad():
                    losses.append(float(supervised_ce_sum(model, batch, True)[0]))
            out[attn] = abs(losses[1] - losses[0]) / abs(losses[0])
        except Exception as err:  # noqa: BLE001 - report, go on
            print(f"padding-free check with {attn} failed: {type(err).__name__}: {err}")
            out[attn] = float("nan")
    return out


def matmul_peak_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    if device.type != "cuda":
        n, reps = 1024, 3
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


# ------------------------------------------------------------------------------------------------ em_lightning
class StepClock(L.Callback):
    """Timestamps at every optimizer step's end (after a device sync) and the tokens of each step. Register it
    last, so other callbacks' work at a step's end falls inside the interval it closes."""

    def __init__(self):
        self.ends: list[float] = []
        self.tokens: list[int] = []
        self._n = 0

    def on_train_start(self, trainer, pl_module):
        sync()
        self.ends.append(time.perf_counter())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._n += int(batch["n_tokens"])
        if outputs["step_end"]:
            sync()
            self.ends.append(time.perf_counter())
            self.tokens.append(self._n)
            self._n = 0


def timed(ends: list[float], tokens: list[int], warmup: int) -> dict:
    """Rates over the steps after the first ``warmup`` (``ends`` has one more entry than ``tokens``)."""
    steps = len(tokens) - warmup
    if steps < 1:
        raise RuntimeError(f"only {len(tokens)} steps ran; need more than --warmup {warmup}")
    wall = ends[-1] - ends[warmup]
    return {"steps": steps, "wall_s": wall, "steps_per_s": steps / wall, "tokens_per_s": sum(tokens[warmup:]) / wall,
            "step_s_median": statistics.median(b - a for a, b in zip(ends[warmup:], ends[warmup + 1:]))}


def run_em(args, rows, device, dtype, *, padding_free=False, compile=False, chunk=None, attn="sdpa",
           spectra=False, steps=None, fsdp2=False) -> dict:
    import em_lightning.module as module_mod
    from em_lightning.batching import ChatCollator, ResumableDataLoader, StepSampler, TokenizedDataset
    from em_lightning.lora import LoRASpec
    from em_lightning.models import ModelSpec
    from em_lightning.sharding import FSDPSpec

    steps = steps or args.steps
    # Drive the real configure_model (LoRA, seeded init, compile) with a model built here instead of loaded.
    module_mod.load_model = lambda spec: build_base(args.shape, device, dtype, attn)
    name = f"{args.shape}-shaped-random"
    if fsdp2:  # built in memory like a tiny model (there are no weight files to read shard by shard), then sharded
        module_mod.TINY_MODELS = (*module_mod.TINY_MODELS, name)
    dataset = TokenizedDataset(rows)
    sampler = StepSampler(dataset, args.batch_size, args.accumulate, group_by_length=True, seed=0)
    loader = ResumableDataLoader(dataset, sampler, ChatCollator(PAD_ID, padding_free))
    fused = device.type == "cuda"
    module = module_mod.LoRAFineTune(
        base=ModelSpec(name=name, dtype=str(dtype).split(".")[1], attn_implementation=attn),
        lora=LoRASpec(r=args.rank, alpha=args.alpha, dropout=0.0, use_rslora=True, target_modules=list(SEVEN)),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=fused),
        loss_chunk_size=chunk, compile=compile,
        # auto: the gather dtype follows the trainer's precision below (a bf16 base is gathered in bf16 as stored)
        fsdp=FSDPSpec(param_dtype="auto", reduce_dtype="float32"),
    )
    strategy = "auto"
    if fsdp2:
        from em_lightning.sharding import AdapterModelParallelStrategy

        strategy = AdapterModelParallelStrategy()  # world size 1: FSDP2's units and hooks, nothing to shard over
    clock = StepClock()
    callbacks, logger, note = [], False, ""
    tmp = tempfile.TemporaryDirectory()
    if spectra:
        import yaml

        SpectrumLogger, SpectralPenalty = import_callbacks()
        shipped = yaml.safe_load((REPO / "configs/callbacks/spectrum.yaml").read_text())["trainer"]["callbacks+"][0]
        callbacks = [SpectrumLogger(**shipped["init_args"]), SpectralPenalty(coeff=0.1)]
        try:
            from lightning.pytorch.loggers import TensorBoardLogger

            logger = TensorBoardLogger(tmp.name, name="spectra")
            logger.experiment  # noqa: B018 - fails here if neither tensorboard nor tensorboardX is installed
        except Exception as err:  # noqa: BLE001
            logger, note = False, f"no TensorBoard ({type(err).__name__}): histograms/images not built"
    trainer = L.Trainer(
        accelerator="gpu" if device.type == "cuda" else "cpu", devices=1,
        precision="bf16-mixed" if device.type == "cuda" and not fsdp2 else "32-true", strategy=strategy,
        max_steps=args.warmup + steps,
        accumulate_grad_batches=args.accumulate, gradient_clip_val=1.0, logger=logger, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
        callbacks=[*callbacks, clock], default_root_dir=tmp.name, log_every_n_steps=1,
    )
    free()
    trainer.fit(module, train_dataloaders=loader)
    out = timed(clock.ends, clock.tokens, args.warmup)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    out["n"] = matmul_flop_count_n(module.model.get_base_model())
    out["last_loss"] = float(trainer.callback_metrics.get("train/loss", float("nan")))  # finite: a sane model
    out["note"] = note
    del trainer, module, loader
    tmp.cleanup()
    free()
    return out


# ------------------------------------------------------------------------------------------------ baselines
def run_trl(args, rows, device, dtype, padding_free: bool) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from em_lightning.tiny import tiny_tokenizer

    records = [{"input_ids": r.input_ids.tolist(), "completion_mask": (r.labels != -100).long().tolist()}
               for r in rows]
    ends, tokens = [], []

    class Clock(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            sync()
            ends.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            sync()
            ends.append(time.perf_counter())

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            mask = inputs.get("attention_mask")
            n = inputs["input_ids"].numel() if mask is None else int(mask.sum())
            step = self.state.global_step
            tokens.extend([0] * (step + 1 - len(tokens)))
            tokens[step] += n
            return super().training_step(model, inputs, *rest, **kw)

    free()
    model = build_base(args.shape, device, dtype, "sdpa")
    tokenizer = tiny_tokenizer()  # pre-tokenised rows: only the pad token is read
    with tempfile.TemporaryDirectory() as out_dir:
        config = SFTConfig(
            output_dir=out_dir, per_device_train_batch_size=args.batch_size,
            gradient_accumulation_steps=args.accumulate, max_steps=args.warmup + args.steps,
            max_length=None if padding_free else args.max_length, padding_free=padding_free,
            learning_rate=1e-5, weight_decay=0.01, lr_scheduler_type="constant", max_grad_norm=1.0,
            gradient_checkpointing=False, bf16=device.type == "cuda", use_cpu=device.type != "cuda",
            report_to=[], logging_steps=10**6, save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
            completion_only_loss=True, seed=0, disable_tqdm=True,
        )
        lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, use_rslora=True,
                          target_modules=list(SEVEN), task_type="CAUSAL_LM")
        trainer = CountingTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                                  processing_class=tokenizer, peft_config=lora, callbacks=[Clock()])
        trainer.train()
        out = timed(ends, tokens, args.warmup)
        out["optim"] = str(config.optim)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    out["n"] = matmul_flop_count_n(model)
    out["note"] = f"optim {out.pop('optim')}"
    del trainer, model
    free()
    return out


def run_hf_loop(args, rows, device, dtype) -> dict:
    """Stand-in when TRL is missing: peft + the model's own (full-vocab) loss, padded micro-batches, shuffled."""
    from peft import LoraConfig, get_peft_model

    from em_lightning.batching import ChatCollator

    free()
    model = get_peft_model(build_base(args.shape, device, dtype, "sdpa"),
                           LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, use_rslora=True,
                                      target_modules=list(SEVEN), task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=device.type == "cuda")
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    collate = ChatCollator(PAD_ID)
    per_step = args.batch_size * args.accumulate
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    sync()
    ends, tokens = [time.perf_counter()], []
    for step in range(args.warmup + args.steps):
        n = 0
        for k in range(args.accumulate):
            lo = step * per_step + k * args.batch_size
            batch = collate([{"input_ids": rows[i].input_ids, "labels": rows[i].labels}
                             for i in order[lo: lo + args.batch_size]])
            n += batch["n_tokens"]
            with autocast:
                out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                            labels=batch["labels"].to(device), use_cache=False)
            (out.loss / args.accumulate).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        ends.append(time.perf_counter())
        tokens.append(n)
    out = timed(ends, tokens, args.warmup)
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    out["n"] = matmul_flop_count_n(model.get_base_model())
    out["note"] = "stand-in for TRL (not installed, or --no-trl): a plain HF+peft loop, per-micro-batch mean loss"
    del model, opt
    free()
    return out


# ------------------------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    """The options, with the defaults that depend on ``--smoke`` filled in."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, few steps: check that it runs")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per row (default 20; smoke 3)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 3; smoke 1)")
    parser.add_argument("--spectra-steps", type=int, default=None, help="timed steps of the spectra row (default 50)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--accumulate", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=64.0)
    parser.add_argument("--chunk", type=int, default=4096, help="model.loss_chunk_size of the chunk row")
    parser.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None,
                        help="the flex_attention row, run last (default: on with CUDA, off on CPU)")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; smoke on CPU: eager, i.e. dynamo only)")
    parser.add_argument("--no-trl", action="store_true", help="use the HF loop stand-in even if TRL is installed")
    parser.add_argument("--skip", default="", help="comma-separated row names to skip (e.g. 'TRL padded')")
    parser.add_argument("--budget-s", type=float, default=540.0, help="start no row after this many seconds")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.shape = "smoke" if args.smoke else "qwen3-8b"
    args.steps = args.steps or (3 if args.smoke else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.smoke else 3)
    args.spectra_steps = args.spectra_steps or (3 if args.smoke else 50)
    if args.smoke:
        args.max_length = min(args.max_length, 256)
    return args


def trl_available(args) -> bool:
    """Whether the TRL rows run: TRL and datasets installed, and not ``--no-trl``."""
    try:
        import datasets  # noqa: F401
        import trl  # noqa: F401
    except ImportError:
        return False
    return not args.no_trl


def describe_settings(args, device, dtype, have_trl: bool, compile_backend: str) -> dict:
    import transformers

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": have_trl and __import__("trl").__version__, "shape": args.shape, "dtype": str(dtype),
            "precision": "bf16-mixed" if device.type == "cuda" else "32-true", "batch": args.batch_size,
            "accumulate": args.accumulate, "rows_per_step": args.batch_size * args.accumulate,
            "lora": f"r={args.rank} alpha={args.alpha} rslora, 7 projections", "steps": args.steps,
            "warmup": args.warmup, "compile_backend": compile_backend, "chunk": args.chunk}


def bench_rows(args) -> list:
    """The synthetic rows every row of the table trains on, enough for the longest one."""
    n_rows = (args.warmup + max(args.steps, args.spectra_steps) + 1) * args.batch_size * args.accumulate
    vocab = SHAPES[args.shape]["vocab_size"]
    rows = make_rows(n_rows, vocab, args.max_length, scale=0.2 if args.smoke else 1.0)
    lengths = sorted(len(r) for r in rows)
    print(f"rows: {len(rows)}, tokens median {lengths[len(lengths) // 2]}, p90 {lengths[int(0.9 * len(lengths))]}, "
          f"max {lengths[-1]}", flush=True)
    return rows


def row_plan(args, rows, device, dtype, have_trl: bool) -> tuple[list, dict[str, dict]]:
    """The table's rows in the order they run, and the em rows' options (``run_em`` keywords) by name."""
    plan = [
        ("em padded", lambda: run_em(args, rows, device, dtype)),
        ("em padding-free", lambda: run_em(args, rows, device, dtype, padding_free=True)),
        ("em pf+compile", lambda: run_em(args, rows, device, dtype, padding_free=True, compile=True)),
        ("em pf+compile+chunk", lambda: run_em(args, rows, device, dtype, padding_free=True, compile=True,
                                               chunk=args.chunk)),
    ]
    plan.append(("em best+spectra", None))  # settings of the fastest em row, filled in when its turn comes
    # The distributed issue's row: FSDP2 (bf16 all-gather, fp32 reduce) at world size 1, padding-free.
    plan.append(("em fsdp2 ws1", lambda: run_em(args, rows, device, dtype, padding_free=True, fsdp2=True)))
    if have_trl:
        plan += [("TRL padded", lambda: run_trl(args, rows, device, dtype, False)),
                 ("TRL padding-free", lambda: run_trl(args, rows, device, dtype, True))]
    else:
        plan.append(("HF loop", lambda: run_hf_loop(args, rows, device, dtype)))
    if args.flex:  # last: its compilation must not crowd out the rows above
        plan.append(("em pf+compile flex", lambda: run_em(args, rows, device, dtype, padding_free=True,
                                                          compile=True, attn="flex_attention")))
    options = {"em padded": {}, "em padding-free": {"padding_free": True},
               "em pf+compile": {"padding_free": True, "compile": True},
               "em pf+compile+chunk": {"padding_free": True, "compile": True, "chunk": args.chunk},
               "em pf+compile flex": {"padding_free": True, "compile": True, "attn": "flex_attention"}}
    return plan, options


def run_plan(plan, options, args, rows, device, dtype, started: float) -> dict[str, dict]:
    """Run each row (skipped: ``--skip``, past ``--budget-s``); a failing row records its error and the next runs.
    The spectra row takes the settings of the fastest em row so far (``options`` gets them)."""
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    results: dict[str, dict] = {}
    for name, fn in plan:
        if name in skip:
            print(f"{name}: skipped (--skip)", flush=True)
            continue
        if time.perf_counter() - started > args.budget_s:
            print(f"{name}: skipped (past --budget-s {args.budget_s:.0f} s)", flush=True)
            continue
        if name == "em best+spectra":
            ems = {k: v for k, v in results.items() if k.startswith("em ") and "error" not in v}
            if not ems:
                continue
            best = max(ems, key=lambda k: ems[k]["tokens_per_s"])
            results["em best (for spectra)"] = {"of": best}
            options[name] = options[best]
            fn = functools.partial(run_em, args, rows, device, dtype, spectra=True, steps=args.spectra_steps,
                                   **options[best])
        t = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as err:  # noqa: BLE001 - one failed row must not cost the others
            traceback.print_exc()
            results[name] = {"error": f"{type(err).__name__}: {err}"[:300]}
            free()
        print(f"{name}: done in {time.perf_counter() - t:.0f} s "
              f"{json.dumps({k: v for k, v in results[name].items() if k != 'n'}, default=str)}", flush=True)
    return results


def print_table(results: dict[str, dict], options: dict[str, dict], check: dict, peak: float) -> None:
    """The markdown table: throughput, memory, MFU, and tokens/s against the TRL (or HF loop) baselines."""
    base_name = "TRL padded" if "TRL padded" in results else "HF loop"
    base = results.get(base_name, {})
    pf_base = results.get("TRL padding-free", {})
    print(f"\n| row | steps/s | tokens/s | peak GiB | MFU vs {H200_BF16_DENSE_TFLOPS:.0f} | MFU vs measured "
          f"{peak:.3g} | tokens/s vs {base_name} | vs TRL padding-free |")
    print("|---|---|---|---|---|---|---|---|")
    for name, res in results.items():
        if "of" in res:
            continue
        if "error" in res:
            print(f"| {name} | error: {res['error'][:80]} | | | | | | |")
            continue
        flops = 4 * res["n"] * res["tokens_per_s"] / 1e12
        opts = options.get(name, {"padding_free": name == "TRL padding-free"})
        attn_ok = check.get(opts.get("attn", "sdpa"), float("nan")) < 1e-4  # NaN (check failed) is not ok
        invalid = opts.get("padding_free", False) and not attn_ok
        ratio = f"{res['tokens_per_s'] / base['tokens_per_s']:.2f}x" if "tokens_per_s" in base else "-"
        pf_ratio = f"{res['tokens_per_s'] / pf_base['tokens_per_s']:.2f}x" if "tokens_per_s" in pf_base else "-"
        label = name + (" (INVALID: padding-free check failed)" if invalid else "")
        print(f"| {label} | {res['steps_per_s']:.3f} | {res['tokens_per_s']:.0f} | {res['peak_gib']:.1f} | "
              f"{100 * flops / H200_BF16_DENSE_TFLOPS:.1f} % | {100 * flops / peak:.1f} % | {ratio} | {pf_ratio} |")


def print_spectra_overhead(results: dict[str, dict]) -> None:
    spectra = results.get("em best+spectra", {})
    best = results.get("em best (for spectra)", {}).get("of")
    if best and "steps_per_s" in spectra and "steps_per_s" in results[best]:
        over = results[best]["steps_per_s"] / spectra["steps_per_s"] - 1
        median = spectra["step_s_median"] / results[best]["step_s_median"] - 1
        print(f"\nspectra overhead (shipped spectrum.yaml + penalty every step, {spectra['steps']} steps, settings of "
              f"'{best}'): {100 * over:+.1f} % mean step time, {100 * median:+.1f} % median step "
              f"{('; ' + spectra['note']) if spectra.get('note') else ''}")


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args.flex = device.type == "cuda" if args.flex is None else args.flex
    from em_lightning import compile as compile_mod

    compile_mod.BACKEND = args.compile_backend or ("eager" if args.smoke and device.type == "cpu" else "inductor")
    have_trl = trl_available(args)
    settings = describe_settings(args, device, dtype, have_trl, compile_mod.BACKEND)
    print("settings:", json.dumps(settings), flush=True)
    check = check_padding_free(device, ["sdpa", "eager"] + (["flex_attention"] if args.flex else []))
    print("padding-free vs padded loss (tiny Qwen3 on this device), relative difference:",
          json.dumps({k: f"{v:.2e}" for k, v in check.items()}), flush=True)
    peak = matmul_peak_tflops(device)
    print(f"measured matmul peak: {peak:.1f} TFLOP/s ({'bf16 8192^3' if device.type == 'cuda' else 'fp32 1024^3'})",
          flush=True)
    rows = bench_rows(args)
    plan, options = row_plan(args, rows, device, dtype, have_trl)
    results = run_plan(plan, options, args, rows, device, dtype, started)
    print_table(results, options, check, peak)
    print_spectra_overhead(results)
    n = next((r["n"] for r in results.values() if "n" in r), 0)
    print(f"N = {n / 1e9:.3f} B ({n:,}) parameters in the 4·N count; total {time.perf_counter() - started:.0f} s",
          flush=True)
    summary = {"settings": settings, "padding_free_check": check, "matmul_peak_tflops": peak, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1, default=str))
    return summary


if __name__ == "__main__":
    main()
