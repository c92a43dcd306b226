"""The real DICOM peers the suite judges our output with are installed and work together with the
phantom: Orthanc (the PACS) receives a phantom series from DCMTK storescu and gives back the same pixels."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pydicom
import pytest

from conftest import ORTHANC, PIXELMED_JAR, SMALL, require_peer, require_tool
from node.phantom import PhantomOptions, generate_study, write_study

pytestmark = pytest.mark.peers


@pytest.mark.parametrize("tool", ["dciodvfy", "storescu", "echoscu", "dsrdump", "java"])
def test_peer_tool_is_installed(tool):
    require_tool(tool)


def test_pixelmed_sr_validator_loads_with_lifted_xpath_limits():
    require_peer(PIXELMED_JAR.exists(), "PixelMed (pixelmed-apps)")
    java = require_tool("java")
    proc = subprocess.run([java, "-Djdk.xml.xpathExprOpLimit=0", "-Djdk.xml.xpathExprGrpLimit=0",
                           "-Djdk.xml.xpathTotalOpLimit=0", "-cp", str(PIXELMED_JAR),
                           "com.pixelmed.validate.DicomSRValidator"], capture_output=True, text=True, timeout=120)
    assert "ClassNotFoundException" not in proc.stderr and "NoClassDefFoundError" not in proc.stderr


def test_orthanc_answers_echo_and_stores_a_phantom_series_sent_by_storescu(orthanc, tmp_path):
    storescu, echoscu = require_tool("storescu"), require_tool("echoscu")
    require_peer(ORTHANC is not None, "Orthanc")
    subprocess.run([echoscu, "-aec", orthanc.ae_title, "127.0.0.1", str(orthanc.dicom_port)], check=True,
                   timeout=30)
    opts = PhantomOptions(**{**SMALL.__dict__, "slices": 24, "slice_spacing_mm": 12.0,
                             "transfer_syntax": "jpeg2000", "order": "shuffled"})
    study = generate_study(55, pe=True, options=opts)
    paths = write_study(study, tmp_path / "out")["ctpa"]
    subprocess.run([storescu, "-aec", orthanc.ae_title, "+sd", "+r", "-xv", "127.0.0.1", str(orthanc.dicom_port),
                    str(tmp_path / "out")], check=True, timeout=120, env={"TCP_NODELAY": "1"})
    studies = orthanc.get("/studies?expand")
    assert len(studies) == 1
    assert studies[0]["MainDicomTags"]["StudyInstanceUID"] == study.identity.study_instance_uid
    instances = orthanc.get(f"/studies/{studies[0]['ID']}/instances")
    assert len(instances) == len(paths)
    stored = pydicom.dcmread(io.BytesIO(orthanc.get_bytes(f"/instances/{instances[0]['ID']}/file")))
    original = pydicom.dcmread(tmp_path / "out" / stored.StudyInstanceUID / stored.SeriesInstanceUID
                               / f"{stored.SOPInstanceUID}.dcm")
    np.testing.assert_array_equal(stored.pixel_array, original.pixel_array)
