"""Folders shipped through Ray's object store to the nodes (common/node_files.py): the copy a node unpacks is
the folder, byte for byte; paths under the folder map to the copy and others stay; a folder over the limit is
refused naming what to do; the job's copies are removed on every node. The cross-node case (each node reads its
own copy after the driver's originals are gone) is in test_multinode.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import ray

from common.node_files import NodePaths, ShipError, local_copy, remove_job_copies, ship_folder
from data.sample import PromptSample

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def ray_local():
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


def make_folder(root: Path) -> Path:
    (root / "media" / "deep").mkdir(parents=True)
    (root / "manifest.jsonl").write_text('{"id": "a"}\n')
    (root / "media" / "clip.mp4").write_bytes(bytes(range(256)) * 40)
    (root / "media" / "deep" / "beep.wav").write_bytes(b"RIFF" + b"\x00" * 1000)
    return root


def test_a_shipped_folder_is_unpacked_once_per_node_and_paths_map_to_it(tmp_path, ray_local):
    folder = make_folder(tmp_path / "data")
    shipped = ship_folder(folder, max_mb=1)
    assert ship_folder(folder, max_mb=1).digest == shipped.digest  # the same folder packs to the same bytes
    copy = local_copy(shipped)
    assert copy != folder and copy.parent == Path(tempfile.gettempdir())
    originals = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert sorted(p.relative_to(copy) for p in copy.rglob("*") if p.is_file()) == originals
    assert all((copy / p).read_bytes() == (folder / p).read_bytes() for p in originals)
    stamp = (copy / "manifest.jsonl").stat().st_mtime_ns
    assert local_copy(shipped) == copy and (copy / "manifest.jsonl").stat().st_mtime_ns == stamp  # kept

    paths = NodePaths((shipped,))
    assert paths.path(folder / "media" / "clip.mp4") == copy / "media" / "clip.mp4"
    assert paths.path(folder) == copy
    assert paths.path(tmp_path / "elsewhere.mp4") == tmp_path / "elsewhere.mp4"  # not shipped: as it is
    assert paths.path(tmp_path / "data2" / "x") == tmp_path / "data2" / "x"  # a sibling with the same prefix
    sample = PromptSample("a", "q?", "free-form", "x", video=folder / "media" / "clip.mp4",
                          audio=folder / "media" / "deep" / "beep.wav")
    moved = paths.sample(sample)
    assert (moved.video, moved.audio) == (copy / "media" / "clip.mp4", copy / "media" / "deep" / "beep.wav")
    assert moved.video.read_bytes() == sample.video.read_bytes() and moved.id == "a"
    assert NodePaths().sample(sample) is sample

    assert remove_job_copies() >= 1
    assert not copy.exists()


def test_a_folder_over_the_limit_is_refused_naming_the_setting(tmp_path, ray_local):
    folder = make_folder(tmp_path / "big")
    with pytest.raises(ShipError, match=r"big is 0 MiB, over storage.max_ship_mb 0.001.*storage.shared_paths"):
        ship_folder(folder, max_mb=0.001)
    with pytest.raises(ShipError, match="not a folder"):
        ship_folder(tmp_path / "missing", max_mb=1)
