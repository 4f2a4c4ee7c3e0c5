"""Converted models against interrupted saves and damaged or lying files; NaN/Inf imports.

A save is interrupted at every step (an exception raised after each file, before and between
the renames, after the swap): the directory then loads as the old model or the new one,
exactly. The on-disk state at the moment of the interruption is copied aside too, before any
clean-up runs, which is what a killed process leaves behind.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import struct
import zlib

import jax
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from pallas_kernels import formats, tiled_format
from samoyeds_jax import atomic, converted_io, hf_import, param_layout, prune_weights
from samoyeds_jax.checkpoints import load_or_convert
from samoyeds_jax.converted_io import (CONVERTED_CONFIG, CONVERTED_MANIFEST, CONVERTED_WEIGHTS,
                                       load_converted, save_converted)
from samoyeds_jax.hf_import import load_hf_checkpoint
from samoyeds_jax.model import ModelConfig, MoETransformer

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "mixtral")  # has tokenizer.json


def _model(seed: int, fmt: str = "nm") -> MoETransformer:
    return MoETransformer(ModelConfig.tiny(expert_format=fmt), rngs=nnx.Rngs(seed))


def _leaves(model) -> dict[str, np.ndarray]:
    """Every parameter leaf, sparse format fields included, by path."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in flat}


def _same(got: dict, want: dict) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def models():
    """Two nm models of one config with different weights, and their parameter leaves."""
    old, new = _model(1), _model(2)
    assert not _same(_leaves(old), _leaves(new))
    return {"old": (old, _leaves(old)), "new": (new, _leaves(new))}


def _which(directory: str, models) -> str:
    """'old' or 'new': the model ``directory`` loads as, exactly (fails otherwise)."""
    loaded = _leaves(load_converted(directory)[0])
    matches = [name for name, (_, leaves) in models.items() if _same(loaded, leaves)]
    assert len(matches) == 1, f"{directory} loads as neither model"
    return matches[0]


def _rewrite(directory: str, tensors: dict | None = None, meta: dict | None = None) -> None:
    """Replace the weights and/or metadata and list them in the manifest as save_converted
    would: a self-consistent directory whose content lies about the model."""
    man_path = os.path.join(directory, CONVERTED_MANIFEST)
    with open(man_path) as f:
        manifest = json.load(f)
    files = manifest["files"]
    if tensors is not None:
        path = os.path.join(directory, CONVERTED_WEIGHTS)
        save_file(tensors, path)
        files[CONVERTED_WEIGHTS] = {"bytes": os.path.getsize(path), "tensors": {
            k: {"shape": list(a.shape), "dtype": a.dtype.name, "bytes": a.nbytes,
                "crc32": zlib.crc32(np.ascontiguousarray(a).reshape(-1).view(np.uint8))}
            for k, a in tensors.items()}}
    if meta is not None:
        data = json.dumps(meta).encode()
        with open(os.path.join(directory, CONVERTED_CONFIG), "wb") as f:
            f.write(data)
        files[CONVERTED_CONFIG] = {"bytes": len(data), "crc32": zlib.crc32(data)}
    with open(man_path, "w") as f:
        json.dump(manifest, f)


def _read_json(directory: str, name: str) -> dict:
    with open(os.path.join(directory, name)) as f:
        return json.load(f)


@pytest.fixture
def saved(tmp_path, models) -> str:
    """The old model saved (with a tokenizer) under tmp_path/models/model."""
    target = str(tmp_path / "models" / "model")
    save_converted(models["old"][0], target, source=FIXTURE)
    return target


# ----------------------------------------------------------------------------- interrupted saves


class _Killed(Exception):
    pass


# (exchange available, function, its n-th call, kill before/after it runs, who is left)
KILL_POINTS = [
    (True, "fsync_file", 0, "after", "old"),  # weights written
    (True, "write_file", 0, "after", "old"),  # metadata written
    (True, "write_file", 1, "after", "old"),  # tokenizer written
    (True, "write_file", 2, "after", "old"),  # manifest written
    (True, "fsync_dir", 0, "after", "old"),  # staging directory durable
    (True, "exchange", 0, "before", "old"),  # before the rename
    (True, "exchange", 0, "after", "new"),  # swapped, old copy not yet deleted
    (False, "rename", 0, "before", "old"),  # before the first rename
    (False, "rename", 1, "before", "old"),  # between the renames
    (False, "rename", 1, "after", "new"),  # after the renames
]


