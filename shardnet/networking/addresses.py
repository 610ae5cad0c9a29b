"""Parse replica addresses once, so that adding and looking up use the same key.

``https://host:port`` and ``grpcs://host:port`` ask for TLS; ``grpc://`` and a
bare ``host:port`` do not. The key of an address is ``host:port`` whatever its
scheme, so ``has_connection('https://h:1')`` finds what ``add_connection('https://h:1')``
added (the original design stripped the scheme in one place only).

``unix:/absolute/path`` (or gRPC's ``unix:///absolute/path``) is a Unix domain
socket: a worker on the head's machine, reached without the TCP stack (about a
sixth less client CPU per call, ``benchmarks/transports.py``). In a control
request's related entity it travels as address ``unix:/path`` and port 0.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import unicodedata
import urllib.parse
from dataclasses import dataclass
from typing import Optional, Union

from shardnet.errors import ConfigurationError

_TLS_SCHEMES = {"https": True, "grpcs": True, "http": False, "grpc": False}
_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"})
_LOCAL_NAMES = _LOOPBACK_NAMES | {""}  # and what parses as an address: loopback or unspecified (0.0.0.0, ::)
UNIX_SCHEME = "unix:"
MAX_UNIX_PATH_BYTES = 107  # sockaddr_un.sun_path holds 108 bytes, the terminating NUL included
MAX_HOST_CHARS = 253  # the longest DNS name; a longer host could only be a mistake or an attack
MAX_LABEL_CHARS = 63  # the longest label (the text between dots) of a DNS name
# a label of a host name: letters, digits, '-' and '_' (Docker and compose service names have it, getaddrinfo takes
# it), not starting or ending with '-'; its length is checked apart, to say so
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?")
# what gRPC reads as the scheme of a target "X:rest" rather than as a host: unix-abstract:4242 is an abstract socket
_GRPC_SCHEMES = frozenset({"dns", "ipv4", "ipv6", "unix", "unix-abstract", "vsock", "xds", "google-c2p"})


@dataclass(frozen=True)
class Address:
    """A parsed replica address: ``target`` is what gRPC dials, ``tls`` whether to encrypt.

    A Unix socket has ``unix_path`` set, host ``localhost`` and port 0.
    """

    host: str
    port: int
    tls: bool = False
    unix_path: Optional[str] = None

    @property
    def target(self) -> str:
        if self.unix_path is not None:
            return f"{UNIX_SCHEME}{self.unix_path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def dial_target(self) -> str:
        """``target`` as gRPC is given it: gRPC reads a ``unix:`` target as a URI, so a path's '?' or '#' would
        end it and a '%41' name another file ('A'); percent-encoded, every byte of the path is itself."""
        return unix_target(self.unix_path) if self.unix_path is not None else self.target

    def entity(self) -> tuple[str, int]:
        """The (address, port) pair a control request's related entity carries for this address."""
        return (self.target, 0) if self.unix_path is not None else (self.host, self.port)

    def __str__(self) -> str:
        return f"https://{self.target}" if self.tls else self.target


def unix_target(path: str) -> str:
    """The gRPC target (to dial or to bind) of the Unix socket at ``path``, percent-encoded (see ``dial_target``)."""
    return UNIX_SCHEME + urllib.parse.quote(path, safe="/")


def entity_address(address: str, port: int) -> str:
    """The address text of a related entity's (address, port): ``host:port``, ``[v6]:port`` or ``unix:/path``."""
    if address.startswith(UNIX_SCHEME):
        return address
    try:
        bracketed = ipaddress.ip_address(address).version == 6
    except ValueError:
        bracketed = False
    return f"[{address}]:{port}" if bracketed else f"{address}:{port}"


# what a socket path may not hold, as a name may not (cli.options.check_visible_name): controls, line and paragraph
# separators, bidirectional overrides; a no-break space, U+3000 or an emoji's joiner are shown as they are
_UNPRINTED_CATEGORIES = frozenset(("Cc", "Zl", "Zp"))
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def _parse_unix(address: str, text: str, tls: bool) -> Address:
    if tls:
        raise ConfigurationError(f"bad address {address!r:.200}: a Unix socket is local and plaintext, it takes no TLS")
    path = text.removeprefix(UNIX_SCHEME)
    if path.startswith("//"):  # gRPC's unix:///absolute/path form
        path = path[2:]
    if not path.startswith("/"):
        raise ConfigurationError(
            f"bad address {address!r:.200}: a Unix socket needs an absolute path (unix:/run/worker.sock); "
            "a relative one would depend on each process's working directory"
        )
    try:  # gRPC takes the path as UTF-8 text: bytes the locale could not decode name no socket it can reach
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigurationError(f"bad address {address!r:.200}: the socket path is not text (bytes not in the "
                                 "locale's encoding)") from None
    # C0 and C1 controls (\x9b is a terminal's CSI), DEL, line separators (U+2028, \x85), bidi overrides: the path
    # is written in log lines and status output as it is
    if any(unicodedata.category(ch) in _UNPRINTED_CATEGORIES or ch in _BIDI_CONTROLS for ch in path):
        raise ConfigurationError(f"bad address {address!r:.200}: control characters in the socket path")
    # one spelling per socket, so that one worker is one replica: "//" and "/./" name the same file ("/../" may
    # not, under a symbolic link, and is kept)
    path = "/" + "/".join(part for part in path.split("/") if part not in ("", "."))
    if len(path.encode()) > MAX_UNIX_PATH_BYTES:
        raise ConfigurationError(
            f"bad address {address!r:.200}: a Unix socket path holds at most {MAX_UNIX_PATH_BYTES} bytes, "
            f"this one has {len(path.encode())}"
        )
    return Address(host="localhost", port=0, unix_path=path)


