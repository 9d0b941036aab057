"""Retrieval heads: the attention heads whose queries find a fact again, found by a short calibration per model.

A few heads in a few middle layers do the copying when a model answers from its context (Wu et al., "Retrieval Head
Mechanistically Explains Long-Context Factuality", arXiv 2404.15574; DuoAttention, arXiv 2410.10819, finds its
"retrieval heads" with synthetic passkeys the same way). Block memory that asks *those* heads which blocks the
question needs retrieves far better on prose than InfLLM's per-layer mean query (field notes, BENCHMARKS.md).

:func:`calibrate` builds synthetic needle prompts (a seeded word-salad filler, a "secret code" needle, a question
about it: nothing from the benchmark's corpus or templates), runs the model once per prompt with full attention,
and for every (layer, query head) ranks the needle's block among all blocks by :func:`block_scores` (the max over
question tokens and block tokens of the pre-RoPE q.k). Heads that rank the needle's block first most often win.
:func:`retrieval_heads` caches the answer per model fingerprint under ``~/.cache/tiermem/retrieval_heads``.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tiermem.layer_info import attention_modules, describe_layers
from tiermem.staging import staged_file

CALIBRATION_VERSION = 2
DISTRACTORS = 3  # other subjects' codes in the same prompt: a head must match the subject, not only the phrase
_WORDS = {
    "adj": [
        "red",
        "small",
        "old",
        "quiet",
        "bright",
        "heavy",
        "wooden",
        "narrow",
        "busy",
        "cold",
        "distant",
        "green",
        "hidden",
        "famous",
        "empty",
    ],
    "noun": [
        "river",
        "garden",
        "teacher",
        "window",
        "market",
        "bridge",
        "doctor",
        "village",
        "engine",
        "letter",
        "forest",
        "kitchen",
        "harbor",
        "tower",
        "painter",
        "farmer",
        "station",
        "castle",
        "island",
        "library",
    ],
    "verb": [
        "watched",
        "carried",
        "painted",
        "followed",
        "opened",
        "visited",
        "cleaned",
        "repaired",
        "described",
        "passed",
    ],
    "place": ["the hill", "the square", "the old mill", "the school", "the coast", "the valley", "the north road"],
}
# Needle subjects use words the filler never does, as a key in a real document is rare in it.
_SUBJECTS = {
    "adj": ["amber", "crimson", "silver", "velvet", "copper", "scarlet", "ivory", "cobalt", "golden", "violet"],
    "noun": ["falcon", "walrus", "badger", "otter", "heron", "lynx", "beetle", "marmot", "gecko", "bison"],
}


@dataclass(frozen=True)
class RetrievalHeads:
    """The chosen heads as (layer, query head) pairs, best first, and each head's calibration score."""

    heads: list[tuple[int, int]]
    mrr: list[list[float]]  # (layers, query heads): mean reciprocal rank of the needle's block
    prompts: int
    version: int = CALIBRATION_VERSION

    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.heads})


def block_scores(queries: torch.Tensor, keys: torch.Tensor, block_size: int | list[int]) -> torch.Tensor:
    """Score blocks of keys for the queries of one head: max over queries and the block's tokens of q.k.

    ``queries`` (Tq, D) and ``keys`` (S, D), both before RoPE. ``block_size``: one size for consecutive equal
    blocks (the last may be shorter), or the list of block sizes (summing to S). Returns (n_blocks,).
    """
    best = (keys.float() @ queries.float().T).amax(dim=1)  # (S,): each key's best match over the queries
    sizes = _sizes(block_size, keys.shape[0])
    return torch.stack([part.max() for part in best.split(sizes)])


def _sizes(block_size: int | list[int], total: int) -> list[int]:
    if isinstance(block_size, list):
        return block_size
    return [min(block_size, total - s) for s in range(0, total, block_size)]


def combine(per_head: list[torch.Tensor]) -> torch.Tensor:
    """One score per block from several heads' scores: the mean of each head's z-scores over the blocks."""
    z = [(s - s.mean()) / s.std().clamp_min(1e-6) if s.numel() > 1 else s * 0 for s in per_head]
    return torch.stack(z).mean(dim=0)


