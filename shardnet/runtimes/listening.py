"""Whether this process can listen where it is told to: ports, wildcard hosts and Unix socket paths.

Checked before anything slow (an Executor's load) so that a port in use or a typo'd host is refused at once, in
words a person reads, rather than by gRPC's bind after the load; the Unix path check also guards the bind itself
(a live server's socket is never replaced). Apart from ``server.py``: these checks bind and close plain sockets
and know nothing of gRPC, and the metrics listener (``metrics.py``) binds with ``wildcard_socket`` as they check.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from typing import TYPE_CHECKING, Optional

from shardnet.errors import ConfigurationError
from shardnet.networking.addresses import entity_address
from shardnet.networking.tls import only_this_user_in

if TYPE_CHECKING:
    from shardnet.runtimes.server import ServerConfig

logger = logging.getLogger(__name__)

# the loopback address a client on this machine dials for a server bound on each wildcard host
WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}
# why an IPv6 host cannot be listened on where the kernel has no IPv6 (socket() refuses the family), and what to do
NO_IPV6 = "this machine has no IPv6 (Address family not supported): --host 0.0.0.0 listens on every IPv4 address"


def check_unix_path_free(path: str) -> None:
    """Refuse a socket path holding a file that is no socket, or a socket a server may listen on. Only a socket
    that refuses a connection (ECONNREFUSED: left by a dead server), or is gone by then, is free: one this user
    may not connect to (EACCES) is another user's, maybe live, and any other answer may be a live server's."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise ConfigurationError(f"cannot listen on unix:{path}: a file that is not a socket is in the way")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)  # a live server whose backlog is full would hold a blocking connect
            outcome = probe.connect_ex(path)
        if outcome == 0:
            raise ConfigurationError(f"cannot listen on unix:{path}: another server is listening there")
        if outcome == errno.EACCES:
            raise ConfigurationError(
                f"cannot listen on unix:{path}: the socket there is another user's, which this user may not "
                "connect to (permission denied), so it may be their live server's: stop it or have them remove "
                "the socket, or choose another path"
            )
        if outcome not in (errno.ECONNREFUSED, errno.ENOENT):
            raise ConfigurationError(
                f"cannot listen on unix:{path}: the socket there answered a connection with "
                f"{errno.errorcode.get(outcome, outcome)} ({os.strerror(outcome)}), so a server may be listening on it"
            )


def warn_if_socket_folder_shared(path: str) -> None:
    """Warn of a socket path whose folder another user owns, or may write in without the sticky bit (``mkdir -p
    /tmp/shardnet`` finds one another user made first): they could rename this server's socket away and bind
    their own at its path, which the head dials for every request of this worker. A warning, not a refusal: a
    Kubernetes emptyDir shared by a pod's containers is such a folder (0777), and its other users are the pod's.
    Root's folders are trusted; one with the sticky bit (/tmp) lets nobody else remove the socket."""
    folder = os.path.dirname(path) or "."
    try:
        found = os.stat(folder)
    except OSError:
        return  # missing: the bind says so
    others_own = found.st_uid not in (os.geteuid(), 0)
    # group write in a group only this user is in (a user-private group: umask 002 makes folders 0775) is no one
    # else's
    others_write = 0o002 if found.st_gid == os.getegid() and only_this_user_in(found.st_gid) else 0o022
    if others_own or (found.st_mode & others_write and not found.st_mode & stat.S_ISVTX):
        whose = "another user's" if others_own else (
            f"writable by other users (mode {found.st_mode & 0o7777:04o}, no sticky bit)")
        logger.warning(
            "unix:%s: its folder %s is %s, so another user of this machine could put their own socket in this "
            "one's place and take its requests: use a folder only you write to (mkdir -m 700)", path, folder, whose,
        )


