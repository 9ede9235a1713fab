"""Tests of dent.data: readers, cache, discovery, download, stratified subsets; plus the shared real archive."""

from __future__ import annotations

import dataclasses
import gzip
import os
import pickle
import shutil
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import dent.data.discovery as discovery
import dent.data.download as download
import dent.data.image_folder as image_folder
from dent.data import DATASETS, Split, find_data_dir, load_split, load_subset, stratified_indices
from dent.data.datasets import DatasetInfo
from dent.errors import CorruptFileError, DataNotFoundError, DentError, UnknownNameError

CIFAR10 = DATASETS.get("cifar10")
REPO_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures: tiny fake data sets


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No DENT_DATA, a private cache, a working directory and a source checkout without data."""
    monkeypatch.delenv("DENT_DATA", raising=False)
    monkeypatch.setenv("DENT_CACHE", str(tmp_path / "cache"))
    work = tmp_path / "work" / "repo"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    checkout = tmp_path / "checkout" / "dent"
    checkout.mkdir(parents=True)
    monkeypatch.setattr(discovery, "source_checkout", lambda: checkout)


def fake_images(labels: np.ndarray) -> np.ndarray:
    """uint8 [N, 3, 32, 32]: channel 0 encodes the label, channel 1 the image index, channel 2 a gradient."""
    n = len(labels)
    images = np.empty((n, 3, 32, 32), dtype=np.uint8)
    images[:, 0] = (labels * 20 + 10)[:, None, None]
    images[:, 1] = (np.arange(n) * 7 % 256)[:, None, None]
    images[:, 2] = np.arange(32, dtype=np.uint8)[None, None, :] * 8
    return images


def per_class_labels(n_classes: int, per_class: int) -> np.ndarray:
    return np.repeat(np.arange(n_classes), per_class)


def write_batch(path: Path, images: np.ndarray, labels: np.ndarray, label_key: bytes = b"labels") -> None:
    batch = {b"batch_label": b"fake", label_key: labels.tolist(), b"data": images.reshape(len(images), -1),
             b"filenames": [b"%d.png" % i for i in range(len(images))]}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def write_pickle_release(root: Path, info: DatasetInfo = CIFAR10, per_split: int = 20) -> dict[str, np.ndarray]:
    """A release folder whose every split has ``per_split`` images; returns the test split's labels."""
    folder = root / info.pickle_dir
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    for split, files in info.pickle_files.items():
        labels[split] = rng.integers(0, len(info.classes), per_split)
        for name, part in zip(files, np.array_split(np.arange(per_split), len(files))):
            write_batch(folder / name, fake_images(labels[split])[part], labels[split][part], info.label_key)
    return labels


def write_image_tree(root: Path, split: str, images: np.ndarray, labels: np.ndarray,
                     classes: tuple[str, ...] = CIFAR10.classes, suffix: str = ".png") -> Path:
    """``root/<split>/<class>/<index>.png``; returns ``root/<split>``."""
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root / split / classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.transpose(1, 2, 0)).save(folder / f"{i:04d}{suffix}", quality=100)
    return root / split


def write_archive(archive: Path, tree_root: Path, split: str) -> Path:
    """``archive`` holding ``<split>/...`` of ``tree_root``, members in reverse order (tar order is arbitrary)."""
    files = sorted((tree_root / split).rglob("*"), reverse=True)
    with tarfile.open(archive, "w:gz") as tar:
        for file in files:
            tar.add(file, arcname=str(file.relative_to(tree_root)), recursive=False)
    return archive


@pytest.fixture
def tiny_split():
    """20 images, 2 per CIFAR-10 class, sorted by label (the order the ImageFolder readers produce)."""
    labels = per_class_labels(10, 2)
    return fake_images(labels), labels


@pytest.fixture
def archive_dir(tmp_path, tiny_split):
    """A data folder holding only ``cifar10-test.tar.gz`` (PNG images)."""
    images, labels = tiny_split
    write_image_tree(tmp_path / "tree", "test", images, labels)
    data = tmp_path / "archive-data"
    data.mkdir()
    write_archive(data / "cifar10-test.tar.gz", tmp_path / "tree", "test")
    return data


def pixels_u8(split: Split) -> np.ndarray:
    return (split.images * 255).round().to(torch.uint8).numpy()


# ---------------------------------------------------------------- Split


def test_split_subset_keeps_order_classes_and_name(tiny_split):
    images, labels = tiny_split
    split = Split.from_uint8(images, labels, CIFAR10.classes, "cifar10-test")
    part = split.subset([5, 0, 19])
    assert len(split) == 20 and len(part) == 3
    assert part.labels.tolist() == [labels[5], labels[0], labels[19]]
    assert torch.equal(part.images[1], split.images[0])
    assert part.classes == CIFAR10.classes and part.name == "cifar10-test"


