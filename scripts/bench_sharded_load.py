"""Peak host memory of loading a big model: one process (from_pretrained) against each rank of a 2-process FSDP2
load on the meta device (em_lightning.sharding.load_sharded_lora_model), on CPU.

    python scripts/bench_sharded_load.py [--model-dir DIR] [--hidden 1280 --layers 26]

A random Qwen3-architecture model (about 530 M parameters at the defaults, fp32: 2.1 GB) is saved to disk first.
Each measurement runs in a fresh process: the figure is the process's peak resident memory (VmHWM) minus its
resident memory after the imports (VmRSS), so the libraries' own footprint cancels; every weight the process holds
is read once after loading (a memory-mapped load is otherwise not resident yet). Printed: both figures and the
ratio largest rank / one process (target <= 0.6; a rank-0-loads-then-broadcasts scheme would be >= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def rss_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_model(model_dir: Path, hidden: int, layers: int) -> int:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from em_lightning.tiny import tiny_tokenizer

    config = Qwen3Config(vocab_size=32000, hidden_size=hidden, intermediate_size=int(hidden * 2.7),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=4,
                         head_dim=64, tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    n = sum(p.numel() for p in model.parameters())
    model.save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    return n


def child(mode: str, model_dir: str) -> None:
    import torch
    import transformers  # noqa: F401

    from em_lightning.lora import LoRASpec, apply_lora
    from em_lightning.models import ModelSpec, load_model
    from em_lightning.sharding import FSDPSpec, load_sharded_lora_model

    base = rss_mb("VmRSS")
    spec, lora = ModelSpec(name=model_dir, dtype="float32"), LoRASpec(r=8, alpha=16.0)
    if mode == "single":
        model = apply_lora(load_model(spec), lora)
    else:
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        dist.init_process_group("gloo")
        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("data_parallel",))
        model = load_sharded_lora_model(spec, lora, mesh, FSDPSpec(param_dtype=None, reduce_dtype=None),
                                        torch.device("cpu"), seed=0, precision="32-true")
        dist.barrier()
    # Touch every weight this process holds: from_pretrained may map the file without reading it, and a model that
    # trains reads all of it; the peak then counts what holding the model really costs.
    locals_ = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters()]
    checksum = float(sum(t.detach().double().sum() for t in locals_))
    held = sum(t.numel() for t in locals_)
    print(json.dumps({"mode": mode, "rank": int(os.environ.get("RANK", "0")), "peak_mb": rss_mb("VmHWM") - base,
                      "params_held": held, "checksum": checksum}), flush=True)


def run(mode: str, model_dir: Path, world: int = 1) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if world > 1:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world))
    procs = [subprocess.Popen([sys.executable, __file__, "--child", mode, "--model-dir", str(model_dir)],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, text=True)
             for r in range(world)]
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=1800)
        if p.returncode:
            raise SystemExit(f"{mode} load failed (exit {p.returncode})")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path)
    parser.add_argument("--hidden", type=int, default=1280)
    parser.add_argument("--layers", type=int, default=26)
    parser.add_argument("--child", choices=["single", "sharded"])
    args = parser.parse_args()
    if args.child:
        return child(args.child, str(args.model_dir))
    model_dir = args.model_dir or Path(tempfile.mkdtemp(prefix="em-bench-load-")) / "model"
    if not (model_dir / "config.json").exists():
        n = make_model(model_dir, args.hidden, args.layers)
        print(f"saved a random Qwen3 model: {n / 1e6:.0f} M parameters, fp32, in {model_dir}")
    (single,) = run("single", model_dir)
    ranks = run("sharded", model_dir, world=2)
    print(f"settings: fp32, LoRA r=8 on all 7 projections, CPU, gloo, {os.cpu_count()} cores; peak RSS above "
          "the RSS after imports")
    print(f"one process (from_pretrained):         {single['peak_mb']:8.0f} MB   ({single['params_held'] / 1e6:.0f} M "
          "params held)")
    for r in ranks:
        print(f"FSDP2 rank {r['rank']} of 2 (meta + own rows):  {r['peak_mb']:8.0f} MB   "
              f"({r['params_held'] / 1e6:.0f} M params held)")
    worst = max(r["peak_mb"] for r in ranks)
    print(f"ratio largest rank / one process: {worst / single['peak_mb']:.2f}  (target <= 0.60)")


if __name__ == "__main__":
    main()
