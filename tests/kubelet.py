"""What the kubelet does to a container's arguments before it runs them, for tests that run rendered commands.

It expands ``$(VAR)`` from the container's ``env`` (a variable it does not
know stays as written) and turns ``$$`` into ``$``, in every argument
(Kubernetes' "Define Dependent Environment Variables" rules).
"""

from __future__ import annotations

import re
from typing import Any

_REFERENCE = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def container_environment(container: dict[str, Any], namespace: str) -> dict[str, str]:
    """The container's variables: literal values, and the pod's namespace where the downward API gives it."""
    environment = {}
    for variable in container.get("env", []):
        if "value" in variable:
            environment[variable["name"]] = variable["value"]
        elif variable.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "metadata.namespace":
            environment[variable["name"]] = namespace
        else:
            raise AssertionError(f"a variable these tests cannot resolve: {variable}")
    return environment


def expand(argument: str, environment: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        return environment.get(match.group(1), match.group(0))

    return _REFERENCE.sub(replace, argument)


def pod_arguments(container: dict[str, Any], namespace: str) -> list[str]:
    """The container's ``args`` as the process in a pod of ``namespace`` receives them."""
    environment = container_environment(container, namespace)
    return [expand(argument, environment) for argument in container["args"]]