def parse_address(address: str, tls: bool = False) -> Address:
    """Parse ``[scheme://]host:port`` (host: an IPv4 address, a DNS name or an IPv6 address in brackets) or
    ``unix:/path``; ConfigurationError when malformed."""
    if not isinstance(address, str) or not address.strip():
        raise ConfigurationError(f"bad address {address!r:.200}: expected host:port")
    text = address.strip()
    if text.startswith(UNIX_SCHEME):
        return _parse_unix(address, text, tls)
    if "://" in text:
        scheme, _, text = text.partition("://")
        if scheme.lower() not in _TLS_SCHEMES:
            raise ConfigurationError(f"bad address {address!r:.200}: unknown scheme {scheme!r} (use grpc, grpcs, http or https)")
        tls = tls or _TLS_SCHEMES[scheme.lower()]
    text = text.rstrip("/")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ConfigurationError(f"bad address {address!r:.200}: expected [ipv6]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigurationError(f"bad address {address!r:.200}: {host!r:.200} in brackets is not an IPv6 address") from None
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep or ":" in host:
            raise ConfigurationError(f"bad address {address!r:.200}: expected host:port")
    if not host or not host.isprintable() or any(ch.isspace() or ch in "/?#@" for ch in host):
        raise ConfigurationError(f"bad address {address!r:.200}: bad host {host!r:.200}")
    if host.lower() in _GRPC_SCHEMES:
        raise ConfigurationError(
            f"bad address {address!r:.200}: gRPC reads {host!r} as the scheme of a target, not as a host "
            f"({host}:{port_text} would dial something else)"
        )
    if len(host) > MAX_HOST_CHARS:
        raise ConfigurationError(
            f"bad address {address[:40]!r}...: a host name has at most {MAX_HOST_CHARS} characters, this one {len(host)}"
        )
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ConfigurationError(f"bad address {address!r:.200}: port must be a number from 1 to 65535")
    fault = None if sep == "]" else _host_name_fault(host)  # one in brackets was checked as IPv6 above
    if fault is not None:
        raise ConfigurationError(f"bad address {address!r:.100}: bad host {host!r:.100}: {fault}")
    return Address(host=host, port=int(port_text), tls=tls)


def _host_name_fault(host: str) -> Optional[str]:
    """Why ``host`` is neither an IPv4 address (as a dial reads it: ``127.1`` and ``0x7f.1`` too) nor a DNS name,
    or None: gRPC would take ``*``, ``]`` or ``999.1.1.1`` and route to a name no resolver ever finds."""
    with contextlib.suppress(OSError):
        socket.inet_aton(host)
        return None
    if not host.isascii():
        try:
            hint = f"its IDNA form, {host.encode('idna').decode('ascii')!r}"
        except UnicodeError:
            hint = "its IDNA (xn--) form"
        return f"a host name is ASCII: write an international name in {hint}"
    labels = host.removesuffix(".").split(".")  # one final dot: a fully qualified name
    for label in labels:
        if len(label) > MAX_LABEL_CHARS:
            return f"a DNS label has at most {MAX_LABEL_CHARS} characters, {label[:20]!r}... has {len(label)}"
        if not _LABEL.fullmatch(label):
            return (
                f"{'an empty label (a dot at the start or two in a row)' if not label else f'label {label!r}'}: "
                f"a host name is labels of 1 to {MAX_LABEL_CHARS} ASCII letters, digits, '-' and '_' between dots, "
                "none starting or ending with '-' (or an IP address)"
            )
    if all(label.isdigit() for label in labels):
        return "all numbers, but no IPv4 address (four numbers from 0 to 255, no final dot)"
    return None


def _unbracketed(hostname: str) -> str:
    """``hostname`` without spaces around it and without a pair of brackets around an IPv6 address; an unbalanced
    bracket stays (``[::1`` is no address, as ``parse_address`` says, so not ``::1`` either)."""
    host = hostname.strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _ip_or_name(hostname: str) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address, str]:
    """``hostname`` as an IP address, else as the lower-case name (brackets, spaces and a final dot dropped).

    The numeric forms a dial reads as IPv4 too (``127.1``, ``0``, ``2130706433``, ``0x7f.1``: inet_aton's, which
    getaddrinfo follows) count as the address they stand for."""
    name = _unbracketed(hostname).lower()
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(name)
    if name and all(ch in "0123456789abcdefx." for ch in name):
        with contextlib.suppress(OSError):  # no number inet_aton reads: a name made of hex digits ("cafe")
            return ipaddress.IPv4Address(socket.inet_aton(name))
    return name.removesuffix(".")  # "localhost." is localhost, fully qualified