def test_split_rejects_mismatched_labels():
    with pytest.raises(DentError, match="labels must be int64"):
        Split(torch.zeros(3, 3, 32, 32), torch.zeros(2, dtype=torch.long), CIFAR10.classes, "x")


# ---------------------------------------------------------------- readers


def test_pickle_release_loads_with_chw_pixels_and_labels(tmp_path):
    labels = write_pickle_release(tmp_path)["test"]
    split = load_split("cifar10", "test", data_dir=tmp_path)
    assert split.images.shape == (20, 3, 32, 32) and split.images.dtype == torch.float32
    assert split.labels.dtype == torch.int64 and split.labels.tolist() == labels.tolist()
    assert 0 <= split.images.min() and split.images.max() <= 1
    np.testing.assert_array_equal(pixels_u8(split), fake_images(labels))
    assert split.name == "cifar10-test" and split.classes[0] == "airplane"


def test_pickle_train_split_concatenates_the_five_batches(tmp_path):
    labels = write_pickle_release(tmp_path)["train"]
    split = load_split("cifar10", "train", data_dir=tmp_path)
    assert split.labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(pixels_u8(split), fake_images(labels))


def test_cifar100_pickle_release_reads_fine_labels(tmp_path):
    info = DATASETS.get("cifar100")
    labels = write_pickle_release(tmp_path, info)["test"]
    split = load_split("CIFAR100", "test", data_dir=tmp_path)
    assert len(split.classes) == 100 and split.name == "cifar100-test"
    assert split.labels.tolist() == labels.tolist()


@pytest.mark.parametrize("layout", ["tree", "archive"])
def test_image_folder_loads_labels_in_official_class_order(tmp_path, tiny_split, archive_dir, layout):
    images, labels = tiny_split
    data = archive_dir if layout == "archive" else tmp_path / "tree"
    split = load_split("cifar10", "test", data_dir=data)
    assert split.images.shape == (20, 3, 32, 32) and split.images.dtype == torch.float32
    assert split.labels.tolist() == labels.tolist()
    np.testing.assert_array_equal(pixels_u8(split), images)  # PNG is lossless


def test_jpeg_images_are_decoded(tmp_path, tiny_split):
    images, labels = tiny_split
    write_image_tree(tmp_path, "test", images, labels, suffix=".jpg")
    split = load_split("cifar10", "test", data_dir=tmp_path)
    assert split.labels.tolist() == labels.tolist()
    assert np.abs(pixels_u8(split).astype(int) - images).mean() < 3  # JPEG is lossy


def test_class_index_is_the_official_order_not_the_alphabetical_one(tmp_path):
    toy = dataclasses.replace(CIFAR10, name="toy", classes=("zebra", "ant"))
    labels = per_class_labels(2, 3)
    folder = write_image_tree(tmp_path, "test", fake_images(labels), labels, classes=toy.classes)
    images, read_labels = image_folder.read_tree(toy, folder, "test")
    assert read_labels.tolist() == labels.tolist()  # zebra = 0 although "ant" sorts first
    assert images[0, 0, 0, 0] == 10 and images[-1, 0, 0, 0] == 30  # label-encoding channel


def test_non_image_files_are_ignored(tmp_path, tiny_split):
    images, labels = tiny_split
    folder = write_image_tree(tmp_path, "test", images, labels)
    (folder / "airplane" / ".DS_Store").write_bytes(b"\0junk")
    (folder / "airplane" / "._0000.png").write_bytes(b"\0junk")
    (folder / "README.txt").write_text("not a class")
    assert len(load_split("cifar10", "test", data_dir=tmp_path)) == 20


def test_loaded_split_lacking_the_requested_split_is_not_found(archive_dir):
    with pytest.raises(DataNotFoundError, match="not its 'train' split"):
        load_split("cifar10", "train", data_dir=archive_dir)


def test_unknown_dataset_and_split_list_valid_names():
    with pytest.raises(UnknownNameError, match="valid names: cifar10, cifar100"):
        load_split("cifar-10")
    with pytest.raises(UnknownNameError, match="valid splits: train, test"):
        load_split("cifar10", "val")


# ---------------------------------------------------------------- cache


