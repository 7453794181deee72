"""Hostile folders, files and faults: one line and exit 2, nothing outside artifacts/, no litter."""

from __future__ import annotations

import builtins
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import make_folder, make_image

from pipeline.cli.main import main
from pipeline.core.errors import CacheError, DataError, FinetuneError, PipelineError
from pipeline.core.files import WriteError, write_atomic, write_bytes_atomic
from pipeline.data import images
from pipeline.data.folders import scan_folder
from pipeline.data.images import ImageError, load_image
from pipeline.features import cache
from pipeline.features.config import FeatureConfig
from pipeline.features.extract import extract_features
from pipeline.finetuning.checkpoints import Checkpoint

TINY = FeatureConfig(backbone="mobilenet_v2", weights="none", input_size=32, batch_size=4)


def run(folder, artifacts, config=TINY):
    return extract_features(folder, config, artifacts_dir=artifacts, progress=False)


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


# --------------------------------------------------------------------------- data folders


def test_dangling_links_and_link_loops_are_skipped_with_a_reason(image_folder):
    os.symlink(image_folder / "red" / "nowhere.png", image_folder / "red" / "dangling.png")
    os.symlink("loop.png", image_folder / "red" / "loop.png")  # a link to itself
    os.symlink("..", image_folder / "blue" / "up")  # a folder link back to an ancestor
    folder = scan_folder(image_folder)
    paths = [r.path for r in folder.records]
    assert "red/dangling.png" in paths and "red/loop.png" in paths
    assert len(folder.fingerprint()) == 64  # no crash on the broken links
    assert any("blue/up" in w and "already scanned" in w for w in folder.warnings)
    with pytest.raises(ImageError, match="dangling symbolic link"):
        load_image(image_folder / "red" / "dangling.png", 32)
    with pytest.raises(ImageError, match="symbolic link loop"):
        load_image(image_folder / "red" / "loop.png", 32)


def test_fixing_a_dangling_link_changes_the_fingerprint(image_folder):
    link = image_folder / "red" / "later.png"
    os.symlink(image_folder / "elsewhere.png", link)
    before = scan_folder(image_folder).fingerprint()
    make_image(image_folder / "elsewhere.png", (1, 2, 3), seed=7)
    assert scan_folder(image_folder).fingerprint() != before


def test_symlinked_split_folders_are_followed(tmp_path):
    real = make_folder(tmp_path / "store" / "train")
    (tmp_path / "data").mkdir()
    os.symlink(real, tmp_path / "data" / "train")
    folder = scan_folder(tmp_path / "data")
    assert folder.split_source == "folders" and len(folder.records) == 12


def test_stage_one_records_broken_links_as_skipped(image_folder, tmp_path):
    os.symlink(image_folder / "red" / "nowhere.png", image_folder / "red" / "dangling.png")
    summary = run(image_folder, tmp_path / "art")
    assert summary.extracted == 12
    assert [p for p, _ in summary.skipped] == ["red/dangling.png"]
    assert "dangling symbolic link" in summary.skipped[0][1]


@pytest.mark.parametrize("where", ["file", "class"])
def test_names_that_are_not_utf8_are_refused_naming_the_file(image_folder, where):
    bad = os.fsencode(image_folder / "red") + b"/\xff.png"
    if where == "class":
        bad = os.fsencode(image_folder) + b"/caf\xe9"
        os.mkdir(bad)
        bad += b"/a.png"
    Path(os.fsdecode(bad)).write_bytes((image_folder / "red" / "img00.png").read_bytes())
    with pytest.raises(DataError, match="not valid UTF-8") as caught:
        scan_folder(image_folder)
    message = str(caught.value)
    assert ("\\xff.png" if where == "file" else "caf\\xe9") in message and "\n" not in message
    message.encode("utf-8")  # printable


def test_a_name_that_is_not_utf8_is_one_line_from_the_cli(image_folder, tmp_path, capsys):
    Path(os.fsdecode(os.fsencode(image_folder / "red") + b"/\xff.png")).write_bytes(b"x")
    argv = ["features", "--data", str(image_folder), "--weights", "none", "--input-size", "32"]
    code = main([*argv, "--quiet", "--artifacts", str(tmp_path / "art")])
    err = capsys.readouterr().err
    assert code == 2 and "not valid UTF-8" in err and err.count("\n") == 1
    assert not (tmp_path / "art").exists()


def test_decoding_is_bounded_even_when_pillows_guard_is_off(tmp_path, monkeypatch):
    from PIL import Image

    path = make_image(tmp_path / "big.png", (10, 20, 30), seed=0, size=(40, 30))
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 1000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageError, match="too large to decode safely: 40x30"):
        load_image(path, 32)


