"""Checkpoint I/O: dtype round trips, sharded indexes, header validation, layout."""

import dataclasses
import errno
import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

from checkpoints import read_checkpoint, write_checkpoint, write_safetensors
from llm_merge.errors import MergeError
from llm_merge.io.checkpoint import open_checkpoint
from llm_merge.io.reader import TensorReader
from llm_merge.io.safetensors_format import MAX_HEADER_BYTES, read_header


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16, np.float64])
def test_reader_upcasts_every_float_dtype(tmp_path, dtype):
    values = np.random.default_rng(0).normal(size=(5, 7)).astype(dtype)
    write_safetensors(tmp_path / "model.safetensors", {"w": values})
    info = open_checkpoint(tmp_path, "model").tensors["w"]
    out = np.empty(20, np.float32)
    with TensorReader() as reader:
        reader.read_f32(info, 10, out)
    np.testing.assert_array_equal(out, values.astype(np.float32).ravel()[10:30])


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_mapped_chunks_hold_the_bytes_of_read_chunks(tmp_path, dtype):
    """map_stored views the file's bytes (read-only, any start, across pages) exactly as read_stored copies them."""
    rng = np.random.default_rng(2)
    tensors = {"a": rng.normal(size=37).astype(dtype), "b": rng.normal(size=(300, 41)).astype(dtype)}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    info = open_checkpoint(tmp_path, "model").tensors["b"]
    with TensorReader() as reader:
        for start, count in ((0, 1), (0, info.numel), (1, 5000), (4093, 3000), (info.numel - 7, 7)):
            mapped = reader.map_stored(info, start, count)
            assert not mapped.flags.writeable
            np.testing.assert_array_equal(mapped.view(np.uint8), reader.read_stored(info, start, count).view(np.uint8))
        assert reader.map_stored(info, 0, 0) is None


def test_misaligned_tensors_are_read_not_mapped(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"w": np.arange(64, dtype=np.float32)})
    info = open_checkpoint(tmp_path, "model").tensors["w"]
    with TensorReader() as reader:
        assert reader.map_stored(dataclasses.replace(info, start=info.start + 2), 0, 8) is None


def test_a_truncated_file_is_left_to_the_read_which_names_the_truncation(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"w": np.arange(5000, dtype=np.float32)})
    info = open_checkpoint(tmp_path, "model").tensors["w"]
    os.truncate(info.file, info.start + 400)
    with TensorReader() as reader:
        assert reader.map_stored(info, 0, 5000) is None
        with pytest.raises(MergeError, match="truncated"):
            reader.read_stored(info, 0, 5000)


def test_files_that_cannot_be_mapped_are_copied_with_the_same_result(tmp_path, monkeypatch):
    """A file system that refuses mmap (ENODEV: some FUSE mounts) costs speed, not the merge."""
    import errno

    from checkpoints import make_llama_family
    from llm_merge.api import merge
    from llm_merge.config.options import MergeConfig
    from llm_merge.io import reader as reader_module

    family = make_llama_family(tmp_path / "family", n_models=2, dtype=ml_dtypes.bfloat16, shards=2)
    monkeypatch.setenv("LLM_MERGE_NUMBA", "1")

    def run(out):
        merge(MergeConfig(merge_method="dare_ties", model_path_list=[str(d) for d in family.model_dirs],
                          base_model_path=str(family.base_dir), output_path=str(out), quiet=True))
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    mapped = run(tmp_path / "mapped")
    attempts = []

    def refuse(fd, *args, **kwargs):
        attempts.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    monkeypatch.setattr(reader_module.mmap, "mmap", refuse)
    assert run(tmp_path / "copied") == mapped
    assert attempts and len(attempts) == len(set(attempts))  # one try per file, then copies


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps")
def test_a_mapping_is_released_with_its_last_view(tmp_path):
    """Only chunks still in use stay mapped, so input pages do not pile up in resident memory."""
    write_safetensors(tmp_path / "model.safetensors", {"w": np.arange(1 << 16, dtype=np.float32)})
    info = open_checkpoint(tmp_path, "model").tensors["w"]

    def mapped() -> bool:
        with open("/proc/self/maps") as maps:
            return str(info.file) in maps.read()

    with TensorReader() as reader:
        chunk = reader.map_stored(info, 100, 20000).view(np.uint32)
        assert mapped() and chunk[0] == np.float32(100).view(np.uint32)
        del chunk
        assert not mapped()


