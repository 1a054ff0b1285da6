"""zserve.security without processes: key files, client options, the allow
lists the broker's ZAP handler checks."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import pytest
import zmq

from zserve.security import (
    DOMAIN_CLIENTS,
    DOMAIN_WORKERS,
    ClientCurve,
    KeyExists,
    _AllowLists,
    ensure_key_set,
    load_keypair,
    load_public,
    write_keypair,
)


def test_write_keypair_modes_and_no_overwrite(tmp_path: Path) -> None:
    public, secret = write_keypair(tmp_path / "k", "a")
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert stat.S_IMODE(public.stat().st_mode) == 0o644
    pub, sec = load_keypair(secret)
    assert load_public(public) == pub and zmq.curve_public(sec) == pub
    with pytest.raises(KeyExists, match="not overwriting"):
        write_keypair(tmp_path / "k", "a")
    secret.unlink()  # a lone public key is still not overwritten
    with pytest.raises(KeyExists):
        write_keypair(tmp_path / "k", "a")
    with pytest.raises(ValueError):
        write_keypair(tmp_path, "../escape")


def test_client_curve_needs_both_keys_and_a_secret_file(tmp_path: Path) -> None:
    public, secret = write_keypair(tmp_path, "c")
    assert ClientCurve.load(None, None) is None
    with pytest.raises(ValueError, match="both"):
        ClientCurve.load(secret, None)
    with pytest.raises(ValueError, match="no secret key"):
        ClientCurve.load(public, public)  # a public file given as the secret
    with pytest.raises(OSError):
        ClientCurve.load(tmp_path / "missing.key_secret", public)
    cc = ClientCurve.load(secret, public)
    assert cc is not None and cc.server == load_public(public)
    # z85 keys as bytes work too
    pub, sec = zmq.curve_keypair()
    cc2 = ClientCurve.load(sec, pub)
    assert cc2 is not None and cc2.public == pub and cc2.server == pub


def test_loose_secret_file_is_warned_about(tmp_path: Path, caplog) -> None:
    _, secret = write_keypair(tmp_path, "loose")
    secret.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="zserve.security"):
        load_keypair(secret)
    assert "readable by others" in caplog.text


def test_allow_lists_per_domain_count_refusals_and_keep_a_list_that_fails(
    tmp_path: Path, caplog
) -> None:
    workers, clients = tmp_path / "w", tmp_path / "c"
    workers.mkdir()
    clients.mkdir()
    wpub, _ = write_keypair(workers, "w1")
    cpub, _ = write_keypair(clients, "c1")
    lists = _AllowLists({DOMAIN_WORKERS: workers, DOMAIN_CLIENTS: clients})
    assert lists.load(strict=True) == {DOMAIN_WORKERS: 1, DOMAIN_CLIENTS: 1}
    w, c = load_public(wpub), load_public(cpub)
    assert lists.callback(DOMAIN_WORKERS, w) and lists.callback(DOMAIN_CLIENTS, c)
    with caplog.at_level(logging.WARNING, logger="zserve.security"):
        assert not lists.callback(DOMAIN_CLIENTS, w)  # a worker key on the client socket
        for _ in range(5):
            assert not lists.callback(DOMAIN_WORKERS, c)
    assert lists.snapshot() == {"curve_refused_clients": 1, "curve_refused_workers": 5}
    # rate-limited: one line per domain within the interval
    assert caplog.text.count("refused on the workers socket") == 1
    assert caplog.text.count("refused on the clients socket") == 1

    (clients / "c1.key").unlink()
    write_keypair(clients, "c2")
    clients_before = lists.keys[DOMAIN_CLIENTS]
    workers.rename(tmp_path / "gone")
    sizes = lists.load(strict=False)
    assert sizes == {DOMAIN_WORKERS: 1, DOMAIN_CLIENTS: 1}
    assert lists.callback(DOMAIN_WORKERS, w)  # the unreadable directory kept its list
    assert lists.keys[DOMAIN_CLIENTS] != clients_before and not lists.callback(DOMAIN_CLIENTS, c)
    with pytest.raises(ValueError, match="allowed workers keys"):
        lists.load(strict=True)


def test_key_set_is_made_once_and_kept(tmp_path: Path) -> None:
    ks = ensure_key_set(tmp_path / "set")
    before = Path(ks.path("broker", secret=True)).read_bytes()
    ks2 = ensure_key_set(tmp_path / "set")
    assert Path(ks2.path("broker", secret=True)).read_bytes() == before
    assert (Path(ks.allow_workers) / "worker.key").read_bytes() == Path(
        ks.path("worker")
    ).read_bytes()
    assert sorted(p.name for p in Path(ks.allow_clients).iterdir()) == ["client.key"]
    assert stat.S_IMODE((tmp_path / "set").stat().st_mode) == 0o700
