"""Data-layer benchmarks, each against its baseline in the same run. Usage: python -m bench.data --json

1. Chunk preload from GCS (gcp-storage-emulator behind a loopback proxy adding --latency-ms per
   request): packed shards (only the row groups holding the chunk, all requests in flight)
   against one object per image read one after another, the source's bucket approach; plus
   one object per image read concurrently, the best a per-file layout can do.
2. Decode + augment (the worker's ChunkSamples path, a batch at a time as the DataLoader asks)
   per core against bare JPEG decode of the same bytes, with the fastest decoder available here;
   Pillow, simplejpeg, PyTurboJPEG and torchvision.io are each measured or reported unavailable
   with the reason. Also: per-component times, and the mask/depth encodings (PNG and the raw
   format's variants) by size and decode speed.
3. Data-wait fraction of a chunk's training time (quickstart's head_tail stage settings), data on
   the same emulated GCS, with the next chunk prefetched vs not.
"""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import platform
import tempfile
import time
from typing import Any

import numpy as np

PACKAGES = ("PIL", "simplejpeg", "turbojpeg", "torchvision")


def _machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.platform()}"


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
        "stages": [{"name": "s", "forward": "full", "trainable": ["all"], "resolution": 64, "batch_size": 16, "chunk_size": args.chunk, "lr": 1e-3}],
    })
    chunk = make_plan(recipe, ds.sample_ids).chunk_ids(0, 0)
    aligned = np.sort(ds.sample_ids)[: len(chunk)]

    fs, _ = sfs.filesystem(shards_uri)
    per_file = chunk[: args.per_file_samples]
    rows = ds.read_samples(chunk)
    fs.pipe({f"{bucket}/perfile/{int(sid)}/{k}": rows[k][i] for i, sid in enumerate(rows["sample_id"][: len(chunk)]) for k in ("fg_bg", "bg", "mask", "depth")})
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
        return dt, {**fresh.reader.stats.as_dict(), "http_requests": proxy.counters.requests}

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
    out["preload_sharded_vs_per_file"] = round(out["preload_sharded_samples_per_s"] / out["preload_per_file_samples_per_s"], 1)
    out["preload_sharded_vs_per_file_concurrent"] = round(out["preload_sharded_samples_per_s"] / out["preload_per_file_concurrent_samples_per_s"], 2)
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

        # The limit for a 56-px stage: libjpeg-turbo's DCT scaling to the smallest size >= 56 px.
        limit_56 = _rate(n, _best_of(lambda: _each(lambda b: simplejpeg.decode_jpeg(b, colorspace="RGB", min_height=56, min_width=56), jpegs)))
        out["jpeg_decode_limit_samples_per_s_per_core_at_56px"] = limit_56

    # The worker's path: ChunkSamples.__getitems__ per batch, as the DataLoader calls it, timed in
    # turns with the limit's decoder (the limit reported is from these turns).
    batches = [list(range(i, min(i + args.decode_batch, n))) for i in range(0, n, args.decode_batch)]
    samples = ChunkSamples(rows, size, ds.describe, hflip=0.5, flip_key=(0, 0, 0, 0))
    limit_dec = ok[best]

    # Where the time goes, per sample: the two JPEGs, the mask, the depth map, each written into
    # a batch-sized buffer as the worker does (timed in the same turns); "other" is the rest of
    # __getitems__ (flip keys, buffers, Python), within the noise of the machine.
    def parts(kind: str) -> None:
        for b in batches:
            if kind == "jpeg_pair":
                buf = np.empty((len(b), 2, size, size, 3), np.uint8)
                for j, i in enumerate(b):
                    decode_rgb_into(rows["fg_bg"][i], buf[j, 0])
                    decode_rgb_into(rows["bg"][i], buf[j, 1])
            elif kind == "mask":
                buf = np.empty((len(b), size, size), np.uint8)
                for j, i in enumerate(b):
                    codec.decode_mask(rows["mask"][i], out=buf[j])
            else:
                buf = np.empty((len(b), 2, size, size), np.uint8)
                for j, i in enumerate(b):
                    codec.decode_depth_planes(rows["depth"][i], out=buf[j])

    kinds = ("jpeg_pair", "mask", "depth")
    t = _best_of_alternating({"limit": lambda: _each(limit_dec, jpegs), "decode": lambda: _each(samples.__getitems__, batches),
                              **{k: functools.partial(parts, k) for k in kinds}})
    out["jpeg_decode_limit_samples_per_s_per_core"] = _rate(n, t["limit"])
    out["decode_samples_per_s_per_core"] = _rate(n, t["decode"])
    for kind in kinds:
        out[f"decode_us_per_sample_{kind}"] = round(1e6 * t[kind] / n, 1)
    out["decode_us_per_sample_other"] = round(1e6 * (t["decode"] - sum(t[k] for k in kinds)) / n, 1)
    out["decode_us_per_sample_total"] = round(1e6 * t["decode"] / n, 1)
    out["jpeg_limit_us_per_sample"] = round(1e6 * t["limit"] / n, 1)
    samples_56 = ChunkSamples(rows, 56, ds.describe, hflip=0.5, flip_key=(0, 0, 0, 0))
    out["decode_samples_per_s_per_core_at_56px"] = _rate(n, _best_of(lambda: _each(samples_56.__getitems__, batches)))
    out["decode_vs_jpeg_limit"] = round(out["decode_samples_per_s_per_core"] / out["jpeg_decode_limit_samples_per_s_per_core"], 3)
    if limit_56:
        out["decode_vs_jpeg_limit_at_56px"] = round(out["decode_samples_per_s_per_core_at_56px"] / limit_56, 3)
    # The same two measured keeping every result (all of them in fresh memory), as this bench did before.
    t = _best_of_alternating({"limit": lambda: [limit_dec(b) for b in jpegs], "decode": lambda: [samples.__getitems__(b) for b in batches]})
    out["retained_jpeg_decode_limit_samples_per_s_per_core"] = _rate(n, t["limit"])
    out["retained_decode_samples_per_s_per_core"] = _rate(n, t["decode"])
    out["retained_decode_vs_jpeg_limit"] = round(out["retained_decode_samples_per_s_per_core"] / out["retained_jpeg_decode_limit_samples_per_s_per_core"], 3)

    # The step after: integers -> float model tensors, flips. It runs on the training device; on
    # a GPU that is ~free, this is what it costs where training runs on the CPU (one core).
    def prepare_all(raw: list) -> None:
        _each(lambda r: prepare_batch(r, "cpu"), raw)

    out["prepare_batch_on_cpu_samples_per_s_per_core"] = _rate(n, _best_of(
        functools.partial(prepare_all, [samples.__getitems__(b) for b in batches])))

    # Mask and depth encodings, on this dataset's maps: bytes, and decode speed of mask + depth
    # into batch buffers (the depth as byte planes where the worker takes it so).
    masks = [codec.decode_mask(m) for m in rows["mask"]]
    depths = [codec.decode_depth_uint16(d) for d in rows["depth"]]
    L, Z, PLANES, NONE = codec.CODEC_LZ4, codec.CODEC_ZSTD, codec.LAYOUT_BYTE_PLANES, codec.CODEC_NONE
    encodings = {
        "png": (codec.encode_mask_png, lambda d: codec.encode_depth_png(d.astype(np.float32) / codec.DEPTH_SCALE)),
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
            lambda em=em, ed=ed: [(codec.decode_mask(m, out=mbuf), codec.decode_depth_planes(d, out=dbuf)) for m, d in zip(em, ed, strict=True)]))
    out["maskdepth_written_as"] = {(PLANES, L): "raw_lz4_planes", (PLANES, Z): "raw_zstd_planes"}.get(
        (codec.DEPTH_LAYOUT, codec.DEPTH_CODEC), f"raw layout {codec.DEPTH_LAYOUT} codec {codec.DEPTH_CODEC}")
    out["jpeg_pair_bytes_per_sample"] = round(sum(map(len, jpegs)) / n)
    return out


