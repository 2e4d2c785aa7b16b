"""Data-layer benchmarks, each against its baseline in the same run. Usage: python -m bench.data --json

This module is one piece on purpose: each figure and its baseline are measured in the same process, on
the same datasets made once at its start, and printed as one JSON document.

1. Chunk preload from GCS (gcp-storage-emulator behind a loopback proxy adding --latency-ms per
   request): packed shards (only the row groups holding the chunk, all requests in flight)
   against one object per image read one after another, the source's bucket approach; plus
   one object per image read concurrently, the best a per-file layout can do.
2. Decode + augment (the worker's ChunkSamples path, a batch at a time as the DataLoader asks)
   per core against bare JPEG decode of the same bytes, with the fastest decoder available here;
   Pillow, simplejpeg, PyTurboJPEG and torchvision.io are each measured or reported unavailable
   with the reason. At full size and at 56 px (unet224's first stage), each against its limit
   (at 56 px libjpeg-turbo's DCT-scaled decode) in the same turns; also without reusing decoded
   backgrounds (every sample's bg decoded again: the per-JPEG cost). Also: per-component times,
   and the mask/depth encodings (PNG and the raw format's variants) by size and decode speed.
3. Data-wait fraction of a chunk's training time (quickstart's head_tail stage settings), data on
   the same emulated GCS, with the next chunk prefetched vs not.
4. Size: `data synth --layout seed --zip` (the source's layout) of --source-samples samples,
   `data pack`ed: shard bytes (shards + the shared backgrounds) against the zips' bytes, with a
   baseline in the same run (the first --legacy-samples samples written as format /2, every row
   holding its background and LZ4 depth, as `data pack` wrote them before), the 8-bit depth
   encodings on the packed maps, and `data verify`'s time.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from bench import machine

PACKAGES = ("PIL", "simplejpeg", "turbojpeg", "torchvision")


def _rate(n: int, seconds: float) -> float:
    return round(n / max(seconds, 1e-9), 2)


# -- 1. preload ---------------------------------------------------------------------------------------


def bench_preload(args: argparse.Namespace, proxy: Any, bucket: str) -> dict[str, Any]:
    from common.plan import make_plan
    from common.recipe import validate_recipe
    from storage import fs as sfs
    from storage.pack import choose_sizes
    from storage.shards import open_dataset
    from storage.synth import synthesize

    shards_uri = f"gs://{bucket}/shards"
    # Row groups as `data pack` would size them for this sample size (~1 MB).
    probe = os.path.join(tempfile.mkdtemp(), "probe")
    synthesize(probe, 64, seed=1, image_size=args.image_size, workers=1)
    per_sample = open_dataset(probe).manifest["shards"][0]["bytes"] / 64
    _, rows_per_group = choose_sizes(int(per_sample), None, None)
    synthesize(shards_uri, args.samples, seed=0, image_size=args.image_size, rows_per_group=rows_per_group)
    ds = open_dataset(shards_uri)

    # A chunk as the planner makes it (a slice of a seeded permutation), and one aligned to row groups.
    recipe = validate_recipe({
        "run": {"name": "bench", "storage": "unused", "seed": 0},
        "data": {"uri": shards_uri, "eval_samples": 16},
        "model": {"name": "unet224", "width": 0.125},
        "stages": [{"name": "s", "forward": "full", "trainable": ["all"], "resolution": 64, "batch_size": 16,
                    "chunk_size": args.chunk, "lr": 1e-3}],
    })
    chunk = make_plan(recipe, ds.sample_ids).chunk_ids(0, 0)
    aligned = np.sort(ds.sample_ids)[: len(chunk)]

    fs, _ = sfs.filesystem(shards_uri)
    per_file = chunk[: args.per_file_samples]
    rows = ds.read_samples(chunk)
    fs.pipe({f"{bucket}/perfile/{int(sid)}/{k}": rows[k][i] for i, sid in enumerate(rows["sample_id"][: len(chunk)])
             for k in ("fg_bg", "bg", "mask", "depth")})
    wanted_bytes = sum(len(rows[k][i]) for i in range(len(chunk)) for k in ("fg_bg", "bg", "mask", "depth"))
    del rows

    proxy.configure(latency_s=args.latency_ms / 1000)
    out: dict[str, Any] = {"preload_latency_ms_per_request": args.latency_ms, "preload_dataset_samples": args.samples,
                           "preload_chunk_samples": len(chunk), "preload_rows_per_group": rows_per_group,
                           "preload_sample_bytes": int(per_sample)}

    def cold(ids: np.ndarray) -> tuple[float, dict[str, int]]:
        fresh = open_dataset(shards_uri)  # a new worker: no footers in memory (and the cache is off)
        proxy.reset_counters()
        t0 = time.perf_counter()
        got = fresh.read_samples(ids)
        dt = time.perf_counter() - t0
        assert got["sample_id"].tolist() == list(map(int, ids))
        stats = fresh.reader.stats.as_dict()
        for table in fresh.shared.values():  # the backgrounds' own reads (format /4)
            for k, v in table.reader.stats.as_dict().items():
                stats[k] += v
        return dt, {**stats, "http_requests": proxy.counters.requests}

    dt, stats = cold(chunk)
    out["preload_sharded_samples_per_s"] = _rate(len(chunk), dt)
    out["preload_sharded_requests"] = stats["http_requests"]
    out["preload_sharded_read_amplification"] = round(stats["bytes_fetched"] / wanted_bytes, 2)
    dt, stats = cold(aligned)
    out["preload_sharded_aligned_chunk_samples_per_s"] = _rate(len(aligned), dt)
    out["preload_sharded_aligned_chunk_requests"] = stats["http_requests"]

    # The source's approach: each sample's four images are objects, fetched one after another.
    proxy.reset_counters()
    t0 = time.perf_counter()
    for sid in per_file:
        for k in ("fg_bg", "bg", "mask", "depth"):
            fs.cat_file(f"{bucket}/perfile/{int(sid)}/{k}")
    dt = time.perf_counter() - t0
    out["preload_per_file_samples_per_s"] = _rate(len(per_file), dt)
    out["preload_per_file_measured_samples"] = len(per_file)
    out["preload_per_file_requests"] = proxy.counters.requests
    # Per-file at its best: every object of the chunk requested at once (gcsfs async).
    paths = [f"{bucket}/perfile/{int(sid)}/{k}" for sid in chunk for k in ("fg_bg", "bg", "mask", "depth")]
    t0 = time.perf_counter()
    fs.cat(paths)
    out["preload_per_file_concurrent_samples_per_s"] = _rate(len(chunk), time.perf_counter() - t0)
    out["preload_sharded_vs_per_file"] = round(out["preload_sharded_samples_per_s"]
                                               / out["preload_per_file_samples_per_s"], 1)
    out["preload_sharded_vs_per_file_concurrent"] = round(out["preload_sharded_samples_per_s"]
                                                          / out["preload_per_file_concurrent_samples_per_s"], 2)
    proxy.configure()
    return out


# -- 2. decode ----------------------------------------------------------------------------------------


def _decoders() -> tuple[dict[str, Any], dict[str, str]]:
    """Bare JPEG -> HxWx3 uint8 decoders available here, and why the others are not."""
    from PIL import Image

    ok: dict[str, Any] = {"pillow": lambda b: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))}
    missing: dict[str, str] = {}
    try:
        import simplejpeg

        ok["simplejpeg"] = lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB")
    except ImportError as exc:
        missing["simplejpeg"] = f"not installed ({exc})"
    try:
        from turbojpeg import TJPF_RGB, TurboJPEG

        tj = TurboJPEG()
        ok["pyturbojpeg"] = lambda b: tj.decode(b, pixel_format=TJPF_RGB)
    except Exception as exc:  # noqa: BLE001 - ImportError, or the missing libturbojpeg.so (RuntimeError)
        missing["pyturbojpeg"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    try:
        import torch
        import torchvision.io as tvio

        ok["torchvision"] = lambda b: tvio.decode_jpeg(torch.frombuffer(bytearray(b), dtype=torch.uint8))
    except Exception as exc:  # noqa: BLE001
        missing["torchvision"] = (f"{type(exc).__name__}: {exc}; torchvision is not a dependency, and no torchvision "
                                  "release imports beside torch 2.13 (README: Why torch 2.13.0)")
    return ok, missing


def _best_of(fn, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _best_of_alternating(fns: dict[str, Any], repeats: int = 7) -> dict[str, float]:
    """Best time of each fn, the fns taking turns: load from other work hits all of them alike."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def _each(fn, items) -> None:
    """fn over items, each result dropped before the next call: as a DataLoader's consumer does
    (and so memory is reused, rather than every result paying for fresh pages)."""
    for item in items:
        fn(item)


