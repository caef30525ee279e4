"""Tensors stored by key in a few SQLite files (the shards): the training cache's storage.

A million cached latents as a million small files hurt every filesystem; here each shard file holds its own
index (the primary key) and the tensors (safetensors bytes), writes are transactions (a killed writer leaves
the shard as it was), and several processes and DataLoader workers may read and write at once. SQLite's
write-ahead log is safe only among processes of one machine, so each machine keeps its own shard files (a cache
folder shared by the nodes of a cluster holds one set per node).
"""

from __future__ import annotations

import os
import socket
import sqlite3
from pathlib import Path

import torch
from safetensors.torch import load, save

SHARDS = 16


class TensorStore:
    """Named tensors by hex key under ``folder`` in SHARDS SQLite files. Picklable: each process opens its own
    connections on first use."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)
        self._connections: dict[int, sqlite3.Connection] = {}
        self._pid = os.getpid()

    def _connection(self, key: str) -> sqlite3.Connection:
        if self._pid != os.getpid():  # a forked worker: never share the parent's connections
            self._connections, self._pid = {}, os.getpid()
        shard = int(key[:4], 16) % SHARDS
        if shard not in self._connections:
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"shard-{socket.gethostname()}-{shard:02d}.sqlite"
            connection = sqlite3.connect(self.folder / name, timeout=600)
            # WAL: readers (DataLoader workers) never wait for the writer; NORMAL: no fsync per commit (a killed
            # process loses nothing committed; a power cut may lose the last commits, never the file's integrity)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            connection.execute("CREATE TABLE IF NOT EXISTS items (key TEXT PRIMARY KEY, data BLOB NOT NULL)")
            self._connections[shard] = connection
        return self._connections[shard]

    def get(self, key: str) -> dict[str, torch.Tensor] | None:
        """The tensors stored under ``key``, or None."""
        row = self._connection(key).execute("SELECT data FROM items WHERE key = ?", (key,)).fetchone()
        return None if row is None else load(row[0])

    def put(self, items: dict[str, dict[str, torch.Tensor]]) -> None:
        """Store each key's tensors (replacing what was there), one transaction per shard."""
        by_shard: dict[sqlite3.Connection, list[tuple[str, bytes]]] = {}
        for key, tensors in items.items():
            data = save({name: tensor.contiguous() for name, tensor in tensors.items()})
            by_shard.setdefault(self._connection(key), []).append((key, data))
        for connection, rows in by_shard.items():
            with connection:
                connection.executemany("INSERT OR REPLACE INTO items (key, data) VALUES (?, ?)", rows)

    def __getstate__(self) -> dict:
        return {"folder": self.folder, "_connections": {}, "_pid": -1}

