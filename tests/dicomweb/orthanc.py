"""A real PACS for the tests: Debian's Orthanc with its DICOMweb plugin, on loopback.

The configuration is the fixture's own: a free HTTP port, no DICOM port
(`DicomServerEnabled: false`), `RemoteAccessAllowed: false`, authentication on with one user,
storage in a temporary folder, and the plugin's path. Orthanc and the plugin come from
`make dicom-tools` (Debian's `orthanc` and `orthanc-dicomweb`); the tests skip, naming the
package, only where they are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import requests

from conftest import free_port

ORTHANC = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
PLUGIN_PATHS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so", "/usr/lib/orthanc/libOrthancDicomWeb.so")
PLUGIN = next((p for p in PLUGIN_PATHS if os.path.exists(p)), None)
USER, PASSWORD = "medseg", "s3cret-for-tests"


def missing() -> str | None:
    """Why Orthanc cannot run here (the package to install), or None."""
    if ORTHANC is None:
        return "Orthanc (Debian's `orthanc`) is not installed: make dicom-tools"
    if PLUGIN is None:
        return "Orthanc's DICOMweb plugin (Debian's `orthanc-dicomweb`) is not installed: make dicom-tools"
    return None


@dataclass
class Orthanc:
    """A running Orthanc: its REST root, its DICOMweb root, its folder and its process."""

    root: str
    dicomweb: str
    folder: Path
    process: subprocess.Popen

    @property
    def port(self) -> int:
        return int(self.root.rsplit(":", 1)[1])

    @property
    def auth(self) -> tuple[str, str]:
        return USER, PASSWORD

    def upload(self, paths) -> list[str]:
        """POST each file to `/instances` (Orthanc's own REST API); the Orthanc ids."""
        ids = []
        for path in paths:
            answer = requests.post(f"{self.root}/instances", data=Path(path).read_bytes(), auth=self.auth, timeout=30)
            answer.raise_for_status()
            ids.append(answer.json()["ID"])
        return ids

    def series(self) -> list[dict]:
        """Every series Orthanc holds, with its main DICOM tags."""
        answer = requests.get(f"{self.root}/series?expand", auth=self.auth, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        """Die at once, as a crashed server does."""
        self.process.kill()
        self.process.wait()


def start_orthanc(folder: Path, port: int | None = None) -> Orthanc:
    """Orthanc on `port` (a free one by default), storing in `folder`: started again on the same
    folder and port, it is the same server with what it held."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    config = {
        "Name": "medseg-tests",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": port,
        "DicomServerEnabled": False,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {USER: PASSWORD},
        "Plugins": [PLUGIN],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
        "StableAge": 1,
        "HttpTimeout": 30,
    }
    (folder / "orthanc.json").write_text(json.dumps(config, indent=2))
    log = open(folder / "orthanc.log", "wb")
    process = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    root = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"Orthanc exited ({process.returncode}): {(folder / 'orthanc.log').read_text()[-2000:]}")
        try:
            if requests.get(f"{root}/system", auth=(USER, PASSWORD), timeout=2).status_code == 200:
                return Orthanc(root, f"{root}/dicom-web", folder, process)
        except requests.exceptions.ConnectionError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError(f"Orthanc did not answer within 60 s: {(folder / 'orthanc.log').read_text()[-2000:]}")
