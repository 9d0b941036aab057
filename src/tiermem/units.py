"""Parsing of what users type: token counts (``4k``), byte sizes (``512MB``) and UTF-8 text files.

A leaf module (it imports nothing from tiermem but the error type), so every command's argument parser can use it
without importing another command's module.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tiermem.errors import TiermemError


def parse_tokens(text: str) -> int:
    """``"512"`` -> 512, ``"4k"`` -> 4096, ``"1m"`` -> 1048576."""
    raw = text.strip().lower()
    scale = {"k": 1024, "m": 1024 * 1024}.get(raw[-1:], 1)
    try:
        value = int(float(raw[:-1] if scale > 1 else raw) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a token count (e.g. 512, 4k)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be at least 1")
    return value


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 2**10,
    "kib": 2**10,
    "m": 2**20,
    "mb": 2**20,
    "mib": 2**20,
    "g": 2**30,
    "gb": 2**30,
    "gib": 2**30,
}


def parse_size(text: str) -> int:
    """``"512MB"`` -> 536870912. Units are binary: 1 KB = 1 KiB = 1024 bytes, likewise MB and GB."""
    raw = text.strip().lower().replace(" ", "")
    number = raw.rstrip("kmgib")
    unit = raw[len(number) :]
    try:
        value = float(number) * _SIZE_UNITS[unit]
    except (ValueError, KeyError):
        raise argparse.ArgumentTypeError(f"'{text}' is not a size (e.g. 512MB, 2GB)") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"'{text}' must be positive")
    return int(value)


def read_text_file(path: str, what: str = "context file") -> str:
    """Read a UTF-8 text file, or raise a one-line :class:`TiermemError` saying what is wrong with it."""
    file = Path(path)
    if not file.exists():
        raise TiermemError(f"{what} '{path}' not found")
    if not file.is_file():
        raise TiermemError(f"{what} '{path}' is not a regular file")
    data = file.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TiermemError(
            f"{what} '{path}' is not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None
    if not text.strip():
        raise TiermemError(f"{what} '{path}' is empty")
    return text
