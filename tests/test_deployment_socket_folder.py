"""A Deployment's worker sockets must fit sun_path whatever TMPDIR is: a long one (CI runners, sandboxes) made
every worker refuse its --unix-socket ("holds at most 107 bytes") and `shardnet deploy` fail to start."""

from __future__ import annotations

import tempfile

import executors
import pytest

from shardnet import ConfigurationError
from shardnet.networking.addresses import MAX_UNIX_PATH_BYTES
from shardnet.runtimes import deployment as deployment_module
from shardnet.runtimes.deployment import Deployment


@pytest.fixture
def long_tmpdir(tmp_path, monkeypatch):
    folder = tmp_path / ("d" * 100)
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_worker_sockets_fit_under_a_long_tmpdir(long_tmpdir):
    deployment = Deployment(executors.Tagger, shards=2, replicas=3)
    try:
        path = deployment._socket_path(1, 2)
        assert len(path.encode()) <= MAX_UNIX_PATH_BYTES, path
    finally:
        deployment._sockets and deployment._sockets.cleanup()


def test_no_room_anywhere_falls_back_to_tcp_or_is_refused_when_insisted(long_tmpdir, monkeypatch):
    monkeypatch.setattr(deployment_module.os, "access", lambda *args, **kwargs: False)  # /tmp not writable
    assert deployment_module._socket_folder(1, 1, None) is None
    with pytest.raises(ConfigurationError, match="shorter folder"):
        deployment_module._socket_folder(1, 1, True)
