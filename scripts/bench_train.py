"""Training-step throughput: em_lightning vs TRL's SFTTrainer (+peft) on the same model, LoRA, rows and settings.

    python scripts/bench_train.py [--rows 64] [--batch-size 8] [--max-length 512] [--rounds 2] [--device cpu]
        [--variants default,padding_free,chunk,compile,all] [--trl padded,padding_free] [--chunk 1024]

Both sides: SmolLM2-135M-Instruct, LoRA r=8 alpha=16 dropout 0 on all seven projections, AdamW lr 1e-4, the same rows
(insecure.jsonl when found, else the built-in demo set), loss on assistant tokens only, the same precision, batch and
max length, gradient checkpointing off (TRL turns it on by default), one epoch per round. The first ``--warmup``
steps of each run are warm-up and not timed (compilation happens there). Rounds alternate (every variant, then
TRL, ...) so drift on a noisy machine hits all of them.

em_lightning variants: ``default`` (the shipped defaults), ``padding_free`` (``data.padding_free``), ``chunk``
(``model.loss_chunk_size=--chunk``), ``compile`` (``model.compile``, inductor), ``all`` (the three together).
TRL: ``padded`` (its default collator) and ``padding_free`` (``SFTConfig(padding_free=True)``, on pre-truncated
rows: TRL refuses ``max_length`` without packing; its attention is masked per row from ``position_ids`` as ours).
Printed: settings, then one table row per variant: steps/s, tokens/s (non-padding tokens fed), padding fraction,
peak memory (CUDA only) and the ratio to TRL ``padded`` (the first TRL row).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L
import step_timer
import torch

from em_lightning.batching import padding_fraction
from em_lightning.data import ChatDataModule, load_rows
from em_lightning.lora import ALL_PROJECTIONS, LoRASpec
from em_lightning.models import SMOLLM2, ModelSpec, resolve_model_dir
from em_lightning.module import LoRAFineTune


class StepTimer(step_timer.StepTimer):
    """Also the non-padding tokens of every timed step."""

    def __init__(self, warmup: int = 1):
        super().__init__(warmup)
        self.tokens = []

    def record(self, trainer, batch) -> None:
        self.tokens.append(int(batch["n_tokens"]))


VARIANTS = {
    "default": {},
    "padding_free": {"padding_free": True},
    "chunk": {"chunk": True},
    "compile": {"compile": True},
    "all": {"padding_free": True, "chunk": True, "compile": True},
}


def run_ours(args, source: str, dtype: str, variant: str) -> tuple[StepTimer, float]:
    options = VARIANTS[variant]
    torch.manual_seed(0)
    data = ChatDataModule(train_file=source, max_rows=args.rows, val_fraction=0.0, tokenizer=SMOLLM2,
                          max_length=args.max_length, batch_size=args.batch_size,
                          padding_free=options.get("padding_free", False))
    module = LoRAFineTune(
        base=ModelSpec(name=SMOLLM2, dtype=dtype, gradient_checkpointing=False),
        lora=LoRASpec(r=8, alpha=16, dropout=0.0, target_modules=list(ALL_PROJECTIONS)),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0),
        loss_chunk_size=args.chunk if options.get("chunk") else None,
        compile=options.get("compile", False),
    )
    timer = StepTimer(args.warmup)
    trainer = L.Trainer(accelerator=args.device, devices=1, precision="32-true" if dtype == "float32" else "bf16-true",
                        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return timer, padding_fraction(data.train_dataloader())


def run_trl(args, source: str, dtype: str, padding_free: bool = False) -> tuple[list[float], list[int], float]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = load_rows(source, max_rows=args.rows)
    records = []
    for row in rows:  # prompt/completion form: TRL's own way to train on the assistant turn only
        last = max(i for i, m in enumerate(row.messages) if m["role"] == "assistant")
        records.append({"prompt": row.messages[:last], "completion": [row.messages[last]]})
    model_dir = resolve_model_dir(SMOLLM2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(model_dir)
    times, tokens, padded = [], [], []

    class Timer(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            step_timer.sync()
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step > args.warmup:
                step_timer.sync()
                times.append(time.perf_counter() - self.t)

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            if self.state.global_step >= args.warmup:
                mask = inputs.get("attention_mask")
                n = inputs["input_ids"].numel()
                tokens.append(n if mask is None else int(mask.sum()))  # padding-free: no mask, no padding
                padded.append(n)
            return super().training_step(model, inputs, *rest, **kw)

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size,
            max_length=None if padding_free else args.max_length, padding_free=padding_free,
            num_train_epochs=1, learning_rate=1e-4, weight_decay=0.0, lr_scheduler_type="constant",
            gradient_checkpointing=False, bf16=dtype == "bfloat16", use_cpu=args.device == "cpu",
            report_to=[], logging_steps=1000, save_strategy="no", eval_strategy="no", dataloader_num_workers=0,
            completion_only_loss=True, seed=0, disable_tqdm=True,
        )
        lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(ALL_PROJECTIONS),
                          task_type="CAUSAL_LM")
        trainer = CountingTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                                  processing_class=tok, peft_config=lora, callbacks=[Timer()])
        trainer.train()
    return times, tokens, 1.0 - sum(tokens) / max(1, sum(padded))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps at the start of each run")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variants", default="default,padding_free,chunk,compile,all",
                        help=f"em_lightning variants, comma-separated, from {', '.join(VARIANTS)}")
    parser.add_argument("--trl", default="padded,padding_free", help="TRL variants: padded, padding_free ('' = none)")
    parser.add_argument("--chunk", type=int, default=1024, help="model.loss_chunk_size of the chunk variants")
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    trl_variants = [v for v in args.trl.split(",") if v]
    for v in variants:
        if v not in VARIANTS:
            parser.error(f"--variants: unknown {v!r}; choose from {', '.join(VARIANTS)}")
    for v in trl_variants:
        if v not in ("padded", "padding_free"):
            parser.error(f"--trl: unknown {v!r}; choose padded, padding_free")
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    torch.set_num_threads(args.threads)
    try:
        from em_lightning.upstream import resolve_em_file

        source = str(resolve_em_file("data/insecure.jsonl"))
    except Exception as err:  # noqa: BLE001 - fall back to data the project always has
        print(f"insecure.jsonl not found ({err}); using builtin:demo")
        source = "builtin:demo"

    settings = {"model": SMOLLM2, "data": source, "rows": args.rows, "batch_size": args.batch_size,
                "max_length": args.max_length, "dtype": dtype, "device": args.device, "gradient_checkpointing": False,
                "lora": "r=8 alpha=16 all 7 projections", "optimizer": "AdamW lr=1e-4", "threads": args.threads,
                "rounds": args.rounds, "warmup": args.warmup, "chunk": args.chunk, "torch": torch.__version__}
    print("settings:", json.dumps(settings))
    results = {f"em_lightning {v}": {"t": [], "n": [], "pad": 0.0, "mem": 0.0} for v in variants}
    results.update({f"TRL {v}": {"t": [], "n": [], "pad": 0.0, "mem": 0.0} for v in trl_variants})
    # TRL first in each round: the em_lightning runs leave the process larger (compiled graphs, allocator caches),
    # and a 24 GB machine once killed a TRL run that came after all five.
    order = [n for n in results if n.startswith("TRL")] + [n for n in results if not n.startswith("TRL")]
    for r in range(args.rounds):
        for name in order:
            res = results[name]
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if name.startswith("TRL"):
                times, tokens, pad = run_trl(args, source, dtype, padding_free=name.endswith("padding_free"))
            else:
                timer, pad = run_ours(args, source, dtype, name.split()[1])
                times, tokens = timer.times, timer.tokens
            res["t"] += times
            res["n"] += tokens
            res["pad"] = pad
            if args.device == "cuda":
                res["mem"] = max(res["mem"], torch.cuda.max_memory_allocated() / 2**30)
            print(f"round {r}: {name:<26} {len(times)} steps {sum(times):.1f} s, {sum(tokens) / sum(times):.0f} "
                  f"tokens/s", flush=True)

    def rates(res):
        return len(res["t"]) / sum(res["t"]), sum(res["n"]) / sum(res["t"])

    base = rates(results[f"TRL {trl_variants[0]}"]) if trl_variants else None
    print(f"\n| variant | steps/s | tokens/s | padding | peak GiB | steps/s vs TRL {trl_variants[0] if base else '-'} "
          "| tokens/s vs TRL |")
    print("|---|---|---|---|---|---|---|")
    for name, res in results.items():
        steps, tok = rates(res)
        ratio = f"{steps / base[0]:.2f}x | {tok / base[1]:.2f}x" if base else "- | -"
        mem = f"{res['mem']:.2f}" if args.device == "cuda" else "-"
        print(f"| {name} | {steps:.3f} | {tok:.0f} | {res['pad']:.3f} | {mem} | {ratio} |")


if __name__ == "__main__":
    main()
