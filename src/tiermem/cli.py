"""The ``tiermem`` command: generate, bench, demo, policies."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NoReturn

from tiermem.cli_args import add_generation_args, add_model_args, add_policy_args, generation_config, load_options
from tiermem.errors import TiermemError
from tiermem.units import parse_size, parse_tokens, read_text_file

EXIT_BAD_INPUT = 2


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (no usage dump) and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"tiermem: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_BAD_INPUT)

    def parse_known_args(  # type: ignore[override]
        self, args: Any = None, namespace: Any = None
    ) -> tuple[argparse.Namespace, list[str]]:
        """Parse, then let ``--formats`` fill the format flags not given (:func:`tiermem.formats.apply_preset`)."""
        parsed, extras = super().parse_known_args(args, namespace)
        if hasattr(parsed, "formats"):
            from tiermem.formats import apply_preset

            apply_preset(parsed)
        return parsed, extras


def make_policy(name: str, kv_budget: int | None, compression_ratio: float | None, options: list[str]) -> Any:
    """Build a policy from CLI arguments; ``options`` are ``key=value`` strings for its dataclass fields."""
    from tiermem.memory import registry

    spec_name, spec_options = registry.parse_spec(name)
    for item in options:
        key, eq, value = item.partition("=")
        if not eq:
            raise TiermemError(f"bad --policy-opt '{item}': expected key=value")
        spec_options[key.strip()] = value
    if registry.budget_optional(spec_name):
        return registry.build(spec_name, kv_budget=kv_budget, compression_ratio=compression_ratio, **spec_options)
    if registry.takes_budget(spec_name):
        if kv_budget is None and compression_ratio is None:
            raise TiermemError(f"policy '{spec_name}' needs --kv-budget TOKENS or --compression-ratio FRACTION")
        return registry.build(spec_name, kv_budget=kv_budget, compression_ratio=compression_ratio, **spec_options)
    if kv_budget is not None or compression_ratio is not None:
        raise TiermemError(f"policy '{spec_name}' keeps every token and takes no budget")
    return registry.build(spec_name, **spec_options)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    add_model_args(parser)


def _add_weight_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default="resident", choices=["resident", "stream", "flash"], help="placement")
    parser.add_argument("--weight-memory", type=parse_size, help="RAM for weights, e.g. 1GB (stream: layers held)")
    parser.add_argument("--prefetch-layers", type=int, help="stream: layers held and loaded ahead, k (default: fit)")
    parser.add_argument("--evict-layers", type=int, default=1, help="stream: layers evicted at once, k'")
    parser.add_argument("--drop-page-cache", action="store_true", help="stream: read every layer from disk")
    parser.add_argument("--weight-loader", default="mmap", choices=["mmap", "read"], help="stream: how layers load")
    parser.add_argument("--flash-density", type=float, default=0.5, help="flash: FFN neurons used per token")
    parser.add_argument("--flash-window", type=int, default=2, help="flash: tokens whose neurons stay in RAM")


def flash_config(args: argparse.Namespace) -> Any:
    """The :class:`FlashConfig` of the flash arguments (which need ``--weights flash``)."""
    from tiermem.weights.flash import FlashConfig

    if args.weights != "flash" and (args.flash_density != 0.5 or args.flash_window != 2):
        raise TiermemError("--flash-density and --flash-window need --weights flash")
    if args.weights == "flash" and args.weight_memory is not None:
        raise TiermemError("--weight-memory applies to --weights resident or stream, not flash")
    return FlashConfig(args.flash_density, args.flash_window)


def stream_config(args: argparse.Namespace) -> Any:
    """The :class:`StreamConfig` the weight arguments describe (also checks them against ``--weights``)."""
    from tiermem.weights.stream import StreamConfig

    stream_only = (
        args.prefetch_layers is not None
        or args.evict_layers != 1
        or args.drop_page_cache
        or args.weight_loader != "mmap"
    )
    if args.weights != "stream" and stream_only:
        raise TiermemError(
            "--prefetch-layers, --evict-layers, --drop-page-cache and --weight-loader need --weights stream"
        )
    return StreamConfig(
        args.weight_memory, args.prefetch_layers, args.evict_layers, args.drop_page_cache, args.weight_loader
    )


def _add_policy_args(parser: argparse.ArgumentParser) -> None:
    add_policy_args(parser)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tiermem", description="Run LLMs on long contexts under tiered KV-cache policies.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="answer a question about a long context under a KV policy")
    _add_model_args(gen)
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--context-file", help="UTF-8 text file with the context")
    source.add_argument("--context", help="the context as text")
    gen.add_argument("--question", default="", help="question asked after the context")
    _add_weight_args(gen)
    _add_policy_args(gen)
    add_generation_args(gen, max_new_tokens=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")

    from tiermem.bench.cli import add_bench_parser

    add_bench_parser(sub)

    from tiermem.serve.cli import add_serve_parser

    add_serve_parser(sub)

    from tiermem.tune.cli import add_tune_parser

    add_tune_parser(sub)

    demo = sub.add_parser("demo", help="full vs SnapKV on one long prompt, side by side")
    _add_model_args(demo)

    plan = sub.add_parser("plan", help="choose weight placement and KV policy for a memory limit (roofline model)")
    plan.add_argument("--model", default="smollm2", help="smollm2, gemma3-270m, a local HF folder or a .gguf file")
    plan.add_argument("--memory", type=parse_size, required=True, help="RAM for the whole process, e.g. 2GB")
    plan.add_argument("--context", type=parse_tokens, required=True, help="prompt tokens, e.g. 32k")
    plan.add_argument("--new-tokens", type=parse_tokens, default=32)
    plan.add_argument("--cold", action="store_true", help="assume streamed layers come from disk, not page cache")
    plan.add_argument("--reprobe", action="store_true", help="measure the machine again")

    sub.add_parser("policies", help="list the registered KV policies and their defaults")
    return parser


def summary_lines(policy: str, weights: str, stats: Any) -> list[str]:
    """The cost summary ``generate`` prints after the answer: KV and time, then what the weights cost."""
    extra = stats.extra
    lines = [
        f"[{policy}] prompt {stats.prompt_tokens} tok, KV kept {stats.kv_tokens} tok, "
        f"KV peak {stats.kv_bytes_peak / 2**20:.1f} MiB, prefill {stats.prefill_seconds:.2f} s, "
        f"decode {stats.decode_tokens_per_second:.1f} tok/s, peak RSS {stats.peak_rss_bytes / 2**20:.0f} MiB"
    ]
    if "auto" in extra:  # what --policy auto chose, and why
        lines.insert(0, f"[auto] {extra['auto']}")
    if "weights_format" in extra:  # the number formats that ran (also in --json's "extra")
        lines.append(
            f"[formats] weights {extra['weights_format']}, activations {extra['compute_dtype']}, KV {extra['kv_dtype']}"
            + (f"; decode step {extra['decode_step']}" if "decode_step" in extra else "")
        )
    if weights == "stream":
        lines.append(
            f"[weights stream] {extra['weight_layers_held']} layers held, {extra['weight_loads']} loads, "
            f"{int(extra['weight_bytes_read']) / 2**30:.2f} GiB read, waited {extra['weight_wait_seconds']} s"
        )
    if weights == "flash":
        lines.append(
            f"[weights flash] FFN bytes read per decoded token {int(extra['ffn_bytes_read_per_token']) / 2**20:.2f}"
            f" MiB (resident FFNs read {int(extra['ffn_bytes_per_token_resident']) / 2**20:.1f} MiB)"
        )
    return lines


def cmd_generate(args: argparse.Namespace) -> int:
    from tiermem.engine import generate
    from tiermem.models import load
    from tiermem.prompts import build_prompt

    context = read_text_file(args.context_file) if args.context_file else args.context
    if not context or not context.strip():
        raise TiermemError("the context is empty")
    policy = make_policy(args.policy, args.kv_budget, args.compression_ratio, args.policy_opt)
    config = generation_config(
        args, temperature=args.temperature, top_p=args.top_p, seed=args.seed, stop_strings=tuple(args.stop)
    )
    weights = {"weights": args.weights, "stream": stream_config(args), "flash": flash_config(args)}
    lm = load(args.model, **load_options(args), **weights)
    prompt = build_prompt(lm, context, args.question, style=args.prompt_style)

    def echo(piece: str) -> None:
        print(piece, end="", flush=True)

    try:
        result = generate(lm, prompt, policy, config, on_text=None if args.json else echo)
    finally:
        lm.close()
    stats = result.stats
    if args.json:
        record = {"text": result.text, "model": args.model, "finish_reason": result.finish_reason}
        record.update(stats.to_dict())
        record.update({"chunk_size": config.chunk_size, "question_aware": config.question_aware, "style": prompt.style})
        print(json.dumps(record))
    else:
        print()
        ran = result.policy.name if result.policy is not None else policy.name
        print("\n".join(summary_lines(ran, args.weights, stats)), file=sys.stderr)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from tiermem.models import cache_root, resolve_source
    from tiermem.plan.choose import candidates, choose, command, explain, kv_options
    from tiermem.plan.cost import Shapes
    from tiermem.plan.layer_profile import profile_layer
    from tiermem.plan.probe import probe

    source = resolve_source(args.model)
    hf_config = AutoConfig.from_pretrained(str(source), local_files_only=True)
    shapes = Shapes.from_config(hf_config)
    machine = probe(cache_root() / "probe.json", force=args.reprobe)
    profiles = {}  # one measured decoder layer of this model per KV policy (a few seconds each)
    for kv in kv_options(shapes, args.context, args.new_tokens, args.memory):
        profiles[kv.policy] = profile_layer(hf_config, kv.policy, min(args.context, 2048), kv.hot_tokens)
    warm = not args.cold
    options = candidates(shapes, machine, args.memory, args.context, args.new_tokens, profiles, warm_page_cache=warm)
    print(f"{'configuration':58s} {'decode ms/tok':>13s} {'prefill s':>10s} {'peak MiB':>9s}  fits")
    for option in options:
        p = option.prediction
        fits = "yes" if p.peak_bytes <= args.memory else "no"
        print(f"{option.label:58s} {p.decode_s * 1e3:13.1f} {p.prefill_s:10.1f} {p.peak_bytes / 2**20:9.0f}  {fits}")
    choice = choose(options)
    print(f"\nchoice: {choice.label}")
    parts = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in choice.prediction.parts.items() if v > 0)
    chosen = choice.prediction
    print(
        f"predicted: {chosen.decode_s * 1e3:.1f} ms per token ({parts} ms), "
        f"prefill {chosen.prefill_s:.1f} s, peak {chosen.peak_bytes / 2**20:.0f} MiB"
    )
    for line in explain(shapes, machine, args.memory, args.context, choice):
        print(f"  - {line}")
    print(f"run: {command(args.model, choice, shapes)}")
    return 0


def cmd_policies(args: argparse.Namespace) -> int:
    import dataclasses

    from tiermem.memory.registry import REGISTRY

    for name, entry in REGISTRY.items():
        fields = [f for f in dataclasses.fields(entry.cls) if f.name not in ("kv_budget", "compression_ratio")]
        defaults = {f.name: entry.defaults.get(f.name, f.default) for f in fields}
        shown = ", ".join(f"{k}={v!r}" for k, v in defaults.items())
        print(f"{name:14s} {entry.summary}\n{'':14s} {shown or '(no options)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    commands = {"generate": cmd_generate, "policies": cmd_policies, "plan": cmd_plan}
    try:
        if args.command == "bench":
            from tiermem.bench.cli import cmd_bench

            return cmd_bench(args)
        if args.command == "tune":
            from tiermem.tune.cli import cmd_tune

            return cmd_tune(args)
        if args.command == "serve":
            from tiermem.serve.cli import cmd_serve

            return cmd_serve(args)
        if args.command == "demo":
            from tiermem.demo import cmd_demo

            return cmd_demo(args)
        return commands[args.command](args)
    except TiermemError as exc:
        print(f"tiermem: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("tiermem: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: one line unless asked for the traceback
        if os.environ.get("TIERMEM_DEBUG"):
            raise
        print(
            f"tiermem: internal error: {type(exc).__name__}: {exc} (TIERMEM_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