def test_pillows_warning_band_is_refused_not_silenced(tmp_path, monkeypatch):
    from PIL import Image

    # Above Pillow's limit but below twice it, Pillow only warns: decoding must still stop.
    path = make_image(tmp_path / "big.png", (10, 20, 30), seed=0, size=(40, 30))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="too large"):
        load_image(path, 32)


# --------------------------------------------------------------------------- writing outputs


def test_a_refused_run_leaves_no_lock_and_no_files(image_folder, tmp_path):
    art = tmp_path / "art"
    with pytest.raises(PipelineError, match="block_99"):
        run(image_folder, art, FeatureConfig(**{**TINY.__dict__, "layer": "block_99"}))
    assert files_under(art) == []


@pytest.fixture
def read_only(monkeypatch):
    """Make folders unwritable: chmod, or (as root, where chmod does not stop writes) refuse
    every write-mode open and replace under them."""

    chmodded: list[Path] = []

    def apply(folder: Path) -> None:
        if os.geteuid() != 0:
            for path in [folder, *folder.rglob("*")]:
                path.chmod(path.stat().st_mode & ~0o222)
            chmodded.append(folder)
            return
        prefix = str(folder.resolve())

        def denied(path) -> bool:
            return str(Path(os.fsdecode(path)).resolve()).startswith(prefix)

        def refuse(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))

        real_open, real_os_open, real_replace = builtins.open, os.open, os.replace

        def fake_open(file, mode="r", *args, **kwargs):
            writes = isinstance(file, str | bytes | os.PathLike) and set(mode) & set("wax+")
            if writes and denied(file):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        def fake_os_open(path, flags, *args, **kwargs):
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and denied(path):
                refuse(path)
            return real_os_open(path, flags, *args, **kwargs)

        def fake_replace(src, dst, *args, **kwargs):
            if denied(dst):
                refuse(dst)
            return real_replace(src, dst, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", fake_open)
        monkeypatch.setattr(os, "open", fake_os_open)
        monkeypatch.setattr(os, "replace", fake_replace)

    yield apply
    for folder in chmodded:
        for path in [folder, *folder.rglob("*")]:
            path.chmod(path.stat().st_mode | 0o200)


def test_an_up_to_date_run_needs_no_write_access(image_folder, tmp_path, read_only):
    art = tmp_path / "art"
    run(image_folder, art)
    before = files_under(art)
    read_only(art)
    summary = run(image_folder, art)
    assert summary.status == "up to date"
    assert files_under(art) == before


def test_a_read_only_folder_is_one_line_naming_it(image_folder, tmp_path, read_only, capsys):
    art = tmp_path / "art"
    (art / "features").mkdir(parents=True)
    read_only(art)
    argv = ["features", "--data", str(image_folder), "--weights", "none", "--input-size", "32"]
    code = main([*argv, "--quiet", "--artifacts", str(art)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert "cannot write to" in err and str(art) in err and "ermission denied" in err


def test_a_full_disk_mid_run_is_one_line_and_the_next_run_resumes(
    image_folder, tmp_path, monkeypatch
):
    art = tmp_path / "art"
    real_replace, calls = os.replace, []

    def full_after_two_batches(src, dst, *args, **kwargs):
        if str(dst).endswith(".partial.json"):
            calls.append(dst)
            if len(calls) == 3:  # the initial progress, batch 1, then batch 2 fails
                raise OSError(errno.ENOSPC, "No space left on device", str(src))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_after_two_batches)
    with pytest.raises(WriteError, match="cannot write to .*No space left on device") as caught:
        run(image_folder, art)
    assert "\n" not in str(caught.value)
    folder = next((art / "features").iterdir())
    assert not [p for p in folder.iterdir() if ".tmp." in p.name]  # no temporary left
    monkeypatch.setattr(os, "replace", real_replace)

    summary = run(image_folder, art)
    assert summary.status == "resumed" and "resuming at image 4 of 12" in summary.notes
    whole = run(image_folder, tmp_path / "fresh")
    np.testing.assert_allclose(
        cache.load_features(summary.cache_path).features,
        cache.load_features(whole.cache_path).features,
        rtol=1e-5,
        atol=1e-6,
    )


def test_temporary_files_of_dead_processes_are_removed_by_the_next_writer(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    pid = int(dead.stdout)
    stale = tmp_path / f".{pid}.tmp.model.keras"
    stale.write_bytes(b"half a model")
    alive = tmp_path / f".{os.getppid()}.tmp.other.json"  # a live process: its file stays
    alive.write_bytes(b"{}")
    write_bytes_atomic(tmp_path / "new.json", "{}")
    assert not stale.exists() and alive.exists()


def test_a_failed_write_removes_its_temporary_file(tmp_path):
    def fail(tmp: Path) -> None:
        tmp.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=f"cannot write to {tmp_path}: No space left"):
        write_atomic(tmp_path / "out.bin", fail)
    assert files_under(tmp_path) == []


def test_a_second_finetune_run_of_the_same_name_refuses(tmp_path):
    first, second = Checkpoint(tmp_path / "run.checkpoint"), Checkpoint(tmp_path / "run.checkpoint")
    assert first.open({}, restart=False, note=print) is None
    try:
        with pytest.raises(FinetuneError, match="'run' is being trained by another process"):
            second.open({}, restart=False, note=print)
    finally:
        first.release()
    assert second.open({}, restart=False, note=print) is None  # free again
    second.release()


def test_a_second_finetune_process_refuses(tmp_path):
    code = (
        "import sys, time; from pipeline.finetuning.checkpoints import Checkpoint;"
        f"c = Checkpoint({str(tmp_path / 'run.checkpoint')!r}); c.open({{}}, restart=False,"
        " note=print); print('locked', flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FinetuneError, match=rf"another process \(pid {holder.pid}\)"):
            Checkpoint(tmp_path / "run.checkpoint").open({}, restart=False, note=print)
    finally:
        holder.kill()
        holder.wait()


# --------------------------------------------------------------------------- untrusted files


def _checkpoint_with(tmp_path: Path, **state) -> Checkpoint:
    folder = tmp_path / "run.checkpoint"
    folder.mkdir(parents=True)
    (folder / "epoch-0.weights.h5").write_bytes(b"")
    base = {
        "identity": {}, "epoch": 0, "best_epoch": 0, "best_val_accuracy": 0.5,
        "phase_one_val_accuracy": 0.5, "wait": 0, "head_source": "scratch", "history": [],
        "last": "epoch-0.weights.h5", "best": "epoch-0.weights.h5", "optimizer": None,
        "random": None, "seconds": 0.0,
    }  # fmt: skip
    (folder / "state.json").write_text(json.dumps({**base, **state}))
    return Checkpoint(folder)


@pytest.mark.parametrize(
    "state",
    [
        {"epoch": "three"},
        {"identity": []},
        {"last": "../../outside.weights.h5"},
        {"best": "/etc/passwd"},
        {"optimizer": "missing.npz"},
        {"history": "not a list"},
    ],
)
def test_a_malformed_checkpoint_state_is_one_line_suggesting_restart(tmp_path, state):
    checkpoint = _checkpoint_with(tmp_path, **state)
    with pytest.raises(FinetuneError, match="is malformed .*RESTART=1") as caught:
        checkpoint.open({}, restart=False, note=print)
    assert "\n" not in str(caught.value)
    assert not checkpoint._lock._exit_callbacks  # the lock was given back
    good = _checkpoint_with(tmp_path / "ok")
    assert good.open({}, restart=False, note=print)["head_source"] == "scratch"
    good.release()


def test_a_state_that_is_not_an_object_is_refused(tmp_path):
    checkpoint = _checkpoint_with(tmp_path)
    checkpoint.state_path.write_text("[1, 2]")
    with pytest.raises(FinetuneError, match="not a JSON object"):
        checkpoint.open({}, restart=False, note=print)


def _edit_attrs(path: Path, **attrs) -> None:
    with h5py.File(path, "r+") as f:
        for key, value in attrs.items():
            f.attrs[key] = value


def test_a_dataset_attribute_cannot_name_a_path(tiny_cache, tmp_path):
    copy = tmp_path / "copy.h5"
    copy.write_bytes(tiny_cache.read_bytes())
    _edit_attrs(copy, dataset="../../../../tmp/evil")
    attrs = cache.read_attrs(copy)
    assert "/" not in attrs["dataset"] and ".." not in attrs["dataset"]
    assert cache.load_features(copy).attrs["dataset"] == attrs["dataset"]


@pytest.mark.parametrize(
    "attrs",
    [{"input_size": -3}, {"class_names": "abc"}, {"data_root": "relative/path"}],
)
def test_malformed_cache_attributes_are_refused_in_one_line(tiny_cache, tmp_path, attrs):
    copy = tmp_path / "copy.h5"
    copy.write_bytes(tiny_cache.read_bytes())
    _edit_attrs(copy, **attrs)
    with pytest.raises(CacheError, match=f"attribute '{next(iter(attrs))}' must be"):
        cache.load_features(copy)
