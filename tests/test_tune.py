"""tiermem tune: the seed trick, ZO steps against hand-computed finite differences and torch's optimizers, resume
after a simulated crash, LoRA round trips, and one-line errors for bad input (tiny random models, seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tune_fixtures import make_tiny_tune_model, torch_reference
from tiermem.cli import main
from tiermem.errors import TiermemError
from tiermem.tune import TuneConfig, tune
from tiermem.tune import perturb as perturb_module
from tiermem.tune.objective import Objective, batch_indices
from tiermem.tune.perturb import add_noise_, noise, perturb_, step_seed
from tiermem.tune.tasks import load_task, polarity_split
from tiermem.tune.zo import ZOHyper, ZOOptimizer


@pytest.fixture(scope="module")
def tune_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_tune_model(tmp_path_factory.mktemp("tune-llama"))


def _run(tune_model: Path, out: Path | None, **kw: object) -> object:
    settings: dict[str, object] = dict(model=str(tune_model), task="polarity-k16", steps=4, batch_size=4, out=out)
    settings.update(kw)
    return tune(TuneConfig(**settings))  # type: ignore[arg-type]


# --- the seed trick -------------------------------------------------------------------------------------------


def test_seed_regenerates_the_same_perturbation() -> None:
    like = torch.zeros(3, 5)
    first, again = noise(7, "w", like), noise(7, "w", like)
    assert torch.equal(first, again)
    assert not torch.equal(first, noise(8, "w", like))  # another step's direction
    assert not torch.equal(first, noise(7, "v", like))  # another tensor's direction
    param = torch.randn(3, 5)
    original = param.clone()
    add_noise_(param, 7, "w", 1e-3)
    assert torch.allclose(param, original + 1e-3 * first)
    add_noise_(param, 7, "w", -2e-3)
    add_noise_(param, 7, "w", 1e-3)
    assert torch.allclose(param, original, atol=1e-6)  # +ε, −2ε, +ε restores θ (up to rounding)


def test_chunked_noise_is_one_direction_whatever_the_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(perturb_module, "CHUNK", 4)
    a, b = torch.zeros(10), torch.zeros(3)
    perturb_([("a", a), ("b", b)], 5, 1.0)
    a2, b2 = torch.zeros(10), torch.zeros(3)
    perturb_([("b", b2), ("a", a2)], 5, 1.0)  # visiting the tensors in another order (as streaming may)
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert torch.equal(a, noise(5, "a", a))
    assert not torch.equal(a[:4], a[4:8])  # each chunk has its own generator
    assert step_seed(0, 3) == step_seed(0, 3) != step_seed(0, 4)


# --- ZO steps --------------------------------------------------------------------------------------------------


def _loss_fn(model: torch.nn.Module, objective: Objective, batch: object) -> float:
    with torch.inference_mode():
        return float(objective.loss(model, batch))  # type: ignore[arg-type]


def _tiny(tune_model: Path) -> tuple[torch.nn.Module, Objective, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tune_model)).eval()
    objective = Objective(load_task("polarity-k16"), AutoTokenizer.from_pretrained(str(tune_model)))
    batch = objective.batch(polarity_split(16)[0][:4])
    return model, objective, batch


def test_zo_sgd_step_matches_a_hand_computed_finite_difference(tune_model: Path) -> None:
    model, objective, batch = _tiny(tune_model)
    named = [(n, p.data) for n, p in model.named_parameters()]
    theta = {n: p.clone() for n, p in named}
    seed, eps, lr = 123, 1e-3, 1e-2
    z = {n: noise(seed, n, p) for n, p in named}
    # The finite difference by hand, on explicitly built θ ± εz.
    losses = []
    for sign in (1, -1):
        with torch.no_grad():
            for n, p in named:
                p.copy_(theta[n] + sign * eps * z[n])
        losses.append(_loss_fn(model, objective, batch))
    g_hand = (losses[0] - losses[1]) / (2 * eps)
    with torch.no_grad():
        for n, p in named:
            p.copy_(theta[n])
    zo = ZOOptimizer("zo-sgd", ZOHyper(lr=lr, eps=eps))
    plus, minus, g = zo.step(named, seed, lambda: _loss_fn(model, objective, batch))
    assert plus == pytest.approx(losses[0], abs=1e-5) and minus == pytest.approx(losses[1], abs=1e-5)
    assert g == pytest.approx(g_hand, rel=1e-2, abs=1e-3)
    assert abs(g) > 1e-3  # the random model's loss does move along z: the check above is not 0 == 0
    for n, p in named:
        assert torch.allclose(p, theta[n] - lr * g * z[n], atol=1e-5), n


@pytest.mark.parametrize("method", ["zo-sgd-mmt", "zo-adam"])
def test_stateful_zo_rules_match_torch_optimizers(method: str) -> None:
    """ZO-Bench runs torch.optim.SGD(momentum)/Adam on ĝ = g·z: our chunked rule gives the same parameters."""
    hyper = ZOHyper(lr=1e-2, eps=1e-3, weight_decay=0.1)
    param = torch.randn(6, 7)
    reference, optimizer = torch_reference(method, hyper, param)
    zo = ZOOptimizer(method, hyper)
    for step, g in enumerate([0.7, -1.3, 0.2]):
        zo.begin_update()
        zo.update_tensor("layer.weight", param, step, g)
        reference.grad = g * noise(step, "layer.weight", param)
        optimizer.step()
        assert torch.allclose(param, reference.detach(), atol=1e-6)


def test_sign_rule_uses_only_the_sign_of_g() -> None:
    a, b = torch.zeros(4, 4), torch.zeros(4, 4)
    zo = ZOOptimizer("zo-sgd-sign", ZOHyper(lr=0.5, eps=1e-3))
    zo.update_tensor("w", a, 3, 0.01)
    zo.update_tensor("w", b, 3, 100.0)
    assert torch.equal(a, b) and torch.allclose(a, -0.5 * noise(3, "w", a))


def test_batches_are_a_function_of_seed_and_step() -> None:
    seen = [i for step in range(4) for i in batch_indices(32, 16, step, 0)]
    assert sorted(seen[:32]) == list(range(32))  # one epoch covers every example once
    assert batch_indices(32, 16, 5, 0) == batch_indices(32, 16, 5, 0) != batch_indices(32, 16, 5, 1)


# --- runs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["zo-sgd", "zo-adam", "adamw", "lora"])
def test_resume_after_a_crash_gives_the_same_loss_curve(tune_model: Path, tmp_path: Path, method: str) -> None:
    lr = {"zo-sgd": 1e-3, "zo-adam": 1e-3}.get(method)
    whole = _run(tune_model, tmp_path / "whole", method=method, steps=6, checkpoint_every=2, lr=lr, save_model=False)
    common = dict(model=str(tune_model), method=method, task="polarity-k16", steps=6, lr=lr, batch_size=4)
    first = tune(
        TuneConfig(**common, out=tmp_path / "crash", checkpoint_every=2),  # type: ignore[arg-type]
        stop_after=3,  # dies after step 3; the last checkpoint is step 2
    )
    assert first.steps == 3
    assert json.loads((tmp_path / "crash" / "checkpoint.json").read_text())["step"] == 2
    resumed = tune(TuneConfig(**common, out=tmp_path / "crash", resume=True))  # type: ignore[arg-type]
    assert resumed.resumed_from == 2
    assert resumed.losses == whole.losses  # type: ignore[attr-defined]
    assert resumed.after == whole.after  # type: ignore[attr-defined]
    lines = (tmp_path / "crash" / "steps.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4, 5, 6]


def test_zo_training_lowers_the_training_loss(tune_model: Path) -> None:
    """Not a benchmark: a large lr on 32 examples must fit them a little (catches a sign error in the update)."""
    result = _run(tune_model, None, method="zo-sgd", steps=40, lr=2e-3, batch_size=32)
    losses = result.losses  # type: ignore[attr-defined]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.01


@pytest.mark.parametrize("method", ["zo-lora", "lora"])
def test_lora_adapter_round_trips(tune_model: Path, tmp_path: Path, method: str) -> None:
    from transformers import AutoModelForCausalLM

    from tiermem.tune.lora import load_adapter

    lr = 1e-2 if method == "zo-lora" else None
    _run(tune_model, tmp_path, method=method, steps=3, lr=lr)
    _, objective, batch = _tiny(tune_model)
    base = AutoModelForCausalLM.from_pretrained(str(tune_model)).eval()
    with torch.inference_mode():
        before = objective.logits(base, batch)  # type: ignore[arg-type]
    adapted = load_adapter(AutoModelForCausalLM.from_pretrained(str(tune_model)).eval(), tmp_path / "adapter")
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "model")).eval()
    with torch.inference_mode():
        via_adapter = objective.logits(adapted, batch)  # type: ignore[arg-type]
        via_merged = objective.logits(merged, batch)  # type: ignore[arg-type]
    assert not torch.allclose(before, via_adapter, atol=1e-6)  # the adapter was trained (B moved off zero)
    assert torch.allclose(via_adapter, via_merged, atol=1e-4)


def test_full_tuned_model_loads_back_in_tiermem(tune_model: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tiermem.models import load

    result = _run(tune_model, tmp_path, method="zo-sgd", steps=2, lr=1e-2)
    lm = load(str(tmp_path / "model"))
    saved = load_file(str(tmp_path / "model" / "model.safetensors"))
    original = load_file(str(tune_model / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(saved[name], original[name])
    assert torch.equal(lm.model.state_dict()[name], saved[name])
    record = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[-1])
    assert record["accuracy_after"] == result.after  # type: ignore[attr-defined]
    assert (tmp_path / "loss.png").is_file()


# --- bad input -------------------------------------------------------------------------------------------------


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(["tune", *argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_line(code: int, err: str, needle: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tiermem: error: ") and needle in lines[0], err


def test_bad_input_is_one_line_before_any_compute(
    tune_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = ["--model", str(tune_model)]
    _one_line(*_cli(capsys, *model, "--task", "nope")[::2], "unknown task 'nope'")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    _one_line(*_cli(capsys, *model, "--task", str(empty))[::2], "0 examples")
    one_label = tmp_path / "one.jsonl"
    one_label.write_text('{"text": "a", "label": "x"}\n{"text": "b", "label": "x"}\n')
    _one_line(*_cli(capsys, *model, "--task", str(one_label))[::2], "one label")
    _one_line(*_cli(capsys, *model, "--weight-memory", "1KB")[::2], "exceed --weight-memory")
    _one_line(*_cli(capsys, *model, "--method", "adamw", "--eps", "0.1")[::2], "--eps applies")
    _one_line(*_cli(capsys, *model, "--resume")[::2], "--resume needs --out")
    _one_line(*_cli(capsys, *model, "--out", str(tmp_path / "none"), "--resume")[::2], "no checkpoint")


def test_corrupt_checkpoint_is_refused(tune_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _run(tune_model, tmp_path, steps=2, save_model=False)
    args = ["--model", str(tune_model), "--steps", "4", "--batch-size", "4", "--out", str(tmp_path), "--resume"]
    tensors = next(tmp_path.glob("checkpoint-*.safetensors"))
    data = bytearray(tensors.read_bytes())
    data[-5] ^= 0xFF
    tensors.write_bytes(bytes(data))
    _one_line(*_cli(capsys, *args)[::2], "SHA-256 does not match")
    (tmp_path / "checkpoint.json").write_text("{not json")
    _one_line(*_cli(capsys, *args)[::2], "corrupt checkpoint")
    with pytest.raises(TiermemError, match="already holds a run"):
        _run(tune_model, tmp_path, steps=2)


def test_cli_json_and_list_tasks(tune_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _cli(capsys, "--list-tasks")
    assert code == 0 and "polarity-k16" in out and "wiki-lm" in out
    argv = ["--model", str(tune_model), "--method", "zo-sgd-sign", "--steps", "2", "--batch-size", "4", "--json"]
    code, out, err = _cli(capsys, *argv)
    assert code == 0, err
    record = json.loads(out)
    for key in ("accuracy_before", "accuracy_after", "peak_rss_bytes", "seconds_per_step", "steps", "method"):
        assert key in record
    assert record["steps"] == 2 and record["method"] == "zo-sgd-sign" and len(record["losses"]) == 2
    assert 0 <= record["accuracy_after"] <= 1 and record["seconds_per_step"] > 0


def test_tasks_are_real_and_disjoint() -> None:
    train16, test = polarity_split(16)
    train50, test50 = polarity_split(50)
    assert len(train16) == 32 and len(train50) == 100 and len(test) == 100 and test == test50
    assert {e.text for e in train50}.isdisjoint({e.text for e in test})
    assert sum(e.label for e in test) == 50
    wiki = load_task("wiki-lm")
    assert wiki.kind == "lm" and len(wiki.train) > 100 and len(wiki.test) > 10
    assert {e.text for e in wiki.train}.isdisjoint({e.text for e in wiki.test})
