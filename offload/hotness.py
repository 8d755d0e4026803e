"""Expert hotness: how often the router picks each routed expert, kept per model file for the next start.

The planner puts the hottest experts on the GPU (offload/planner.py). Counts come from a short calibration
text run through the model at its first start (or from whatever the model routed while running, merged in
with `save`), and are stored as JSON in the user's cache directory, keyed by the file's path, size and
modification time, so an edited or replaced file is calibrated again.
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence

# Calibration text: prose, dialogue, code, arithmetic and a second language, so that routing sees the
# kinds of tokens a chat model is asked about. Real models route differently per domain (DeepSeek-V2
# paper, section 4 on expert specialization); a mix spreads the counts over the experts each one uses.
CALIBRATION_TEXT = """\
The old lighthouse keeper climbed the stairs every evening at dusk. "Another storm tonight," he said to
the cat, who did not answer. Far below, the waves broke against the rocks and the fishing boats hurried
home before the wind could turn.
User: Can you explain why the sky is blue?
Assistant: Sunlight is scattered by the molecules of the air, and short wavelengths scatter much more than
long ones (Rayleigh scattering goes as the inverse fourth power of the wavelength), so blue light reaches
our eyes from every direction of the sky.
def merge_sorted(a, b):
    i = j = 0
    out = []
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]
SELECT name, COUNT(*) AS orders FROM customers JOIN orders USING (customer_id) GROUP BY name;
If 3x + 7 = 25, then 3x = 18 and x = 6. The area of a circle of radius 2 is 4 * pi, about 12.566.
量子计算利用叠加和纠缠来处理信息。今天天气很好，我们去公园散步吧。
Les enfants jouaient dans le jardin pendant que leurs parents préparaient le dîner.
"""

Counts = Mapping[int, Sequence[int]]


def cache_dir() -> str:
    """$DSLOCAL_CACHE_DIR, else $XDG_CACHE_HOME/dslocal, else ~/.cache/dslocal."""
    root = os.environ.get("DSLOCAL_CACHE_DIR")
    if root:
        return root
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dslocal")


def cache_path(model_path: str) -> str:
    """Where the counts of this model file are kept: its name plus a hash of path, size and mtime."""
    st = os.stat(model_path)
    key = f"{os.path.abspath(model_path)}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    name = os.path.basename(model_path).removesuffix(".gguf")
    return os.path.join(cache_dir(), "hotness", f"{name}-{hashlib.sha256(key).hexdigest()[:16]}.json")


def load(model_path: str) -> dict[int, list[int]] | None:
    """The stored counts (MoE layer -> tokens per expert), or None if this file was never calibrated or
    the stored file cannot be read (it is then measured again and overwritten)."""
    try:
        with open(cache_path(model_path)) as fh:
            stored = json.load(fh)
        return {int(layer): [int(c) for c in counts] for layer, counts in stored["counts"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def for_model(model_path: str, cfg) -> dict[int, list[int]] | None:
    """The stored counts if they fit this model (a count per expert for every MoE layer), else None."""
    counts = load(model_path)
    layers = {i for i in range(cfg.n_layer) if cfg.is_moe_layer(i)}
    if counts is None or set(counts) != layers or any(len(c) != cfg.n_expert for c in counts.values()):
        return None
    return counts


def save(model_path: str, counts: Counts, merge: bool = True) -> str:
    """Store counts for this file (added to what is stored when merge); returns the path written."""
    total = {int(k): [int(c) for c in v] for k, v in counts.items()}
    old = load(model_path) if merge else None
    if old is not None and old.keys() == total.keys():
        total = {k: [a + b for a, b in zip(total[k], old[k])] if len(old[k]) == len(total[k]) else total[k]
                 for k in total}
    path = cache_path(model_path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"model": os.path.abspath(model_path), "counts": {str(k): v for k, v in total.items()}}, fh)
    os.replace(tmp, path)      # atomic: a reader never sees half a file
    return path
