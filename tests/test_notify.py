"""Notifications against real listeners: the RIS's ACK codes decide retry or give up; the messages
are valid HL7 v2.5.1 (hl7apy) and the webhook body names no patient."""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

import pydicom
import pytest
from hl7apy.parser import parse_message

from conftest import free_port
from loopback import Hl7Listener, WebhookListener
from node.config import HL7Settings, NotifySettings, WebhookSettings
from node.notify import Notifier
from node.notify.hl7 import build_oru
from node.notify.webhook import build_payload
from node.store import JobState, Received, Store, utcnow

SUMMARY = {"positive": True, "probability": 0.93, "threshold": 0.014, "decision": "PE suspected",
           "study_instance_uid": "1.2.826.0.1.3680043.8.498.1",
           "model": {"name": "petriage-pe-demo", "version": "0.1.0"}}


def _source() -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "PID-77", "Doe^Jane^Q", "19700101", "F"
    ds.AccessionNumber, ds.StudyDescription, ds.StudyDate, ds.StudyTime = "ACC9", "CT angio|chest", "20261126", "1015"
    return ds


def _queued(store: Store, channel: str, payload: str) -> int:
    now = utcnow()
    store.record_instance(Received("1.2.3.4", "1.2.3", "1.2.3.9", "1.2", "1.2", Path(__file__), 1, "A"), now)
    store.complete_quiet_studies(now + dt.timedelta(seconds=30), 1, 900)
    job = store.claim_job("w", 60, now + dt.timedelta(seconds=31))
    assert job and store.set_outputs(job["id"], "w", None, json.dumps(SUMMARY), now, notify=[(channel, payload)])
    store.finish_job(job["id"], "w", JobState.DONE, "done", now)
    return job["id"]


def test_the_oru_message_is_valid_hl7_251_with_the_finding_and_escaped_fields():
    message = build_oru(HL7Settings(host="x", port=1), _source(), SUMMARY, corrected=True)
    parsed = parse_message(message, find_groups=False)
    assert parsed.msh.msh_9.value == "ORU^R01^ORU_R01" and parsed.msh.msh_12.value == "2.5.1"
    assert parsed.pid.pid_5.value == "Doe^Jane^Q" and parsed.obr.obr_4.value == "CTPA^CT angio chest^L"
    assert all(o.obx_11.value == "C" for o in parsed.obx)  # reported before: a corrected result
    assert "59282003^Pulmonary embolism^SCT" in message and "0.9300" in message


@pytest.mark.parametrize(("answer", "state", "attempts"), [("AA", "sent", 1), ("AE", "pending", 1),
                                                             ("AR", "failed", 1)])
def test_the_ris_ack_decides_delivered_retried_or_given_up(tmp_path, answer, state, attempts):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    listener = Hl7Listener(free_port(), answer=answer)
    settings = NotifySettings(hl7=HL7Settings(host="127.0.0.1", port=listener.port))
    try:
        _queued(store, "hl7", build_oru(settings.hl7, _source(), SUMMARY))
        Notifier(store, settings).run_due()
    finally:
        listener.stop()
    [note] = store.notifications_of("1.2.3")
    assert (note["state"], note["attempts"]) == (state, attempts), note
    assert len(listener.received) == 1
    if answer != "AA":
        assert f"ACK {answer}" in note["reason"]


def test_an_unreachable_ris_is_retried_until_max_attempts_then_failed(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    settings = NotifySettings(hl7=HL7Settings(host="127.0.0.1", port=free_port(), timeout_seconds=2), max_attempts=3)
    _queued(store, "hl7", build_oru(settings.hl7, _source(), SUMMARY))
    clock = [utcnow()]
    notifier = Notifier(store, settings, clock=lambda: clock[0])
    for _ in range(3):
        notifier.run_due()
        clock[0] += dt.timedelta(hours=2)  # past any backoff
    [note] = store.notifications_of("1.2.3")
    assert note["state"] == "failed" and note["attempts"] == 3 and "MLLP" in note["reason"]


def test_the_webhook_body_names_the_study_but_never_the_patient(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    hook = WebhookListener(free_port())
    try:
        _queued(store, "webhook", build_payload(_source(), SUMMARY, 1093))
        Notifier(store, NotifySettings(webhook=WebhookSettings(url=hook.url))).run_due()
    finally:
        hook.stop()
    [body] = hook.bodies
    assert body["accession_number"] == "ACC9" and body["priority"] == 1093 and body["positive"] is True
    text = json.dumps(body)
    assert not [s for s in ("PID-77", "Doe", "Jane", "19700101") if s in text]


def test_notifiers_of_several_nodes_on_one_store_send_each_message_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(url)
    hook = WebhookListener(free_port())
    settings = NotifySettings(webhook=WebhookSettings(url=hook.url))
    try:
        for i in range(6):  # six studies, each with its webhook message
            now = utcnow()
            uid = f"1.2.40.{i}"
            store.record_instance(Received(f"{uid}.1", uid, f"{uid}.9", "1.2", "1.2", Path(__file__), 1, "A"), now)
            store.complete_quiet_studies(now + dt.timedelta(seconds=30), 1, 900)
            job = store.claim_job("w", 60, now + dt.timedelta(seconds=31))
            assert job and store.set_outputs(job["id"], "w", None, json.dumps(SUMMARY), now,
                                             notify=[("webhook", build_payload(_source(), SUMMARY, i))])
            store.finish_job(job["id"], "w", JobState.DONE, "done", now)
        nodes = [Notifier(Store(url), settings) for _ in range(3)]  # three nodes, each its own engine
        threads = [threading.Thread(target=n.run_due) for n in nodes]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        hook.stop()
    assert sorted(b["priority"] for b in hook.bodies) == list(range(6))  # each message exactly once
    assert all(n["state"] == "sent" and n["attempts"] == 1
               for i in range(6) for n in store.notifications_of(f"1.2.40.{i}"))
