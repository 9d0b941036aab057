"""The benchmark harness: long-context tasks, sweeps with resume, tables and plots."""