def bench_decode(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from storage import codec
    from storage.shards import open_dataset
    from storage.synth import synthesize
    from workers.data import decode_rgb_into
    from workers.tasks.mask_depth import ChunkSamples, prepare_batch

    torch.set_num_threads(1)  # per core
    uri = os.path.join(tempfile.mkdtemp(), "decode")
    load_before = os.getloadavg()[0]
    synthesize(uri, args.decode_samples, seed=2, image_size=args.image_size)
    ds = open_dataset(uri)
    rows = ds.read_samples(ds.sample_ids)
    n = len(rows["sample_id"])
    jpegs = rows["fg_bg"] + rows["bg"]
    size = args.image_size
    out: dict[str, Any] = {"decode_samples": n, "decode_image_size": size, "decode_batch_size": args.decode_batch}
    ok, missing = _decoders()
    for name, dec in ok.items():
        out[f"jpeg_decode_{name}_samples_per_s_per_core"] = _rate(n, _best_of(lambda dec=dec: _each(dec, jpegs)))
    for name, why in missing.items():
        out[f"jpeg_decode_{name}_unavailable"] = why
    best = max(ok, key=lambda k: out[f"jpeg_decode_{k}_samples_per_s_per_core"])
    out["jpeg_decode_limit_decoder"] = best
    limit_56 = None
    if "simplejpeg" in ok:
        import simplejpeg

        # The limit for a 56-px stage: libjpeg-turbo's DCT scaling to the smallest size >= 56 px
        # (measured below, in turns with the worker's path).
        limit_56 = True

    # The worker's path: ChunkSamples.__getitems__ per batch, as the DataLoader calls it, timed in
    # turns with the limit's decoder (the limits reported are from these turns). A fresh
    # ChunkSamples per turn: each turn pays the first decode of every background (52 here, for
    # 512 samples; a chunk of the source's holds ~100 for 50K samples).
    batches = [list(range(i, min(i + args.decode_batch, n))) for i in range(0, n, args.decode_batch)]
    limit_dec = ok[best]

    class EveryBg(ChunkSamples):
        """Without reusing decoded backgrounds: what every JPEG costs (two per sample)."""

        def _bg_into(self, data: bytes, out: np.ndarray) -> None:
            decode_rgb_into(data, out, "bg")

    def worker(cls: type, side: int) -> None:
        _each(cls(rows, side, ds.describe, hflip=0.5, flip_key=(0, 0, 0, 0)).__getitems__, batches)

    # Where the time goes, per sample: the two JPEGs (the bg through the worker's reuse), the mask,
    # the depth map, each written into a batch-sized buffer as the worker does (timed in the same
    # turns); "other" is the rest of __getitems__ (flip keys, buffers, Python).
    def parts(kind: str) -> None:
        cs = ChunkSamples(rows, size, ds.describe)
        for b in batches:
            if kind == "jpeg_pair":
                buf = np.empty((len(b), 2, size, size, 3), np.uint8)
                for j, i in enumerate(b):
                    decode_rgb_into(rows["fg_bg"][i], buf[j, 0])
                    cs._bg_into(rows["bg"][i], buf[j, 1])
            elif kind == "mask":
                buf = np.empty((len(b), size, size), np.uint8)
                for j, i in enumerate(b):
                    codec.decode_mask(rows["mask"][i], out=buf[j])
            else:
                buf = np.empty((len(b), 2, size, size), np.uint8)
                for j, i in enumerate(b):
                    codec.decode_depth_planes(rows["depth"][i], out=buf[j])

    kinds = ("jpeg_pair", "mask", "depth")
    turns = {"limit": lambda: _each(limit_dec, jpegs), "decode": functools.partial(worker, ChunkSamples, size),
             "decode_every_bg": functools.partial(worker, EveryBg, size),
             **{k: functools.partial(parts, k) for k in kinds}}
    if limit_56:
        turns.update({"limit_56": lambda: _each(lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB", min_height=56,
                                                                                 min_width=56), jpegs),
                      "decode_56": functools.partial(worker, ChunkSamples, 56),
                      "decode_every_bg_56": functools.partial(worker, EveryBg, 56)})
    t = _best_of_alternating(turns)
    out["jpeg_decode_limit_samples_per_s_per_core"] = _rate(n, t["limit"])
    out["decode_samples_per_s_per_core"] = _rate(n, t["decode"])
    for kind in kinds:
        out[f"decode_us_per_sample_{kind}"] = round(1e6 * t[kind] / n, 1)
    out["decode_us_per_sample_other"] = round(1e6 * (t["decode"] - sum(t[k] for k in kinds)) / n, 1)
    out["decode_us_per_sample_total"] = round(1e6 * t["decode"] / n, 1)
    out["jpeg_limit_us_per_sample"] = round(1e6 * t["limit"] / n, 1)
    out["decode_vs_jpeg_limit"] = round(t["limit"] / t["decode"], 3)
    out["decode_vs_jpeg_limit_every_bg_decoded"] = round(t["limit"] / t["decode_every_bg"], 3)
    if limit_56:
        out["jpeg_decode_limit_samples_per_s_per_core_at_56px"] = _rate(n, t["limit_56"])
        out["decode_samples_per_s_per_core_at_56px"] = _rate(n, t["decode_56"])
        out["decode_vs_jpeg_limit_at_56px"] = round(t["limit_56"] / t["decode_56"], 3)
        out["decode_vs_jpeg_limit_at_56px_every_bg_decoded"] = round(t["limit_56"] / t["decode_every_bg_56"], 3)
    # The same two measured keeping every result (all of them in fresh memory), as this bench did before.
    t = _best_of_alternating({"limit": lambda: [limit_dec(b) for b in jpegs],
                              "decode": lambda: [cs.__getitems__(b)
                                                 for cs in [ChunkSamples(rows, size, ds.describe, hflip=0.5)]
                                                 for b in batches]})
    out["retained_jpeg_decode_limit_samples_per_s_per_core"] = _rate(n, t["limit"])
    out["retained_decode_samples_per_s_per_core"] = _rate(n, t["decode"])
    out["retained_decode_vs_jpeg_limit"] = round(out["retained_decode_samples_per_s_per_core"]
                                                 / out["retained_jpeg_decode_limit_samples_per_s_per_core"], 3)

    # The step after: integers -> float model tensors, flips (and at 56 px the final resizes of
    # the inputs and depth). It runs on the training device; on a GPU that is ~free, this is what
    # it costs where training runs on the CPU (one core).
    def prepare_all(raw: list) -> None:
        _each(lambda r: prepare_batch(r, "cpu"), raw)

    for side, key in ((size, ""), (56, "_at_56px")):
        cs = ChunkSamples(rows, side, ds.describe, hflip=0.5, flip_key=(0, 0, 0, 0))
        out[f"prepare_batch_on_cpu_samples_per_s_per_core{key}"] = _rate(
            n, _best_of(functools.partial(prepare_all, [cs.__getitems__(b) for b in batches])))
    out["decode_load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]

    # Mask and depth encodings, on this dataset's maps: bytes, and decode speed of mask + depth
    # into batch buffers (the depth as byte planes where the worker takes it so).
    masks = [codec.decode_mask(m) for m in rows["mask"]]
    depths = [codec.decode_depth_uint16(d) for d in rows["depth"]]
    L, Z, PLANES, NONE = codec.CODEC_LZ4, codec.CODEC_ZSTD, codec.LAYOUT_BYTE_PLANES, codec.CODEC_NONE
    encodings = {
        "png": (codec.encode_mask_png, lambda d: codec.encode_depth_png(d.astype(np.float32) / codec.DEPTH_U16_MAX)),
        "raw_lz4_planes": (lambda m: codec.encode_raw(m, codec=L), lambda d: codec.encode_raw(d, PLANES, L)),
        "raw_lz4_plain": (lambda m: codec.encode_raw(m, codec=L), lambda d: codec.encode_raw(d, codec=L)),
        "raw_zstd_planes": (lambda m: codec.encode_raw(m, codec=Z), lambda d: codec.encode_raw(d, PLANES, Z)),
        "raw_zstd_plain": (lambda m: codec.encode_raw(m, codec=Z), lambda d: codec.encode_raw(d, codec=Z)),
        "raw_uncompressed": (lambda m: codec.encode_raw(m, codec=NONE), lambda d: codec.encode_raw(d, codec=NONE)),
    }
    mbuf, dbuf = np.empty((size, size), np.uint8), np.empty((2, size, size), np.uint8)
    for name, (enc_mask, enc_depth) in encodings.items():
        em, ed = [enc_mask(m) for m in masks], [enc_depth(d) for d in depths]
        assert all(np.array_equal(codec.decode_depth_uint16(b), d) for b, d in zip(ed, depths, strict=True))
        out[f"maskdepth_{name}_bytes_per_sample"] = round(sum(map(len, em + ed)) / n)
        out[f"maskdepth_{name}_decode_samples_per_s_per_core"] = _rate(n, _best_of(
            lambda em=em, ed=ed: [(codec.decode_mask(m, out=mbuf), codec.decode_depth_planes(d, out=dbuf))
                                  for m, d in zip(em, ed, strict=True)]))
    out["maskdepth_written_as"] = {(PLANES, L): "raw_lz4_planes", (PLANES, Z): "raw_zstd_planes"}.get(
        (codec.DEPTH_LAYOUT, codec.DEPTH_CODEC), f"raw layout {codec.DEPTH_LAYOUT} codec {codec.DEPTH_CODEC}")
    out["jpeg_pair_bytes_per_sample"] = round(sum(map(len, jpegs)) / n)
    return out


# -- 3. data wait -------------------------------------------------------------------------------------


def bench_data_wait(args: argparse.Namespace, proxy: Any, bucket: str) -> dict[str, Any]:
    import torch

    from common.plan import make_plan
    from common.recipe import validate_recipe
    from storage.plans import save_plan
    from storage.shards import open_dataset
    from storage.synth import synthesize
    from workers.session import LocalSession
    from workers.train.trainer import Trainer

    torch.set_num_threads(args.threads)
    uri = f"gs://{bucket}/quickstart"
    eval_n = 32
    synthesize(uri, eval_n + 2 * args.wait_chunk, seed=0, image_size=128)
    ds = open_dataset(uri)
    out: dict[str, Any] = {"data_wait_chunk_samples": args.wait_chunk,
                           "data_wait_latency_ms_per_request": args.latency_ms}
    proxy.configure(latency_s=args.latency_ms / 1000)
    for prefetch in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            recipe = validate_recipe({
                "run": {"name": "bench", "storage": os.path.join(tmp, "runs"), "seed": 0},
                "data": {"uri": uri, "eval_samples": eval_n, "prefetch": prefetch, "decode_workers": 0},
                "model": {"name": "unet224", "width": 0.125},
                # quickstart's head_tail stage: full forward at 128 px, batch 16
                "stages": [{"name": "head_tail", "forward": "full", "trainable": ["head", "tail"], "resolution": 128,
                            "batch_size": 16, "chunk_size": args.wait_chunk, "lr": 0.005}],
                "checkpoint": {"every_steps": 1_000_000, "every_seconds": 1e9},
                "execution": {"backend": "local", "torch_threads": args.threads},
            })
            run_dir = os.path.join(tmp, "runs", "bench")
            plan = make_plan(recipe, ds.sample_ids)
            save_plan(plan, run_dir)
            trainer = Trainer(recipe, {"run_dir": run_dir, "data_uri": uri, "task_info": {"baseline_depth": 0.5}},
                              LocalSession(run_dir, keep=1))
            get, waited = trainer.prefetcher.get, []

            def timed_get(key, ids, get=get, waited=waited):
                t0 = time.perf_counter()
                rows = get(key, ids)
                waited.append(time.perf_counter() - t0)
                return rows

            trainer.prefetcher.get = timed_get
            trainer.enter_stage(0)
            trainer.train_chunk(0, 0)  # chunk 1 is fetched in the background now, or not
            t0 = time.perf_counter()
            trainer.train_chunk(0, 1)
            key = "on" if prefetch else "off"
            out[f"data_wait_fraction_prefetch_{key}"] = round(trainer._data_wait, 4)
            # The part of that wait spent on the chunk's bytes (the rest is decoding batches).
            out[f"data_wait_preload_s_prefetch_{key}"] = round(waited[-1], 4)
            out[f"data_wait_chunk_s_prefetch_{key}"] = round(time.perf_counter() - t0, 2)
            trainer.close()
    proxy.configure()
    return out


# -- 4. size ------------------------------------------------------------------------------------------


def _tree_bytes(root: str, skip: tuple[str, ...] = ()) -> int:
    total = 0
    for dirpath, dirnames, files in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip]
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def bench_size(args: argparse.Namespace) -> dict[str, Any]:
    from storage import codec
    from storage.pack import choose_sizes, pack
    from storage.seed_layout import synthesize_seed_layout
    from storage.shards import LEGACY_MASK_DEPTH_FORMAT, ShardWriter, open_dataset
    from storage.verify import verify

    root = tempfile.mkdtemp()
    src, dest, legacy = (os.path.join(root, k) for k in ("src", "packed", "legacy"))
    n = args.source_samples
    out: dict[str, Any] = {"size_source_samples": n, "size_load_average_1min": [round(os.getloadavg()[0], 2)]}
    t0 = time.perf_counter()
    synthesize_seed_layout(src, n, seed=0, image_size=args.image_size, as_zip=True)
    out["size_synth_seed_zip_s"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    res = pack(src, dest)
    out["size_pack_s"] = round(time.perf_counter() - t0, 1)
    zips = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src) if f.endswith(".zip"))
    labels = _tree_bytes(os.path.join(src, "labels"))
    ds = open_dataset(dest)
    m = ds.manifest
    shards = sum(int(sh["bytes"]) for sh in m["shards"])
    bg = m["shared"]["bg"]
    bg_files = sum(int(f["bytes"]) for f in bg["files"])
    everything = _tree_bytes(dest, skip=(".pack",))
    out.update({
        "source_zip_bytes": zips, "source_label_bytes": labels, "packed_shard_bytes": shards,
        "packed_backgrounds_bytes": bg_files,
        "packed_backgrounds": bg["num"], "packed_dataset_bytes": everything, "packed_shards": res.shards,
        "packed_format": m["format"],
        "shard_bytes_vs_source": round((shards + bg_files) / zips, 3),
        "dataset_bytes_vs_source": round(everything / (zips + labels), 3),
    })
    t0 = time.perf_counter()
    v = verify(dest)
    out["size_verify_s"] = round(time.perf_counter() - t0, 1)
    out["size_verify_ok"] = v["ok"]
    out["size_verify_bad"] = len(v["bad"])

    # Per sample, what a row stores, and the baseline: the first samples as `data pack` wrote
    # them before (format /2: each row its own background, depth LZ4), in the same sizes of group.
    k = min(n, args.legacy_samples)
    rows = ds.read_samples(np.sort(ds.sample_ids)[:k])
    for col in ("fg_bg", "mask", "depth"):
        out[f"packed_{col}_bytes_per_sample"] = round(sum(map(len, rows[col])) / k)
    values = [codec.depth_values(d) for d in rows["depth"]]
    per_row = (sum(len(rows[c][i]) for c in ("fg_bg", "bg", "mask") for i in range(k))
               + sum(len(codec.encode_raw(v, codec=codec.CODEC_LZ4)) for v in values))
    rps, rpg = choose_sizes(per_row // k, None, None)
    with ShardWriter(legacy, rows_per_shard=rps, rows_per_group=rpg, format=LEGACY_MASK_DEPTH_FORMAT) as w:
        for i in range(k):
            w.add({"sample_id": int(rows["sample_id"][i]), "fg_bg": rows["fg_bg"][i], "bg": rows["bg"][i],
                   "mask": rows["mask"][i],
                   "depth": codec.encode_raw(values[i], codec=codec.CODEC_LZ4), "height": int(rows["height"][i]),
                   "width": int(rows["width"][i]),
                   "depth_mean": 0.0})
        lm = w.close()
    legacy_per_sample = sum(int(sh["bytes"]) for sh in lm["shards"]) / k
    out["legacy_2_samples"] = k
    out["shard_bytes_vs_source_legacy_2"] = round(legacy_per_sample * n / zips, 3)

    # 8-bit depth (the source's PNG maps, as packed): encodings by size and decode time.
    enc = {
        "png": lambda v: _png(v),
        "raw_lz4": lambda v: codec.encode_raw(v, codec=codec.CODEC_LZ4),
        "raw_zstd3": lambda v: codec.encode_raw(v, codec=codec.CODEC_ZSTD, level=3),
        "raw_zstd9": lambda v: codec.encode_raw(v, codec=codec.CODEC_ZSTD, level=9),
    }
    sample = values[: min(k, 500)]
    for name, fn in enc.items():
        data = [fn(v) for v in sample]
        out[f"depth8_{name}_bytes_per_sample"] = round(sum(map(len, data)) / len(data))
        out[f"depth8_{name}_decode_us"] = round(1e6 * _best_of(lambda data=data: _each(codec.depth_values, data))
                                                / len(data), 1)
    out["depth8_written_as"] = "raw_zstd9"
    out["size_load_average_1min"].append(round(os.getloadavg()[0], 2))
    import shutil

    shutil.rmtree(root, ignore_errors=True)
    return out


def _png(values: np.ndarray) -> bytes:
    from PIL import Image

    from storage import codec

    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG", compress_level=codec.PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=4096, help="dataset size for the preload benchmark")
    ap.add_argument("--chunk", type=int, default=1024, help="chunk size for the preload benchmark")
    ap.add_argument("--image-size", type=int, default=200, help="px (the source's images are 200x200)")
    ap.add_argument("--latency-ms", type=float, default=20.0, help="added by the proxy to every request")
    ap.add_argument("--per-file-samples", type=int, default=128, help="samples the sequential per-file baseline reads")
    ap.add_argument("--decode-samples", type=int, default=512)
    ap.add_argument("--decode-batch", type=int, default=16, help="batch size for the decode benchmark (quickstart's)")
    ap.add_argument("--wait-chunk", type=int, default=128, help="chunk size for the data-wait benchmark")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for the data-wait benchmark")
    ap.add_argument("--source-samples", type=int, default=20000,
                    help="samples of the source layout the size benchmark packs")
    ap.add_argument("--legacy-samples", type=int, default=2000,
                    help="of those, written as format /2 for the size baseline")
    ap.add_argument("--skip", default="", help="comma list of parts to skip: preload,decode,wait,size")
    ap.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["ORCHESTRATOR_CACHE"] = "off"  # cold reads: what a fresh worker pays
    import logging

    logging.getLogger("storage").setLevel(logging.ERROR)
    from tests.fault_proxy import FaultProxy
    from tests.gcs_emulator import make_bucket, point_gcsfs_at, start_emulator, stop_emulator

    result: dict[str, Any] = {"bench": "data", "machine": machine()}
    t0 = time.perf_counter()
    proc, url = start_emulator()
    try:
        with FaultProxy(url) as proxy:
            point_gcsfs_at(proxy.url)
            make_bucket("bench")
            if "preload" not in skip:
                result.update(bench_preload(args, proxy, "bench"))
            if "decode" not in skip:
                result.update(bench_decode(args))
            if "wait" not in skip:
                result.update(bench_data_wait(args, proxy, "bench"))
            if "size" not in skip:
                result.update(bench_size(args))
    finally:
        stop_emulator(proc)
    result["bench_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