@pytest.mark.parametrize("exchange,name,n,when,left", KILL_POINTS,
                         ids=[f"{'exchange' if p[0] else 'rename_aside'}-{p[3]}-{p[1]}{p[2]}"
                              for p in KILL_POINTS])
def test_an_interrupted_save_leaves_the_old_or_the_new_model(tmp_path, models, saved, monkeypatch,
                                                             exchange, name, n, when, left):
    parent, snapshot = os.path.dirname(saved), str(tmp_path / "at_the_kill")
    if not exchange:
        monkeypatch.setattr(atomic, "exchange", lambda a, b: False)
    else:
        os.mkdir(tmp_path / "a")
        os.mkdir(tmp_path / "b")
        if not atomic.exchange(str(tmp_path / "a"), str(tmp_path / "b")):
            pytest.skip("no renameat2(RENAME_EXCHANGE) on this platform / file system")
    owner = os if name == "rename" else atomic
    original, calls = getattr(owner, name), []

    def killing(*args, **kwargs):
        calls.append(args)
        hit = len(calls) - 1 == n
        if hit and when == "before":
            shutil.copytree(parent, snapshot)
            raise _Killed(name)
        result = original(*args, **kwargs)
        if hit:
            shutil.copytree(parent, snapshot)
            raise _Killed(name)
        return result

    monkeypatch.setattr(owner, name, killing)
    with pytest.raises(_Killed):
        save_converted(models["new"][0], saved, source=FIXTURE)
    monkeypatch.undo()

    # After the exception (clean-up ran): the path holds one complete model.
    assert _which(saved, models) == left
    # What a killed process leaves (no clean-up): the same, or for the one step no OS makes
    # atomic without an exchange, no directory and the complete old copy beside it.
    target = os.path.join(snapshot, "model")
    if os.path.exists(target):
        assert _which(target, models) == left
    else:
        assert (exchange, name, n, when) == (False, "rename", 1, "before")
        (old_copy,) = glob.glob(os.path.join(snapshot, ".model.old-*"))
        assert _which(old_copy, models) == "old"
    # A staging directory caught mid-write is refused; a finished one is the new model.
    for staged in glob.glob(os.path.join(snapshot, ".model.tmp-*")):
        if os.path.isfile(os.path.join(staged, CONVERTED_MANIFEST)):
            assert _which(staged, models) == ("new" if left == "old" else "old")
        else:
            with pytest.raises(FileNotFoundError, match=CONVERTED_MANIFEST):
                load_converted(staged)
    # The next save goes through.
    save_converted(models["new"][0], saved, source=FIXTURE)
    assert _which(saved, models) == "new"


def test_a_save_deletes_what_crashed_saves_left_beside_it(models, saved):
    parent = os.path.dirname(saved)
    crashed = [os.path.join(parent, ".model.tmp-0123456789ab"),  # a partial write
               os.path.join(parent, ".model.old-ba9876543210")]  # an old copy set aside
    unrelated = [os.path.join(parent, ".model.tmp-notours"),
                 os.path.join(parent, ".other.tmp-0123456789ab")]
    for path in crashed + unrelated:
        os.mkdir(path)
        atomic.write_file(os.path.join(path, "x"), b"x")
    save_converted(models["new"][0], saved, source=FIXTURE)
    assert _which(saved, models) == "new"
    assert not any(os.path.exists(p) for p in crashed)
    assert all(os.path.isfile(os.path.join(p, "x")) for p in unrelated)


