"""Nothing half-done on disk (issue #24): every writer of a model folder (`lion convert`,
`Lion.save_pretrained`, the trainer's export, best-model copy and shipping) writes into a temporary folder
beside its target through `checkpoint_files.folder_written_whole` and renames it into place when complete;
a failure or a killed process leaves nothing at the target, and the next write to it succeeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ASSETS

from lion_mllm import load_model
from lion_mllm.checkpoints.checkpoint_files import folder_written_whole
from lion_mllm.checkpoints.downloads import DownloadError
from lion_mllm.checkpoints.hub import write_official_config
from lion_mllm.cli import main
from lion_mllm.demo import EXAMPLES_DIR
from lion_mllm.ram import RamConfig, RamVocabulary

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one intra-op thread


def _siblings(target: Path) -> list[str]:
    """Everything beside `target` that a writer of it may leave: its temporary and set-aside folders."""
    return sorted(p.name for p in target.parent.glob(f".{target.name}.*"))


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_failed_write_leaves_nothing_and_a_complete_one_lands_whole(tmp_path: Path) -> None:
    target = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"), folder_written_whole(target) as partial:
        (partial / "config.json").write_text("{}")
        raise RuntimeError("disk full")
    assert not target.exists() and _siblings(target) == []
    with folder_written_whole(target) as partial:
        assert partial.parent == target.parent and not target.exists()  # nothing at the target until done
        (partial / "a.txt").write_text("a")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"] and _siblings(target) == []
    empty = tmp_path / "empty"
    empty.mkdir()
    with folder_written_whole(empty) as partial:  # an empty folder is taken as absent
        (partial / "b.txt").write_text("b")
    assert sorted(p.name for p in empty.iterdir()) == ["b.txt"] and _siblings(empty) == []


def test_a_replace_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="exists and is not empty"), folder_written_whole(target):
        pass
    with pytest.raises(RuntimeError), folder_written_whole(target, replace=True) as partial:
        (partial / "new.txt").write_text("new")
        assert (target / "old.txt").read_text() == "old"
        raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["old.txt"] and _siblings(target) == []
    with folder_written_whole(target, replace=True) as partial:
        (partial / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"] and _siblings(target) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a folder"), folder_written_whole(tmp_path / "file"):
        pass


def test_leftovers_of_dead_writers_are_cleaned_and_a_torn_replace_is_undone(tmp_path: Path) -> None:
    target = tmp_path / "out"
    dead = _dead_pid()
    stale = tmp_path / f".out.partial-{dead}-0000"
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    live = tmp_path / f".out.partial-{os.getpid()}-ffff"  # a writer still running: not touched
    live.mkdir()
    # A replace killed between its two renames: the previous folder is aside and nothing is at the target.
    aside = tmp_path / f".out.replaced-{dead}-0000"
    aside.mkdir()
    (aside / "old.txt").write_text("old")
    with pytest.raises(FileExistsError, match="not empty"), folder_written_whole(target):
        pass
    assert (target / "old.txt").read_text() == "old"  # put back
    assert _siblings(target) == [live.name]
    live.rmdir()


def _shapes_bundle_files(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def shapes_lion():
    return load_model("lion-shapes")


def test_save_pretrained_replaces_a_bundle_and_refuses_other_folders(shapes_lion, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = shapes_lion.save_pretrained(tmp_path / "bundle")
    files = _shapes_bundle_files(bundle)
    assert {"config.json", "tagger.json", "generation_config.json"} <= files
    before = (bundle / "config.json").stat().st_ino
    # A failure while writing over an existing bundle leaves the old bundle as it was.
    monkeypatch.setattr(type(shapes_lion.generation_config), "save",
                        lambda self, directory: (_ for _ in ()).throw(OSError("No space left on device")))
    with pytest.raises(OSError, match="No space left"):
        shapes_lion.save_pretrained(bundle)
    assert (bundle / "config.json").stat().st_ino == before and _shapes_bundle_files(bundle) == files
    assert _siblings(bundle) == []
    monkeypatch.undo()
    assert shapes_lion.save_pretrained(bundle) == bundle
    assert (bundle / "config.json").stat().st_ino != before and _shapes_bundle_files(bundle) == files
    scene = EXAMPLES_DIR / "shapes-1.png"
    assert load_model(str(bundle)).ask(scene, "How many shapes are there?") == shapes_lion.ask(
        scene, "How many shapes are there?")
    other = tmp_path / "photos"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"not ours")
    with pytest.raises(FileExistsError, match="something other than a lion-mllm bundle"):
        shapes_lion.save_pretrained(other)
    assert [p.name for p in other.iterdir()] == ["holiday.jpg"]


_SAVE_AND_HANG = """
import sys, time
from lion_mllm import load_model
from lion_mllm.model.generation import GenerationDefaults
lion = load_model("lion-shapes")
def hang(self, directory):
    print("saving", flush=True)
    time.sleep(600)
