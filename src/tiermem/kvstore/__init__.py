"""Where KV bytes live: dense growable blocks in RAM (more tiers come with the retrieval policies)."""

from tiermem.kvstore.dense import KVBuffer

__all__ = ["KVBuffer"]
