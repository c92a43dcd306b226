"""Security: DICOM TLS both ways (certificates made here with openssl), the source-IP allow-list."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import select

from conftest import free_port, require_tool
from loopback import RecordingPacs, start_listener
from node.config import Destination
from node.phantom import PhantomOptions, generate_study, write_study
from node.scu import SendError, echo, send_files
from node.store import events

OPTIONS = PhantomOptions(matrix=64, slices=4, slice_spacing_mm=4.5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA, and a server and a client certificate it signed (for 127.0.0.1)."""
    openssl = require_tool("openssl")
    d = tmp_path_factory.mktemp("pki")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-subj",
        "/CN=petriage test CA", "-days", "2")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for name in ("node", "client", "pacs"):
        run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj",
            f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
            f"{name}.crt", "-days", "2", "-extfile", "san.ext")
    return {p.stem + p.suffix.replace(".", "_"): p for p in d.iterdir()}


def _client_context(pki, with_cert: bool = True) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_crt"]))
    if with_cert:
        context.load_cert_chain(str(pki["client_crt"]), str(pki["client_key"]))
    return context


def _associate(port: int, tls: ssl.SSLContext | None, sop_class=Verification):
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(sop_class)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", port, ae_title="PETRIAGE", tls_args=(tls, "127.0.0.1") if tls else None)


@pytest.fixture
def tls_node(tmp_path, pki):
    cfg, store, server = start_listener(
        tmp_path / "var", f"node.tls={{cert: {pki['node_crt']}, key: {pki['node_key']}, ca: {pki['ca_crt']}}}")
    yield cfg.node.port, store
    server.shutdown()


def test_the_listener_speaks_dicom_tls_and_stores_from_a_client_with_a_certificate(tls_node, pki, tmp_path):
    port, store = tls_node
    ds = pydicom.dcmread(write_study(generate_study(980001, pe=False, options=OPTIONS), tmp_path / "in")["ctpa"][0])
    assoc = _associate(port, _client_context(pki), ds.SOPClassUID)
    assert assoc.is_established
    assert assoc.send_c_store(ds).Status == 0x0000
    assoc.release()
    assert store.study(ds.StudyInstanceUID)["instances"] == 1


def test_the_tls_listener_refuses_plain_tcp_and_clients_without_a_certificate(tls_node, pki):
    port, _ = tls_node
    assert not _associate(port, None).is_established
    assert not _associate(port, _client_context(pki, with_cert=False)).is_established


def test_results_go_to_a_tls_destination_which_is_verified_against_its_ca(pki, tmp_path):
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(str(pki["pacs_crt"]), str(pki["pacs_key"]))
    server_context.load_verify_locations(cafile=str(pki["ca_crt"]))
    server_context.verify_mode = ssl.CERT_REQUIRED
    pacs = RecordingPacs().start(free_port(), ssl_context=server_context)
    files = write_study(generate_study(980002, pe=False, options=OPTIONS), tmp_path / "in")["ctpa"]
    try:
        good = Destination(name="pacs", ae_title=pacs.ae_title, host="127.0.0.1", port=pacs.port,
                           tls_ca=pki["ca_crt"], tls_cert=pki["client_crt"], tls_key=pki["client_key"])
        assert echo(good, calling_ae_title="PETRIAGE") > 0
        assert len(send_files(files, good, calling_ae_title="PETRIAGE").acknowledged) == len(files)
        plain = good.model_copy(update={"tls_ca": None, "tls_cert": None, "tls_key": None})
        with pytest.raises(SendError, match="association failed"):
            send_files(files, plain, calling_ae_title="PETRIAGE")
        wrong_ca = good.model_copy(update={"tls_ca": pki["client_crt"]})  # a certificate that did not sign the PACS's
        with pytest.raises(SendError):
            echo(wrong_ca, calling_ae_title="PETRIAGE")
    finally:
        pacs.stop()
    assert len({s.sop_instance_uid for s in pacs.received}) == len(files)


@pytest.mark.parametrize(("allowed", "accepted"), [("[10.0.0.0/8]", False), ("[127.0.0.0/8]", True), ("[]", True)])
def test_the_source_ip_allow_list_closes_connections_from_other_addresses(tmp_path, allowed, accepted):
    cfg, store, server = start_listener(tmp_path / "var", f"node.allowed_source_ips={allowed}")
    try:
        assoc = _associate(cfg.node.port, None)
        assert assoc.is_established == accepted
        if accepted:
            assoc.release()
    finally:
        server.shutdown()
    with store.engine.connect() as conn:
        refused = conn.execute(select(events).where(events.c.kind == "connection-refused")).all()
    assert bool(refused) != accepted  # each refusal is in the audit trail
    if refused:
        assert "127.0.0.1" in refused[0].detail
