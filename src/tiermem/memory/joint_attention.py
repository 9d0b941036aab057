"""One softmax over two key sets rotated differently: the local window and the retrieved memory.

InfLLM and EM-LLM attend to the local window with ordinary relative RoPE and to memory with the query rotated at one
fixed angle, in a single softmax. SDPA cannot take two query rotations, so this is written out with matmuls; it also
returns the attention each local key received, which those methods use to pick representative tokens.
"""

from __future__ import annotations

import torch


def _logits(q: torch.Tensor, keys: torch.Tensor, mask: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """(1, Hkv, G, T, S) logits of grouped queries ``q`` (1, Hq, T, D) against ``keys`` (1, Hkv, S, D)."""
    _, hq, t, d = q.shape
    hkv = keys.shape[1]
    logits = (q.reshape(1, hkv, (hq // hkv) * t, d) @ keys.transpose(-1, -2)).mul_(scaling)
    logits = logits.view(1, hkv, hq // hkv, t, keys.shape[2])
    if mask is not None:
        logits.masked_fill_(~mask, float("-inf"))
    return logits


def joint_attention(
    q_local: torch.Tensor,
    k_local: torch.Tensor,
    v_local: torch.Tensor,
    mask_local: torch.Tensor,
    q_global: torch.Tensor,
    k_global: torch.Tensor,
    v_global: torch.Tensor,
    mask_global: torch.Tensor | None,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over local and global keys in one softmax.

    ``q_*`` (1, Hq, T, D); ``k_*``/``v_*`` (1, Hkv, S_*, D); masks (T, S_*) with True = visible (``mask_global``
    None: all visible). Every query must see at least one key. Returns the output (1, Hq, T, D) and the attention
    mass each local key received, summed over the T queries, (Hq, S_local).
    """
    _, hq, t, d = q_local.shape
    hkv = k_local.shape[1]
    local = _logits(q_local, k_local, mask_local, scaling)
    glob = _logits(q_global, k_global, mask_global, scaling) if k_global.shape[2] else None
    peak = local.amax(dim=-1, keepdim=True)
    if glob is not None:
        peak = torch.maximum(peak, glob.amax(dim=-1, keepdim=True))
    local = local.sub_(peak).exp_()
    denom = local.sum(dim=-1, keepdim=True)
    out = local.view(1, hkv, -1, k_local.shape[2]) @ v_local  # (1, Hkv, G*T, D)
    if glob is not None:
        glob = glob.sub_(peak).exp_()
        denom = denom + glob.sum(dim=-1, keepdim=True)
        out = out + glob.view(1, hkv, -1, k_global.shape[2]) @ v_global
    out = out.view(1, hkv, hq // hkv, t, d) / denom
    received = (local / denom).sum(dim=3).reshape(hq, k_local.shape[2])
    return out.reshape(1, hq, t, d), received
