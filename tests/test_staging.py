"""Cache entries are published whole, also when several processes build the same one at once."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import torch

from tiermem.staging import staged_dir, staged_file
from tiermem.weights.shards import convert, open_store


def _build_slowly(target: str, marker: str, barrier: object) -> None:
    with staged_dir(Path(target)) as folder:
        (folder / "a.txt").write_text(marker)
        barrier.wait()  # type: ignore[attr-defined]  # both writers are mid-build before either publishes
        (folder / "b.txt").write_text(marker)


def test_two_processes_building_one_folder_both_succeed_and_one_whole_folder_remains(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    ctx = multiprocessing.get_context("spawn")  # a forked child of a torch process can hang in OpenMP
    barrier = ctx.Barrier(2)
    workers = [ctx.Process(target=_build_slowly, args=(str(target), m, barrier)) for m in ("first", "second")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
    assert [w.exitcode for w in workers] == [0, 0]
    texts = {(target / "a.txt").read_text(), (target / "b.txt").read_text()}
    assert len(texts) == 1 and texts <= {"first", "second"}  # one writer's whole folder, not a mix
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]  # no staging folder left behind


def test_a_failed_build_publishes_nothing_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError), staged_dir(target) as folder:
        (folder / "half.txt").write_text("x")
        raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []


def test_staged_file_replaces_whole_and_cleans_up(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "types.json"
    for text in ("old", "new"):
        with staged_file(target) as partial:
            partial.write_text(text)
    assert target.read_text() == "new"
    with pytest.raises(ValueError), staged_file(target) as partial:
        partial.write_text("broken")
        raise ValueError("stop")
    assert target.read_text() == "new"
    assert [p.name for p in target.parent.iterdir()] == ["types.json"]


def _convert(source: str, target: str) -> None:
    convert(Path(source), Path(target), torch.float32)


def test_concurrent_layer_store_conversions_of_one_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    """Two processes streaming the same model for the first time: before, the second deleted the first's staging
    folder mid-write and crashed with a traceback."""
    target = tmp_path / "layers"
    ctx = multiprocessing.get_context("spawn")  # a forked child of a torch process can hang in OpenMP
    workers = [ctx.Process(target=_convert, args=(str(tiny_model_dir), str(target))) for _ in range(2)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert [w.exitcode for w in workers] == [0, 0]
    assert len(open_store(target).layers) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers"]