def _unmapped(host: Union[ipaddress.IPv4Address, ipaddress.IPv6Address]) -> Union[ipaddress.IPv4Address, ipaddress.IPv6Address]:
    """An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) as the IPv4 address a dial of it reaches."""
    if isinstance(host, ipaddress.IPv6Address) and host.ipv4_mapped is not None:
        return host.ipv4_mapped
    return host


def canonical_host(hostname: str) -> str:
    """``hostname`` without brackets, an IP address in its standard form (``[::1]``, ``0:0::1`` -> ``::1``)."""
    host = _ip_or_name(hostname)
    return _unbracketed(hostname) if isinstance(host, str) else str(host)


def same_host(first: str, second: str) -> bool:
    """Whether two host names or addresses are written alike, whatever their brackets, case or IPv6 form."""
    return _ip_or_name(first) == _ip_or_name(second)


def host_is_loopback(hostname: str) -> bool:
    """True for a name or address only this machine reaches (localhost, 127.0.0.0/8, ::1), unlike
    ``host_is_local`` which also takes the unspecified address (0.0.0.0: every interface); never raises."""
    if not isinstance(hostname, str):
        return False
    host = _ip_or_name(hostname)
    return host in _LOOPBACK_NAMES if isinstance(host, str) else _unmapped(host).is_loopback


def dialled_host(hostname: str) -> str:
    """The address a dial of ``hostname`` reaches, for telling where a connection lands: an IPv4-mapped IPv6
    address as its IPv4, the unspecified addresses as loopback (Linux connects 0.0.0.0 and :: to this machine),
    a loopback name as 127.0.0.1; anything else in its canonical form. Other names are not resolved."""
    host = _ip_or_name(hostname)
    if isinstance(host, str):
        return "127.0.0.1" if host in _LOOPBACK_NAMES else host
    host = _unmapped(host)
    if host.is_unspecified:
        return "127.0.0.1" if host.version == 4 else "::1"
    return str(host)


def is_own_address(host: str) -> bool:
    """Whether the IP address ``host`` is one of this machine's own: only those can be bound (unless the
    kernel is told to bind any, net.ipv4.ip_nonlocal_bind, which no one sets on a head's machine by chance)."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    address = _unmapped(address)
    if address.is_unspecified or address.is_multicast:
        return False
    if address.is_loopback:  # 127.0.0.0/8 is this machine's, though a dial of 127.0.0.2 leaves from 127.0.0.1
        return True
    family = socket.AF_INET6 if address.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((str(address), 0))
        except OSError:
            return False
    # under net.ipv4.ip_nonlocal_bind (a keepalived or HAProxy host's floating address) any address binds: one of
    # this machine's own is also where a dial of it leaves from (a UDP connect sends nothing)
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((str(address), 9))
            source = ipaddress.ip_address(probe.getsockname()[0].partition("%")[0])
        except (OSError, ValueError):
            return False
    # by the address alone: a link-local one's scope (fe80::1%4 from a gRPC peer) is not in getsockname's answer
    return _unmapped(source).packed == address.packed


def host_is_local(hostname: str) -> bool:
    """True for localhost, loopback and unspecified addresses and the empty name; never raises."""
    if not isinstance(hostname, str):
        return False
    host = _ip_or_name(hostname)
    if isinstance(host, str):
        return host in _LOCAL_NAMES
    host = _unmapped(host)
    return host.is_loopback or host.is_unspecified


def is_remote_local_connection(first: str, second: str) -> bool:
    """True when ``first`` is a public (global) host and ``second`` a private or loopback one.

    This is the case where a connection from ``first`` cannot reach ``second``
    (for example a gateway on a public IP told to call ``localhost``). Names
    other than ``localhost`` count as global for ``first`` and as not local for
    ``second``, as in the original design.
    """
    try:
        first_global = ipaddress.ip_address(first).is_global
    except ValueError:
        first_global = first != "localhost"
    try:
        second_ip = ipaddress.ip_address(second)
        second_local = second_ip.is_private or second_ip.is_loopback
    except ValueError:
        second_local = second == "localhost"
    return first_global and second_local
