"""Our chunk loader beside litdata's on the same samples, in one run (issue 24's peer bench).

Usage: python -m bench.peer --json [--samples 2000] [--sizes 56,224] [--skip gcs,litdata,resume]

One dataset is synthesized (storage.synth: 224-px JPEG inputs, raw masks, the mask_depth columns).
With --columns decoded (the default) every arm's files hold the two columns the arms decode: ours a
copy of the synthetic dataset with only its input JPEG and raw mask (the same encoded bytes, the
same rows per row group), litdata's the same; with --columns all they hold every column of the
mask_depth dataset (depth maps and background ids too), as the UNet's training reads them. Either
way both sides hold the same values: no arm reads, checks or spools bytes another does not.
litdata reads them two ways: written in its own format (litdata.optimize, 64 MB chunks, its
recommended size: each sample's values and its id), and our own shard files read by its
ParquetLoader (hard links to them beside the index.json that litdata.index_parquet_dataset
writes). Every arm decodes with the same functions (bench.peer_measure.decode_pair:
workers.data.decode_rgb_into for the JPEG, DCT-scaled to the size asked for;
storage.codec.decode_mask and a nearest resize for the mask), batch 64, and reads the whole
dataset once as one chunk:

  ours_stream      ChunkPrefetcher streaming the chunk in the batches' order (the trainer's path: the
                   window shuffle of new runs, data.shuffle_window_mb's default), 2 DataLoader workers
                   decoding through the spool while the rest of the chunk lands
  ours_whole       the chunk read whole, then 2 DataLoader workers decode (the same batch order)
  litdata          litdata.StreamingDataset (shuffle, seed 0) + StreamingDataLoader, 2 workers, its format
  litdata_parquet  the same over our shard files with litdata's ParquetLoader (low_memory: a row group
                   at a time, the three columns decoded)

Each arm runs twice, locally (every file of the arm dropped from the page cache first:
posix_fadvise DONTNEED, no root needed) and on gcp-storage-emulator behind tests/fault_proxy.py
adding --latency-ms to every request (litdata's GCS client is google-cloud-storage, pointed at the
proxy by STORAGE_EMULATOR_HOST with anonymous credentials; gcsfs for ours). Each arm runs in a
fresh process, so its memory is its own and nothing is warm from an earlier arm.

Per arm: first_batch_s (dataset opened to first batch in hand), steady_samples_per_s (after the first
batch; second_half_samples_per_s: the pass's second half alone, past any worker start-up), pss_mb
(peak PSS of the process and its DataLoader workers, sampled every 0.1 s by a
watcher process: bench.peer_measure.PssPeak), and:
  local: requests  ours: the dataset's own count of reads (ShardDataset.requests: open, ranges, shared);
                   litdata: files opened (from its index: chunk files, or shard files, plus index.json),
                   not traced, so a lower bound for litdata_parquet, which reads a row group at a time
  gcs:   gets      GET requests seen at the proxy during the pass (every GET: metadata, index and data);
                   gets_object_data: those that fetched object bytes (alt=media)
  resume_exact     the pass is stopped after k = half its batches and resumed, in a new process:
                   ours the trainer's way (the same batch order from batch k: a fresh prefetcher
                   streams batches[k:], as train_chunk does after a checkpoint at batch k);
                   litdata by StreamingDataLoader.state_dict() after k batches, then a new dataset
                   and loader (a new cache) with load_state_dict. Exact when the ids before the stop
                   and after the resume are the uninterrupted pass's, in order.
With --repeat N every arm runs N passes per setting, the arms in turns (a slow spell of this shared
machine then falls on all of them), and each timed figure is the median of its passes (each pass's
under `runs`): on a 2-core machine one pass's samples/s varies by 20 % from run to run.
Ratios are ours_stream / peer (`*_ratio_vs_*`); `acceptance` checks issue 24's lines. Where a
comparison handicaps one side, a `*_note` key says how.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import machine
from bench.peer_measure import BATCH, SEED, WORKERS, PssPeak, drop_page_cache, iterate
from storage.columns import Column

DECODED = (Column("fg_bg", "image"), Column("mask", "raw_u8"))
ARMS = ("ours_stream", "ours_whole", "litdata", "litdata_parquet")
PEERS = ("litdata", "litdata_parquet", "ours_whole")
# What every arm's files hold (--columns): the same encoded values on both sides, so no arm reads,
# checks or spools bytes another does not. The arms decode fg_bg and mask either way.
COLUMNS = {"decoded": "fg_bg (224-px JPEG) and mask (raw), as ours and litdata's own format both hold them",
           "all": "every column of the mask_depth dataset (fg_bg, bg_id, mask, depth), in ours and in litdata's "
                  "own format; decoded: fg_bg and mask"}
NOTES = {
    "ours_stream": "the window shuffle (48 MB windows) and litdata's shuffle differ in what a batch mixes: ours "
                   "draws each batch from one window of stored row groups, litdata from one chunk file per worker",
    "litdata_parquet": "on GCS it downloads whole shard files (every column, depth and bg_id included, which "
                       "no arm decodes) before reading them; locally it reads only the 3 columns asked for; "
                       "its DataLoader workers are spawned, not forked (ParquetLoader refuses fork: Polars)",
    "litdata": "its chunk files hold the values our shard rows hold (written from ours by litdata.optimize), "
               "and the sample id; ours verify a checksum per sample, litdata's are read unchecked",
}


# -- our arms ---------------------------------------------------------------------------------------


class _OurSamples:
    """A DataLoader dataset over a chunk's rows (dict or StreamingRows): whole batches per call."""

    def __init__(self, rows: Any, res: int) -> None:
        self.rows, self.res = rows, res

    def __len__(self) -> int:
        return len(self.rows["sample_id"])

    def __getitems__(self, idx: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from bench.peer_measure import decode_pair

        pairs = [decode_pair(self.rows["fg_bg"][i], self.rows["mask"][i], self.res) for i in idx]
        ids = np.asarray(self.rows["sample_id"])[np.asarray(idx, dtype=np.int64)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs]), ids


