"""Address parsing, host_is_local and the is_remote_local_connection truth table of the original design."""

from __future__ import annotations

import pytest

from shardnet import ConfigurationError, host_is_local, is_remote_local_connection
from shardnet.networking.addresses import dialled_host, parse_address


@pytest.mark.parametrize(
    "first, second, expected",
    [
        ("localhost", "localhost", False),
        ("1.2.3.4", "localhost", True),
        ("1.2.3.4", "127.0.0.1", True),
        ("1.2.3.4", "192.168.0.1", True),
        ("192.168.0.1", "localhost", False),
        ("google.com", "localhost", True),
        ("google.com", "127.0.0.1", True),
        ("localhost", "google.com", False),
        ("1.2.3.4", "google.com", False),
        ("127.0.0.1", "1.2.3.4", False),
    ],
)
def test_is_remote_local_connection(first, second, expected):
    assert is_remote_local_connection(first, second) is expected


@pytest.mark.parametrize(
    "hostname",
    # IPv4-mapped loopback and unspecified addresses reach this machine as their IPv4 does (they were not local)
    ["localhost", "LOCALHOST", "127.0.0.1", "127.0.1.1", "::1", "[::1]", "0.0.0.0", "", "::ffff:127.0.0.1",
     "[::ffff:0.0.0.0]"],
)
def test_host_is_local(hostname):
    assert host_is_local(hostname) is True


def test_an_ipv4_mapped_address_is_loopback_as_its_ipv4_is():
    from shardnet.networking.addresses import host_is_loopback

    assert host_is_loopback("::ffff:127.0.0.1") and host_is_loopback("[::ffff:127.9.9.9]")
    assert not host_is_loopback("::ffff:10.0.0.1") and not host_is_local("::ffff:10.0.0.1")


@pytest.mark.parametrize(
    "hostname",
    # an unbalanced bracket is no address (parse_address refuses "[::1:5"): it was stripped, taken for ::1
    ["1.2.3.4", "192.168.0.1", "example.com", "not a host", "::2", None, 42, "[::1", "::1]", "[127.0.0.1"],
)
def test_host_is_not_local_and_never_raises(hostname):
    assert host_is_local(hostname) is False


@pytest.mark.parametrize(
    "address, target, tls",
    [
        ("127.0.0.1:50051", "127.0.0.1:50051", False),
        ("grpc://worker:1", "worker:1", False),
        ("http://worker:1", "worker:1", False),
        ("https://worker:443", "worker:443", True),
        ("grpcs://worker:443/", "worker:443", True),
        ("HTTPS://worker:443", "worker:443", True),
        ("[::1]:8080", "[::1]:8080", False),
        ("  localhost:65535 ", "localhost:65535", False),
        ("worker_1:5", "worker_1:5", False),  # a Docker / compose service name: getaddrinfo takes the underscore
        ("worker.example.:5", "worker.example.:5", False),  # fully qualified
        ("xn--ncode-cta3g.example:5", "xn--ncode-cta3g.example:5", False),
        ("a" * 63 + ".example:5", "a" * 63 + ".example:5", False),
        ("0x7f.1:5", "0x7f.1:5", False),  # as a dial reads IPv4 (inet_aton's forms)
        ("127.1:5", "127.1:5", False),
        ("[fe80::1%eth0]:5", "[fe80::1%eth0]:5", False),
    ],
)
def test_parse_address(address, target, tls):
    parsed = parse_address(address)
    assert (parsed.target, parsed.tls) == (target, tls)
    assert parse_address(str(parsed)) == parsed  # the printed form parses back to the same address


@pytest.mark.parametrize(
    "address",
    [
        "",
        "   ",
        "localhost",
        "localhost:",
        ":8080",
        "host:0",
        "host:65536",
        "host:http",
        "host:-1",
        "host:\u00b9",  # a superscript one: str.isdigit() says yes, int() refuses
        "host:\u0661",  # an Arabic-Indic one: int() takes it, gRPC would not
        "ftp://host:21",
        "::1:8080",
        "[::1]8080",
        "user@host:1",
        "ho st:1",
        "host:1/path",
        "127.0.0.1\x00.example.invalid:1",  # gRPC would dial the part before the NUL, STATUS would list it all
        "ho\x07st:1",
        "h" * 254 + ":1",  # longer than any DNS name: it would also swell STATUS's metadata
        "unix-abstract:4242",  # gRPC dials the abstract socket @4242, which only this machine reaches
        "unix:/tmp/\udcff.sock",  # a byte the locale could not decode: it crashed with UnicodeEncodeError
        "vsock:2",
        "DNS:53",
        None,
        8080,
    ],
)
def test_bad_addresses_raise_configuration_error(address):
    with pytest.raises(ConfigurationError, match="bad address"):
        parse_address(address)


