"""MeZO's n-SPSA (``zo_queries``): an n = 2 step against a hand-computed average of two finite differences, n = 1
bitwise the plain MeZO step, the averaged rule for stateful optimizers, resume and one-line errors (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tune_fixtures import make_tiny_tune_model, torch_reference
from tiermem.errors import TiermemError
from tiermem.tune import TuneConfig, tune
from tiermem.tune.objective import Objective
from tiermem.tune.perturb import noise, query_seed
from tiermem.tune.tasks import load_task, polarity_split
from tiermem.tune.zo import ZOHyper, ZOOptimizer


@pytest.fixture(scope="module")
def tune_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_tune_model(tmp_path_factory.mktemp("tune-queries"))


def _tiny(tune_model: Path) -> tuple[torch.nn.Module, Objective, object]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(tune_model)).eval()
    objective = Objective(load_task("polarity-k16"), AutoTokenizer.from_pretrained(str(tune_model)))
    return model, objective, objective.batch(polarity_split(16)[0][:4])


def _loss(model: torch.nn.Module, objective: Objective, batch: object) -> float:
    with torch.inference_mode():
        return float(objective.loss(model, batch))  # type: ignore[arg-type]


def test_query_seeds_are_distinct_and_the_first_is_the_step_seed() -> None:
    assert query_seed(99, 0) == 99  # n = 1 draws what it drew before n-SPSA
    seeds = {query_seed(99, q) for q in range(8)}
    assert len(seeds) == 8 and query_seed(99, 1) == query_seed(99, 1) != query_seed(98, 1)


def test_two_query_step_is_the_average_of_two_hand_computed_finite_differences(tune_model: Path) -> None:
    model, objective, batch = _tiny(tune_model)
    named = [(n, p.data) for n, p in model.named_parameters()]
    theta = {n: p.clone() for n, p in named}
    seed, eps, lr = 321, 1e-3, 1e-2
    directions = [{n: noise(query_seed(seed, q), n, p) for n, p in named} for q in range(2)]
    grads = []
    for z in directions:  # each direction's finite difference by hand, on explicitly built θ ± εz
        losses = []
        for sign in (1, -1):
            with torch.no_grad():
                for n, p in named:
                    p.copy_(theta[n] + sign * eps * z[n])
            losses.append(_loss(model, objective, batch))
        grads.append((losses[0] - losses[1]) / (2 * eps))
    with torch.no_grad():
        for n, p in named:
            p.copy_(theta[n])
    zo = ZOOptimizer("zo-sgd", ZOHyper(lr=lr, eps=eps))
    probes = zo.step_queries(named, seed, lambda: _loss(model, objective, batch), 2)
    assert len(probes) == 2
    for (_, _, g), g_hand in zip(probes, grads, strict=True):
        assert g == pytest.approx(g_hand, rel=1e-2, abs=1e-3)
    assert abs(grads[0] - grads[1]) > 1e-3  # two different directions: the average is not one of them
    for n, p in named:
        expected = theta[n] - lr * (grads[0] * directions[0][n] + grads[1] * directions[1][n]) / 2
        assert torch.allclose(p, expected, atol=1e-5), n
        assert not torch.allclose(p, theta[n] - lr * grads[0] * directions[0][n], atol=1e-5), n  # not z_0 alone


def test_one_query_is_bitwise_the_mezo_step(tune_model: Path) -> None:
    model, objective, batch = _tiny(tune_model)
    other, _, _ = _tiny(tune_model)
    a = [(n, p.data) for n, p in model.named_parameters()]
    b = [(n, p.data) for n, p in other.named_parameters()]
    hyper = ZOHyper(lr=1e-2, eps=1e-3, weight_decay=0.1)
    first = ZOOptimizer("zo-sgd", hyper).step(a, 5, lambda: _loss(model, objective, batch))
    again = ZOOptimizer("zo-sgd", hyper).step_queries(b, 5, lambda: _loss(other, objective, batch), 1)
    assert again == [first]
    assert all(torch.equal(p, q) for (_, p), (_, q) in zip(a, b, strict=True))


@pytest.mark.parametrize("method", ["zo-sgd", "zo-sgd-mmt", "zo-adam"])
def test_averaged_rule_is_the_rule_on_the_averaged_gradient(method: str) -> None:
    """torch's SGD/Adam on ĝ = (g₀z₀ + g₁z₁)/2, one update per step (Adam's step count advances once)."""
    hyper = ZOHyper(lr=1e-2, eps=1e-3, weight_decay=0.1)
    param = torch.randn(6, 7)
    reference, optimizer = torch_reference(method, hyper, param)
    zo = ZOOptimizer(method, hyper)
    for step, gs in enumerate([(0.7, -0.2), (-1.3, 0.4), (0.2, 0.9)]):
        weights = [(query_seed(step, q), g / 2) for q, g in enumerate(gs)]
        zo.begin_update()
        zo.update_tensor_average("layer.weight", param, weights)
        reference.grad = sum(w * noise(s, "layer.weight", param) for s, w in weights)  # type: ignore[assignment]
        optimizer.step()
        assert torch.allclose(param, reference.detach(), atol=1e-6)
    assert zo.updates == 3


def test_n_spsa_run_resumes_and_refuses_another_n(tune_model: Path, tmp_path: Path) -> None:
    common = dict(model=str(tune_model), task="polarity-k16", steps=4, batch_size=4, lr=1e-3, save_model=False)
    whole = tune(TuneConfig(**common, zo_queries=2))  # type: ignore[arg-type]
    single = tune(TuneConfig(**common))  # type: ignore[arg-type]
    assert whole.zo_queries == 2 and whole.losses != single.losses  # n changes the run
    out = tmp_path / "run"
    tune(TuneConfig(**common, zo_queries=2, out=out, checkpoint_every=2), stop_after=3)  # type: ignore[arg-type]
    assert json.loads((out / "checkpoint.json").read_text())["settings"]["zo_queries"] == 2
    with pytest.raises(TiermemError, match="zo_queries"):
        tune(TuneConfig(**common, out=out, resume=True))  # type: ignore[arg-type]
    resumed = tune(TuneConfig(**common, zo_queries=2, out=out, resume=True))  # type: ignore[arg-type]
    assert resumed.resumed_from == 2 and resumed.losses == whole.losses


@pytest.mark.parametrize(
    ("settings", "needle"),
    [
        ({"zo_queries": 0}, "at least 1"),
        ({"zo_queries": 2, "method": "lora"}, "zeroth-order methods"),
        ({"zo_queries": 2, "method": "zo-sgd-sign"}, "sign"),
        ({"zo_queries": 2, "weights": "stream"}, "--weights resident"),
    ],
)
def test_bad_query_settings_are_one_line_errors(settings: dict[str, object], needle: str) -> None:
    with pytest.raises(TiermemError, match=needle) as info:
        TuneConfig(**settings).validate()  # type: ignore[arg-type]
    assert "\n" not in str(info.value)


def test_cli_flag_reaches_the_run(tune_model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tiermem.cli import main

    args = ["tune", "--model", str(tune_model), "--steps", "1", "--batch-size", "4", "--json"]
    assert main([*args, "--zo-queries", "3"]) == 0
    assert json.loads(capsys.readouterr().out)["zo_queries"] == 3
    assert main([*args, "--zo-queries", "2", "--method", "zo-sgd-sign"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sign" in err[0]
