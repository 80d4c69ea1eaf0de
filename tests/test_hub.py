"""`lion download` and model-name resolution (lion_mllm.checkpoints.hub) against a loopback server only.

The server plays both the Hugging Face hub (the routes huggingface_hub 2.x uses: repo info, tree
listing, HEAD/GET `/{repo}/resolve/{revision}/{file}`) and the plain-URL hosts (reached through
LION_MLLM_MIRROR). Its repositories hold the golden set's tiny stand-ins, so a downloaded
"lion-flant5xl" really loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import re
import threading
import urllib.parse
from pathlib import Path

import pytest
import yaml
from conftest import ASSETS, GOLDEN, RAM_VOCABULARY

from lion_mllm.checkpoints import hub
from lion_mllm.checkpoints.downloads import ChecksumMismatchError, DownloadError, RemoteFile
from lion_mllm.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"
EVA_PATH = "/storage.googleapis.com/sfr-vision-language-research/LAVIS/models/BLIP2/eva_vit_g.pth"


def _commit(revision: str) -> str:
    """The commit a revision names, as the hub answers: a commit hash itself, a branch its head (COMMIT)."""
    return revision if re.fullmatch(r"[0-9a-f]{40}", revision) else COMMIT


def _folder(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


class FakeHub:
    """Threaded loopback HTTP server; records (method, path, Range) of every request."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {
            "daybreaksly/LION-FlanT5-XL": {"LION-FlanT5-XL.pth": (ASSETS / "LION-FlanT5-tiny.pth").read_bytes(),
                                           "README.md": b"# LION\n"},
            # Files no pattern asks for must not be downloaded (TF/Flax weights, BERT's weights).
            "google/flan-t5-xl": {**_folder(ASSETS / "flan-t5-tiny"), "tf_model.h5": b"x" * 1000,
                                  "flax_model.msgpack": b"y" * 1000},
            "google-bert/bert-base-uncased": {**_folder(ASSETS / "bert-tiny-uncased"),
                                              "model.safetensors": b"z" * 1000},
            "xinyu1205/recognize_anything_model": {"ram_swin_large_14m.pth":
                                                   (ASSETS / "ram_swin_tiny_14m.pth").read_bytes()},
        }
        self.plain: dict[str, bytes] = {EVA_PATH: (ASSETS / "eva_vit_g_tiny.pth").read_bytes()}
        from lion_mllm.ram import RAM_TAG_LIST_FILE, RAM_THRESHOLDS_FILE

        for remote, local in ((RAM_TAG_LIST_FILE, RAM_VOCABULARY / "ram_tag_list.txt"),
                              (RAM_THRESHOLDS_FILE, RAM_VOCABULARY / "ram_tag_list_threshold.txt")):
            self.plain["/" + remote.url.split("://", 1)[1]] = local.read_bytes()
        self.requests: list[tuple[str, str, str | None]] = []
        self.cut_once: dict[str, int] = {}  # path -> bytes sent before the connection drops (once)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def gets(self, needle: str = "") -> list[str]:
        """Paths of GET requests for file contents (not the JSON API) containing ``needle``."""
        return [p for m, p, _ in self.requests if m == "GET" and not p.startswith("/api/") and needle in p]

    def _handler(self):
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def do_GET(self) -> None:
                self._serve(head=False)

            def _json(self, payload) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _missing(self, code: str = "RepoNotFound") -> None:
                self.send_response(404)
                self.send_header("X-Error-Code", code)
                self.send_header("X-Error-Message", "not found")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def _serve(self, head: bool) -> None:
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                fake.requests.append(("HEAD" if head else "GET", path, self.headers.get("Range")))
                parts = path.strip("/").split("/")
                if parts[:2] == ["api", "models"] and len(parts) >= 6:
                    repo = "/".join(parts[2:4])
                    if repo not in fake.repos:
                        return self._missing()
                    files = fake.repos[repo]
                    if parts[4] == "revision":
                        return self._json({"id": repo, "sha": _commit(parts[5]),
                                           "siblings": [{"rfilename": f} for f in files]})
                    if parts[4] == "tree":
                        return self._json([{"type": "file", "path": f, "size": len(d),
                                            "oid": hashlib.sha1(d).hexdigest()} for f, d in files.items()])
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo, name = "/".join(parts[:2]), "/".join(parts[4:])
                    data = fake.repos.get(repo, {}).get(name)
                    if data is None:
                        return self._missing("EntryNotFound" if repo in fake.repos else "RepoNotFound")
                    extra = {"X-Repo-Commit": _commit(parts[3]), "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
                    return self._body(data, head, extra, path)
                if path in fake.plain:
                    return self._body(fake.plain[path], head, {}, path)
                self.send_error(404)

            def _body(self, data: bytes, head: bool, extra: dict[str, str], path: str) -> None:
                start = 0
                rng = self.headers.get("Range")
                if rng and not head:
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                for key, value in extra.items():
                    self.send_header(key, value)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                if head:
                    return
                cut = fake.cut_once.pop(path, None)
                self.wfile.write(data[start:cut] if cut is not None else data[start:])
                if cut is not None:
                    self.close_connection = True

        return Handler


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


@pytest.fixture
def fake_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    import huggingface_hub.constants as hf_constants

    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv(hub.MIRROR_ENV, server.url)
    monkeypatch.setenv("LION_MLLM_CACHE", str(tmp_path / "lion-cache"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    # huggingface_hub reads HF_HOME at import time; point its cache into the test folder directly.
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv(hub.MODEL_ENV, raising=False)
    # The tiny stand-in ViT's head count cannot be inferred from its shapes (EVA's can); the YAML says it.
    spec = hub.PUBLISHED_MODELS["lion-flant5xl"]
    monkeypatch.setitem(hub.PUBLISHED_MODELS, "lion-flant5xl",
                        dataclasses.replace(spec, extra_config={"vit_num_heads": 2}))
    yield server
    server.server.shutdown()
    server.server.server_close()


def _quiet(_message: str) -> None:
    pass


# ---------------------------------------------------------------------------------------- download


def test_download_fetches_everything_and_writes_the_authors_yaml(fake_hub: FakeHub, tmp_path: Path) -> None:
    config = hub.download_model("lion-flant5xl", progress=False, say=_quiet)
    assert config == tmp_path / "lion-cache" / "models" / "lion-flant5xl" / "lion-flant5xl.yaml"
    model = yaml.safe_load(config.read_text())["model"]
    assert model["visual_input"] == "ALL" and model["enable_semantic_tags"] is True
    assert Path(model["pretrained"]).read_bytes() == (ASSETS / "LION-FlanT5-tiny.pth").read_bytes()
    assert Path(model["vit_model"]) == tmp_path / "lion-cache" / "eva_vit_g.pth"
    assert Path(model["vit_model"]).read_bytes() == (ASSETS / "eva_vit_g_tiny.pth").read_bytes()
    # No checksum is published for eva_vit_g.pth: the first download's is recorded, later ones check it.
    recorded = Path(model["vit_model"] + ".sha256").read_text().split()[0]
    assert recorded == hashlib.sha256((ASSETS / "eva_vit_g_tiny.pth").read_bytes()).hexdigest()
    assert Path(model["ram_model"]).read_bytes() == (ASSETS / "ram_swin_tiny_14m.pth").read_bytes()
    llm, bert = Path(model["llm_model"]), Path(model["bert_model"])
    assert sorted(p.name for p in llm.iterdir()) == sorted(_folder(ASSETS / "flan-t5-tiny"))
    assert sorted(p.name for p in bert.iterdir()) == sorted(_folder(ASSETS / "bert-tiny-uncased"))
    assert str(llm).startswith(str(tmp_path / "hf-cache"))  # hub files live in the HF cache
    # Only what the model needs crossed the wire: no TF/Flax/BERT weights, no README.
    fetched = fake_hub.gets()
    assert not [p for p in fetched if p.endswith((".h5", ".msgpack", "README.md"))]
    assert not [p for p in fetched if "bert-base-uncased" in p and p.endswith(".safetensors")]
    # Every repository with a pinned commit was asked for that commit, not for `main`.
    spec = hub.PUBLISHED_MODELS["lion-flant5xl"]
    for pinned in (spec.llm, spec.bert, spec.ram):
        assert re.fullmatch(r"[0-9a-f]{40}", pinned.revision), pinned
        asked = [p for p in fake_hub.gets(f"/{pinned.repo_id}/resolve/")]
        assert asked and all(f"/resolve/{pinned.revision}/" in p for p in asked), asked
    # RAM's vocabulary went where the tagger looks for it (md5-verified by download_file).
    assert (tmp_path / "lion-cache" / "ram" / "ram_tag_list.txt").read_bytes() == \
        (RAM_VOCABULARY / "ram_tag_list.txt").read_bytes()
    # The name now resolves to that YAML, and the YAML loads as the authors' model.
    assert hub.resolve_model("lion-flant5xl") == str(config)
    from lion_mllm import Lion

    lion = Lion.from_official(config)
    assert lion.tagger is not None and not lion.tagger.is_loaded  # RAM attached lazily


def test_second_download_reuses_the_caches(fake_hub: FakeHub) -> None:
    hub.download_model("lion-flant5xl", progress=False, say=_quiet)
    assert fake_hub.gets("eva_vit_g.pth") and fake_hub.gets("LION-FlanT5-XL.pth")
    fake_hub.requests.clear()
    hub.download_model("lion-flant5xl", progress=False, say=_quiet)
    assert fake_hub.requests == []  # a complete install needs no network at all
    hub.download_model("lion-flant5xl", refresh=True, progress=False, say=_quiet)
    assert fake_hub.requests, "refresh asks the servers again"
    assert fake_hub.gets() == []  # ... but no file is downloaded a second time


def test_cut_off_download_resumes_with_a_range_request(fake_hub: FakeHub) -> None:
    size = len(fake_hub.plain[EVA_PATH])
    fake_hub.cut_once[EVA_PATH] = size // 3
    config = hub.download_model("lion-flant5xl", progress=False, say=_quiet)
    eva_requests = [(m, r) for m, p, r in fake_hub.requests if p == EVA_PATH]
    assert eva_requests == [("GET", None), ("GET", f"bytes={size // 3}-")]
    vit = Path(yaml.safe_load(config.read_text())["model"]["vit_model"])
    assert vit.read_bytes() == fake_hub.plain[EVA_PATH]


def test_checksum_mismatch_is_refused(fake_hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture) -> None:
    spec = hub.PUBLISHED_MODELS["lion-flant5xl"]
    bad = dataclasses.replace(spec, vit=dataclasses.replace(spec.vit, md5="0" * 32))
    monkeypatch.setitem(hub.PUBLISHED_MODELS, "lion-flant5xl", bad)
    with pytest.raises(ChecksumMismatchError, match="md5 mismatch"):
        hub.download_model("lion-flant5xl", progress=False, say=_quiet)
    assert not (tmp_path / "lion-cache" / "eva_vit_g.pth").exists()  # bad data deleted
    assert not list((tmp_path / "lion-cache").glob("eva_vit_g.pth*"))
    with pytest.raises(hub.ModelNotInstalledError, match="lion download lion-flant5xl"):
        hub.resolve_model("lion-flant5xl")  # no YAML for an incomplete download
    # The CLI turns it into one line and exit code 1.
    assert main(["download", "lion-flant5xl", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lion: error: md5 mismatch for") and "eva_vit_g.pth" in err[0]


def test_cli_download_to_dir_then_caption_by_name(fake_hub: FakeHub, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "models"
    assert main(["download", "lion-flant5xl", "--to", str(target), "--json"]) == 0
    captured = capsys.readouterr()
    printed = json.loads(captured.out)
    assert printed == {"name": "lion-flant5xl", "config": str(target / "lion-flant5xl.yaml")}
    assert "[1/8] LION checkpoint daybreaksly/LION-FlanT5-XL/LION-FlanT5-XL.pth" in captured.err
    assert (target / "LION-FlanT5-XL.pth").is_file() and (target / "eva_vit_g.pth").is_file()
    assert (target / "flan-t5-xl" / "model.safetensors").is_file()
    assert (target / "bert-base-uncased" / "vocab.txt").is_file()
    assert not (target / "bert-base-uncased" / "model.safetensors").exists()
    model = yaml.safe_load((target / "lion-flant5xl.yaml").read_text())["model"]
    assert model["llm_model"] == str((target / "flan-t5-xl").resolve())
    assert main(["download", "--list", "--json"]) == 0
    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert {r["name"]: bool(r["installed"]) for r in listed} == {"lion-flant5xl": True, "lion-flant5xxl": False}
    # `--model lion-flant5xl` resolves to the downloaded files and really runs.
    image = GOLDEN / "images" / "a0.png"
    code = main(["caption", str(image), "--model", "lion-flant5xl", "--tags", "dog, grass", "--num-beams", "1",
                 "--max-new-tokens", "4", "--json", "-q"])
    out = capsys.readouterr().out
    assert code == 0
    record = json.loads(out)
    assert record["image"] == str(image) and isinstance(record["caption"], str)


def test_unknown_repository_is_one_clear_error(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    del fake_hub.repos["daybreaksly/LION-FlanT5-XL"]
    with pytest.raises(DownloadError, match="daybreaksly/LION-FlanT5-XL/LION-FlanT5-XL.pth"):
        hub.download_model("lion-flant5xl", progress=False, say=_quiet)
    assert main(["download", "lion-flant5xl", "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lion: error: could not download daybreaksly/LION-FlanT5-XL")
    assert main(["download", "lion-nonexistent"]) == 2


# ---------------------------------------------------------------------------------------- resolving


def test_hub_bundle_loads_like_the_local_one(fake_hub: FakeHub, tmp_path: Path) -> None:
    """`hf-hub:owner/repo@rev` downloads a published bundle (subfolders included) through the one resolver;
    the model answers as the local copy does, and a second load is served from the cache."""
    from PIL import Image

    from lion_mllm import load_model

    local = Path(hub.resolve_model("lion-shapes"))
    fake_hub.repos["someone/lion-shapes"] = {str(p.relative_to(local)): p.read_bytes()
                                             for p in sorted(local.rglob("*")) if p.is_file()}
    image = Image.new("RGB", (64, 48), (30, 140, 200))
    remote = load_model(f"hf-hub:someone/lion-shapes@{COMMIT}")
    expected = load_model(str(local)).caption(image, max_new_tokens=8)
    assert remote.caption(image, max_new_tokens=8) == expected
    assert remote.generation_config == load_model(str(local)).generation_config
    fetched = len(fake_hub.gets("/someone/lion-shapes/resolve/"))
    assert fetched == len(fake_hub.repos["someone/lion-shapes"])  # every file once, subfolders included
    load_model(f"hf-hub:someone/lion-shapes@{COMMIT}")
    assert len(fake_hub.gets("/someone/lion-shapes/resolve/")) == fetched  # the cache, not the network

    fake_hub.repos["someone/not-a-bundle"] = {"README.md": b"# hello\n"}
    with pytest.raises(DownloadError, match="not-a-bundle.*no config.json"):
        load_model("hf-hub:someone/not-a-bundle")
    with pytest.raises(DownloadError, match="could not download someone/missing"):
        load_model("hf-hub:someone/missing")


def test_resolve_model_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LION_MLLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(hub.MODEL_ENV, raising=False)
    config = tmp_path / "lion.yaml"
    config.write_text("model: {}\n")
    assert hub.resolve_model(str(config)) == str(config)
    assert hub.resolve_model(str(tmp_path)) == str(tmp_path)
    assert hub.resolve_model(f"local-dir:{tmp_path}") == str(tmp_path)
    with pytest.raises(hub.ModelNotInstalledError, match="local-dir:/nowhere/x: not a directory"):
        hub.resolve_model("local-dir:/nowhere/x")
    with pytest.raises(hub.ModelNotInstalledError, match="no such config file"):
        hub.resolve_model(str(tmp_path / "other.yaml"))
    with pytest.raises(hub.ModelNotInstalledError, match="no such file or directory"):
        hub.resolve_model(str(tmp_path / "nothing" / "here"))
    # the default demo model ships inside the package
    assert Path(hub.resolve_model(None)).parts[-3:] == ("assets", "models", "lion-shapes")
    with pytest.raises(hub.ModelNotInstalledError, match="run `lion download lion-flant5xxl`"):
        hub.resolve_model("lion-flant5xxl")
    # A bundle installed under <cache>/models/<name> comes first; $LION_MODEL picks the default.
    bundle = tmp_path / "cache" / "models" / "lion-shapes"
    bundle.mkdir(parents=True)
    (bundle / "config.json").write_text("{}")
    assert hub.resolve_model(None) == str(bundle)
    monkeypatch.setenv(hub.MODEL_ENV, str(config))
    assert hub.resolve_model(None) == str(config)


def test_incomplete_install_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LION_MLLM_CACHE", str(tmp_path))
    config = tmp_path / "models" / "lion-flant5xl" / "lion-flant5xl.yaml"
    hub.write_official_config(config, bert_model=ASSETS / "bert-tiny-uncased", vit_model=tmp_path / "gone.pth",
                              llm_model=ASSETS / "flan-t5-tiny", pretrained=ASSETS / "LION-FlanT5-tiny.pth",
                              ram_model=None)
    with pytest.raises(hub.ModelNotInstalledError, match="gone.pth is missing"):
        hub.resolve_model("lion-flant5xl")


def test_mirror_rewrites_plain_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(hub.MIRROR_ENV, raising=False)
    assert hub.mirrored(hub.EVA_VIT_G.url) == hub.EVA_VIT_G.url
    monkeypatch.setenv(hub.MIRROR_ENV, "http://mirror.local/base/")
    assert hub.mirrored("https://a.example/x/y.pth") == "http://mirror.local/base/a.example/x/y.pth"
    assert isinstance(hub.EVA_VIT_G, RemoteFile)
