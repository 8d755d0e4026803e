"""Conversations of the chat window on disk: one JSON file each under the user's data directory.

Files are replaced atomically (write a temporary file, then rename), so a crash leaves the old or the new
version, never half of one. A conversation: {"id", "title", "created", "updated", "system", "messages":
[{"role", "content", "reasoning"?, "finish"?}, ...]}.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import threading
import time
from pathlib import Path

_ID = re.compile(r"^[0-9]{8}-[0-9]{6}-[0-9a-f]{6}$")   # ids name files: nothing else is accepted


def default_root() -> Path:
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return Path(data) / "dslocal" / "conversations"


class Store:
    def __init__(self, root: Path | str | None = None):
        self.root = Path(root) if root is not None else default_root()
        self._lock = threading.Lock()

    def _path(self, conv_id: str) -> Path:
        if not _ID.match(conv_id or ""):
            raise ValueError(f"not a conversation id: {conv_id!r}")
        return self.root / f"{conv_id}.json"

    def new(self, system: str = "") -> dict:
        now = time.time()
        conv_id = time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + "-" + secrets.token_hex(3)
        return {"id": conv_id, "title": "New conversation", "created": now, "updated": now, "system": system,
                "messages": []}

    def save(self, conv: dict) -> None:
        conv["updated"] = time.time()
        users = [m["content"] for m in conv["messages"] if m["role"] == "user"]
        if users:
            first = " ".join(users[0].split())
            conv["title"] = first[:48] + ("…" if len(first) > 48 else "")
        path = self._path(conv["id"])
        with self._lock:
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{threading.get_ident()}")
            tmp.write_text(json.dumps(conv, ensure_ascii=False, indent=1), encoding="utf-8")
            os.replace(tmp, path)

    def load(self, conv_id: str) -> dict | None:
        try:
            return json.loads(self._path(conv_id).read_text(encoding="utf-8"))
        except (FileNotFoundError, ValueError):
            return None

    def delete(self, conv_id: str) -> None:
        with self._lock:
            self._path(conv_id).unlink(missing_ok=True)

    def list(self) -> list[dict]:
        """The conversations, most recently changed first (id, title, updated)."""
        out = []
        for p in self.root.glob("*.json") if self.root.is_dir() else []:
            conv = self.load(p.stem)
            if conv is not None:
                out.append({"id": conv["id"], "title": conv["title"], "updated": conv["updated"]})
        return sorted(out, key=lambda c: c["updated"], reverse=True)


def to_markdown(conv: dict) -> str:
    lines = [f"# {conv['title']}", ""]
    if conv.get("system"):
        lines += ["**System:** " + conv["system"], ""]
    for m in conv["messages"]:
        lines.append(f"**{m['role'].capitalize()}:**")
        lines.append("")
        if m.get("reasoning"):
            lines += ["<details><summary>Reasoning</summary>", "", m["reasoning"], "", "</details>", ""]
        lines += [m["content"], ""]
    return "\n".join(lines)


def to_json(conv: dict) -> str:
    return json.dumps(conv, ensure_ascii=False, indent=2)
