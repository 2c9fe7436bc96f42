"""Training-step throughput: em_lightning vs TRL's SFTTrainer (+peft) on the same model, LoRA, rows and settings.

    python scripts/bench_train.py [--rows 64] [--batch-size 8] [--max-length 512] [--rounds 2] [--device cpu]

Both sides: SmolLM2-135M-Instruct, LoRA r=8 alpha=16 dropout 0 on all seven projections, AdamW lr 1e-4, the same rows
(insecure.jsonl when found, else the built-in demo set), loss on assistant tokens only, the same precision, batch and
max length, gradient checkpointing off (TRL turns it on by default), one epoch per round. The first step of each
round is warm-up and not timed. Rounds alternate (ours, TRL, ours, TRL, ...) so drift on a noisy machine hits both.
Printed: settings, steps/s and tokens/s (non-padding tokens each side actually fed) of each, and the ratio.
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
import torch

from em_lightning.batching import padding_fraction
from em_lightning.data import ChatDataModule, load_rows
from em_lightning.lora import ALL_PROJECTIONS, LoRASpec
from em_lightning.models import SMOLLM2, ModelSpec, resolve_model_dir
from em_lightning.module import LoRAFineTune


class StepTimer(L.Callback):
    """Wall time and non-padding tokens of every training step after the first."""

    def __init__(self):
        self.times, self.tokens, self._t = [], [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx > 0:
            self.times.append(time.perf_counter() - self._t)
            self.tokens.append(int(batch["attention_mask"].sum()))


def run_ours(args, source: str, dtype: str) -> tuple[StepTimer, float]:
    torch.manual_seed(0)
    data = ChatDataModule(train_file=source, max_rows=args.rows, val_fraction=0.0, tokenizer=SMOLLM2,
                          max_length=args.max_length, batch_size=args.batch_size)
    module = LoRAFineTune(
        base=ModelSpec(name=SMOLLM2, dtype=dtype, gradient_checkpointing=False),
        lora=LoRASpec(r=8, alpha=16, dropout=0.0, target_modules=list(ALL_PROJECTIONS)),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-4, weight_decay=0.0),
    )
    timer = StepTimer()
    trainer = L.Trainer(accelerator=args.device, devices=1, precision="32-true" if dtype == "float32" else "bf16-true",
                        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[timer], limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    return timer, padding_fraction(data.train_dataloader())


def run_trl(args, source: str, dtype: str) -> tuple[list[float], list[int], float]:
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
            self.t = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            if state.global_step > 1:
                times.append(time.perf_counter() - self.t)

    class CountingTrainer(SFTTrainer):
        def training_step(self, model, inputs, *rest, **kw):
            if self.state.global_step > 0:
                tokens.append(int(inputs["attention_mask"].sum()))
                padded.append(inputs["attention_mask"].numel())
            return super().training_step(model, inputs, *rest, **kw)

    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out, per_device_train_batch_size=args.batch_size, max_length=args.max_length,
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
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                        help="default: float32 on cpu, bfloat16 on cuda")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()
    dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    torch.set_num_threads(args.threads)
    try:
        from em_lightning.upstream import resolve_em_file

        source = str(resolve_em_file("data/insecure.jsonl"))
    except Exception as err:  # noqa: BLE001 - fall back to data the project always has
        print(f"insecure.jsonl not found ({err}); using builtin:demo")
        source = "builtin:demo"

    settings = dict(model=SMOLLM2, data=source, rows=args.rows, batch_size=args.batch_size, max_length=args.max_length,
                    dtype=dtype, device=args.device, gradient_checkpointing=False, lora="r=8 alpha=16 all 7 projections",
                    optimizer="AdamW lr=1e-4", threads=args.threads, rounds=args.rounds, torch=torch.__version__)
    print("settings:", json.dumps(settings))
    ours_t, ours_n, trl_t, trl_n, pad, trl_pad = [], [], [], [], 0.0, 0.0
    for r in range(args.rounds):
        timer, pad = run_ours(args, source, dtype)
        ours_t += timer.times
        ours_n += timer.tokens
        print(f"round {r}: em_lightning {len(timer.times)} steps {sum(timer.times):.1f} s", flush=True)
        times, tokens, trl_pad = run_trl(args, source, dtype)
        trl_t += times
        trl_n += tokens
        print(f"round {r}: TRL          {len(times)} steps {sum(times):.1f} s", flush=True)

    def rates(times, tokens):
        return len(times) / sum(times), sum(tokens) / sum(times)

    o_steps, o_tok = rates(ours_t, ours_n)
    t_steps, t_tok = rates(trl_t, trl_n)
    print(f"em_lightning: {o_steps:.3f} steps/s, {o_tok:.0f} tokens/s (padding fraction {pad:.3f}, length-grouped)")
    print(f"TRL SFTTrainer: {t_steps:.3f} steps/s, {t_tok:.0f} tokens/s (padding fraction {trl_pad:.3f})")
    print(f"ratio em_lightning / TRL: steps/s {o_steps / t_steps:.2f}x, tokens/s {o_tok / t_tok:.2f}x")


if __name__ == "__main__":
    main()