def test_new_weights_never_load_under_old_metadata(tmp_path, models, saved):
    newer = str(tmp_path / "newer")
    save_converted(models["new"][0], newer)
    mix = str(tmp_path / "mix")
    shutil.copytree(saved, mix)
    shutil.copy(os.path.join(newer, CONVERTED_WEIGHTS), os.path.join(mix, CONVERTED_WEIGHTS))
    # Same size (same config), so only the checksums can tell.
    assert os.path.getsize(os.path.join(saved, CONVERTED_WEIGHTS)) == os.path.getsize(
        os.path.join(mix, CONVERTED_WEIGHTS))
    with pytest.raises(ValueError, match=rf"tensor '[\w.]+' in .*mix/{CONVERTED_WEIGHTS}: "
                                         r"expected crc32 \w{8} .*found \w{8}"):
        load_converted(mix)
    # New weights and manifest under the old metadata: the metadata's size or checksum tells.
    shutil.copy(os.path.join(newer, CONVERTED_MANIFEST), os.path.join(mix, CONVERTED_MANIFEST))
    with pytest.raises(ValueError, match=rf"mix/{CONVERTED_CONFIG}: expected (\d+ bytes|crc32)"):
        load_converted(mix)


def test_save_refuses_to_replace_a_directory_of_another_kind(tmp_path, models):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="does not look like a converted model"):
        save_converted(models["old"][0], str(other))
    assert os.listdir(other) == ["notes.txt"] and (other / "notes.txt").read_text() == "keep me"
    assert [p for p in os.listdir(tmp_path) if p != "notes"] == []  # no staging left behind


def test_save_refuses_parameters_that_disagree_with_the_config(tmp_path):
    model = _model(3)
    w1 = model.layers[0].mlp.w1
    w1.set_value(tiled_format.TiledSparse.from_dense(np.asarray(w1.get_value().to_dense())))
    with pytest.raises(ValueError, match=r"parameter layers\.0\.mlp\.w1 in the model: expected "
                                         r"NMSparse \(expert_format='nm'\).*found TiledSparse"):
        save_converted(model, str(tmp_path / "c"))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("fmt", ["nm", "samoyeds", "unstructured"])
def test_bfloat16_round_trip_of_every_sparse_format(tmp_path, fmt):
    config = ModelConfig.tiny(expert_format=fmt, dtype="bfloat16", param_dtype="bfloat16")
    model = MoETransformer(config, rngs=nnx.Rngs(4))
    save_converted(model, str(tmp_path / fmt))
    loaded, loaded_config = load_converted(str(tmp_path / fmt))
    assert loaded_config == config
    assert type(loaded.layers[1].mlp.w2.get_value()) is type(model.layers[1].mlp.w2.get_value())
    assert _same(_leaves(loaded), _leaves(model))


# ----------------------------------------------------------------------------- damaged files


def test_manifest_lists_every_stored_array(models, saved):
    manifest = _read_json(saved, CONVERTED_MANIFEST)
    assert (manifest["format"], manifest["format_version"]) == ("samoyeds_jax.converted", 3)
    files = manifest["files"]
    assert set(files) == {CONVERTED_CONFIG, CONVERTED_WEIGHTS, "tokenizer.json"}
    for name in (CONVERTED_CONFIG, "tokenizer.json"):
        with open(os.path.join(saved, name), "rb") as f:
            data = f.read()
        assert files[name] == {"bytes": len(data), "crc32": zlib.crc32(data)}
    stored = load_file(os.path.join(saved, CONVERTED_WEIGHTS))
    entries = files[CONVERTED_WEIGHTS]["tensors"]
    assert set(entries) == set(stored)
    sparse_fields = {"layers.0.mlp.w1.values", "layers.0.mlp.w1.meta", "layers.1.mlp.w2.meta"}
    assert sparse_fields <= set(entries)
    for key, array in stored.items():
        assert entries[key] == {"shape": list(array.shape), "dtype": array.dtype.name,
                                "bytes": array.nbytes,
                                "crc32": zlib.crc32(array.reshape(-1).view(np.uint8))}, key


