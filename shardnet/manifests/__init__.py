"""Manifests that run a shardnet deployment on a cluster, rendered as plain data."""