# -- calibration prompts ---------------------------------------------------------------------------------------
def _sentence(rng: random.Random) -> str:
    w = _WORDS
    return (
        f"The {rng.choice(w['adj'])} {rng.choice(w['noun'])} {rng.choice(w['verb'])} the "
        f"{rng.choice(w['adj'])} {rng.choice(w['noun'])} near {rng.choice(w['place'])}."
    )


@dataclass(frozen=True)
class _Prompt:
    ids: torch.Tensor  # (1, T)
    needle: tuple[int, int]  # token span [a, b) of the needle sentence, subject to value
    question_start: int  # first token of the question


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False).input_ids)


def _prompt(tokenizer: PreTrainedTokenizerBase, length: int, depth: float, rng: random.Random) -> _Prompt:
    """A needle prompt of about ``length`` tokens: filler, the needle at ``depth``, filler, the question."""
    subjects: list[str] = []
    while len(subjects) < 1 + DISTRACTORS:  # the asked subject, then others with their own codes
        subject = f"{rng.choice(_SUBJECTS['adj'])} {rng.choice(_SUBJECTS['noun'])}"
        subjects += [subject] if subject not in subjects else []
    subject = subjects[0]
    value = str(rng.randint(1_000_000, 9_999_999))
    question = f"What is the secret code of the {subject}? Answer with the number only."
    filler: list[str] = []
    budget = length - 64 - len(_encode(tokenizer, question))
    while budget > 0:
        filler.append(_sentence(rng))
        budget -= len(_encode(tokenizer, " " + filler[-1]))
    for other in subjects[1:]:
        filler.insert(rng.randrange(len(filler)), f"The secret code of the {other} is {rng.randint(10**6, 10**7 - 1)}.")
    cut = round(depth * len(filler))
    before = " ".join(filler[:cut]) + " "
    needle = f"The secret code of the {subject} is "
    after = ". " + " ".join(filler[cut:])
    marker = "\x00CONTEXT\x00"
    if getattr(tokenizer, "chat_template", None):
        user = f"{marker}\n\n{question}"
        messages = [{"role": "user", "content": user}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert isinstance(rendered, str)
        head, tail = rendered.split(marker)
    else:
        head, tail = (tokenizer.bos_token or ""), f"\n\nQuestion: {question}\nAnswer:"
    parts = [_encode(tokenizer, text) for text in (head + before, needle, value, after, tail)]
    a = len(parts[0])
    b = a + len(parts[1]) + len(parts[2])
    question_start = b + len(parts[3])
    ids = torch.tensor([[i for p in parts for i in p]])
    return _Prompt(ids, (a, b), question_start)


# -- capture and rank -------------------------------------------------------------------------------------------
def _capture(model: PreTrainedModel, ids: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pre-RoPE queries and keys of every layer for one forward: lists of (1, T, H, D) tensors."""
    qs: list[torch.Tensor] = []
    ks: list[torch.Tensor] = []
    hooks = []
    for module in attention_modules(model):
        d = int(module.head_dim)
        # QK-norm (Qwen3, Gemma3) normalises each head's vector: applied here to the projections' outputs, since
        # the norm modules see (1, T, H, D) in some families and (1, H, T, D) in others.
        q_norm = getattr(module, "q_norm", None)
        k_norm = getattr(module, "k_norm", None)

        def keep(store: list[torch.Tensor], head_dim: int, norm: Any) -> Any:
            def hook(_m: Any, _i: Any, out: torch.Tensor) -> None:
                x = out.detach().reshape(1, out.shape[1], -1, head_dim)
                store.append(norm(x) if norm is not None else x)

            return hook

        hooks += [
            module.q_proj.register_forward_hook(keep(qs, d, q_norm)),
            module.k_proj.register_forward_hook(keep(ks, d, k_norm)),
        ]
    try:
        with torch.inference_mode():
            model(input_ids=ids, use_cache=False, logits_to_keep=1)
    finally:
        for hook in hooks:
            hook.remove()
    return qs, ks


def needle_ranks(
    qs: list[torch.Tensor], ks: list[torch.Tensor], prompt: _Prompt, block_size: int, skip: int
) -> torch.Tensor:
    """Rank (0 = first) of the needle's block for every (layer, query head): (L, Hq).

    Candidates are the blocks of the context from token ``skip`` (tokens before it are init tokens, always
    attended) to the question; the needle's block is the best-ranked block holding a token of the needle sentence
    (its subject or its value: retrieval adds the block after each retrieved one, so either finds the value).
    Ties count against the needle (a head that scores every block alike ranks it last, not first). Scores are
    :func:`block_scores`, computed for all heads of a layer at once.
    """
    first, q0 = skip, prompt.question_start
    a, b = prompt.needle
    n = q0 - first
    n_blocks = -(-n // block_size)
    needle_blocks = sorted({(p - first) // block_size for p in range(a, b)})
    ranks = []
    for q, k in zip(qs, ks, strict=True):
        hq, hkv = q.shape[2], k.shape[2]
        queries = q[0, q0:].transpose(0, 1).float()  # (Hq, Tq, D)
        keys = k[0, first:q0].transpose(0, 1).float().repeat_interleave(hq // hkv, dim=0)  # (Hq, S, D)
        best = (queries @ keys.transpose(1, 2)).amax(dim=1)  # (Hq, S)
        padded = torch.nn.functional.pad(best, (0, n_blocks * block_size - n), value=float("-inf"))
        scores = padded.view(hq, n_blocks, block_size).amax(dim=-1)  # (Hq, n_blocks)
        needle = scores[:, needle_blocks].amax(dim=1, keepdim=True)
        ranks.append((scores >= needle).sum(dim=1) - 1)
    return torch.stack(ranks)


def calibrate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    n_heads: int = 8,
    prompts: int = 6,
    length: int = 2048,
    block_size: int = 64,
    seed: int = 0,
) -> RetrievalHeads:
    """Find the ``n_heads`` query heads that best rank a needle's block first (mean reciprocal rank)."""
    max_positions = int(getattr(model.config, "max_position_embeddings", 0) or 0)
    if max_positions:
        length = min(length, max_positions - 96)
    rng = random.Random(f"retrieval-heads/{seed}")
    total: torch.Tensor | None = None
    for i in range(prompts):
        prompt = _prompt(tokenizer, length, (i + 0.5) / prompts, rng)
        qs, ks = _capture(model, prompt.ids)
        reciprocal = 1.0 / (needle_ranks(qs, ks, prompt, block_size, skip=min(64, prompt.needle[0])) + 1).double()
        total = reciprocal if total is None else total + reciprocal
    assert total is not None
    mrr = total / prompts
    # Only global-attention layers hold block memory (Gemma3's local layers keep their window under every policy).
    local = [i.layer_idx for i in describe_layers(model) if i.sliding_window is not None]
    mrr[local] = -1.0
    order = mrr.flatten().argsort(descending=True)[:n_heads].tolist()
    heads = [(i // mrr.shape[1], i % mrr.shape[1]) for i in order]
    return RetrievalHeads(heads, [[round(float(x), 4) for x in row] for row in mrr], prompts)


# -- per-model cache ---------------------------------------------------------------------------------------------
def model_fingerprint(model: PreTrainedModel) -> str:
    """Config plus a sample of the weights: a different model, or the same one in another dtype, differs."""
    digest = hashlib.sha256(model.config.to_json_string(use_diff=False).encode())
    digest.update(str(model.dtype).encode())
    module = attention_modules(model)[0]
    for tensor in (module.q_proj.weight, module.k_proj.weight):
        digest.update(tensor.detach().flatten()[:4096].float().numpy().tobytes())
    return digest.hexdigest()[:16]


def retrieval_heads(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, n_heads: int, folder: Path | None = None
) -> RetrievalHeads:
    """The model's ``n_heads`` retrieval heads, calibrated once and cached on disk per model fingerprint."""
    if folder is None:
        from tiermem.models import cache_root

        folder = cache_root() / "retrieval_heads"
    path = folder / f"{model_fingerprint(model)}-{n_heads}.json"
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("version") == CALIBRATION_VERSION:
                return RetrievalHeads([(int(a), int(b)) for a, b in data["heads"]], data["mrr"], data["prompts"])
        except (ValueError, KeyError, TypeError):
            pass  # a damaged cache file: calibrate again and overwrite it
    found = calibrate(model, tokenizer, n_heads)
    with staged_file(path) as partial:
        partial.write_text(json.dumps(asdict(found)))
    return found
