"""RMSNorm in one call for bf16 models (tiermem.norms): at least as accurate as transformers', only in bf16."""

from __future__ import annotations

import copy

import pytest
import torch

from tests.conftest import tiny
from tiermem.norms import fuse_norms


def _norms(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_bf16_norms_take_one_call_and_are_no_less_accurate(arch: str) -> None:
    reference = tiny(arch)  # float32, with norm weights away from 1 (so their rounding matters) and bf16-exact
    for i, norm in enumerate(_norms(reference)):
        noise = torch.randn(norm.weight.shape, generator=torch.Generator().manual_seed(i))
        norm.weight.data = (1 + 0.3 * noise).to(torch.bfloat16).float()
    plain, model = copy.deepcopy(reference).to(torch.bfloat16), copy.deepcopy(reference).to(torch.bfloat16)
    norms = _norms(model)
    assert fuse_norms(model) == len(norms) > 0  # q_norm and k_norm too, for Qwen3
    x = (torch.randn(8, norms[0].weight.shape[0], generator=torch.Generator().manual_seed(2)) * 3).to(torch.bfloat16)
    norm = norms[0]
    exact = x.double() / (x.double().pow(2).mean(-1, keepdim=True) + norm.variance_epsilon).sqrt()
    exact = exact * norm.weight.double()
    ours, theirs = norm(x).double(), _norms(plain)[0](x).double()
    assert not torch.equal(ours, theirs)  # the one-call path really ran
    assert (ours - exact).abs().mean() <= (theirs - exact).abs().mean()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        want = reference(ids).logits
        ours_err = (model(ids).logits.float() - want).abs().mean()
        theirs_err = (plain(ids).logits.float() - want).abs().mean()
    assert ours_err <= 1.25 * theirs_err  # against float32, the whole model: no worse than transformers' bf16


def test_the_weight_is_read_at_each_call() -> None:
    model = tiny("llama").to(torch.bfloat16)
    fuse_norms(model)
    norm = model.model.norm
    x = torch.randn(2, norm.weight.shape[0]).to(torch.bfloat16)
    before = norm(x)
    norm.weight.data.mul_(2)  # e.g. a streamed layer's weights replaced in place
    assert torch.allclose(norm(x).float(), 2 * before.float(), rtol=2**-7)


@pytest.mark.parametrize(("arch", "dtype"), [("llama", torch.float32), ("gemma3", torch.bfloat16)])
def test_float32_and_other_norms_are_left_alone(arch: str, dtype: torch.dtype) -> None:
    model = tiny(arch).to(dtype)
    assert fuse_norms(model) == 0
    assert not any("forward" in vars(m) for m in _norms(model))


@pytest.mark.parametrize("width", [64, 576, 960])
def test_the_layer_norm_form_equals_torch_rms_norm(width: int) -> None:
    """RMSNorm computed as LayerNorm of ``[x, -x]`` (tiermem.norms): bit for bit ``torch.rms_norm`` in bf16, at
    small, unit and large scales and any leading shape (Qwen3's per-head norms see (B, H, T, D))."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    generator = torch.Generator().manual_seed(width)
    norm = LlamaRMSNorm(width)
    norm.weight.data = 0.5 + torch.rand(width, generator=generator)
    norm = norm.to(torch.bfloat16)
    assert fuse_norms(norm) == 1
    for scale, shape in [(1e-2, (1, 1)), (1.0, (3, 5)), (40.0, (2, 3, 4))]:
        x = (torch.randn(*shape, width, generator=generator) * scale).to(torch.bfloat16)
        out = norm(x)
        assert out.is_contiguous() and torch.equal(out, torch.rms_norm(x, (width,), norm.weight, norm.variance_epsilon))
