"""Bytes and messages of the Jina 3 wire protocol, and nothing else."""
