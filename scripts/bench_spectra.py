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
    python scripts/bench_spectra.py --subspace-only     # part (c) only

(c) The extra time per log of ``SpectrumLogger(subspace=True)`` (principal angles of the top-4 singular
    subspaces against the previous log, all 210 SmolLM2-shaped adapters, r=8, random B and A) over the same
    logger without it:
    ``log_spectra`` timed end to end (computation, TensorBoard scalars, the JSONL line), with and without
    per-module scalars, and the maths alone (bases, cosines, one host copy).

Without the converted SmolLM2 weights (a GPU box with no internet), ``--random-init`` builds the same architecture
with random weights from SmolLM2's config; step times do not depend on the weights' values.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # without it small CPU ops slow down 15-60x under contention

import torch

from em_lightning.lora import find_lora_layers, iter_lora_modules
from em_lightning.spectra import grouped_singular_values, lora_singular_values, mean_penalty

SHAPES = [(576, 576, 8), (4096, 4096, 32), (14336, 4096, 32)]

# SmolLM2-135M-Instruct's architecture (config.json of the converted model), for --random-init.
SMOLLM2_CONFIG = {
    "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "head_dim": 64, "vocab_size": 49152, "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5, "tie_word_embeddings": True, "rope_theta": 100000.0, "bos_token_id": 1,
    "eos_token_id": 2, "pad_token_id": 2,
}


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
        # B, A, scale bound as defaults: the lambdas must time this shape's tensors (ruff B023)
        t_fact = _time(lambda B=B, A=A, s=scale: lora_singular_values(B, A, s), device, repeats)
        t_qr = _time(lambda B=B, A=A, s=scale: lora_singular_values(B, A, s, "qr"), device, repeats)
        t_dense = _time(lambda B=B, A=A, s=scale: torch.linalg.svdvals(s * B @ A), device, dense_repeats,
                        warmup=0)
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
        # The plain DataLoader's batches lack ChatDataModule's step token count (every row supervises the same
        # number of tokens, so the per-micro-batch mean is the step's mean anyway).
        loss_normalization="micro_batch",
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

    from em_lightning.callbacks.spectral_penalty import SpectralPenalty
    from em_lightning.callbacks.spectrum_logger import SpectrumLogger

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

    def factors():
        return [(B, A, s) for *_, B, A, s in iter_lora_modules(model, layers)]

    def spectra():  # SpectrumLogger's computation, without the writing
        with torch.no_grad():
            return grouped_singular_values([(B.detach(), A.detach(), s) for B, A, s in factors()])

    t_walk = _time(lambda: find_lora_layers(model), args.device, 5)
    t_s = _time(spectra, args.device, 5)
    t_p = _time(lambda: mean_penalty(factors()).backward(), args.device, 5)  # SpectralPenalty's raw term
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


# -------------------------------------------------------------------------------- (c) subspace dynamics cost
def bench_subspace(args) -> None:
    from types import SimpleNamespace

    from lightning.pytorch.loggers import TensorBoardLogger
    from transformers import AutoModelForCausalLM, LlamaConfig

    from em_lightning.callbacks.spectrum_logger import SpectrumLogger
    from em_lightning.lora import LoRASpec, apply_lora

    config = LlamaConfig(**SMOLLM2_CONFIG)
    model = apply_lora(AutoModelForCausalLM.from_config(config, dtype=torch.float32), LoRASpec(r=args.rank))
    model.to(args.device)
    g = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        for *_, B, _, _ in iter_lora_modules(model):
            B.copy_(torch.randn(B.shape, generator=g) * 1e-3)
    layers = find_lora_layers(model)
    print(f"\n(c) subspace dynamics: {len(layers)} adapters (SmolLM2 shapes), r={args.rank}, k=4, "
          f"device={args.device}, {args.repeats} logs after 2 warm-up ones; log_spectra end to end (no "
          "image, no histograms)")
    writers = []
    with tempfile.TemporaryDirectory() as tmp:
        for per_module in (False, True):
            calls = {}
            for subspace in (False, True):
                logger = SpectrumLogger(every_n_steps=1, log_per_module=per_module, log_histograms=False,
                                        log_image=False, subspace=subspace)
                tb = TensorBoardLogger(tmp, name=f"c{per_module}{subspace}")
                trainer = SimpleNamespace(global_step=0, current_epoch=0, is_global_zero=True, loggers=[tb],
                                          log_dir=tb.log_dir, default_root_dir=tmp)
                logger.setup(trainer, model, "fit")  # where its spectra.jsonl goes, as a Trainer would

                def log(logger=logger, trainer=trainer):
                    trainer.global_step += 1
                    logger.log_spectra(trainer, model)

                calls[subspace] = log
                writers.append(tb)
            # interleaved (off, on) pairs, so load from other processes hits both alike
            off, on = [], []
            for i in range(args.repeats + 2):
                times = [_time(calls[subspace], args.device, 1, warmup=0) for subspace in (False, True)]
                if i >= 2:
                    off.append(times[0])
                    on.append(times[1])
            extra = [b - a for a, b in zip(off, on)]
            label = "with" if per_module else "without"
            print(f"    {label} per-module scalars: off {statistics.median(off) * 1e3:.1f} ms, on "
                  f"{statistics.median(on) * 1e3:.1f} ms (medians); extra per log: median "
                  f"{statistics.median(extra) * 1e3:.1f} ms, min-to-min {(min(on) - min(off)) * 1e3:.1f} ms")
        for tb in writers:
            tb.experiment.close()  # before the temporary dir goes

    from em_lightning.spectra import grouped_singular_subspaces, principal_cosines

    def maths(prev=[None]):  # noqa: B006 (the previous log's bases, as the logger keeps them)
        with torch.no_grad():
            groups = grouped_singular_subspaces([(B.detach(), A.detach(), s) for *_, B, A, s in
                                                 iter_lora_modules(model, layers)], 4)
        if prev[0] is not None:
            cos = [principal_cosines(p.left, c.left).flatten() for (_, p), (_, c) in zip(prev[0], groups)]
            cos += [principal_cosines(p.right, c.right).flatten() for (_, p), (_, c) in zip(prev[0], groups)]
            torch.cat(cos).cpu()
        prev[0] = groups

    def spectra():  # the logger's σ, for scale
        with torch.no_grad():
            return grouped_singular_values([(B.detach(), A.detach(), s) for *_, B, A, s in
                                            iter_lora_modules(model, layers)])

    t_maths, t_sigma = [], []
    for _ in range(args.repeats):  # interleaved, as above
        t_maths.append(_time(maths, args.device, 1, warmup=0))
        t_sigma.append(_time(spectra, args.device, 1, warmup=0))
    print(f"    the maths alone (bases of all adapters, cosines against the previous ones, one host copy): "
          f"median {statistics.median(t_maths) * 1e3:.1f} ms; all σ, as the logger computes them anyway: "
          f"{statistics.median(t_sigma) * 1e3:.1f} ms")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--repeats", type=int, default=20, help="timed calls of the factored SVD per shape")
    p.add_argument("--dense-repeats", type=int, default=None, help="timed dense SVDs per shape (cpu 1, cuda 3)")
    p.add_argument("--skip-training", action="store_true", help="only part (a)")
    p.add_argument("--skip-svd", action="store_true", help="only part (b)")
    p.add_argument("--subspace-only", action="store_true", help="only part (c)")
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
    if args.subspace_only:
        bench_subspace(args)
        return
    if not args.skip_svd:
        bench_factored_vs_dense(args.device, args.repeats, args.dense_repeats)
    if not args.skip_training:
        bench_training(args)


if __name__ == "__main__":
    main()
