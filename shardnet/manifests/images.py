"""Container image references as a registry and the kubelet take them, checked before a manifest is rendered.

The grammar is the Docker/OCI distribution reference's (what the kubelet parses an image with; one it refuses
leaves the pod in InvalidImageName)::

    reference := name [":" tag] ["@" digest]
    name      := [host [":" port] "/"] path-component ["/" path-component]*
    path-component := [a-z0-9]+ ([._] | "__" | "-"+) [a-z0-9]+ ...   (lowercase: a registry refuses capitals)
    tag       := [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}
    digest    := "sha256:" 64, "sha384:" 96 or "sha512:" 128 lowercase hex digits (the algorithms registries know)

A name holds 255 characters at most, and a reference of 64 hex digits alone is an image id, not a name.
"""

from __future__ import annotations

import re

from shardnet.errors import ConfigurationError

_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_NAME = rf"(?:{_HOST}(?::[0-9]+)?/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_DIGEST = r"sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128}"
_REFERENCE = re.compile(
    rf"(?P<name>{_NAME})(?::[A-Za-z0-9_][A-Za-z0-9_.-]{{0,127}})?(?:@(?:{_DIGEST}))?", re.ASCII
)
_IMAGE_ID = re.compile(r"[a-f0-9]{64}", re.ASCII)
NAME_MAX = 255  # characters of a reference's name (registry and path), as the distribution reference caps it
SHAPE = "[HOST[:PORT]/]PATH[:TAG][@sha256:DIGEST]"  # sha384 and sha512 digests too


def check_image(image: object, flag: str = "image (--image)") -> None:
    """Refuse ``image`` unless it is a reference the kubelet can pull, in a ConfigurationError naming ``flag``,
    the value and what a valid reference looks like: Kubernetes takes any string, and the pods then sit in
    InvalidImageName."""
    match = _REFERENCE.fullmatch(image) if isinstance(image, str) else None
    if match is not None and len(match["name"]) <= NAME_MAX and not _IMAGE_ID.fullmatch(image):
        return
    raise ConfigurationError(
        f"{flag} {image!r} is not an image reference: give {SHAPE}, such as registry.example:5000/team/search:1.2, "
        "where PATH is lowercase letters and digits, separated by '.', '_', '__' or dashes, in components "
        "separated by '/' (a name of 255 characters at most), TAG 1 to 128 letters, digits, '_', '.' or '-' "
        "not starting with '.' or '-', and DIGEST 64 lowercase hex digits (96 after sha384:, 128 after sha512:)"
    )
