"""Model source checks, against a local stand-in for the Hub that answers the way the real one does."""

import http.server
import socket
import threading

import pytest

from conftest import one_line_error, run_sd3fit
from sd3fit import hub
from sd3fit.errors import UserError

SD3 = "stabilityai/stable-diffusion-3-medium-diffusers"


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers like huggingface.co: gated repos get 401/403 with X-Error-Code GatedRepo, unknown ones RepoNotFound."""

    def do_HEAD(self):  # hf_hub_download asks for a file's metadata first
        self.do_GET(body=False)

    def do_GET(self, body=True):
        if "/stabilityai/" in self.path:
            code, error = (403 if self.headers.get("authorization") else 401), "GatedRepo"
        elif "/public/" in self.path:
            code, error = 200, None
        else:
            code, error = 404, "RepoNotFound"
        self.send_response(code)
        if error:
            self.send_header("X-Error-Code", error)
            self.send_header("X-Error-Message", "Access to model is restricted" if error == "GatedRepo" else "Repository not found")
        self.send_header("Content-Length", "2")
        self.end_headers()
        if body:
            self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_hub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def hub_env(tmp_path, endpoint, token=None):
    return {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0", "HF_TOKEN": token or ""}


def test_gated_model_without_token(tmp_path, fake_hub, image_folder):
    proc = run_sd3fit("train", "lora-r16-int8", f"dataset_dir={image_folder}", "--runs-dir", str(tmp_path / "runs"),
                      env=hub_env(tmp_path, fake_hub))
    line = one_line_error(proc)
    assert f"model {SD3} is gated and no Hugging Face token is set" in line
    assert f"accept its licence at https://huggingface.co/{SD3}" in line and "hf auth login" in line
    assert not (tmp_path / "runs").exists()


def test_gated_model_with_a_token_that_lacks_access(tmp_path, fake_hub, image_folder):
    proc = run_sd3fit("train", "lora-r16-int8", f"dataset_dir={image_folder}", "--runs-dir", str(tmp_path / "runs"),
                      env=hub_env(tmp_path, fake_hub, token="hf_notreal"))
    assert "your Hugging Face token has no access yet: accept its licence" in one_line_error(proc)


def test_unreachable_hub(tmp_path, image_folder):
    proc = run_sd3fit("train", "lora-r16-int8", f"dataset_dir={image_folder}", "--runs-dir", str(tmp_path / "runs"),
                      env=hub_env(tmp_path, f"http://127.0.0.1:{_closed_port()}"))
    line = one_line_error(proc)
    assert f"cannot reach the Hugging Face Hub to get {SD3}" in line and "pass its folder" in line
    assert not (tmp_path / "runs").exists()


def test_unknown_repository(tmp_path, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", fake_hub)
    monkeypatch.setattr("huggingface_hub.hf_api.api.endpoint", fake_hub)
    with pytest.raises(UserError, match="was not found on the Hugging Face Hub"):
        hub.check_model("nobody/nothing")
    assert hub.check_model("public/model") == "hub"


def test_offline_and_not_cached(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="not in the local Hugging Face cache and HF_HUB_OFFLINE is set"):
        hub.check_model("someone/model")


def test_local_folders(tmp_path, demo_assets):
    assert hub.check_model(str(demo_assets["model"])) == "local"
    with pytest.raises(UserError, match="model folder not found"):
        hub.check_model(str(tmp_path / "absent"))
    with pytest.raises(UserError, match="not a diffusers pipeline folder"):
        hub.check_model(str(tmp_path))
