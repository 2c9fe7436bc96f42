"""Benchmark the LoRA spectrum code: (a) factored vs dense singular values, (b) training-step overhead on SmolLM2.

(a) ``lora_singular_values(B, A, s)`` (default ``method="gram"``: Cholesky of the r×r A·Aᵀ and eigenvalues of an r×r
    Gram matrix, float64; the ``qr`` column is ``method="qr"``, QR of Aᵀ and SVD of a d_out×r matrix) against
    ``svdvals(s * B @ A)`` (forming and decomposing the dense d_out×d_in update), float32 inputs, for 576×576 r=8
    (SmolLM2), 4096×4096 r=32 and 14336×4096 r=32 (8B-model MLP). Target: ≥ 100× at 4096 r=32.
(b) Mean wall time per optimizer step of the real Trainer + LoRAFineTune on SmolLM2-135M (all 7 projections, r=8,
    210 adapters) with SpectrumLogger(every_n_steps=1) + SpectralPenalty against no callbacks: same seed, data,
    batch, sequence length and precision; warm-up steps excluded; printed as a ratio. Target: ≤ 1.03.

    python scripts/bench_spectra.py                     # CPU, both parts
    python scripts/bench_spectra.py --device cuda       # GPU (bf16-mixed by default)
    python scripts/bench_spectra.py --skip-training     # part (a) only

Without the converted SmolLM2 weights (a GPU box with no internet), ``--random-init`` builds the same architecture
with random weights from SmolLM2's config; step times do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # without it small CPU ops slow down 15-60x under contention
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from em_lightning.spectra import (  # noqa: E402
    find_lora_layers,
    lora_singular_values,
    lora_spectra,
    spectral_penalty,
)

SHAPES = [(576, 576, 8), (4096, 4096, 32), (14336, 4096, 32)]

# SmolLM2-135M-Instruct's architecture (config.json of the converted model), for --random-init.
SMOLLM2_CONFIG = dict(
    hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
    rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2,
)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time(fn, device: str, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------ (a) factored vs dense
def bench_factored_vs_dense(device: str, repeats: int, dense_repeats: int) -> None:
    print(f"\n(a) singular values of s·B·A, float32 inputs, device={device}, threads={torch.get_num_threads()}, "
          f"median of {repeats} (factored) / {dense_repeats} (dense) timed calls after one warm-up each")
    print("    factored = lora_singular_values (default method='gram'); qr = method='qr'; dense = svdvals(s * B @ A); "
          "rel err = max |σ - σ_dense| / σ₁")
    print(f"{'d_out x d_in, r':>22} {'factored ms':>12} {'qr ms':>9} {'dense ms':>12} {'speed-up':>9} "
          f"{'rel err':>9} {'qr rel err':>10}")
    g = torch.Generator().manual_seed(0)
    for d_out, d_in, r in SHAPES:
        B = torch.randn(d_out, r, generator=g).to(device)
        A = (torch.randn(r, d_in, generator=g) / d_in**0.5).to(device)
        scale = 16 / r
        dense = torch.linalg.svdvals(scale * B @ A)[:r]
        err = {m: ((lora_singular_values(B, A, scale, m) - dense).abs().max() / dense[0]).item() for m in ("gram", "qr")}
        t_fact = _time(lambda: lora_singular_values(B, A, scale), device, repeats)
        t_qr = _time(lambda: lora_singular_values(B, A, scale, "qr"), device, repeats)
        t_dense = _time(lambda: torch.linalg.svdvals(scale * B @ A), device, dense_repeats, warmup=0)
        print(f"{f'{d_out}x{d_in}, r={r}':>22} {t_fact * 1e3:12.3f} {t_qr * 1e3:9.3f} {t_dense * 1e3:12.1f} "
              f"{t_dense / t_fact:8.0f}x {err['gram']:9.1e} {err['qr']:10.1e}")


# ------------------------------------------------------------------------------------ (b) training-step overhead
def _module(args):
    from em_lightning.lora import LoRASpec, apply_lora
    from em_lightning.models import ModelSpec
    from em_lightning.module import LoRAFineTune

    class RandomInitSmolLM2(LoRAFineTune):
        """SmolLM2's architecture with random weights (no converted weights needed)."""

        def configure_model(self):
            if self.model is None:
                from transformers import AutoModelForCausalLM, LlamaConfig

                config = LlamaConfig(**SMOLLM2_CONFIG, attn_implementation="sdpa")
                self.model = apply_lora(AutoModelForCausalLM.from_config(config, dtype=torch.float32), self.lora)

    cls = RandomInitSmolLM2 if args.random_init else LoRAFineTune
    return cls(
        base=ModelSpec(name=args.model),
        lora=LoRASpec(r=args.rank, alpha=2.0 * args.rank),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0),
    )


