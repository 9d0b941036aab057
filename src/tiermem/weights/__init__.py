"""Weight placement: ``resident`` (plain HF), ``stream`` (layers from disk through k RAM slots) and ``flash``."""
