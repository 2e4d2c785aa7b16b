"""What every task's data path shares inside a worker: image decode, resize, per-sample
randomness without RNG state, the DataLoader, size checks, and the chunk prefetcher.

The next chunk is fetched in a background thread while the current one trains, so at most
two chunks' encoded bytes are held in memory at any time. What a sample's columns mean is the
task's business (workers/tasks/).
"""

from __future__ import annotations

import functools
import io
import os
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from storage.codec import DEPTH_SCALE, CorruptImageError

try:  # libjpeg-turbo straight into a numpy buffer, with DCT scaling: ~1.7x Pillow's decode+convert
    import simplejpeg
except ImportError:  # pragma: no cover - a dependency; Pillow decodes the same pixels, slower
    simplejpeg = None

# Inputs are scaled to roughly zero mean, unit variance (the source's dataset stats sit near 0.5/0.21).
INPUT_MEAN = 0.5
INPUT_STD = 0.25
_JPEG_SOI = b"\xff\xd8"


class DataError(RuntimeError):
    """Bad data met at train time; the message names the dataset, shard and sample."""


def _mix(*keys: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): cheap per-sample randomness that needs no RNG state."""
    h = 0x9E3779B97F4A7C15
    for k in keys:
        h = (h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h


def flip_decision(p: float, *keys: int) -> bool:
    return p > 0 and (_mix(*keys) / 2**64) < p


def _mix_on(h: int, k: int) -> int:
    """One more key into a _mix hash: _mix_on(_mix(*keys), k) == _mix(*keys, k)."""
    h = (h ^ (int(k) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
    return h ^ (h >> 31)


def _resize_into(out: np.ndarray, img: np.ndarray, nearest: bool) -> None:
    """Resize an HxW(xC) uint8/uint16 image into `out` (same dtype): bilinear with antialiasing
    (as Pillow's), or nearest (pixel centres, as Pillow's); torch's kernels beat Pillow's here."""
    size = out.shape[:2]
    if img.dtype == np.uint16:  # no 16-bit kernels: through float, rounded back
        t = torch.from_numpy(img.astype(np.float32))[None, None]
        t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[...] = t[0, 0].round_().clamp_(0, DEPTH_SCALE).numpy()
        return
    if nearest:
        out[...] = img[np.ix_(_nearest_index(img.shape[0], size[0]), _nearest_index(img.shape[1], size[1]))]
        return
    t = torch.from_numpy(img)
    t = (t.permute(2, 0, 1) if t.ndim == 3 else t[None])[None]  # 1 x C x H x W (channels-last strides)
    t = F.interpolate(t, size=size, mode="bilinear", antialias=True, align_corners=False)
    torch.from_numpy(out).copy_(t[0].permute(1, 2, 0) if out.ndim == 3 else t[0, 0])


@functools.lru_cache(maxsize=64)
def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.intp), n_in - 1)


def _decode_rgb_pillow(data: bytes, out: np.ndarray) -> None:
    img = Image.open(io.BytesIO(data))
    # draft() lets libjpeg decode at 1/2, 1/4 or 1/8 scale: a small stage never pays for full-size decodes.
    img.draft("RGB", (out.shape[1], out.shape[0]))
    img = img.convert("RGB")
    if img.size != (out.shape[1], out.shape[0]):
        img = img.resize((out.shape[1], out.shape[0]), Image.BILINEAR)
    out[...] = np.asarray(img)


def decode_rgb_into(data: bytes, out: np.ndarray, what: str = "input") -> None:
    """Decode image bytes into `out` (r x r x 3 uint8, C-contiguous), resized to it if need be.

    JPEGs go through simplejpeg, scaled in the DCT to the smallest size not below `out`'s (so a
    small stage never pays for full-size decodes) and written straight into `out` when that is
    its size; anything else (PNG inputs, which `data pack` keeps) through Pillow. Raises
    CorruptImageError naming `what`.
    """
    jpeg = is_jpeg(data)
    try:
        if simplejpeg is not None and jpeg:
            r_h, r_w = out.shape[:2]
            try:  # the usual case: the (DCT-scaled) image is out's size, decoded in place
                if simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=r_h, min_width=r_w, buffer=out).shape == out.shape:
                    return
            except ValueError:
                pass  # larger than out (or corrupt: then the decode below raises again)
            img = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=r_h, min_width=r_w)
            _resize_into(out, img, nearest=False)
        else:
            _decode_rgb_pillow(data, out)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types for bad bytes
        raise CorruptImageError(f"{what} {'JPEG' if jpeg else 'image'} cannot be decoded ({type(exc).__name__}: {exc})") from exc


def is_jpeg(data: Any) -> bool:
    return isinstance(data, (bytes, bytearray, memoryview)) and bytes(data[:2]) == _JPEG_SOI


def jpeg_scaled_size(data: bytes, min_height: int, min_width: int) -> tuple[int, int] | None:
    """(height, width) decode_rgb_into's DCT-scaled decode of these JPEG bytes has for a target of
    at least min_height x min_width (libjpeg-turbo's M/8 scales: 200 px for 56 gives 75); None
    when they are not a JPEG simplejpeg reads (Pillow, or no simplejpeg: no such decode)."""
    if simplejpeg is None or not is_jpeg(data):
        return None
    try:
        h, w = simplejpeg.decode_jpeg_header(data, min_height=min_height, min_width=min_width)[:2]
    except Exception:  # noqa: BLE001 - a corrupt header: the decode itself then names the sample
        return None
    return int(h), int(w)


def _collate(batch: Any) -> Any:
    return batch  # a task's samples.__getitems__ already returns whole batches


def make_loader(samples: torch.utils.data.Dataset, *, batch_size: int | None = None, batch_sampler: Any = None,
                num_workers: int = 0, pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """A DataLoader of a task's raw batches over `samples` (in order with batch_size, or as batch_sampler says).

    Worker processes get the samples as they are when forked: rows still streaming in (StreamingRows)
    are waited for first, since the threads that land them stay in this process."""
    rows = getattr(samples, "rows", None)
    if num_workers > 0 and isinstance(rows, StreamingRows):
        samples.rows = rows.materialize()
    if batch_sampler is not None:
        return torch.utils.data.DataLoader(samples, batch_sampler=batch_sampler, collate_fn=_collate,
                                           num_workers=num_workers, pin_memory=pin_memory)
    return torch.utils.data.DataLoader(samples, batch_size=batch_size, collate_fn=_collate,
                                       num_workers=num_workers, pin_memory=pin_memory)


def check_sizes(rows: dict[str, Any], expected: tuple[int, int] | None, describe: Any) -> None:
    """Fail on images whose recorded size is not the recipe's data.image_size."""
    if expected is None:
        return
    for sid, h, w in zip(rows["sample_id"], rows["height"], rows["width"], strict=True):
        if (int(h), int(w)) != tuple(expected):
            raise DataError(
                f"{describe(int(sid))}: image is {int(h)}x{int(w)}, the recipe's data.image_size is "
                f"{expected[0]}x{expected[1]}; resize the data or set data.image_size"
            )


# A chunk is read in pieces of about this many bytes of row groups, PIECES_IN_FLIGHT at a time
# (one fetches while another is parsed): a worker holds the chunk's own samples plus a few pieces,
# not every row group the chunk touches. A random chunk of a big dataset touches nearly all of
# them (a 100K chunk of 1.2M samples in 41-row groups: 97 %), so reading it whole held ~3x the
# dataset's bytes at once (fetched ranges, their row groups, the parsed rows): bench.scale.
PIECE_BYTES = 64 * 2**20  # litdata's chunk size: fewer, larger requests (bench.peer)
PIECES_IN_FLIGHT = 2


def _group_bytes(manifest: dict[str, Any]) -> np.ndarray:
    """Each shard's bytes per row group (its mean): what a piece's size is reckoned in."""
    per_group = int(manifest.get("rows_per_group") or 256)
    out = np.empty(len(manifest["shards"]), dtype=np.float64)
    for i, sh in enumerate(manifest["shards"]):
        groups = int(sh.get("row_groups") or 0) or max(1, -(-int(sh["rows"]) // per_group))
        out[i] = int(sh["bytes"]) / groups
    return out


def chunk_pieces(dataset: Any, ids: np.ndarray, piece_bytes: int = PIECE_BYTES) -> list[np.ndarray]:
    """Positions in `ids` of each piece: runs of whole row groups (in shard and file order, so
    adjacent ones still merge into one request) of about piece_bytes each. Index only, no reads."""
    n = len(ids)
    if n == 0:
        return []
    shard = np.asarray(dataset.index_values("shard", ids), dtype=np.int64)
    group = np.asarray(dataset.index_values("row_group", ids), dtype=np.int64)
    order = np.lexsort((group, shard))
    s, g = shard[order], group[order]
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = (s[1:] != s[:-1]) | (g[1:] != g[:-1])
    starts = np.flatnonzero(new_group)
    size = _group_bytes(dataset.manifest)[s[starts]]
    before = np.cumsum(size) - size  # bytes of the row groups ahead of each one
    piece_of_group = (before // max(1, int(piece_bytes))).astype(np.int64)
    piece_of = np.repeat(piece_of_group, np.diff(np.append(starts, n)))
    cuts = np.flatnonzero(np.diff(piece_of)) + 1
    return [np.sort(p) for p in np.split(order, cuts)]


def read_chunk(dataset: Any, ids: np.ndarray, piece_bytes: int = PIECE_BYTES, in_flight: int = PIECES_IN_FLIGHT) -> dict[str, Any]:
    """dataset.read_samples(ids), read in pieces (chunk_pieces) so that memory holds the chunk's
    samples and a few pieces' row groups: the same result, in the order of `ids`, every sample
    checked as read_samples checks it. A chunk of one piece is one read_samples call."""
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if not hasattr(dataset, "index_values"):  # a dataset without an index to plan pieces from
        return dataset.read_samples(ids)
    pieces = chunk_pieces(dataset, ids, piece_bytes)
    if len(pieces) <= 1:
        return dataset.read_samples(ids)
    n = len(ids)
    out: dict[str, Any] = {}
    lists: set[str] = set()  # the columns read_samples gives as lists (encoded bytes)
    getattr(dataset, "reader", None)  # made here, once: the pieces' threads share it (footers, counts)
    pool = ThreadPoolExecutor(max_workers=max(1, in_flight), thread_name_prefix="chunk-piece")
    try:
        futures = [pool.submit(dataset.read_samples, ids[sel]) for sel in pieces]
        for sel, fut in zip(pieces, futures, strict=True):
            part = fut.result()
            for c, values in part.items():
                if isinstance(values, np.ndarray):
                    if c not in out:
                        out[c] = np.empty(n, dtype=values.dtype)
                    out[c][sel] = values
                else:
                    if c not in out:
                        out[c] = np.empty(n, dtype=object)
                        lists.add(c)
                    col = np.empty(len(values), dtype=object)
                    col[:] = values
                    out[c][sel] = col
            del part
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return {c: v.tolist() if c in lists else v for c, v in out.items()}


# A streamed chunk's first piece holds the row groups its first batch needs; the rest follow in
# file order, in pieces of PIECE_BYTES (adjacent row groups merging into one request as in
# read_chunk). The first piece's row groups are scattered (a shuffled batch), one request each,
# and they split the rest's runs: about twice its row groups in extra requests. So a chunk whose
# first batch needs more than STREAM_MAX_SHARE of its row-group bytes is read whole, as before:
# the first batch would wait on most of it anyway.
STREAM_MAX_SHARE = 0.25


def stream_pieces(dataset: Any, ids: np.ndarray, order: np.ndarray, batch: int,
                  piece_bytes: int = PIECE_BYTES) -> list[np.ndarray]:
    """Positions in `ids` of each piece of a streamed chunk, in the order training needs them.

    `order` holds positions in `ids` in the order the batches take them (`batch` per batch). The
    first piece is every position whose row group the first batch needs (whole row groups: their
    other samples come along); the rest are chunk_pieces of what is left. Index only, no reads.
    Without a first piece worth streaming (STREAM_MAX_SHARE) it is chunk_pieces of the chunk.
    """
    n = len(ids)
    if n == 0:
        return []
    ids = np.asarray(ids, dtype=np.int64)
    shard = np.asarray(dataset.index_values("shard", ids), dtype=np.int64)
    group = np.asarray(dataset.index_values("row_group", ids), dtype=np.int64)
    key = (shard << 32) | group
    first_batch = np.asarray(order, dtype=np.int64)[: max(1, int(batch))]
    first = np.isin(key, key[first_batch])
    uniq, starts = np.unique(key, return_index=True)
    size = _group_bytes(dataset.manifest)[(uniq >> 32).astype(np.int64)]
    share = float(size[first[starts]].sum()) / max(float(size.sum()), 1.0)
    if share > STREAM_MAX_SHARE or first.all():
        return chunk_pieces(dataset, ids, piece_bytes)
    head = np.flatnonzero(first)
    rest = np.flatnonzero(~first)
    return [head, *(rest[p] for p in chunk_pieces(dataset, ids[rest], piece_bytes))]


def stream_order(ids: np.ndarray, batches: list[np.ndarray]) -> tuple[np.ndarray | None, int | None]:
    """(positions in `ids` in the order `batches` of sample ids take them, the largest batch's
    size): what ChunkPrefetcher streams a chunk by. (None, None) when there are no batches."""
    if not batches:
        return None, None
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    wanted = np.concatenate([np.asarray(b, dtype=np.int64) for b in batches])
    sorter = np.argsort(ids, kind="stable")
    where = np.searchsorted(ids, wanted, sorter=sorter)
    return sorter[np.minimum(where, len(ids) - 1)], max(len(b) for b in batches)


class StreamingRows(Mapping):
    """A chunk's rows (as read_samples gives them) that arrive piece by piece, in the order of
    stream_pieces: `sample_id`, `height` and `width` at once (from the index), every other column
    per position, a read of a position waiting until its piece has landed (and raising its piece's
    error, if it failed). The values are read_samples' own, each sample checked as it checks them;
    only when they are there changes. Pickling waits for the whole chunk (a DataLoader worker
    process gets plain lists)."""

    def __init__(self, dataset: Any, ids: np.ndarray, pieces: list[np.ndarray], pool: ThreadPoolExecutor) -> None:
        self.ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        n = len(self.ids)
        self._piece_of = np.empty(n, dtype=np.int64)
        for k, sel in enumerate(pieces):
            self._piece_of[sel] = k
        self._pieces = pieces
        self._landed = [threading.Event() for _ in pieces]
        self._errors: list[BaseException | None] = [None] * len(pieces)
        self._cols: dict[str, np.ndarray] = {}
        self._lists: set[str] = set()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._all_landed = False
        names = getattr(dataset, "sample_columns", None) or ()
        self._names = tuple(c for c in names if c not in ("sample_id", "height", "width"))
        self._index = {
            "sample_id": self.ids,
            "height": np.asarray(dataset.index_values("height", self.ids), dtype=np.int32),
            "width": np.asarray(dataset.index_values("width", self.ids), dtype=np.int32),
        }
        getattr(dataset, "reader", None)  # made here, once: the pieces' threads share it
        self._futures = [pool.submit(self._land, dataset, k) for k in range(len(pieces))]

    def _land(self, dataset: Any, k: int) -> None:
        sel = self._pieces[k]
        try:
            part = dataset.read_samples(self.ids[sel])
            for c in ("height", "width"):  # the index said so; the shard row must agree
                if not np.array_equal(np.asarray(part[c], dtype=np.int32), self._index[c][sel]):
                    raise DataError(f"{getattr(dataset, 'uri', 'dataset')}: index and shards disagree on {c} "
                                    "(the dataset is damaged, re-create it)")
            with self._lock:
                for c, values in part.items():
                    if c in self._index:
                        continue
                    if c not in self._cols:
                        if isinstance(values, np.ndarray):
                            self._cols[c] = np.zeros(len(self.ids), dtype=values.dtype)
                        else:
                            self._cols[c] = np.empty(len(self.ids), dtype=object)
                            self._lists.add(c)
                    if c in self._lists:
                        col = np.empty(len(values), dtype=object)
                        col[:] = values
                        self._cols[c][sel] = col
                    else:
                        self._cols[c][sel] = values
        except BaseException as exc:  # noqa: BLE001 - handed to the reader of the piece's positions
            self._errors[k] = exc
        finally:
            self._landed[k].set()

    def wait(self, positions: Any = None) -> None:
        """Block until the pieces holding these positions (all of them when None) have landed."""
        if self._all_landed:
            return
        if isinstance(positions, (int, np.integer)):
            pieces = [int(self._piece_of[positions])]
        elif positions is None:
            pieces = list(range(len(self._pieces)))
        else:
            pieces = np.unique(self._piece_of[positions]).tolist()
        for k in pieces:
            if not self._landed[k].is_set():
                if os.getpid() != self._pid:  # a forked copy: the threads that land pieces are not here
                    raise RuntimeError("rows still streaming in were forked into another process; "
                                       "call materialize() before handing them to DataLoader workers")
                self._landed[k].wait()
            if self._errors[k] is not None:
                raise self._errors[k]
        if positions is None:
            self._all_landed = True

    def failure(self) -> BaseException | None:
        for k, ev in enumerate(self._landed):
            if ev.is_set() and self._errors[k] is not None:
                return self._errors[k]
        return None

    def cancel(self) -> None:
        for f in self._futures:
            f.cancel()

    def __getitem__(self, name: str) -> Any:
        if name in self._index:
            return self._index[name]
        if name not in self._names and name not in self._cols:
            raise KeyError(name)
        return _StreamingColumn(self, name)

    def column(self, name: str, positions: Any) -> Any:
        self.wait(positions)
        # No lock: a piece's values are written before its event is set, and never after.
        return self._cols[name][positions]

    def __iter__(self):
        return iter((*self._index, *[c for c in self._names if c not in self._index]))

    def __len__(self) -> int:
        return len(self._index) + len([c for c in self._names if c not in self._index])

    def materialize(self) -> dict[str, Any]:
        """The whole chunk as read_chunk gives it (waits for every piece)."""
        self.wait()
        out: dict[str, Any] = dict(self._index)
        for c, v in self._cols.items():
            out[c] = v.tolist() if c in self._lists else v
        return out

    def __reduce__(self):
        return (dict, (self.materialize(),))


class _StreamingColumn:
    """One column of StreamingRows: `col[i]` waits for position i's piece only."""

    def __init__(self, rows: StreamingRows, name: str) -> None:
        self._rows, self._name = rows, name

    def __getitem__(self, i: Any) -> Any:
        return self._rows.column(self._name, i)

    def __len__(self) -> int:
        return len(self._rows.ids)

    def __iter__(self):
        return iter(self._rows.column(self._name, slice(None)).tolist())

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self._rows.column(self._name, slice(None))
        return out if dtype is None else out.astype(dtype)

    def __reduce__(self):
        values = self._rows.materialize()[self._name]
        return (list, (list(values),)) if isinstance(values, list) else (np.asarray, (values,))


class ChunkPrefetcher:
    """Fetches the encoded rows of the next chunk in the background while this one trains.

    With `order` (the positions of `ids` in the order the chunk's batches take them, `batch` per
    batch), a chunk streams: get() returns StreamingRows at once and training starts when the
    first batch's row groups have landed, while the rest arrive (stream_pieces). Without, get()
    returns the whole chunk read as read_chunk reads it.
    """

    def __init__(self, dataset: Any, stream: bool = True) -> None:
        self.dataset = dataset
        self.stream = stream and hasattr(dataset, "index_values")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        # Pieces of streamed chunks; more than one in flight: one fetches while another is parsed.
        self._pieces = ThreadPoolExecutor(max_workers=PIECES_IN_FLIGHT, thread_name_prefix="chunk-piece")
        self._pending: dict[tuple, Any] = {}

    def _start(self, ids: np.ndarray, order: np.ndarray | None, batch: int | None) -> Any:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if not self.stream or order is None or not batch:
            return self._pool.submit(read_chunk, self.dataset, ids)
        pieces = stream_pieces(self.dataset, ids, order, batch)
        return StreamingRows(self.dataset, ids, pieces, self._pieces)

    def prefetch(self, key: tuple, ids: np.ndarray, order: np.ndarray | None = None, batch: int | None = None) -> None:
        # One slot: a newer prefetch replaces an older one, so memory holds at most two chunks.
        if key not in self._pending:
            for old in self._pending.values():
                if isinstance(old, StreamingRows):
                    old.cancel()
            self._pending = {key: self._start(ids, order, batch)}

    def failure(self) -> BaseException | None:
        """The error of a background fetch that has already failed (its retries spent), if any."""
        for fut in self._pending.values():
            if isinstance(fut, StreamingRows):
                if fut.failure() is not None:
                    return fut.failure()
            elif fut.done() and not fut.cancelled() and fut.exception() is not None:
                return fut.exception()
        return None

    def get(self, key: tuple, ids: np.ndarray, order: np.ndarray | None = None, batch: int | None = None) -> Any:
        fut = self._pending.pop(key, None)
        if fut is None:
            fut = self._start(ids, order, batch)
        return fut if isinstance(fut, StreamingRows) else fut.result()

    def close(self) -> None:
        for old in self._pending.values():
            if isinstance(old, StreamingRows):
                old.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pieces.shutdown(wait=False, cancel_futures=True)
