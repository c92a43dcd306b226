#!/usr/bin/env bash
# Install the real DICOM peers the tests talk to, where apt-get is usable and they are missing:
#   dicom3tools (dciodvfy), dcmtk (storescu, echoscu, dsrdump), orthanc (the PACS),
#   pixelmed-apps (DicomSRValidator, with a Java runtime), systemd (systemd-analyze verify),
#   postgresql (the shared store of several nodes), chromium (the web console's browser tests),
#   orthanc-dicomweb (Orthanc's DICOMweb plugin: the STOW-RS destination's peer).
# Elsewhere it says what is missing; tests needing them skip with that reason (and fail under CI=true).
set -euo pipefail
need=()
command -v dciodvfy >/dev/null || need+=(dicom3tools)
{ command -v storescu && command -v echoscu && command -v dsrdump; } >/dev/null || need+=(dcmtk)
{ command -v Orthanc || [ -x /usr/sbin/Orthanc ]; } >/dev/null || need+=(orthanc)
{ [ -f /usr/share/java/pixelmed.jar ] && command -v java; } >/dev/null || need+=(pixelmed-apps)
command -v systemd-analyze >/dev/null || need+=(systemd)  # verifies systemd/petriage.service
# PostgreSQL server programs (a test cluster per session, made by initdb as the postgres user)
{ command -v initdb || ls /usr/lib/postgresql/*/bin/initdb; } >/dev/null 2>&1 || need+=(postgresql)
[ -x /usr/bin/chromium ] || need+=(chromium)  # driven by Playwright (executable_path) in tests/test_web.py
ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so >/dev/null 2>&1 || need+=(orthanc-dicomweb)
if [ ${#need[@]} -eq 0 ]; then
  echo "peers present: dciodvfy, dcmtk, Orthanc (+ DICOMweb), PixelMed, systemd-analyze, PostgreSQL, Chromium"
  exit 0
fi
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing DICOM peers: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
else
  echo "DICOM peers missing (${need[*]}) and apt-get is not usable here: tests that need them will skip" >&2
fi
