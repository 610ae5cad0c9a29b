"""Polling: does a request go to one shard (ANY) or to every shard (ALL)."""

from __future__ import annotations

import enum
import json
import logging
from types import MappingProxyType
from typing import Any, Mapping, Union

from shardnet.errors import ConfigurationError

logger = logging.getLogger(__name__)


class PollingType(enum.IntEnum):
    """ANY: one replica of one shard. ALL: one replica of every shard, answers merged."""

    ANY = 1
    ALL = 2

    def __str__(self) -> str:
        return self.name  # as Jina's PollingType prints: "ALL", not "2"

    def __format__(self, spec: str) -> str:
        return format(self.name, spec)

    def to_string(self) -> str:
        """The name, as Jina's enums give it."""
        return self.name

    @property
    def is_push(self) -> bool:
        """Jina's word for ANY (a request pushed to one shard)."""
        return self is PollingType.ANY

    @property
    def is_block(self) -> bool:
        """Jina's word for ALL (the caller blocks until every shard answered)."""
        return self is PollingType.ALL

    @classmethod
    def from_string(cls, text: str) -> "PollingType":
        """Jina's name for ``parse`` of text ("any", "ALL")."""
        return cls.parse(text)

    @classmethod
    def parse(cls, value: Union[str, int, "PollingType"]) -> "PollingType":
        """``"ANY"``/``"all"``, 1/2 or a PollingType; anything else is a ConfigurationError."""
        if isinstance(value, PollingType):
            return value
        if isinstance(value, bool):  # an int to Python, and 1 is ANY: a JSON true is no polling
            raise ConfigurationError(f"unknown polling {value!r}: expected ANY or ALL")
        try:
            return cls[value.strip().upper()] if isinstance(value, str) else cls(value)
        except (KeyError, ValueError):
            raise ConfigurationError(f"unknown polling {value!r}: expected ANY or ALL") from None


def _polling(kind: Any, what: str) -> PollingType:
    """``kind`` as PollingType.parse reads it, refused naming ``what`` (the endpoint or the default)."""
    try:
        return PollingType.parse(kind)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{what}: {exc}") from None


class PollingMap:
    """Polling per endpoint: a default (``*``) and the endpoints that differ from it.

    As a Jina head, ``/search`` goes to ALL and ``/index`` to ANY whatever the
    default is, unless a map names them: a head with ``--polling ANY`` in front
    of several shards still searches every shard.

    >>> polling = PollingMap.parse("ANY")
    >>> polling["/search"].name, polling["/index"].name, polling["/tag"].name
    ('ALL', 'ANY', 'ANY')
    >>> PollingMap.parse('{"/search": "ANY", "*": "ALL"}')["/search"].name
    'ANY'
    """

    JINA_DEFAULTS = MappingProxyType({"/search": PollingType.ALL, "/index": PollingType.ANY})

    def __init__(
        self,
        by_endpoint: Mapping[str, Union[PollingType, str]],
        default: Union[PollingType, str] = PollingType.ANY,
    ):
        """``by_endpoint``: the polling of the endpoints named, ``default`` the others'; PollingType members or
        their names (``"ALL"``, ``"any"``), converted here: a name kept as text would equal no PollingType, and
        fail later, far from here (repr, a Deployment). ``PollingMap.parse`` reads JSON text and ``*``."""
        if not isinstance(by_endpoint, Mapping):
            raise ConfigurationError(
                f"PollingMap takes a mapping of endpoint to polling, got {by_endpoint!r:.100} "
                "(PollingMap.parse reads text: ANY, ALL or a JSON object)"
            )
        checked = {}
        for endpoint, kind in by_endpoint.items():
            if not isinstance(endpoint, str):
                raise ConfigurationError(f"polling map key {endpoint!r:.100}: an endpoint is text, such as '/search'")
            if not endpoint:
                raise ConfigurationError("polling map has an empty endpoint: name one such as '/search', or '*'")
            if endpoint == "*":  # which would win, it or default=?
                raise ConfigurationError(
                    "polling map key '*': give PollingMap the default as default= (PollingMap.parse reads '*')"
                )
            if not endpoint.startswith("/"):  # legal (Jina allows it), and usually a typo
                logger.warning(
                    "polling map key %r has no leading '/': it matches the endpoint %r only, not %r",
                    endpoint, endpoint, f"/{endpoint}",
                )
            checked[endpoint] = _polling(kind, f"polling map {endpoint!r:.100}")
        self._by_endpoint = {**self.JINA_DEFAULTS, **checked}
        self.default = _polling(default, "polling map default")

    @classmethod
    def parse(cls, value: Union[str, Mapping[str, str], PollingType, "PollingMap", None]) -> "PollingMap":
        """Accept ``ANY``, ``ALL``, a JSON object text, a dict (``*``: the default), or a PollingMap (as it is:
        checked when it was made)."""
        if value is None:
            return cls({})
        if isinstance(value, PollingMap):
            return value
        if isinstance(value, str) and value.strip().startswith("{"):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ConfigurationError(f"polling map is not valid JSON: {exc}") from None
        if isinstance(value, Mapping):
            parsed = {str(endpoint): kind for endpoint, kind in value.items()}  # checked by the constructor
            default = PollingType.parse(parsed.pop("*", PollingType.ANY))
            return cls(parsed, default)
        return cls({}, PollingType.parse(value))

    def __getitem__(self, endpoint: str) -> PollingType:
        return self._by_endpoint.get(endpoint, self.default)

    @property
    def polls_all(self) -> bool:
        """Whether some endpoint goes to every shard (``/search`` does, unless the map says otherwise)."""
        return self.default is PollingType.ALL or PollingType.ALL in self._by_endpoint.values()

    def to_json(self) -> str:
        return json.dumps({**{k: v.name for k, v in self._by_endpoint.items()}, "*": self.default.name})

    def __repr__(self) -> str:
        return f"PollingMap({self.to_json()})"
