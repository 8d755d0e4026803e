"""Bad input: every problem with a file is one line on stderr naming the file, exit code 2, no traceback."""
import signal
import struct
import subprocess
import sys

import numpy as np
import pytest

from dslocal.gui import cli
from dslocal.quant.ggml import GGMLType
from dslocal.quant.gguf_file import open_gguf
from dslocal.quant.gguf_writer import TensorData, write_gguf


def _info(capsys, path):
    """Run `dslocal info path` in-process; returns (exit code, stderr lines)."""
    rc = cli.main(["info", str(path)])
    err = capsys.readouterr().err.strip().splitlines()
    return rc, err


def _assert_refused(capsys, path, *words):
    rc, err = _info(capsys, path)
    assert rc == 2, err
    assert len(err) == 1 and err[0].startswith("dslocal: ") and str(path) in err[0], err
    for w in words:
        assert w in err[0], err[0]
    return err[0]


@pytest.fixture
def tiny(tiny_gguf):
    return tiny_gguf("tiny-v2", "q8_0")


def test_missing_file_directory_empty_and_not_gguf(capsys, tmp_path):
    _assert_refused(capsys, tmp_path / "nope.gguf", "no such file")
    _assert_refused(capsys, tmp_path, "directory")
    (tmp_path / "empty.gguf").write_bytes(b"")
    _assert_refused(capsys, tmp_path / "empty.gguf", "not a GGUF")
    (tmp_path / "x.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    _assert_refused(capsys, tmp_path / "x.png", "not a GGUF")


def test_wrong_version_and_byte_order(capsys, tmp_path, tiny):
    data = bytearray(open(tiny, "rb").read())
    for version, words in [(1, ("version 1",)), (99, ("version 99",)),
                           (struct.unpack("<I", struct.pack(">I", 3))[0], ("big-endian",))]:
        data[4:8] = struct.pack("<I", version)
        p = tmp_path / f"v{version}.gguf"
        p.write_bytes(data)
        _assert_refused(capsys, p, *words)


def test_truncated_in_each_section(capsys, tmp_path, tiny):
    data = open(tiny, "rb").read()
    with open_gguf(tiny) as f:
        data_start = f.data_start
    for cut, where in [(10, "the header"), (200, "metadata"), (data_start - 100, "tensor index"),
                       (data_start + 1000, "tensor data"), (len(data) - 1, "tensor data")]:
        p = tmp_path / f"cut{cut}.gguf"
        p.write_bytes(data[:cut])
        msg = _assert_refused(capsys, p, "truncated")
        assert where in msg, msg


def _type_field_offset(data: bytes, name: str) -> int:
    """Byte offset of the GGML type id in the tensor index entry of `name`."""
    key = struct.pack("<Q", len(name)) + name.encode()
    pos = data.index(key) + len(key)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    return pos + 4 + 8 * n_dims


def test_unknown_ggml_type(capsys, tmp_path, tiny):
    data = bytearray(open(tiny, "rb").read())
    at = _type_field_offset(data, "blk.1.ffn_up_exps.weight")
    data[at:at + 4] = struct.pack("<I", 99)
    (tmp_path / "t.gguf").write_bytes(data)
    _assert_refused(capsys, tmp_path / "t.gguf", "unknown GGML type 99", "blk.1.ffn_up_exps.weight")


def _rewrite(src, dst, edit_meta=lambda m: m, edit_tensor=None):
    """Copy a GGUF, editing its metadata list and optionally replacing tensors (name -> TensorData)."""
    with open_gguf(src) as f:
        tensors = []
        for t in f.tensors.values():
            new = edit_tensor(t) if edit_tensor else None
            raw = np.array(f.raw(t.name))
            tensors.append(new or TensorData(t.name, t.shape, t.ggml_type, lambda raw=raw: [raw]))
        write_gguf(dst, edit_meta(f.items()), tensors)


def test_missing_key_wrong_shape_and_architecture(capsys, tmp_path, tiny):
    _rewrite(tiny, tmp_path / "a.gguf", lambda m: [kv for kv in m if kv[0] != "deepseek2.embedding_length"])
    _assert_refused(capsys, tmp_path / "a.gguf", "deepseek2.embedding_length", "missing")

    def smaller_ffn(m):
        return [(k, 128 if k == "deepseek2.expert_feed_forward_length" else v, t) for k, v, t in m]
    _rewrite(tiny, tmp_path / "b.gguf", smaller_ffn)
    _assert_refused(capsys, tmp_path / "b.gguf", "shape", "metadata implies")

    def qwen(m):
        return [(k, "qwen2" if k == "general.architecture" else v, t) for k, v, t in m]
    _rewrite(tiny, tmp_path / "c.gguf", qwen)
    _assert_refused(capsys, tmp_path / "c.gguf", "architecture 'qwen2'", "deepseek2")


def test_iq_types_are_listed_by_info_and_refused_by_loaders(capsys, tmp_path, tiny):
    from dslocal.quant.dequant import load_tensor
    from dslocal.quant.gguf_file import GGUFError
    name = "blk.1.ffn_up_exps.weight"

    def to_iq4_xs(t):
        if t.name != name:
            return None
        rng = np.random.default_rng(0)
        raw = rng.integers(0, 256, (*t.shape[:-1], t.shape[-1] // 256 * 136), dtype=np.uint8)
        return TensorData(t.name, t.shape, GGMLType.IQ4_XS, lambda: [raw])
    _rewrite(tiny, tmp_path / "iq.gguf", edit_tensor=to_iq4_xs)
    rc = cli.main(["info", str(tmp_path / "iq.gguf")])
    out = capsys.readouterr().out
    assert rc == 0 and "IQ4_XS" in out and "UNSUPPORTED   1 tensors of type IQ4_XS" in out, out
    with open_gguf(tmp_path / "iq.gguf") as f:
        with pytest.raises(GGUFError, match=f"{name}.*IQ4_XS"):
            load_tensor(f, name)


class _Hang(Exception):
    pass


def _alarm(*_):
    raise _Hang("dslocal info did not finish within 20 s")


def test_truncation_and_bit_flips_never_crash_or_hang(capsys, tmp_path, tiny):
    data = open(tiny, "rb").read()
    with open_gguf(tiny) as f:
        data_start = f.data_start
    rng = np.random.default_rng(1234)
    p = tmp_path / "fuzz.gguf"
    old = signal.signal(signal.SIGALRM, _alarm)
    try:
        # truncations: every one is refused, most of them inside the header, metadata and index
        for cut in sorted(set(rng.integers(0, data_start + 64, 150).tolist()
                              + rng.integers(data_start, len(data), 30).tolist())):
            p.write_bytes(data[:cut])
            signal.alarm(20)
            rc, err = _info(capsys, p)
            signal.alarm(0)
            assert rc == 2 and len(err) == 1 and err[0].startswith("dslocal: "), (cut, err)
        # bit flips in the header, metadata and index: refused or read, never a traceback
        for _ in range(300):
            flipped = bytearray(data)
            at = int(rng.integers(0, data_start))
            flipped[at] ^= 1 << int(rng.integers(0, 8))
            p.write_bytes(flipped)
            signal.alarm(20)
            rc, err = _info(capsys, p)
            signal.alarm(0)
            assert (rc == 0 and not err) or (rc == 2 and len(err) == 1 and err[0].startswith("dslocal: ")), \
                (at, err)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_command_line_exit_code_without_traceback(tmp_path):
    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + bytes(3))
    r = subprocess.run([sys.executable, "-m", "dslocal.gui.cli", "info", str(p)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == f"dslocal: {p}: the file is truncated in the header " \
                               f"(needs 4 bytes at offset 4, the file has 7)"
