"""The GGUF reader against gguf.GGUFReader (llama.cpp's own Python reader) and the writer round trip."""
import gguf
import numpy as np
import pytest

from dslocal.quant.ggml import TYPE_INFO, GGMLType
from dslocal.quant.gguf_file import GGUFError, ValueType, open_gguf
from dslocal.quant.gguf_writer import TensorData, write_gguf


def test_type_table_matches_gguf_package():
    for q, ref in gguf.GGML_QUANT_SIZES.items():
        ours = GGMLType(q.value)
        assert ours.name == q.name
        if ours == GGMLType.Q8_1:
            continue  # gguf-py still lists the old 40-byte block_q8_1; ggml-common.h has 2 halves + 32 = 36
        assert (TYPE_INFO[ours].block_size, TYPE_INFO[ours].type_size) == ref, q.name


@pytest.mark.parametrize("preset,ftype", [("tiny-v2", "q8_0"), ("tiny-v3", "q4_k_m")])
def test_index_and_data_match_gguf_reader(tiny_gguf, preset, ftype):
    path = tiny_gguf(preset, ftype)
    ref = gguf.GGUFReader(path)
    with open_gguf(path) as f:
        assert len(f.tensors) == len(ref.tensors)
        for rt in ref.tensors:
            t = f.tensors[rt.name]
            assert int(t.ggml_type) == int(rt.tensor_type), rt.name
            assert t.shape == tuple(int(n) for n in reversed(rt.shape)), rt.name
            assert t.nbytes == int(rt.n_bytes), rt.name
            assert t.offset == int(rt.data_offset), rt.name
            raw = f.raw(rt.name)
            assert np.array_equal(raw.reshape(-1), np.asarray(rt.data).reshape(-1).view(np.uint8)), rt.name
        for key, field in ref.fields.items():
            if key.startswith("GGUF."):
                continue
            mv = f.metadata[key]
            assert int(mv.type) == int(field.types[0]), key
            ref_value = field.contents()
            if isinstance(mv.value, np.ndarray):
                assert np.array_equal(mv.value, np.asarray(ref_value)), key
            elif isinstance(mv.value, float):
                assert mv.value == pytest.approx(ref_value, rel=1e-7), key
            else:
                assert mv.value == ref_value, key


def test_raw_views_are_zero_copy_and_read_only(tiny_gguf):
    with open_gguf(tiny_gguf("tiny-v2", "q8_0")) as f:
        t = f.tensors["blk.1.ffn_up_exps.weight"]
        raw = f.raw(t.name)
        assert raw.shape == (*t.shape[:-1], t.shape[-1] // 32 * 34)
        assert not raw.flags.writeable and not raw.flags.owndata


def test_writer_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    w16 = rng.standard_normal((3, 64)).astype(np.float16)
    path = tmp_path / "x.gguf"
    meta = [("general.architecture", "test", ValueType.STRING),
            ("test.count", 7, ValueType.UINT32), ("test.scale", 0.5, ValueType.FLOAT32),
            ("test.flag", True, ValueType.BOOL), ("test.words", ["a", "b c", "猫"], ValueType.STRING),
            ("test.ids", [1, -2, 3], ValueType.INT32)]
    write_gguf(path, meta, [TensorData("w", (3, 64), GGMLType.F16, lambda: [w16[:1], w16[1:]])])
    with open_gguf(path) as f:
        assert f.get("test.count") == 7 and f.metadata["test.count"].type == ValueType.UINT32
        assert f.get("test.scale") == 0.5 and f.get("test.flag") is True
        assert f.get("test.words") == ["a", "b c", "猫"]
        assert f.get("test.ids").tolist() == [1, -2, 3]
        assert np.array_equal(f.raw("w").view(np.float16), w16)


def test_writer_checks_byte_count(tmp_path):
    meta = [("general.architecture", "test", ValueType.STRING)]
    bad = TensorData("w", (2, 32), GGMLType.F32, lambda: [np.zeros(32, np.float32)])
    with pytest.raises(ValueError, match="produced 128 bytes"):
        write_gguf(tmp_path / "x.gguf", meta, [bad])
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "x.gguf.partial").exists()


def test_not_a_gguf(tmp_path):
    p = tmp_path / "x.bin"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        open_gguf(p)
