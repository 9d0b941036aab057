"""Write a random-weight Llama checkpoint folder (fp32, sharded safetensors) for offload benchmarks.

    .venv/bin/python benchmarks/make_random_llama.py --preset 1.1b --out /tmp/llama-1.1b-random --seed 0
    .venv/bin/python benchmarks/make_random_llama.py --preset tiny --out /tmp/llama-tiny --check

It measures nothing itself: it produces the model that ``benchmarks/offload_baselines.py`` and tiermem's layer
streaming run on, so that all of them read the same bytes. The folder looks like what ``save_pretrained`` writes:
``config.json``, ``generation_config.json``, ``model-0000i-of-0000n.safetensors`` shards, and
``model.safetensors.index.json`` with a ``weight_map``, plus the tokenizer of the bundled SmolLM2 model (vocab 49152),
so ``AutoModelForCausalLM.from_pretrained(out)`` and ``AutoTokenizer.from_pretrained(out)`` both work.

Presets: ``1.1b`` is TinyLlama-1.1B's shape with SmolLM2's vocabulary (hidden 2048, MLP 5632, 22 layers, 32 query and
4 KV heads, tied embeddings): about 1.07B parameters, 4.3 GB in fp32. ``tiny`` (hidden 256, 4 layers) checks the
plumbing in seconds. Weights are N(0, 0.02) and norm weights are ones, drawn from one seeded generator in checkpoint
order, so a preset and seed always give the same bytes. The model is never held in memory whole: each shard (at most
``--shard-size``, bigger only when a single tensor is) is drawn, written and freed before the next one, so peak RSS
is one shard plus the Python/torch/tokenizer baseline: about 0.85 GB at the default 500MB, whatever the layer count.
The 1.1b preset writes 9 shards in roughly 20-60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

PRESETS: dict[str, dict[str, Any]] = {
    "1.1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 22,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    },
    "tiny": {
        "hidden_size": 256,
        "intermediate_size": 688,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
    },
}
DEFAULT_SHARD_SIZE = {"1.1b": "500MB", "tiny": "8MB"}
TOKENIZER_SOURCE = "smollm2"
INIT_STD = 0.02


def parse_size(text: str) -> int:
    """'500MB' -> 500_000_000 (decimal units, like ``save_pretrained``'s ``max_shard_size``); plain ints are bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "B": 1}
    upper = text.strip().upper()
    for suffix, factor in sorted(units.items(), key=lambda item: -len(item[0])):
        if upper.endswith(suffix):
            return int(float(upper[: -len(suffix)]) * factor)
    return int(upper)


def build_config(preset: str, num_layers: int | None, tokenizer_config: dict) -> LlamaConfig:
    fields = dict(PRESETS[preset])
    if num_layers is not None:
        fields["num_hidden_layers"] = num_layers
    config = LlamaConfig(
        **fields,
        bos_token_id=tokenizer_config.get("bos_token_id"),
        eos_token_id=tokenizer_config.get("eos_token_id"),
        pad_token_id=tokenizer_config.get("pad_token_id"),
        initializer_range=INIT_STD,
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = torch.float32
    return config


def tensor_specs(config: LlamaConfig) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes exactly as LlamaForCausalLM's state dict has them (built on meta, so free), minus tied keys."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {})
    if config.tie_word_embeddings:
        tied.add("lm_head.weight")
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items() if name not in tied]


def plan_shards(specs: list[tuple[str, tuple[int, ...]]], max_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy, in checkpoint order, like ``save_pretrained``: a tensor larger than the limit gets a shard of its own."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in specs:
        nbytes = 4 * _numel(shape)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def tokenizer_folder() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tiermem.models import resolve_source

    return resolve_source(TOKENIZER_SOURCE)


def write_tokenizer(out: Path) -> dict:
    """Save SmolLM2's tokenizer into ``out``; returns its special-token ids for the config."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder()), local_files_only=True)
    tokenizer.save_pretrained(str(out))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": pad}


def write_weights(config: LlamaConfig, out: Path, seed: int, max_shard_bytes: int) -> tuple[int, int, int]:
    """Draw and write shard by shard; returns (parameters, bytes, shard count)."""
    specs = tensor_specs(config)
    shards = plan_shards(specs, max_shard_bytes)
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total_params = 0
    for index, shard in enumerate(shards, start=1):
        filename = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for name, shape in shard:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(shape, dtype=torch.float32)
            else:
                tensors[name] = torch.empty(shape, dtype=torch.float32).normal_(0.0, INIT_STD, generator=generator)
            weight_map[name] = filename
            total_params += _numel(shape)
        save_file(tensors, str(out / filename), metadata={"format": "pt"})
        shard_mb = sum(t.numel() for t in tensors.values()) * 4 / 1e6
        del tensors
        print(f"  wrote {filename} ({len(shard)} tensors, {shard_mb:.0f} MB), peak RSS {_peak_rss_mib():.0f} MiB")
    index_json = {
        "metadata": {"total_parameters": total_params, "total_size": total_params * 4},
        "weight_map": dict(sorted(weight_map.items())),
    }
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")
    return total_params, total_params * 4, len(shards)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def check(out: Path) -> None:
    """Load the folder with plain transformers and greedily generate a few tokens (loads the whole model)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(out), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, local_files_only=True)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        generated = model.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new = generated[0, ids.shape[1] :].tolist()
    print(f"check: loaded {type(model).__name__}, generated {new} -> {tokenizer.decode(new)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder to write (created; existing files overwritten)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="1.1b")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", default=None, help="max bytes per shard, e.g. 500MB (default per preset)")
    parser.add_argument("--num-layers", type=int, default=None, help="override the preset's layer count (testing)")
    parser.add_argument("--check", action="store_true", help="afterwards load it whole and generate (small models!)")
    args = parser.parse_args()

    start = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.glob("model*.safetensors*"):
        stale.unlink()
    special = write_tokenizer(args.out)
    config = build_config(args.preset, args.num_layers, special)
    config.save_pretrained(str(args.out))
    GenerationConfig.from_model_config(config).save_pretrained(str(args.out))
    max_shard = parse_size(args.shard_size or DEFAULT_SHARD_SIZE[args.preset])
    params, nbytes, count = write_weights(config, args.out, args.seed, max_shard)
    seconds = time.perf_counter() - start
    print(
        f"{args.out}: preset {args.preset}, {config.num_hidden_layers} layers, {params / 1e9:.3f}B params, "
        f"{nbytes / 1e9:.2f} GB fp32 in {count} shards, {seconds:.1f}s, peak RSS {_peak_rss_mib():.0f} MiB"
    )
    if args.check:
        check(args.out)


if __name__ == "__main__":
    main()
