"""The head's book of worker registrations (leases, process ids, lapses), without a head around it."""

from shardnet.runtimes.registrations import Lapse, Registrations

KEY = ("127.0.0.1:5000", 0)


def test_a_lease_runs_out_once_and_its_lapse_is_told_to_the_renewal_that_ends_it():
    book = Registrations(lapse_memory=60.0)
    assert book.renew(KEY, now=0.0, lease=2.0) is None
    assert book.expired(1.0) == []
    assert book.expired(3.0) == [KEY]
    assert book.lapse(KEY, now=3.0)
    assert not book.lapse(KEY, now=3.0)  # gone already: not removed twice
    assert book.leased(KEY) is None
    assert book.renew(KEY, now=4.0, lease=2.0) == Lapse(at=3.0, lease=2.0)
    assert book.renew(KEY, now=5.0, lease=2.0) is None  # told once


def test_a_renewal_or_a_deactivate_between_listing_and_lapsing_keeps_the_worker_out_of_the_lapse():
    book = Registrations(lapse_memory=60.0)
    book.renew(KEY, now=0.0, lease=1.0)
    [expired] = book.expired(2.0)
    book.renew(KEY, now=2.0, lease=1.0)  # an ACTIVATE handled while the head removed another worker
    assert not book.lapse(expired, now=2.0)
    book.forget(KEY)
    assert not book.lapse(KEY, now=9.0) and book.expired(9.0) == []


def test_a_stalled_head_moves_leases_on_and_old_lapses_are_forgotten():
    book = Registrations(lapse_memory=5.0)
    book.renew(KEY, now=0.0, lease=1.0)
    book.postpone(10.0)
    assert book.expired(10.5) == []
    assert book.expired(11.5) == [KEY] and book.lapse(KEY, 11.5)
    book.expired(20.0)  # more than the memory (and the lease) later
    assert book.renew(KEY, now=20.0, lease=1.0) is None


def test_a_new_process_id_on_a_known_registration_is_a_restart_and_no_id_changes_nothing():
    book = Registrations(lapse_memory=60.0)
    assert not book.announce(KEY, "a")
    assert not book.announce(KEY, "a")
    assert not book.announce(KEY, None) and book.instance(KEY) == "a"
    assert book.announce(KEY, "b") and book.instance(KEY) == "b"
    assert book.leased(KEY) is None  # an id without a lease never expires
    assert book.expired(1e9) == []
    book.forget(KEY)
    assert book.instance(KEY) is None


def test_a_lapse_remembers_the_process_that_held_the_lease():
    book = Registrations(lapse_memory=60.0)
    book.announce(KEY, "a")
    book.renew(KEY, now=0.0, lease=1.0)
    assert book.lapse(KEY, now=2.0)
    assert not book.announce(KEY, "b")  # the registration went with the lease: no restart to tell of here
    assert book.renew(KEY, now=3.0, lease=1.0) == Lapse(at=2.0, lease=1.0, instance="a")