# -- 3. data wait -------------------------------------------------------------------------------------


def bench_data_wait(args: argparse.Namespace, proxy: Any, bucket: str) -> dict[str, Any]:
    import torch

    from common.plan import make_plan
    from common.recipe import validate_recipe
    from storage.shards import open_dataset
    from storage.synth import synthesize
    from workers.loop import Trainer
    from workers.session import LocalSession

    torch.set_num_threads(args.threads)
    uri = f"gs://{bucket}/quickstart"
    eval_n = 32
    synthesize(uri, eval_n + 2 * args.wait_chunk, seed=0, image_size=128)
    ds = open_dataset(uri)
    out: dict[str, Any] = {"data_wait_chunk_samples": args.wait_chunk, "data_wait_latency_ms_per_request": args.latency_ms}
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
            plan.save(run_dir)
            trainer = Trainer(recipe, {"run_dir": run_dir, "data_uri": uri, "task_info": {"baseline_depth": 0.5}}, LocalSession(run_dir, keep=1))
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
    ap.add_argument("--skip", default="", help="comma list of parts to skip: preload,decode,wait")
    ap.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["ORCHESTRATOR_CACHE"] = "off"  # cold reads: what a fresh worker pays
    import logging

    logging.getLogger("storage").setLevel(logging.ERROR)
    from tests.fault_proxy import FaultProxy
    from tests.gcs_emulator import make_bucket, point_gcsfs_at, start_emulator, stop_emulator

    result: dict[str, Any] = {"bench": "data", "machine": _machine()}
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
    finally:
        stop_emulator(proc)
    result["bench_seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
