"""Identifiers as Jina makes them: 32 lowercase hex characters."""

import uuid


def new_id() -> str:
    """A fresh random id for a request or a document."""
    return uuid.uuid4().hex