def _rows(args, vocab: int):
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for _ in range(args.batch_size * (args.warmup_steps + args.steps + 1)):
        ids = torch.randint(0, vocab, (args.seq_len,), generator=g)
        labels = ids.clone()
        labels[: args.seq_len // 2] = -100  # prompt half unsupervised, like a chat row
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return rows


def _step_timer(device: str, skip: int):
    import lightning as L

    class StepTimer(L.Callback):
        """Wall time between consecutive batch starts (so every hook of a step is inside), after ``skip`` steps."""

        def __init__(self):
            self.times, self._t0 = [], None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            _sync(device)
            now = time.perf_counter()
            if self._t0 is not None and batch_idx > skip:
                self.times.append(now - self._t0)
            self._t0 = now

    return StepTimer()


def _fit(args, variant: str, rows) -> list[float]:
    import lightning as L
    from lightning.pytorch.loggers import TensorBoardLogger
    from torch.utils.data import DataLoader

    from callbacks.spectral_penalty import SpectralPenalty
    from callbacks.spectrum_logger import SpectrumLogger

    L.seed_everything(args.seed, verbose=False)
    timer = _step_timer(args.device, args.warmup_steps)
    callbacks = [timer]
    parts = set(variant.split("+"))
    if "logger" in parts:
        callbacks.append(SpectrumLogger(every_n_steps=1))
    if "logger_lean" in parts:
        callbacks.append(SpectrumLogger(every_n_steps=1, per_module_every_n_steps=50))
    if "penalty" in parts:
        callbacks.append(SpectralPenalty(coeff=0.1))
    if not parts <= {"none", "logger", "logger_lean", "penalty"}:
        raise SystemExit(f"unknown run {variant!r} in --order")
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="gpu" if args.device.startswith("cuda") else "cpu", devices=1, precision=args.precision,
            max_steps=args.warmup_steps + args.steps + 1, logger=TensorBoardLogger(tmp, name="bench"),
            callbacks=callbacks, log_every_n_steps=1, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, num_sanity_val_steps=0,
        )
        module = _module(args)
        trainer.fit(module, train_dataloaders=DataLoader(rows, batch_size=args.batch_size, shuffle=False))
        if variant == "none":  # the cost of the pieces alone, on the trained adapter (B ≠ 0)
            _components(args, module)
    return timer.times


def _components(args, module) -> None:
    """The spectrum pieces alone on the trained adapter, as the callbacks run them (layers found once)."""
    model = module.model
    layers = find_lora_layers(model)
    t_walk = _time(lambda: find_lora_layers(model), args.device, 5)
    t_s = _time(lambda: lora_spectra(model, layers), args.device, 5)
    t_p = _time(lambda: spectral_penalty(model, layers=layers).backward(), args.device, 5)
    model.zero_grad(set_to_none=True)
    print(f"    components on {len(layers)} adapters: finding them {t_walk * 1e3:.1f} ms (once per fit); all σ "
          f"(no grad) {t_s * 1e3:.1f} ms; penalty forward+backward {t_p * 1e3:.1f} ms")


def bench_training(args) -> None:
    print(f"\n(b) training-step overhead: model={args.model}{' (random init)' if args.random_init else ''}, "
          f"LoRA r={args.rank} on all 7 projections, batch={args.batch_size}, seq_len={args.seq_len}, "
          f"precision={args.precision}, device={args.device}, seed={args.seed}, AdamW; "
          f"{args.warmup_steps} warm-up + {args.steps} timed steps per run, order {' → '.join(args.order)}")
    print("    logger: SpectrumLogger(every_n_steps=1): all scalars + histograms incl. 210 per-module ones, plot every 100 "
          "steps, spectra.jsonl, every step;\n    logger_lean: the same but per-module scalars/histograms every 50 "
          "steps (aggregates, jsonl every step);\n    penalty: SpectralPenalty(frob_nuclear_ratio, coeff=0.1) every "
          "step")
    rows = _rows(args, vocab=SMOLLM2_CONFIG["vocab_size"])
    results: dict[str, list[float]] = {}
    for variant in args.order:
        times = _fit(args, variant, rows)
        results.setdefault(variant, []).extend(times)
        print(f"    {variant:>15}: mean {statistics.mean(times) * 1e3:8.1f} ms/step, "
              f"median {statistics.median(times) * 1e3:8.1f} ms/step over {len(times)} steps")
    base = statistics.mean(results["none"])
    for variant, times in results.items():
        if variant != "none":
            ratio = statistics.mean(times) / base
            print(f"    ratio {variant} / none (mean step time): {ratio:.3f}  (overhead {100 * (ratio - 1):+.1f} %)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of the factored SVD per shape")
    p.add_argument("--dense-repeats", type=int, default=None, help="timed dense SVDs per shape (cpu 1, cuda 3)")
    p.add_argument("--skip-training", action="store_true", help="only part (a)")
    p.add_argument("--skip-svd", action="store_true", help="only part (b)")
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--random-init", action="store_true", help="SmolLM2 architecture with random weights")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=None, help="cpu 2, cuda 16")
    p.add_argument("--seq-len", type=int, default=None, help="cpu 128, cuda 512")
    p.add_argument("--precision", default=None, help="cpu 32-true, cuda bf16-mixed")
    p.add_argument("--warmup-steps", type=int, default=3)
    p.add_argument("--steps", type=int, default=None, help="timed steps per run (cpu 8, cuda 40)")
    p.add_argument("--order", default="none,logger+penalty,logger_lean+penalty,none",
                   help="comma-separated runs, each none or a +-joined set of logger, logger_lean, penalty; a "
                        "repeated name adds to its steps (interleave to average out drift)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    args.dense_repeats = args.dense_repeats or (3 if cuda else 1)
    args.batch_size = args.batch_size or (16 if cuda else 2)
    args.seq_len = args.seq_len or (512 if cuda else 128)
    args.precision = args.precision or ("bf16-mixed" if cuda else "32-true")
    args.steps = args.steps or (40 if cuda else 8)
    args.order = [v.strip() for v in args.order.split(",") if v.strip()]
    if "none" not in args.order:
        p.error("--order must include 'none' (the baseline)")
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if cuda else 'cpu'}")
    if not args.skip_svd:
        bench_factored_vs_dense(args.device, args.repeats, args.dense_repeats)
    if not args.skip_training:
        bench_training(args)


if __name__ == "__main__":
    main()
