"""The processes that serve: workers running an Executor, heads routing to shards, local deployments."""
