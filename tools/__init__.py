"""Helpers that are not one of the project's concepts: run plumbing (DDP set-up, atomic checkpoints, signals,
cross-rank checks), checkpoint reading with the authors' release formats, the demo set, the benchmark, and
building LAION-CLAP's HTSAT-tiny from its package."""
