"""The CLI: bad input is one line on stderr with exit status 2, never a traceback; --json is complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tiermem.cli import main


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse usage errors exit from parse_args
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("tiermem: error: ")
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0]


@pytest.fixture()
def context_file(tmp_path: Path) -> Path:
    path = tmp_path / "context.txt"
    path.write_text("The pass key is 4321. " * 10, encoding="utf-8")
    return path


def test_generate_json_fields(capsys, tiny_model_dir: Path, context_file: Path) -> None:
    code, out, _ = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--context-file", str(context_file),
        "--question", "What is the pass key?", "--policy", "snapkv", "--kv-budget", "40",
        "--policy-opt", "window_size=8", "--max-new-tokens", "6", "--json",
    )  # fmt: skip
    assert code == 0
    record = json.loads(out)
    for key in ("text", "prompt_tokens", "kv_tokens", "kv_bytes_peak", "peak_rss_bytes", "prefill_seconds"):
        assert key in record
    assert isinstance(record["text"], str)
    assert record["prompt_tokens"] == record["context_tokens"] + record["question_tokens"] > 40
    assert record["kv_tokens"] == 40  # the context was compressed to the budget
    assert record["kv_bytes_peak"] >= record["kv_bytes_decode"] > 0
    assert record["peak_rss_bytes"] > 10 * 2**20
    assert record["prefill_seconds"] > 0
    assert 1 <= record["new_tokens"] <= 6
    assert record["decode_tokens_per_second"] >= 0
    assert record["policy"].startswith("SnapKV(kv_budget=40") and "window_size=8" in record["policy"]


def test_generate_streams_text(capsys, tiny_model_dir: Path) -> None:
    code, out, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--context", "hello", "--max-new-tokens", "4"
    )
    assert code == 0
    assert "[full]" in err and "KV peak" in err
    assert out.endswith("\n")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--policy", "nope"], "unknown policy 'nope'"),
        (["--policy", "streaming", "--kv-budget", "4"], "too small"),
        (["--policy", "snapkv", "--kv-budget", "16"], "observation window"),
        (["--policy", "snapkv"], "needs --kv-budget"),
        (["--policy", "full", "--kv-budget", "64"], "takes no budget"),
        (["--policy", "snapkv:pooling=median", "--kv-budget", "64"], "pooling"),
        (["--policy", "snapkv", "--kv-budget", "64", "--policy-opt", "colour=red"], "no option 'colour'"),
        (["--policy", "streaming", "--compression-ratio", "1.5"], "compression ratio"),
        (["--kv-budget", "lots"], "not a token count"),
        (["--policy", "infllm", "--kv-memory", "1KB"], "below what policy 'infllm' holds in RAM"),
        (["--policy", "full", "--kv-memory", "1KB"], "below what policy 'full' holds in RAM"),
        (["--kv-memory", "1KB"], "below what policy 'infllm' holds in RAM"),  # auto: full cannot fit, block memory
        (["--policy", "infllm", "--kv-memory", "1GB", "--kv-store", "ram"], "needs the disk store"),
        (["--kv-memory", "lots"], "not a size"),
        (["--policy", "infllm", "--kv-dir", "/no/such/dir"], "does not exist"),
        (["--policy", "emllm:refinement=spectral"], "refinement"),
        (["--max-new-tokens", "0"], "max new tokens"),
    ],
)
def test_bad_arguments(capsys, tiny_model_dir: Path, context_file: Path, args: list[str], needle: str) -> None:
    base = ["generate", "--model", str(tiny_model_dir), "--context-file", str(context_file)]
    code, out, err = run_cli(capsys, *base, *args)
    assert_one_line_error(code, err, needle)
    assert out == ""


def test_bad_context_files(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\u00e9 cr\u00e8me".encode("latin-1"))
    cases = [
        (tmp_path / "missing.txt", "not found"),
        (empty, "is empty"),
        (latin, "not valid UTF-8 (byte 0xe9 at offset 3)"),
        (tmp_path, "not a regular file"),
    ]
    for path, needle in cases:
        code, _, err = run_cli(capsys, "generate", "--model", str(tiny_model_dir), "--context-file", str(path))
        assert_one_line_error(code, err, needle)


def test_prompt_longer_than_the_model(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    long = tmp_path / "long.txt"
    long.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    args = ["generate", "--model", str(tiny_model_dir), "--context-file", str(long)]
    code, _, err = run_cli(capsys, *args, "--policy", "full")
    assert_one_line_error(code, err, "exceed the model's 1024 positions", "'full'")
    # The default, auto, reads it with block memory and says so.
    code, _, err = run_cli(capsys, *args, "--max-new-tokens", "2")
    assert code == 0 and "past the model's 1024 positions: infllm-heads" in err
    # StreamingLLM re-rotates keys into its cache slots, so the same prompt fits.
    code, _, _ = run_cli(capsys, *args, "--policy", "streaming", "--kv-budget", "64", "--max-new-tokens", "2")
    assert code == 0


def smollm2_gguf_head(n: int) -> bytes:
    """The first ``n`` bytes of the bundled SmolLM2 GGUF: a valid header over missing tensor data."""
    from tiermem.models import BUNDLED

    with BUNDLED["smollm2"].locate().open("rb") as handle:
        return handle.read(n)


def test_block_memory_reads_past_the_window_within_a_memory_limit(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    long = tmp_path / "long.txt"
    long.write_text("The quick brown fox jumps over the lazy dog. " * 110)  # > 1024 positions of the tiny model
    policy = "infllm:n_init=4,n_local=64,block_size=16,topk=4,exc_block_size=32"
    code, out, err = run_cli(
        capsys, "generate", "--model", str(tiny_model_dir), "--context-file", str(long), "--question", "Who?",
        "--policy", policy, "--kv-memory", "2MB", "--kv-dir", str(tmp_path), "--max-new-tokens", "3", "--json",
    )  # fmt: skip
    assert code == 0, err
    record = json.loads(out)
    assert record["prompt_tokens"] > 1024
    assert record["extra"]["kv_disk_bytes"] > 0
    assert record["kv_bytes_peak"] <= 2 * 2**20
    assert [p.name for p in tmp_path.iterdir()] == ["long.txt"]  # the store's folder is gone


def test_corrupt_gguf(capsys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERMEM_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00\x01garbage" * 100)
    code, _, err = run_cli(capsys, "generate", "--model", str(bad), "--context", "hi")
    assert_one_line_error(code, err, "cannot read GGUF file", "corrupt or truncated")
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_gguf_head(2_000_000))
    code, _, err = run_cli(capsys, "generate", "--model", str(truncated), "--context", "hi")
    assert_one_line_error(code, err, "cannot read GGUF file", "corrupt or truncated")
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").iterdir())


def test_bench_with_bad_policy_writes_nothing(capsys, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "bench"
    code, _, err = run_cli(
        capsys, "bench", "--models", str(tiny_model_dir), "--policies", "full,bogus", "--out", str(out)
    )
    assert_one_line_error(code, err, "unknown policy 'bogus'")
    assert not out.exists()


def test_entry_point_exit_code_without_traceback(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tiermem.cli", "generate", "--model", "nope", "--context", "x"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "tiermem: error: unknown model 'nope': use one of smollm2, gemma3-270m, a local HF folder or a .gguf file"
    )


def test_usage_errors_are_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["generate"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "required" in err


def test_generate_and_bench_share_one_config_tree(tmp_path: Path) -> None:
    from tiermem.cli import build_parser
    from tiermem.cli_args import generation_config
    from tiermem.kvstore.blocks import StoreConfig

    shared = ["--chunk-size", "1k", "--kv-store", "disk", "--kv-dir", str(tmp_path), "--kv-alloc", "paged"]
    gen = build_parser().parse_args(["generate", "--context", "x", "--temperature", "0.5", *shared])
    bench = build_parser().parse_args(["bench", "--suite", "ruler", *shared])
    store = StoreConfig(backend="disk", folder=str(tmp_path), allocator="paged", kv_dtype=gen.kv_dtype)
    assert gen.kv_dtype == bench.kv_dtype  # the --formats preset fills both alike
    assert gen.max_new_tokens == 32 and bench.max_new_tokens is None  # bench: each task's own by default
    from_bench = generation_config(bench, max_new_tokens=16)
    assert generation_config(gen).store == from_bench.store == store
    assert generation_config(gen).chunk_size == from_bench.chunk_size == 1024
    assert generation_config(gen, temperature=gen.temperature).temperature == 0.5


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--suite", "ruler", "--tasks", "passkey"], "not allowed with argument"),
        (["--budgets", "64", "--compression-ratios", "0.5"], "not allowed with argument"),
        (["--kv-alloc", "slab"], "invalid choice"),
        (["--suite", "longbench"], "invalid choice"),
        (["--kv-dir", "/no/such/dir"], "KV store folder '/no/such/dir' does not exist"),
        (["--tasks", "cwe", "--lengths", "512"], "at least 1024"),
    ],
)
def test_bad_bench_arguments(capsys, tiny_model_dir: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "bench"
    code, _, err = run_cli(capsys, "bench", "--models", str(tiny_model_dir), "--out", str(out), *args)
    assert code == 2 and len(err.strip().splitlines()) == 1 and needle in err, err
    assert not out.exists()