def _batches(ds: Any, ids: np.ndarray) -> list[np.ndarray]:
    """One rank's batches of the chunk `ids` as a new run's trainer takes them: the window shuffle
    of a new plan at the recipe's default window (workers/windows.py), one rank."""
    from common.plan import HEAD_BYTES, HEAD_GROWTH, Plan, batches_for_rank
    from common.recipe import SHUFFLE_WINDOW_MB
    from workers.windows import Windows

    plan = Plan(SEED, len(ids), ids[:0], ids, (), shuffle="window", shuffle_window_bytes=SHUFFLE_WINDOW_MB * 2**20,
                shuffle_head_bytes=HEAD_BYTES, shuffle_head_growth=HEAD_GROWTH)
    order = Windows(ds, plan).order(ids, len(ids), BATCH, 1)
    return batches_for_rank(ids, BATCH, 1, 0, [SEED, 3, 0, 0, 0], windows=order)


def _our_pass(uri: str, res: int, stream: bool, start: int = 0) -> tuple[dict[str, Any], Any]:
    """The chunk (the whole dataset) from batch `start` of its batch order, as train_chunk reads it."""
    # What a worker has imported before its first chunk (the plan, the recipe's defaults), not timed.
    import common.plan  # noqa: F401
    import common.recipe  # noqa: F401
    import workers.windows  # noqa: F401
    from storage.shards import open_dataset
    from workers.data import ChunkPrefetcher, make_loader, stream_order

    t0 = time.perf_counter()
    ds = open_dataset(uri)
    ids = np.sort(ds.sample_ids)
    batches = _batches(ds, ids)[start:]
    pre = ChunkPrefetcher(ds, stream=stream)
    try:
        rows = pre.get((0, 0), ids, *stream_order(ids, batches)) if stream else pre.get((0, 0), ids)
        todo = [np.searchsorted(ids, b).tolist() for b in batches]
        loader = make_loader(_OurSamples(rows, res), batch_sampler=todo, num_workers=WORKERS)
        out = iterate(loader, t0)
    finally:
        pre.close()
    return out, ds