def test_merge_of_tensors_stored_off_element_alignment(tmp_path, mergekit):
    """A float32 tensor stored 2 bytes off 4-byte alignment cannot be mapped: it is read instead, same result."""
    rng = np.random.default_rng(3)
    models = []
    for name in ("ft1", "ft2"):
        tensors = {"odd": rng.normal(size=3).astype(ml_dtypes.bfloat16), "w": rng.normal(size=(64, 3)).astype(np.float32)}
        (tmp_path / name).mkdir()
        write_safetensors(tmp_path / name / "model.safetensors", tensors)
        models.append(tensors)
    assert open_checkpoint(tmp_path / "ft1", "model").tensors["w"].start % 4 == 2
    result = mergekit("--merge_method", "linear", "--model_path_list", tmp_path / "ft1", tmp_path / "ft2",
                      "--output_path", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    expected = (models[0]["w"] + models[1]["w"]) / np.float32(2)
    np.testing.assert_array_equal(read_checkpoint(tmp_path / "out")["w"], expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_single_model_linear_merge_is_a_byte_exact_round_trip(tmp_path, mergekit, dtype):
    rng = np.random.default_rng(1)
    tensors = {"a": rng.normal(size=(300, 7)).astype(dtype), "b": rng.normal(size=(3,)).astype(dtype),
               "mask": np.array([True, False]), "ids": np.arange(5, dtype=np.int32)}
    write_checkpoint(tmp_path / "m", tensors, shards=2)
    result = mergekit("--model_path_list", tmp_path / "m", "--output_path", tmp_path / "out", "--max_shard_size", "1000")
    assert result.returncode == 0, result.stderr
    merged = read_checkpoint(tmp_path / "out")
    for name, value in tensors.items():
        assert merged[name].dtype == value.dtype
        np.testing.assert_array_equal(merged[name].view(np.uint8), value.view(np.uint8))
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in tensors.values())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2 and all((tmp_path / "out" / f).is_file() for f in files)
    assert files[0] == f"model-00001-of-{len(files):05d}.safetensors"


def test_output_loads_with_safetensors_library(tmp_path, mergekit, pair):
    from safetensors import safe_open

    out = tmp_path / "out"
    assert mergekit("--model_path_list", pair["ft1"], pair["ft2"], "--output_path", out).returncode == 0
    with safe_open(str(out / "model.safetensors"), framework="numpy") as handle:
        assert set(handle.keys()) == {"w", "b", "ids"}
        assert handle.metadata() == {"format": "np"}


def _write_raw(path, header: bytes, data: bytes = b"", length: int | None = None):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + data)


def _entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "header length missing"),
        (lambda p: _write_raw(p, b"{}", length=10**6), "runs past the end"),
        (lambda p: _write_raw(p, b"{}", length=MAX_HEADER_BYTES + 1), "exceeds the limit"),
        (lambda p: _write_raw(p, b"{not json", b""), "not valid JSON"),
        (lambda p: _write_raw(p, b"[1, 2]"), "expected an object"),
        (lambda p: _write_raw(p, json.dumps({"w": _entry(offsets=(0, 16))}).encode(), b"\0" * 16), "expected 8"),
        (lambda p: _write_raw(p, json.dumps({"w": _entry()}).encode(), b"\0" * 4), "past the data buffer"),
        (lambda p: _write_raw(p, json.dumps({"w": _entry(), "v": _entry(offsets=(4, 12))}).encode(), b"\0" * 12), "overlapping"),
        (lambda p: _write_raw(p, json.dumps({"w": _entry(dtype="Q7")}).encode(), b"\0" * 8), "unsupported safetensors dtype"),
        (lambda p: _write_raw(p, json.dumps({"w": _entry(shape=(-2,))}).encode(), b"\0" * 8), "non-negative integers"),
    ],
)
def test_corrupt_headers_are_refused(tmp_path, make, needle):
    path = tmp_path / "model.safetensors"
    make(path)
    with pytest.raises(MergeError, match="model.safetensors") as info:
        read_header(path)
    assert needle in str(info.value)


def test_index_pointing_outside_is_refused(tmp_path):
    write_safetensors(tmp_path / "evil.safetensors", {"w": np.zeros(2, np.float32)})
    model = tmp_path / "m"
    model.mkdir()
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../evil.safetensors"}}))
    with pytest.raises(MergeError, match="outside the checkpoint directory"):
        open_checkpoint(model, "model")
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": str(tmp_path / "evil.safetensors")}}))
    with pytest.raises(MergeError, match="outside the checkpoint directory"):
        open_checkpoint(model, "model")


def test_index_naming_a_missing_shard(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-00001-of-00002.safetensors"}}))
    with pytest.raises(MergeError, match="model-00001-of-00002.safetensors.*does not exist"):
        open_checkpoint(tmp_path, "model")


def test_index_naming_a_tensor_absent_from_its_shard(tmp_path):
    write_safetensors(tmp_path / "s.safetensors", {"w": np.zeros(2, np.float32)})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "s.safetensors", "v": "s.safetensors"}}))
    with pytest.raises(MergeError, match="absent from their shard.*'v'"):
        open_checkpoint(tmp_path, "model")


def test_no_checkpoint_for_prefix(tmp_path):
    write_safetensors(tmp_path / "model.safetensors", {"w": np.zeros(2, np.float32)})
    with pytest.raises(MergeError, match="no checkpoint for prefix 'master_weights'.*model.safetensors"):
        open_checkpoint(tmp_path, "master_weights")