GenerationDefaults.save = hang  # the last file of the bundle: everything else is written by then
lion.save_pretrained(sys.argv[1])
"""


def test_a_process_killed_while_saving_leaves_nothing_at_the_target(shapes_lion, tmp_path: Path) -> None:
    target = tmp_path / "bundle"
    process = subprocess.Popen([sys.executable, "-c", _SAVE_AND_HANG, str(target)], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout.readline() == "saving\n"
        partial, = tmp_path.glob(".bundle.partial-*")
        assert (partial / "config.json").is_file() and list(partial.glob("*.safetensors"))  # midway
        process.send_signal(signal.SIGKILL)
        assert process.wait(timeout=30) == -signal.SIGKILL
    finally:
        process.kill()
        process.stdout.close()
    assert not target.exists()
    assert shapes_lion.save_pretrained(target) == target  # the same target again
    assert (target / "generation_config.json").is_file() and _siblings(target) == []  # the dead one's removed


def _yaml_whose_ram_vocabulary_is_fetched(path: Path) -> Path:
    """The goldens' authors'-format files with RAM, its sizes inline and no tag files: RAM's vocabulary
    is then fetched (RamVocabulary.official) when the tagger is built, after the LION weights are written."""
    ram = RamConfig.from_official_dir(ASSETS / "ram")
    return write_official_config(path, bert_model=ASSETS / "bert-tiny-uncased", vit_model=ASSETS / "eva_vit_g_tiny.pth",
                                 llm_model=ASSETS / "flan-t5-tiny", pretrained=ASSETS / "LION-FlanT5-tiny.pth",
                                 ram_model=ASSETS / "ram_swin_tiny_14m.pth",
                                 extra={"vit_num_heads": 2, "ram_config": ram.to_dict()})


def test_a_convert_that_fails_midway_leaves_no_folder_and_a_rerun_succeeds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    config = _yaml_whose_ram_vocabulary_is_fetched(tmp_path / "lion_tiny.yaml")
    out = tmp_path / "bundle"
    written_before_the_failure: list[str] = []

    def offline(cls, *args, **kwargs):
        partial, = tmp_path.glob(".bundle.partial-*")
        written_before_the_failure.extend(sorted(p.name for p in partial.iterdir()))
        raise DownloadError("could not download ram_tag_list.txt: <urlopen error [Errno 101] Network is unreachable>")

    monkeypatch.setattr(RamVocabulary, "official", classmethod(offline))
    assert main(["convert", "--config", str(config), "--out", str(out), "-q"]) == 1
    assert "Network is unreachable" in capsys.readouterr().err
    assert {"config.json", "tokenizer", "model.safetensors.index.json"} <= set(written_before_the_failure)
    assert not out.exists() and _siblings(out) == []

    # The network is back: the stand-in RAM's own vocabulary arrives, and the same command succeeds.
    tiny_vocabulary = RamVocabulary.from_files(ASSETS / "ram" / "data" / "ram_tag_list.txt",
                                               ASSETS / "ram" / "data" / "ram_tag_list_threshold.txt", verify=False)
    monkeypatch.setattr(RamVocabulary, "official", classmethod(lambda cls, *args, **kwargs: tiny_vocabulary))
    assert main(["convert", "--config", str(config), "--out", str(out), "-q"]) == 0
    assert json.loads((out / "tagger.json").read_text())["type"] == "ram" and _siblings(out) == []