def ours_arm(uri: str, res: int, stream: bool) -> dict[str, Any]:
    with PssPeak() as pss:
        out, ds = _our_pass(uri, res, stream)
    return {**out, "pss_mb": round(pss.peak, 1), "requests": ds.requests()}


def ours_resume(uri: str, res: int, stream: bool, k: int) -> dict[str, Any]:
    """A checkpoint at batch k holds the cursor (stage, chunk, epoch, batch k): the resumed process reads
    the same chunk and trains batches[k:] of the same order (workers/train/trainer.py train_chunk)."""
    from storage.shards import open_dataset

    out, _ = _our_pass(uri, res, stream, start=k)
    # Batches are cut evenly (common/plan.py), so the first k hold k x batch samples only roughly.
    ds = open_dataset(uri)
    skipped = sum(len(b) for b in _batches(ds, np.sort(ds.sample_ids))[:k])
    return {"before": None, "skipped": skipped, "after": out["ids"]}


# -- one arm in a fresh process ---------------------------------------------------------------------


def run_arm(arm: str, uri: str, res: int, resume_at: int) -> dict[str, Any]:
    if arm.startswith("ours_"):
        stream = arm == "ours_stream"
        return ours_resume(uri, res, stream, resume_at) if resume_at > 0 else ours_arm(uri, res, stream)
    from bench import peer_lit

    kind = "parquet" if arm == "litdata_parquet" else "native"
    return peer_lit.lit_resume(uri, kind, res, resume_at) if resume_at > 0 else peer_lit.lit_arm(uri, kind, res)


def _spawn(arm: str, uri: str, res: int, resume_at: int = 0) -> dict[str, Any]:
    """run_arm in a child process; its temporary files (litdata's caches) go to a folder removed after."""
    tmp = tempfile.mkdtemp(prefix=f"peer-{arm}-")
    out = os.path.join(tmp, "out.json")
    env = {**os.environ, "TMPDIR": tmp, "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO), os.environ.get(
        "PYTHONPATH")]))}
    try:
        done = subprocess.run([sys.executable, "-m", "bench.peer", "--child", arm, uri, str(res), str(resume_at), out],
                              env=env, capture_output=True, text=True, cwd=str(_REPO))
        if done.returncode or not os.path.exists(out):
            raise RuntimeError(f"arm {arm} at {res} px ({uri}) failed:\n{done.stderr[-3000:]}")
        return json.loads(Path(out).read_text())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_REPO = Path(__file__).resolve().parents[1]


def _gets(proxy: Any) -> dict[str, int]:
    paths = list(proxy.counters.paths)
    gets = [p for p in paths if p.startswith("GET ")]
    return {"gets": len(gets), "gets_object_data": sum("alt=media" in p for p in gets), "requests_at_emulator":
            len(paths)}