def check_can_listen(config: ServerConfig) -> None:
    """Refuse, before an Executor loads, the addresses ``config`` names that this process cannot listen on (a
    port in use, an address not on this machine, a socket path in the way), as the bind would refuse them only
    after the load: a typo should not wait for a model. Not a reservation: the bind still says what it finds."""
    if config.unix_socket is not None:
        check_unix_path_free(config.unix_socket)
        folder = os.path.dirname(config.unix_socket) or "."
        if not os.access(folder, os.W_OK | os.X_OK):
            raise ConfigurationError(f"cannot listen on unix:{config.unix_socket}: folder missing or not writable")
    # port 0 too: the bind of a free port still needs a host of this machine (a typo'd one failed after the load)
    if config.port is not None:
        _check_port_free(config.host, config.port)
    if config.health_port is not None:
        try:
            _check_port_free(config.host, config.health_port)
        except ConfigurationError as exc:
            raise ConfigurationError(f"--health-port {config.health_port}: {exc}") from None
    if config.metrics_port is not None:
        try:
            _check_metrics_port_free(config.host, config.metrics_port)
        except ConfigurationError as exc:
            raise ConfigurationError(f"--metrics-port {config.metrics_port}: {exc}") from None


def _cause(exc: OSError) -> str:
    """What a socket's refusal says, as a person reads it: a family this machine lacks (IPv6) said so."""
    if exc.errno == errno.EAFNOSUPPORT:
        return NO_IPV6
    return exc.strerror or str(exc)


def cannot_listen(host: str, port: int, cause: str) -> ConfigurationError:
    """The refusal of a listener on ``host:port``, saying why (``cause``)."""
    if 0 < port < 1024:
        cause += " (this user may not listen below 1024?)"
    return ConfigurationError(f"cannot listen on {entity_address(host, port)}: {cause}")


def _check_port_free(host: str, port: int) -> None:
    """Bind (and close) a socket on each address ``host`` resolves to, as gRPC would; refused when none binds."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigurationError(f"cannot listen on {entity_address(host, port)}: {exc.strerror}") from None
    failures = []
    for family, kind, protocol, _, address in addresses:
        try:  # the socket too: a family this machine lacks (IPv6 turned off) refuses it
            with socket.socket(family, kind, protocol) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's: TIME_WAIT does not count
                probe.bind(address)
        except OSError as exc:
            failures.append(exc)
            continue
        return
    raise cannot_listen(host, port, "; ".join(sorted({_cause(exc) for exc in failures})))


def _check_metrics_port_free(host: str, port: int) -> None:
    """Bind (and close) what the metrics listener will bind on ``host:port`` (``wildcard_socket``'s rule)."""
    try:
        listener = wildcard_socket(host, port)
    except OSError as exc:
        raise cannot_listen(host, port, exc.strerror or str(exc)) from None
    if listener is None:
        _check_port_free(host, port)
    else:
        listener.close()


def _families_taken(port: int) -> str:
    """Which wildcard addresses of IPv6 and IPv4 have ``port`` taken, for the refusal of a bind on both."""
    taken = []
    for family, address in ((socket.AF_INET6, ("::", port)), (socket.AF_INET, ("0.0.0.0", port))):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
        except OSError:
            taken.append(f"{'IPv6' if family == socket.AF_INET6 else 'IPv4'} ({entity_address(*address)})")
    return " and ".join(taken) or "IPv6 or IPv4 ([::] takes both)"


def wildcard_socket(host: str, port: int) -> Optional[socket.socket]:
    """For a wildcard ``host`` (``0.0.0.0``, ``::``), a TCP socket bound on ``port`` of every address of both
    families, as gRPC binds it (one IPv6 socket taking IPv4 too): a listener other than gRPC's (the metrics')
    is then reached over IPv6 wherever gRPC's are. None for any other host, or for ``0.0.0.0`` on a machine
    without IPv6 (bind ``host`` itself then, as gRPC falls back to); ``::`` there raises OSError (EAFNOSUPPORT)
    saying so. A bind refused raises its OSError; the port in use, naming the family that has it."""
    if host not in WILDCARD_TO_LOOPBACK:
        return None
    try:
        if not socket.has_ipv6:
            raise OSError(errno.EAFNOSUPPORT, os.strerror(errno.EAFNOSUPPORT))
        listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError as exc:  # no IPv6 on this machine
        if host == "::":
            raise OSError(exc.errno, NO_IPV6) from None
        return None
    try:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC's: TIME_WAIT does not count
        listener.bind(("::", port))
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise OSError(exc.errno, f"{exc.strerror} on {_families_taken(port)}") from None
        raise
    except BaseException:
        listener.close()
        raise
    return listener
