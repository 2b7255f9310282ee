"""`medseg.dicom.web`'s errors name the server, the request and the fix, for each way a server can
fail: here against small HTTP servers on loopback that answer as a broken one would."""

from __future__ import annotations

import http.server
import threading

import pytest

from medseg.dicom.web import DicomWebError, DicomWebServer, SeriesRef, find_series, retrieve_series


class _Answer(http.server.BaseHTTPRequestHandler):
    status, content_type, body = 200, "text/html", b"<html><body>Please log in</body></html>"

    def do_GET(self):  # noqa: N802 (http.server's name)
        self.send_response(self.status)
        self.send_header("Content-Type", self.content_type)
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args):
        pass


def _serve(status: int, content_type: str, body: bytes):
    handler = type("Handler", (_Answer,), {"status": status, "content_type": content_type, "body": body})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/dicom-web"


@pytest.mark.parametrize(
    ("status", "content_type", "body", "words"),
    [
        (200, "text/html", b"<html>Please log in</html>", ("is not DICOM", "not a login page or a proxy")),
        (200, "application/dicom+json", b"[{not json", ("is not DICOM",)),
        (404, "text/html", b"no such page", ("not found (HTTP 404)", "DICOMweb root")),
        (403, "text/html", b"forbidden", ("refused", "HTTP 403", "credentials.yml")),
        (500, "text/plain", b"oops", ("answered HTTP 500", "server's log")),
    ],
)
def test_a_broken_server_is_named_with_the_request_and_the_fix(status, content_type, body, words):
    server, url = _serve(status, content_type, body)
    try:
        with pytest.raises(DicomWebError) as error:
            find_series(DicomWebServer.of(url, {"token": "t0ken-secret"}), query={"Modality": "CT"})
        message = str(error.value)
        assert url in message and "QIDO-RS search for series (Modality=CT)" in message
        assert all(word in message for word in words), message
        assert "t0ken-secret" not in message
    finally:
        server.shutdown()


def test_a_retrieval_that_is_not_multipart_dicom_is_refused(tmp_path):
    server, url = _serve(200, "text/html", b"<html>maintenance</html>")
    try:
        with pytest.raises(DicomWebError, match="WADO-RS retrieval of series 1.2.3 of study 1.2 is not DICOM"):
            retrieve_series(DicomWebServer.of(url), SeriesRef("1.2", "1.2.3"), tmp_path / "series")
    finally:
        server.shutdown()


@pytest.mark.parametrize(("url", "credentials", "words"), [
    ("ftp://pacs/dicom-web", None, "not an http:// or https:// URL"),
    ("http://user:pw@pacs:8042/dicom-web", None, "holds a user name or password"),
    ("http://pacs:8042/dicom-web", {"username": "u"}, "give `username` and `password`"),
    ("http://pacs:8042/dicom-web", {"token": "t", "username": "u", "password": "p"}, "or `token`"),
])
def test_a_server_given_wrongly_is_refused_before_any_request(url, credentials, words):
    with pytest.raises(DicomWebError, match=words) as error:
        DicomWebServer.of(url, credentials)
    assert "pw@" not in str(error.value)


def test_the_secrets_never_show_in_the_servers_repr():
    server = DicomWebServer.of("http://pacs:8042/dicom-web", {"username": "medseg", "password": "hunter2"})
    assert "hunter2" not in repr(server) and "medseg" not in repr(server)