def measure(arm: str, uri: str, res: int, resume: bool, cold_root: str | None = None, proxy: Any = None,
            ) -> dict[str, Any]:
    """One arm's pass (cold locally, GETs counted on the emulator), then its resume check."""
    if cold_root:
        drop_page_cache(cold_root)
    if proxy is not None:
        proxy.reset_counters()
    try:
        got = _spawn(arm, uri, res)
    except RuntimeError as exc:  # one arm that cannot run costs its figures, not the whole bench's
        return {"error": str(exc)[-1500:]}
    if proxy is not None:
        got.update(_gets(proxy))
        got.pop("requests", None)  # the proxy's count is the one that holds on GCS
    ids = got.pop("ids")
    got["distinct_samples"] = len(set(ids))
    if resume:
        k = max(1, (len(ids) // BATCH) // 2)
        r = _spawn(arm, uri, res, k)
        before = r["before"] if r["before"] is not None else ids[: r["skipped"]]
        got["resume_after_batches"] = k
        got["resume_exact"] = before == ids[: len(before)] and r["after"] == ids[len(before):]
    return got


# Figures a pass measures by the clock or the sampler: with --repeat, each is the median of its passes.
TIMED = ("first_batch_s", "steady_samples_per_s", "second_half_samples_per_s", "pss_mb")


def rounds(arms: list[str], repeat: int, one: Any) -> dict[str, dict[str, Any]]:
    """`one(arm, first)` for every arm, `repeat` times in turns (arm by arm, then again), so a slow
    spell of this shared machine falls on every arm alike; the TIMED figures are the medians, each
    pass's kept in `runs`. The resume check and the counts come from the first pass (`first`)."""
    passes: dict[str, list[dict[str, Any]]] = {arm: [] for arm in arms}
    for k in range(max(1, int(repeat))):
        for arm in arms:
            passes[arm].append(one(arm, k == 0))
    out: dict[str, dict[str, Any]] = {}
    for arm, got in passes.items():
        bad = next((g for g in got if "error" in g), None)
        if bad is not None or len(got) == 1:
            out[arm] = bad or got[0]
            continue
        out[arm] = {**got[0], **{k: float(np.median([g[k] for g in got])) for k in TIMED if got[0].get(k) is not None},
                    "runs": {k: [g.get(k) for g in got] for k in TIMED}}
    return out


# -- ratios and acceptance --------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None:
        return None
    return round(a / max(b, 1e-9), 2)


def ratios(out: dict[str, Any], where: str, res: int) -> None:
    o = out.get(f"{where}_{res}_ours_stream")
    for peer in PEERS:
        p = out.get(f"{where}_{res}_{peer}")
        if not o or not p or "error" in o or "error" in p:
            continue
        count = "gets" if where == "gcs" else "requests"
        out[f"{where}_{res}_ratio_vs_{peer}"] = {
            "steady_samples_per_s": _ratio(o["steady_samples_per_s"], p["steady_samples_per_s"]),
            "second_half_samples_per_s": _ratio(o.get("second_half_samples_per_s"), p.get("second_half_samples_per_s")),
            "first_batch_s": _ratio(o["first_batch_s"], p["first_batch_s"]),
            "pss": _ratio(o["pss_mb"], p["pss_mb"]),
            count: _ratio(o.get(count), p.get(count)),
        }


def acceptance(out: dict[str, Any], wheres: list[str], sizes: list[int]) -> dict[str, Any]:
    """Issue 24's first acceptance line, per setting: True, False, or None where an arm did not run."""

    def check(where: str, res: int, peer: str, fn: Any) -> bool | None:
        o, p = out.get(f"{where}_{res}_ours_stream"), out.get(f"{where}_{res}_{peer}")
        return None if not o or not p or "error" in o or "error" in p else bool(fn(o, p))

    lines: dict[str, Any] = {}
    for where in wheres:
        for res in sizes:
            key = f"{where}_{res}"
            a = {
                "steady_ge_1x_litdata": check(where, res, "litdata",
                                              lambda o, p: o["steady_samples_per_s"] >= p["steady_samples_per_s"]),
                "steady_ge_1x_litdata_parquet": check(
                    where, res, "litdata_parquet", lambda o, p: o["steady_samples_per_s"] >= p["steady_samples_per_s"]),
                "first_batch_le_litdata": check(where, res, "litdata",
                                                lambda o, p: o["first_batch_s"] <= p["first_batch_s"]),
                "pss_le_litdata": check(where, res, "litdata", lambda o, p: o["pss_mb"] <= p["pss_mb"]),
            }
            if where == "gcs":
                a["gets_le_2x_litdata"] = check(where, res, "litdata", lambda o, p: o["gets"] <= 2 * p["gets"])
                a["gets_le_2x_litdata_parquet"] = check(where, res, "litdata_parquet",
                                                        lambda o, p: o["gets"] <= 2 * p["gets"])
            exact = [out[f"{key}_{arm}"].get("resume_exact") for arm in ARMS if f"{key}_{arm}" in out]
            a["resume_exact"] = None if not exact or None in exact else all(exact)
            lines[key] = a
    flat = [v for a in lines.values() for v in a.values()]
    lines["passed"] = bool(flat) and all(v is True for v in flat)
    lines["not_measured"] = sum(v is None for v in flat)
    return lines


# -- datasets and settings --------------------------------------------------------------------------


def _upload(local: str, uri: str) -> None:
    from storage import fs as sfs

    for p in sorted(Path(local).rglob("*")):
        if p.is_file():
            sfs.write_bytes(sfs.join(uri, str(p.relative_to(local))), p.read_bytes())


def _gcs(paths: dict[str, str], arms: list[str], sizes: list[int], latency_ms: float, resume: bool,
         repeat: int = 1) -> dict[str, Any]:
    from tests.fault_proxy import FaultProxy
    from tests.gcs_emulator import make_bucket, point_gcsfs_at, start_emulator, stop_emulator

    out: dict[str, Any] = {"gcs_latency_ms_per_request": latency_ms}
    uris = {"ours_stream": "gs://peer/ds", "ours_whole": "gs://peer/ds", "litdata": "gs://peer/lit",
            "litdata_parquet": "gs://peer/ds/shards"}
    proc, url = start_emulator()
    try:
        with FaultProxy(url) as proxy:
            point_gcsfs_at(proxy.url)
            make_bucket("peer")
            _upload(paths["ours"], uris["ours_stream"])
            if "litdata" in arms:
                _upload(paths["litdata"], uris["litdata"])
            if "litdata_parquet" in arms:  # our shard objects as they are, and litdata's index beside them
                from storage import fs as sfs

                sfs.write_bytes(sfs.join(uris["litdata_parquet"], "index.json"),
                                Path(paths["litdata_parquet"], "index.json").read_bytes())
            proxy.configure(latency_s=latency_ms / 1000)
            for res in sizes:
                runs = rounds(arms, repeat, lambda arm, first, res=res: measure(arm, uris[arm], res, resume and first,
                                                                                proxy=proxy))
                out.update({f"gcs_{res}_{arm}": got for arm, got in runs.items()})
                ratios(out, "gcs", res)
            proxy.configure()
    finally:
        stop_emulator(proc)
    return out


def decoded_copy(src: str, dest: str, rows_per_group: int) -> None:
    """Our dataset of the columns every arm decodes (the input JPEG, the raw mask), the same encoded
    bytes as src's, in row groups of the same number of rows: what litdata's own format holds when
    written from it, so every arm reads the same bytes."""
    from storage.shards import ShardWriter, open_dataset

    ds = open_dataset(src)
    ids = np.sort(ds.sample_ids)
    with ShardWriter(dest, rows_per_group=rows_per_group, columns=DECODED, task="bench.peer") as w:
        for start in range(0, len(ids), 1024):
            rows = ds.read_samples(ids[start:start + 1024], columns=["sample_id", *(c.name for c in DECODED)])
            w.add_many({"sample_id": int(sid), **{c.name: rows[c.name][i] for c in DECODED}}
                       for i, sid in enumerate(rows["sample_id"].tolist()))
        w.close()


def _apart(fn: str, *args: Any) -> None:
    """A bench.peer_lit function in a child process (litdata.optimize sets the process's start method)."""
    code = (f"import bench.peer_lit as p; p.{fn}(*{args!r})\n"
            "from orchestrator.process_exit import leave; leave(0)")  # no teardown for pyarrow's pools to abort in
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(_REPO))
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--sizes", default="56,224", help="decode resolutions")
    ap.add_argument("--rows-per-group", type=int, default=64)
    ap.add_argument("--columns", choices=("decoded", "all"), default="decoded",
                    help="what every arm's files hold: decoded, the input JPEG and the mask (the columns decoded); "
                         "all, every column of the mask_depth dataset (its depth maps and background ids too)")
    ap.add_argument("--latency-ms", type=float, default=20.0)
    ap.add_argument("--skip", default="", help="comma list of: local, gcs, litdata, litdata_parquet, ours_whole, "
                                               "resume")
    ap.add_argument("--repeat", type=int, default=1,
                    help="passes per arm and setting, taken in turns (ours, litdata, ..., ours, ...); the "
                         "figures are their medians, each pass's in `runs`")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))
    os.environ["ORCHESTRATOR_CACHE"] = "off"  # every arm reads from storage, not from our disk cache
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    from bench.peer_lit import have_litdata
    from storage.synth import synthesize

    sizes = [int(s) for s in args.sizes.split(",")]
    arms = [a for a in ARMS if a not in skip and not (a.startswith("litdata") and "litdata" in skip)]
    work = tempfile.mkdtemp(prefix="bench-peer-")
    out: dict[str, Any] = {"bench": "peer", "machine": machine(), "samples": args.samples, "batch": BATCH,
                           "loader_workers": WORKERS, "image_size": args.image_size,
                           "rows_per_group": args.rows_per_group, "columns": COLUMNS[args.columns],
                           "repeat": args.repeat,
                           "load_average_1m_at_start": round(os.getloadavg()[0], 2),
                           "cold_cache": "posix_fadvise(DONTNEED) on every file of the arm before each local pass"}
    if any(a.startswith("litdata") for a in arms) and not have_litdata():
        arms = [a for a in arms if not a.startswith("litdata")]
        out["litdata_note"] = ("litdata not installed: its arms skipped (pip install --no-deps litdata==0.2.76 "
                               "lightning-utilities==0.15.3 obstore==0.12.1 polars==2.1.0 polars-runtime-32==2.1.0; "
                               "then pip install boto3, which litdata imports)")
    out["arms"] = arms
    out["local_requests_note"] = ("ours: ShardDataset.requests(), every read the dataset made (manifest, "
                                  "index, ranges, shared values); litdata: the files in its index plus index.json, "
                                  "not traced (a lower bound for litdata_parquet, which reads a row group at a time)")
    out["gcs_gets_note"] = "every GET the fault proxy saw during the pass; gets_object_data: those with alt=media"
    out.update({f"{a}_note": NOTES[a] for a in arms if a in NOTES})
    t_all = time.perf_counter()
    try:
        paths = {"ours": os.path.join(work, "ours"), "litdata": os.path.join(work, "lit"),
                 "litdata_parquet": os.path.join(work, "pq")}
        full = paths["ours"] if args.columns == "all" else os.path.join(work, "full")
        synthesize(full, args.samples, seed=1, image_size=args.image_size,
                   rows_per_group=args.rows_per_group, workers=1)
        if args.columns == "decoded":
            decoded_copy(full, paths["ours"], args.rows_per_group)
        if "litdata" in arms:
            _apart("litdata_write", paths["ours"], paths["litdata"], args.samples)
        if "litdata_parquet" in arms:
            _apart("parquet_view", paths["ours"], paths["litdata_parquet"])
        local = {"ours_stream": "ours", "ours_whole": "ours", "litdata": "litdata",
                 "litdata_parquet": "litdata_parquet"}
        if "local" not in skip:
            def local_pass(arm: str, first: bool, res: int) -> dict[str, Any]:
                root = paths[local[arm]]
                got = measure(arm, root, res, "resume" not in skip and first, cold_root=root)
                if arm.startswith("litdata") and "error" not in got:
                    got["requests"] = len([f for f in os.listdir(root) if f.endswith((".bin", ".parquet"))]) + 1
                return got

            for res in sizes:
                runs = rounds(arms, args.repeat, lambda arm, first, res=res: local_pass(arm, first, res))
                out.update({f"local_{res}_{arm}": got for arm, got in runs.items()})
                ratios(out, "local", res)
        if "gcs" not in skip:
            out.update(_gcs(paths, arms, sizes, args.latency_ms, "resume" not in skip, args.repeat))
        wheres = [w for w in ("local", "gcs") if w not in skip]
        out["acceptance"] = acceptance(out, wheres, sizes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    out["bench_seconds"] = round(time.perf_counter() - t_all, 1)
    print(json.dumps(out) if args.json else json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        arm, uri, res, resume_at, out_path = sys.argv[2:7]
        Path(out_path).write_text(json.dumps(run_arm(arm, uri, int(res), int(resume_at))))
        from orchestrator.process_exit import leave

        leave(0)  # a SIGABRT in the interpreter's teardown (pyarrow's pools) would fail an arm that measured fine
    else:
        main()