def _tensor_offset(path: str, key: str) -> int:
    """File offset of tensor ``key``'s first data byte in a safetensors file."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return 8 + size + header[key]["data_offsets"][0]


@pytest.mark.parametrize("name,key", [
    (CONVERTED_WEIGHTS, "layers.1.mlp.w2.meta"),
    (CONVERTED_WEIGHTS, "embed_tokens.embedding"),
    (CONVERTED_CONFIG, None),
    ("tokenizer.json", None),
])
def test_a_flipped_byte_is_refused(saved, name, key):
    path = os.path.join(saved, name)
    offset = _tensor_offset(path, key) + 5 if key else os.path.getsize(path) // 2
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x10]))
    where = rf"tensor '{key}' in .*/{name}" if key else rf".*/{name}"
    with pytest.raises(ValueError,
                       match=rf"{where}: expected crc32 \w{{8}}.*found \w{{8}}.*corrupt"):
        load_converted(saved)


def test_a_truncated_file_is_refused(saved):
    path = os.path.join(saved, CONVERTED_WEIGHTS)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match=rf".*/{CONVERTED_WEIGHTS}: expected {size} bytes .*"
                                         rf"found {size - 100}: the file is truncated"):
        load_converted(saved)


@pytest.mark.parametrize("name", [CONVERTED_MANIFEST, CONVERTED_WEIGHTS, CONVERTED_CONFIG])
def test_a_missing_file_is_refused(saved, name):
    os.remove(os.path.join(saved, name))
    assert converted_io.is_converted(saved)  # still recognised, so load_model refuses it too
    with pytest.raises(FileNotFoundError, match=rf".*/{name} not found"):
        load_converted(saved)


@pytest.mark.parametrize("change,found", [
    ({"format": "pt"}, r"found 'pt' version 3"),
    ({"format_version": 1}, r"found 'samoyeds_jax.converted' version 1"),
])
def test_a_manifest_of_another_format_is_refused(saved, change, found):
    manifest = _read_json(saved, CONVERTED_MANIFEST)
    manifest.update(change)
    with open(os.path.join(saved, CONVERTED_MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match=rf".*/{CONVERTED_MANIFEST}: expected format "
                                         rf"'samoyeds_jax.converted' version 3, {found}"):
        load_converted(saved)


def test_a_wrong_sparse_field_shape_is_refused(saved):
    tensors = load_file(os.path.join(saved, CONVERTED_WEIGHTS))
    good = tensors["layers.0.mlp.w3.meta"]
    tensors["layers.0.mlp.w3.meta"] = good[:, :-1]  # one meta row short, manifest agreeing
    _rewrite(saved, tensors=tensors)
    with pytest.raises(ValueError, match=(
            rf"parameter layers\.0\.mlp\.w3 in .*/{CONVERTED_WEIGHTS}: its stored fields .*"
            rf"'meta': 'int32\[4, 3, 256\]'.* do not make a NMSparse \(NMSparse: meta must have "
            rf"shape \(4, 4, 256\), got \(4, 3, 256\)\)")):
        load_converted(saved)


def test_a_wrong_sparse_field_dtype_is_refused(saved):
    tensors = load_file(os.path.join(saved, CONVERTED_WEIGHTS))
    tensors["layers.1.mlp.w2.meta"] = tensors["layers.1.mlp.w2.meta"].astype(np.int16)
    _rewrite(saved, tensors=tensors)
    with pytest.raises(ValueError, match=rf"parameter layers\.1\.mlp\.w2 in .*/{CONVERTED_WEIGHTS}: "
                                         r"its stored fields .*'meta': 'int16\[4, 8, 128\]'.* do "
                                         r"not make a NMSparse \(NMSparse: meta must be int32, "
                                         r"got int16\)"):
        load_converted(saved)


def test_sparse_static_fields_must_match_the_config(saved):
    meta = _read_json(saved, CONVERTED_CONFIG)
    meta["config"]["moe"]["sparsity"].update(n=2, m=8)  # the config now says 2:8
    _rewrite(saved, meta=meta)
    with pytest.raises(ValueError, match=r"parameter layers\.0\.mlp\.w1 .*expected NMSparse\(n=2, "
                                         r"m=8, .*found NMSparse\(n=2, m=4"):
        load_converted(saved)


def test_a_missing_tensor_is_refused(saved):
    tensors = load_file(os.path.join(saved, CONVERTED_WEIGHTS))
    del tensors["layers.1.self_attn.o_proj.kernel"]
    _rewrite(saved, tensors=tensors)
    with pytest.raises(ValueError, match=r"parameter layers\.1\.self_attn\.o_proj\.kernel "
                                         rf"\(float32\[128, 128\] dense\) is missing from "
                                         rf".*/{CONVERTED_WEIGHTS}"):
        load_converted(saved)


def test_a_dense_dtype_other_than_the_configs_is_refused(saved):
    tensors = load_file(os.path.join(saved, CONVERTED_WEIGHTS))
    tensors["norm.scale"] = tensors["norm.scale"].astype(np.float16)
    _rewrite(saved, tensors=tensors)
    with pytest.raises(ValueError, match=r"parameter norm\.scale .*expected float32\[128\] from "
                                         r"the config, found float16\[128\]"):
        load_converted(saved)


def test_a_tensor_the_manifest_does_not_list_is_refused(saved):
    manifest = _read_json(saved, CONVERTED_MANIFEST)
    del manifest["files"][CONVERTED_WEIGHTS]["tensors"]["norm.scale"]
    with open(os.path.join(saved, CONVERTED_MANIFEST), "w") as f:
        json.dump(manifest, f)
    with pytest.raises(ValueError, match=rf".*/{CONVERTED_WEIGHTS} does not hold the tensors "
                                         rf"{CONVERTED_MANIFEST} lists: not listed "
                                         r"\['norm.scale'\]"):
        load_converted(saved)


@pytest.mark.parametrize("fmt,kwargs", [("nm", {"n": 1, "m": 4}), ("samoyeds", {"v": 64}),
                                        ("unstructured", {"tile_n": 16})])
def test_abstract_layout_is_the_one_from_dense_gives(rng, fmt, kwargs):
    w = np.asarray(rng.standard_normal((3, 128, 64)), np.float32)
    cls = {"nm": formats.NMSparse, "samoyeds": formats.SamoyedsSparse,
           "unstructured": tiled_format.TiledSparse}[fmt]
    if fmt == "nm":
        w = np.asarray(prune_weights.prune_nm(w, **kwargs))
    elif fmt == "samoyeds":
        w = np.asarray(prune_weights.prune_samoyeds(w, **kwargs))
    else:
        w[w < 0.5] = 0
    real = cls.from_dense(w, **kwargs)
    extra = {"num_slots": real.num_slots} if fmt == "unstructured" else {}
    abstract = cls.abstract(w.shape, w.dtype, **kwargs, **extra)
    assert param_layout._describe(abstract) == param_layout._describe(real)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), abstract) == jax.tree.map(
        lambda a: (a.shape, a.dtype), real)


# ----------------------------------------------------------------------------- load_or_convert


def _damage_interrupted(d):
    os.remove(os.path.join(d, CONVERTED_MANIFEST))


def _damage_truncated(d):
    with open(os.path.join(d, CONVERTED_WEIGHTS), "r+b") as f:
        f.truncate(1000)


def _damage_flipped(d):
    path = os.path.join(d, CONVERTED_WEIGHTS)
    offset = _tensor_offset(path, "layers.0.mlp.w1.values")
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))


def _damage_older_format(d):  # the layout before manifests: metadata version 1, no manifest
    os.remove(os.path.join(d, CONVERTED_MANIFEST))
    meta = _read_json(d, CONVERTED_CONFIG)
    meta["format_version"] = 1
    with open(os.path.join(d, CONVERTED_CONFIG), "w") as f:
        json.dump(meta, f)


def _damage_weights_only(d):  # an older save killed after the weights, before the metadata
    for name in (CONVERTED_MANIFEST, CONVERTED_CONFIG, "tokenizer.json"):
        os.remove(os.path.join(d, name))


@pytest.mark.parametrize("damage,reason", [
    (_damage_interrupted, rf"{CONVERTED_MANIFEST} not found"),
    (_damage_truncated, r"expected \d+ bytes"),
    (_damage_flipped, r"tensor 'layers\.0\.mlp\.w1\.values' .*expected crc32"),
    (_damage_older_format, rf"{CONVERTED_MANIFEST} not found"),
    (_damage_weights_only, rf"{CONVERTED_MANIFEST} not found"),
], ids=["interrupted", "truncated", "flipped", "older_format", "weights_only"])
def test_load_or_convert_converts_a_broken_directory_again(tmp_path, damage, reason):
    out = str(tmp_path / "nm")
    first, _ = load_or_convert(FIXTURE, out, expert_format="nm")
    damage(out)
    with pytest.raises((ValueError, FileNotFoundError)):
        load_converted(out)
    with pytest.warns(UserWarning, match=rf"{out} holds no usable converted model \(.*{reason}.*"
                                         rf"\); converting {FIXTURE} into it again"):
        model, _ = load_or_convert(FIXTURE, out, expert_format="nm")
    assert _same(_leaves(model), _leaves(first))
    assert _same(_leaves(load_converted(out)[0]), _leaves(first))
    assert sorted(os.listdir(tmp_path)) == ["nm"]


def test_load_or_convert_keeps_directories_it_did_not_write(tmp_path, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"user data")

    def fail(*args, **kwargs):
        raise AssertionError("converted although the result could not be saved")

    monkeypatch.setattr(hf_import, "load_hf_checkpoint", fail)
    with pytest.raises(ValueError, match="does not look like a converted model"):
        load_or_convert(FIXTURE, str(out), expert_format="nm")
    assert os.listdir(out) == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == b"user data"


# ----------------------------------------------------------------------------- NaN / Inf import


@pytest.mark.parametrize("key,value", [
    ("model.layers.1.block_sparse_moe.experts.2.w3.weight", np.nan),
    ("model.layers.0.self_attn.k_proj.weight", -np.inf),
    ("lm_head.weight", np.inf),
])
def test_import_refuses_non_finite_weights(tmp_path, key, value):
    d = str(tmp_path / "ckpt")
    shutil.copytree(FIXTURE, d)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    tensors[key][3, 5] = value
    save_file(tensors, path)
    with pytest.raises(ValueError, match=rf"tensor '{key}' in .*/model\.safetensors: expected "
                                         r"finite weights, found 1 NaN/Inf values \(the first, "
                                         rf"-?(nan|inf), at index \(3, 5\)\)"):
        load_hf_checkpoint(d)


@pytest.mark.parametrize("key,message", [
    ("model.layers.1.block_sparse_moe.experts.2.w3.weight",
     "tensor 'model.layers.1.block_sparse_moe.experts.2.w3.weight': finite as stored"),
    ("model.layers.0.self_attn.k_proj.weight",
     "layers.0.self_attn.k_proj.kernel: finite in the checkpoint (float64)"),
])
def test_import_refuses_values_beyond_the_model_dtype(tmp_path, key, message):
    d = str(tmp_path / "ckpt")
    shutil.copytree(FIXTURE, d)
    path = os.path.join(d, "model.safetensors")
    tensors = load_file(path)
    tensors[key] = tensors[key].astype(np.float64)
    tensors[key][3, 5] = 1e300  # finite in float64, infinite in the model's float32
    save_file(tensors, path)
    with pytest.raises(ValueError, match=re.escape(message) + ".*beyond the range of float32"):
        load_hf_checkpoint(d)


def test_import_refuses_non_finite_bfloat16_weights(tmp_path):
    import ml_dtypes
    d = str(tmp_path / "ckpt")
    shutil.copytree(FIXTURE, d)
    path = os.path.join(d, "model.safetensors")
    tensors = {k: v.astype(ml_dtypes.bfloat16) for k, v in load_file(path).items()}
    tensors["model.norm.weight"][7] = np.nan
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"tensor 'model\.norm\.weight' .*1 NaN/Inf values"):
        load_hf_checkpoint(d)
