"""Turn the outside world (control requests, Kubernetes) into pool membership changes."""
