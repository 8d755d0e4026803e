"""Shared fixtures: small synthetic deepseek2 GGUF files, built once per test session."""
import pytest

from dslocal.quant import synthetic


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory):
    """Path builder: tiny_gguf(preset, type) writes (once) and returns a synthetic model file."""
    cache = {}
    root = tmp_path_factory.mktemp("models")

    def make(preset: str = "tiny-v2", ftype: str = "q8_0", **kw) -> str:
        key = (preset, ftype, tuple(sorted(kw.items())))
        if key not in cache:
            path = str(root / f"{preset}-{ftype}-{len(cache)}.gguf")
            synthetic.build(path, synthetic.preset(preset), ftype, **kw)
            cache[key] = path
        return cache[key]
    return make
