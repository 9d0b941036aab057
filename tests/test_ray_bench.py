"""``tiermem bench --ray`` against a real local Ray (2 CPUs, loopback), started and stopped here: the same rows as
the local run (timings aside), the same resume rule, and no Ray import without ``--ray``."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tiermem.bench.ray_runner import PROCESS_FIELDS, comparable, run_bench_ray, task_memory
from tiermem.bench.runner import RESULTS_FILE, BenchConfig, load_rows, row_key, run_bench
from tiermem.engine import GenerationConfig
from tiermem.plan.cost import Shapes
from tiermem.raycluster import Cluster, connect, disconnect

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    joined = connect(None, num_cpus=2)
    assert joined.connected_here and joined.address.startswith("127.0.0.1:")  # loopback only
    yield joined
    disconnect(joined)


def sweep(model_dir: Path) -> BenchConfig:
    return BenchConfig(
        models=[str(model_dir)],
        policies=["full", "snapkv:window_size=8", "streaming"],
        budgets=[64],
        lengths=[240, 480],
        depths=[0.2, 0.8],
        tasks=["passkey"],
        generation=GenerationConfig(max_new_tokens=4, chunk_size=64),
        task_new_tokens=False,
    )


def by_key(rows: list[dict]) -> dict[str, dict]:
    return {row_key(r): comparable(r) for r in rows}


def test_ray_sweep_matches_local_and_resumes(cluster: Cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    local = run_bench(sweep(tiny_model_dir), tmp_path / "local")
    remote = run_bench_ray(sweep(tiny_model_dir), tmp_path / "ray")
    assert len(local) == len(remote) == 2 * 2 * 3  # lengths x depths x policies
    assert {r["status"] for r in remote} == {"ok"}
    assert by_key(remote) == by_key(local)  # outputs, scores, KV sizes: all but timings and the process's RSS
    assert all(set(r) - PROCESS_FIELDS == set(comparable(r)) for r in remote)
    assert {r["policy_label"] for r in remote} == {"full", "snapkv:window_size=8@64", "streaming@64"}

    # Resume: a second run sends nothing; a row lost from the file (and a line cut short) is measured again.
    results = tmp_path / "ray" / RESULTS_FILE
    lines = results.read_text().splitlines()
    results.write_text("\n".join(lines[:-2]) + "\n" + lines[-2][:30])
    again = run_bench_ray(sweep(tiny_model_dir), tmp_path / "ray")
    assert by_key(again) == by_key(local)
    assert len(load_rows(tmp_path / "ray")) == 12  # the cut line is skipped, no row is written twice
    before = results.read_text()
    run_bench_ray(sweep(tiny_model_dir), tmp_path / "ray")
    assert results.read_text() == before


def test_task_memory_follows_the_planner(tiny_model_dir: Path) -> None:
    from transformers import AutoConfig

    shapes = Shapes.from_config(AutoConfig.from_pretrained(str(tiny_model_dir)))
    short, long = (task_memory(shapes, n, 16, 64, base_rss=100 * 2**20) for n in (256, 4096))
    assert short > 100 * 2**20
    assert long - short >= (4096 - 256) * shapes.kv_bytes_per_token  # every token's KV is counted


def test_no_ray_import_without_the_flag(tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "plain"
    code = (
        "import sys\n"
        "from tiermem.cli import main\n"
        f"rc = main(['bench', '--models', {str(tiny_model_dir)!r}, '--policies', 'full', '--lengths', '240',"
        f" '--depths', '0.5', '--tasks', 'passkey', '--max-new-tokens', '2', '--out', {str(out)!r}])\n"
        "assert rc == 0, rc\n"
        "assert 'ray' not in sys.modules, 'ray was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((out / RESULTS_FILE).read_text().splitlines()[0])["status"] == "ok"


def test_cli_bench_ray_joins_the_running_cluster(cluster: Cluster, tiny_model_dir: Path, tmp_path: Path) -> None:
    from tiermem.cli import main

    out = tmp_path / "cli"
    argv = ["bench", "--models", str(tiny_model_dir), "--policies", "full,streaming", "--budgets", "64"]
    argv += ["--lengths", "240", "--depths", "0.5", "--tasks", "passkey", "--max-new-tokens", "2"]
    assert main([*argv, "--out", str(out), "--ray"]) == 0
    rows = load_rows(out)
    assert [r["status"] for r in rows] == ["ok", "ok"] and (out / "summary.md").exists()
    import ray

    assert ray.is_initialized()  # a cluster the caller started is left running