def test_cache_is_reused_without_decoding(archive_dir, monkeypatch, tmp_path):
    first = load_split(data_dir=archive_dir)
    entries = list((tmp_path / "cache").iterdir())
    assert [e.suffix for e in entries] == [".npz"]  # no temporary files left behind

    def no_decoding(*args):
        raise AssertionError("decoded although the cache holds the split")

    monkeypatch.setattr(image_folder, "decode_image", no_decoding)
    second = load_split(data_dir=archive_dir)
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_cache_is_rebuilt_when_the_archive_changes(archive_dir, monkeypatch):
    load_split(data_dir=archive_dir)
    archive = archive_dir / "cifar10-test.tar.gz"
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    calls = []
    real_decode = image_folder.decode_image
    monkeypatch.setattr(image_folder, "decode_image", lambda *a: calls.append(a) or real_decode(*a))
    load_split(data_dir=archive_dir)
    assert len(calls) == 20


def test_unwritable_cache_warns_and_still_loads(archive_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("DENT_CACHE", str(blocker))
    with pytest.warns(UserWarning, match="could not write the data cache"):
        assert len(load_split(data_dir=archive_dir)) == 20


# ---------------------------------------------------------------- stratified subsets


def test_stratified_indices_are_exact_balanced_and_mixed():
    labels = per_class_labels(10, 50)
    idx = stratified_indices(labels, 25, seed=0)
    assert idx.dtype == torch.int64 and len(idx) == 25 and len(set(idx.tolist())) == 25
    counts = np.bincount(labels[idx.numpy()], minlength=10)
    assert sorted(counts.tolist()) == [2] * 5 + [3] * 5
    assert labels[idx.numpy()].tolist() != sorted(labels[idx.numpy()].tolist())  # shuffled across classes


def test_stratified_indices_are_deterministic_and_depend_on_the_seed():
    labels = per_class_labels(10, 50)
    assert torch.equal(stratified_indices(labels, 25, seed=3), stratified_indices(labels, 25, seed=3))
    assert not torch.equal(stratified_indices(labels, 25, seed=3), stratified_indices(labels, 25, seed=4))
    remainders = {tuple(np.bincount(labels[stratified_indices(labels, 25, s).numpy()])) for s in range(10)}
    assert len(remainders) > 1  # the classes that get an extra image vary with the seed


def test_small_classes_give_all_they_have_and_the_rest_is_shared():
    labels = np.array([0] * 2 + [1] * 10 + [2] * 10)
    idx = stratified_indices(torch.as_tensor(labels), 14, seed=0)
    assert np.bincount(labels[idx.numpy()]).tolist() == [2, 6, 6]
    assert sorted(stratified_indices(labels, 22, seed=1).tolist()) == list(range(22))


def test_asking_for_more_than_the_split_names_both_sizes():
    with pytest.raises(DentError, match=r"n=21 .* 20 images"):
        stratified_indices(per_class_labels(10, 2), 21, seed=0)


def test_load_subset_draws_a_stratified_subset(tmp_path):
    labels = per_class_labels(10, 4)
    write_image_tree(tmp_path, "test", fake_images(labels), labels)
    subset = load_subset("cifar10", "test", n=20, seed=1, data_dir=tmp_path)
    assert np.bincount(subset.labels.numpy(), minlength=10).tolist() == [2] * 10
    assert len(load_subset("cifar10", "test", data_dir=tmp_path)) == 40


# ---------------------------------------------------------------- discovery


def place_data(folder: Path) -> Path:
    write_pickle_release(folder, per_split=5)
    return folder.resolve()


def test_discovery_order_explicit_env_shared_data(tmp_path, monkeypatch):
    cwd_shared = place_data(tmp_path / "work" / "shared" / "data")
    checkout_shared = place_data(tmp_path / "checkout" / "shared" / "data")
    local = place_data(tmp_path / "work" / "repo" / "data")
    env = place_data(tmp_path / "env")
    explicit = place_data(tmp_path / "explicit")
    monkeypatch.setenv("DENT_DATA", str(env))
    assert find_data_dir(explicit) == explicit
    assert find_data_dir() == env
    monkeypatch.delenv("DENT_DATA")
    assert find_data_dir() == cwd_shared
    shutil.rmtree(cwd_shared)
    assert find_data_dir() == checkout_shared
    shutil.rmtree(checkout_shared)
    assert find_data_dir() == local


def test_discovery_skips_folders_without_the_dataset(tmp_path, monkeypatch):
    (tmp_path / "env").mkdir()
    monkeypatch.setenv("DENT_DATA", str(tmp_path / "env"))
    local = place_data(tmp_path / "work" / "repo" / "data")
    assert find_data_dir() == local


def test_not_found_lists_every_place_and_how_to_provide_the_data(tmp_path, monkeypatch):
    (tmp_path / "work" / "shared" / "data").mkdir(parents=True)
    with pytest.raises(DataNotFoundError) as err:
        find_data_dir()
    message = str(err.value)
    assert "$DENT_DATA: DENT_DATA not set" in message
    assert f"({tmp_path / 'work' / 'shared' / 'data'}): holds no CIFAR-10 data" in message
    assert f"({tmp_path / 'checkout' / 'shared' / 'data'}): does not exist" in message
    assert f"./data ({tmp_path / 'work' / 'repo' / 'data'}): does not exist" in message
    assert "cifar-10-batches-py/" in message and "cifar10-<split>.tar.gz" in message
    assert "DENT_DATA=" in message and "data.dir" in message and "data.download true" in message


def test_an_explicit_folder_is_the_only_place_searched(tmp_path):
    place_data(tmp_path / "work" / "repo" / "data")
    with pytest.raises(DataNotFoundError, match=r"given explicitly\) \(.*missing\): does not exist"):
        find_data_dir(tmp_path / "missing")


def test_real_source_checkout_is_this_repository(monkeypatch):
    monkeypatch.undo()
    assert discovery.source_checkout() == REPO_ROOT


# ---------------------------------------------------------------- corrupt files


def test_truncated_archive(archive_dir):
    archive = archive_dir / "cifar10-test.tar.gz"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(CorruptFileError, match="cifar10-test.tar.gz is not a readable .tar.gz"):
        load_split(data_dir=archive_dir)


def test_gzip_that_is_not_a_tar(tmp_path):
    (tmp_path / "cifar10-test.tar.gz").write_bytes(gzip.compress(b"plain text, no tar headers" * 40))
    with pytest.raises(CorruptFileError, match="cifar10-test.tar.gz"):
        load_split(data_dir=tmp_path)


def test_missing_class_folders(tmp_path, tiny_split):
    images, labels = tiny_split
    keep = labels < 8
    write_image_tree(tmp_path, "test", images[keep], labels[keep])
    with pytest.raises(CorruptFileError, match="no images for class.*ship, truck"):
        load_split(data_dir=tmp_path)


def test_unknown_class_folder(tmp_path, tiny_split):
    write_image_tree(tmp_path, "test", *tiny_split)
    (tmp_path / "test" / "airplane").rename(tmp_path / "test" / "aeroplane")
    with pytest.raises(CorruptFileError, match="test/aeroplane/ is not a CIFAR-10 class"):
        load_split(data_dir=tmp_path)


def test_wrong_image_size(tmp_path, tiny_split):
    write_image_tree(tmp_path, "test", *tiny_split)
    Image.new("RGB", (28, 28)).save(tmp_path / "test" / "cat" / "0006.png")
    with pytest.raises(CorruptFileError, match="test/cat/0006.png is 28x28 pixels, expected 32x32"):
        load_split(data_dir=tmp_path)


def test_unreadable_image(tmp_path, tiny_split):
    write_image_tree(tmp_path, "test", *tiny_split)
    (tmp_path / "test" / "dog" / "0010.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(CorruptFileError, match="test/dog/0010.png is not a readable image"):
        load_split(data_dir=tmp_path)


def test_truncated_pickle(tmp_path):
    write_pickle_release(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(CorruptFileError, match="test_batch is not a readable"):
        load_split(data_dir=tmp_path)


def test_pickle_with_wrong_contents(tmp_path):
    write_pickle_release(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_batch(batch, np.zeros((4, 3, 16, 16), np.uint8), np.zeros(4, int))
    with pytest.raises(CorruptFileError, match="test_batch: b'data' should be uint8 rows of 3072"):
        load_split(data_dir=tmp_path)


def test_pickle_that_would_run_code_is_refused(tmp_path):
    write_pickle_release(tmp_path)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(pickle.dumps({b"data": Exploit()}))
    with pytest.raises(CorruptFileError, match="refusing to load"):
        load_split(data_dir=tmp_path)
    assert not marker.exists()


def test_release_missing_a_batch_file(tmp_path):
    write_pickle_release(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(CorruptFileError, match="missing the file 'data_batch_3'"):
        load_split("cifar10", "train", data_dir=tmp_path)


# ---------------------------------------------------------------- download


@pytest.fixture
def release_archive(tmp_path):
    """A local stand-in for cifar-10-python.tar.gz (tiny batches); returns (path, md5, test labels)."""
    staging = tmp_path / "staging"
    labels = write_pickle_release(staging)["test"]
    archive = tmp_path / "fixture-release.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(staging / CIFAR10.pickle_dir, arcname=CIFAR10.pickle_dir)
    return archive, download.file_md5(archive), labels


def fake_fetch(source: Path, calls: list):
    def fetch(url: str, dest: Path) -> None:
        calls.append(url)
        shutil.copyfile(source, dest)
    return fetch


def test_download_fetches_verifies_extracts_and_loads(tmp_path, monkeypatch, release_archive):
    archive, md5, labels = release_archive
    calls = []
    monkeypatch.setattr(download, "fetch", fake_fetch(archive, calls))
    monkeypatch.setitem(DATASETS._items, "cifar10", dataclasses.replace(CIFAR10, md5=md5))
    target = tmp_path / "downloaded"
    split = load_split("cifar10", "test", data_dir=target, download=True)
    assert calls == [CIFAR10.url]
    assert split.labels.tolist() == labels.tolist()
    assert (target / "cifar-10-batches-py" / "test_batch").is_file()
    assert not list(target.glob("*.part"))
    load_split("cifar10", "test", data_dir=target, download=True)
    assert len(calls) == 1  # found locally: no second download


def test_download_goes_to_dent_data_else_local_data(tmp_path, monkeypatch, release_archive):
    archive, md5, _ = release_archive
    monkeypatch.setattr(download, "fetch", fake_fetch(archive, []))
    monkeypatch.setitem(DATASETS._items, "cifar10", dataclasses.replace(CIFAR10, md5=md5))
    monkeypatch.setenv("DENT_DATA", str(tmp_path / "env"))
    load_split(download=True)
    assert (tmp_path / "env" / "cifar-10-batches-py").is_dir()
    monkeypatch.delenv("DENT_DATA")
    load_split(download=True)
    assert (tmp_path / "work" / "repo" / "data" / "cifar-10-batches-py").is_dir()


def test_checksum_mismatch_is_reported_and_the_file_deleted(tmp_path, monkeypatch, release_archive):
    archive, md5, _ = release_archive
    monkeypatch.setattr(download, "fetch", fake_fetch(archive, []))
    target = tmp_path / "downloaded"
    with pytest.raises(CorruptFileError, match=f"has md5 {md5}, expected {CIFAR10.md5}"):
        load_split(data_dir=target, download=True)
    assert list(target.iterdir()) == []


def test_failed_download_is_a_clear_error(tmp_path, monkeypatch):
    def offline(url, dest):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(download, "fetch", offline)
    with pytest.raises(DentError, match="could not download CIFAR-10 from https://www.cs.toronto.edu.*no route"):
        load_split(data_dir=tmp_path / "d", download=True)


def test_without_download_a_missing_dataset_is_not_fetched(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "fetch", lambda *a: pytest.fail("fetched without download=True"))
    with pytest.raises(DataNotFoundError):
        load_split(data_dir=tmp_path / "empty")


# ---------------------------------------------------------------- the shared real archive


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory):
    """One decode of each real split per test session, without touching the user's cache."""
    return tmp_path_factory.mktemp("real-cache")


@pytest.fixture
def shared_data(monkeypatch, real_cache):
    """The folder with the shared CIFAR-10 archives, found by discovery from the repository."""
    monkeypatch.undo()  # the real source checkout and working directory, not the isolated ones
    monkeypatch.delenv("DENT_DATA", raising=False)
    monkeypatch.setenv("DENT_CACHE", str(real_cache))
    monkeypatch.chdir(REPO_ROOT)
    try:
        folder = find_data_dir()
    except DataNotFoundError:
        folder = None
    if folder is None or not (folder / "cifar10-test.tar.gz").is_file():
        pytest.skip("the shared CIFAR-10 archive (../shared/data/cifar10-test.tar.gz beside the checkout) is absent")
    return folder


def test_real_test_split(shared_data):
    split = load_split("cifar10", "test")
    assert split.images.shape == (10000, 3, 32, 32) and split.images.dtype == torch.float32
    assert torch.bincount(split.labels).tolist() == [1000] * 10
    assert split.images.mean().item() == pytest.approx(0.4765, abs=5e-4)
    assert split.images.std().item() == pytest.approx(0.2501, abs=5e-4)


def test_real_stratified_subset(shared_data):
    subset = load_subset("cifar10", "test", n=1000, seed=0)
    assert torch.bincount(subset.labels).tolist() == [100] * 10
    again = load_subset("cifar10", "test", n=1000, seed=0)
    assert torch.equal(subset.images, again.images)


@pytest.mark.slow
def test_real_train_split(shared_data):
    split = load_split("cifar10", "train")
    assert split.images.shape == (50000, 3, 32, 32)
    assert torch.bincount(split.labels).tolist() == [5000] * 10