def test_shard_writer_releases_written_pages_without_changing_bytes(tmp_path, monkeypatch):
    """Writes at unaligned offsets, released from the page cache almost at once, land byte for byte."""
    from llm_merge.io import shards

    released = []
    real_release = shards.release_written
    monkeypatch.setattr(shards, "release_written", lambda fd, offset, n: released.append((offset, n)) or real_release(fd, offset, n))
    monkeypatch.setattr(shards.ShardWriter, "CACHED_BYTES", 10_000)
    size = 300_001
    (tmp_path / "shard").write_bytes(b"\0" * size)
    expected = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    out = shards.ShardWriter(tmp_path)
    cuts = [0, 1, 4095, 4097, 20_000, 100_003, 200_000, size]
    for start, end in reversed(list(zip(cuts, cuts[1:]))):  # out of order, like workers
        out.write("shard", start, expected[start:end])
    out.close()
    with open(tmp_path / "shard", "rb") as handle:
        os.fsync(handle.fileno())
        assert handle.read() == expected.tobytes()
    assert released  # the large early writes left the cache


@pytest.mark.parametrize("n_process", [1, 2])
def test_released_output_pages_leave_the_merged_bytes_unchanged(tmp_path, monkeypatch, n_process):
    from checkpoints import make_llama_family
    from llm_merge.api import merge
    from llm_merge.config.options import MergeConfig
    from llm_merge.io import shards

    family = make_llama_family(tmp_path / "family", n_models=2, dtype=ml_dtypes.bfloat16, shards=2)

    def run(out):
        merge(MergeConfig(merge_method="ties", model_path_list=[str(d) for d in family.model_dirs],
                          base_model_path=str(family.base_dir), output_path=str(out), n_process=n_process, quiet=True))
        return {p.name: p.read_bytes() for p in sorted(out.glob("*.safetensors"))}

    kept = run(tmp_path / "kept")
    monkeypatch.setattr(shards.ShardWriter, "CACHED_BYTES", 0)  # every write released at once (workers fork: inherited)
    assert run(tmp_path / "released") == kept


def _failing_fallocate(code):
    import ctypes

    def fallocate(fd, mode, offset, length):
        ctypes.set_errno(code)
        return -1

    return fallocate


def test_output_shards_reserve_their_space(tmp_path):
    """A created shard has its header, its planned size and, where the file system can, its blocks reserved."""
    from llm_merge.io import shards

    shard = dataclasses.make_dataclass("Shard", ["file", "header", "size"])("s.safetensors", b"header!", 1 << 20)
    shards.create_shards(tmp_path, [shard])
    path = tmp_path / shard.file
    assert path.stat().st_size == shard.size
    assert path.read_bytes()[:7] == b"header!" and not any(path.read_bytes()[7:])
    if shards._fallocate is None:
        pytest.skip("no fallocate on this platform")
    with open(tmp_path / "probe", "wb") as probe:
        if shards._fallocate(probe.fileno(), 0, 0, 4096) != 0:
            pytest.skip("this file system cannot reserve space")
    assert path.stat().st_blocks * 512 >= shard.size  # a sparse file holds a block or two


@pytest.mark.parametrize("code", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL])
def test_a_file_system_that_cannot_reserve_space_gets_a_sparse_file(tmp_path, monkeypatch, code):
    from llm_merge.io import shards

    monkeypatch.setattr(shards, "_fallocate", _failing_fallocate(code))
    with open(tmp_path / "f", "wb") as handle:
        handle.write(b"abc")
        handle.flush()
        shards.allocate(handle.fileno(), 10_000)
    assert (tmp_path / "f").read_bytes() == b"abc" + b"\0" * 9_997


def test_reserving_space_is_tried_again_when_a_signal_interrupts_it(tmp_path, monkeypatch):
    import ctypes

    from llm_merge.io import shards

    if shards._fallocate is None:
        pytest.skip("no fallocate on this platform")
    real_fallocate = shards._fallocate
    calls = []

    def interrupted_once(fd, mode, offset, length):
        calls.append(length)
        if len(calls) == 1:
            ctypes.set_errno(errno.EINTR)
            return -1
        return real_fallocate(fd, mode, offset, length)

    monkeypatch.setattr(shards, "_fallocate", interrupted_once)
    with open(tmp_path / "f", "wb") as handle:
        shards.allocate(handle.fileno(), 8192)
    assert calls == [8192, 8192] and (tmp_path / "f").stat().st_size == 8192


def test_a_full_disk_fails_when_the_shards_are_created(tmp_path, monkeypatch):
    """No space for the output: refused before any merging, with the file and the reason named."""
    from llm_merge.io import shards

    monkeypatch.setattr(shards, "_fallocate", _failing_fallocate(errno.ENOSPC))
    shard = dataclasses.make_dataclass("Shard", ["file", "header", "size"])("s.safetensors", b"h", 4096)
    with pytest.raises(MergeError, match=r"s\.safetensors: cannot create output shard: No space left on device"):
        shards.create_shards(tmp_path, [shard])