@pytest.mark.parametrize(
    "host, reason",
    # neither a DNS name nor an IP address: they were taken, and routed to (found by a bad-input review)
    [
        ("*", "label '*': a host name is labels of 1 to 63 ASCII letters, digits, '-' and '_'"),
        ("]", "label ']'"),
        ("-", "label '-'"),
        ("-worker", "none starting or ending with '-'"),
        ("worker-", "none starting or ending with '-'"),
        (".", "an empty label"),
        ("..", "an empty label"),
        ("worker..example", "an empty label"),
        (".worker", "an empty label"),
        ("%2e", "label '%2e'"),
        ("999.1.1.1", "all numbers, but no IPv4 address"),
        ("1.2.3.4.5", "all numbers, but no IPv4 address"),
        ("127.0.0.1.", "all numbers, but no IPv4 address"),
        ("99999999999", "all numbers, but no IPv4 address"),
        ("a" * 253, "a DNS label has at most 63 characters, 'aaaaaaaaaaaaaaaaaaaa'... has 253"),
        ("a" * 64 + ".example", "a DNS label has at most 63 characters"),
        ("ünïcode.example",
         "a host name is ASCII: write an international name in its IDNA form, 'xn--ncode-cta3g.example'"),
    ],
)
def test_a_host_that_is_no_dns_name_nor_ip_address_is_refused_saying_why(host, reason):
    with pytest.raises(ConfigurationError, match="^bad address .*: bad host ") as refused:
        parse_address(f"{host}:5")
    assert reason in str(refused.value)


@pytest.mark.parametrize(
    "host, lands_on",
    [
        ("0.0.0.0", "127.0.0.1"),
        ("::", "::1"),
        ("[::]", "::1"),
        ("::ffff:127.0.0.1", "127.0.0.1"),
        ("::ffff:0.0.0.0", "127.0.0.1"),
        ("::ffff:10.1.2.3", "10.1.2.3"),
        ("LOCALHOST", "127.0.0.1"),
        ("127.0.0.2", "127.0.0.2"),
        ("0:0::1", "::1"),
        ("worker.example", "worker.example"),
    ],
)
def test_dialled_host_is_where_a_connection_lands(host, lands_on):
    assert dialled_host(host) == lands_on


@pytest.mark.parametrize("spelling", ["unix:/run/sn//w.sock", "unix:/run/./sn/w.sock", "unix:///run/sn/w.sock/"])
def test_a_unix_socket_has_one_spelling_so_one_worker_is_one_replica(spelling):
    """unix:/d//w.sock and unix:/d/w.sock, one worker's two spellings (a --connection and its ACTIVATE), were two
    replicas of double weight, and its DEACTIVATE removed one (a review's find)."""
    assert parse_address(spelling) == parse_address("unix:/run/sn/w.sock")
    assert parse_address("unix:/run/sn/../w.sock").unix_path == "/run/sn/../w.sock"  # a link may make it another


@pytest.mark.parametrize("path", ["/tmp/a\xa0b/w.sock", "/tmp/資料\u3000フォルダ/w.sock", "/tmp/👩\u200d💻/w.sock",
                                  "/tmp/café 1/w.sock"])
def test_a_unix_path_of_visible_text_with_any_space_is_taken(path):
    """str.isprintable() refused a no-break space, U+3000 and an emoji's joiner: a Deployment under such a TMPDIR
    had every worker refuse its own --unix-socket (a regression review)."""
    assert parse_address(f"unix:{path}").unix_path == path


def test_a_unix_path_of_undecodable_bytes_is_said_to_be_no_text():
    """The isprintable() check ran first and called a surrogate a control character (a regression review)."""
    with pytest.raises(ConfigurationError, match="not text"):
        parse_address("unix:/tmp/caf\udce9/w.sock")


@pytest.mark.parametrize("odd", ["\u202e", "\u2066", "\x00", "\x1b"])
def test_a_unix_path_with_a_bidi_override_or_a_control_is_still_refused(odd):
    with pytest.raises(ConfigurationError, match="control characters in the socket path"):
        parse_address(f"unix:/tmp/sn-{odd}x.sock")


def _unshare_usable() -> bool:
    import os
    import shutil
    import subprocess

    if os.geteuid() != 0 or not all(shutil.which(tool) for tool in ("unshare", "ip", "sysctl")):
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


@pytest.mark.skipif(not _unshare_usable(), reason="needs root and unshare -n (a network namespace of its own)")
def test_is_own_address_is_not_every_address_under_ip_nonlocal_bind():
    """Under net.ipv4.ip_nonlocal_bind (keepalived hosts) any address binds: the bind probe took every address
    for the machine's own, and a wildcard head refused every worker on another machine at the head's port as
    "this head itself" (a regression review)."""
    import subprocess
    import sys

    script = (
        "ip link set lo up && sysctl -q -w net.ipv4.ip_nonlocal_bind=1 net.ipv6.ip_nonlocal_bind=1 && "
        "ip addr add 10.9.0.1/32 dev lo && "
        f"{sys.executable} -c 'from shardnet.networking.addresses import is_own_address as o; "
        "print([o(h) for h in (\"10.1.2.3\", \"2001:db8::5\", \"10.9.0.1\", \"127.0.0.1\", \"::1\")])'"
    )
    result = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "[False, False, True, True, True]", result.stdout + result.stderr
