"""The worker's decode step: JPEGs, mask and depth of a batch decoded straight into it, then made
model tensors (flips, floats) by prepare_batch; the same values whatever the bytes' encoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workers.data
from storage import codec
from storage.shards import open_dataset
from storage.synth import synthesize
from workers.data import DataError, make_loader
from workers.tasks import mask_depth as wdata
from workers.tasks.mask_depth import ChunkSamples, RawBatch, prepare_batch

SIZE = 48
N = 12


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    uri = str(tmp_path_factory.mktemp("decode") / "ds")
    synthesize(uri, N, seed=4, image_size=SIZE, workers=1)
    ds = open_dataset(uri)
    return ds.read_samples(ds.sample_ids)


def _describe(sid: int) -> str:
    return f"dataset ds shard shards/shard-00000.parquet sample {sid}"


def _reference(rows, j: int, flip: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What one sample must become, from the codec's own decoders."""
    x = np.concatenate([codec.decode_jpeg(rows["fg_bg"][j]), codec.decode_jpeg(rows["bg"][j])], axis=2)
    x = (x.transpose(2, 0, 1).astype(np.float32) / 255 - wdata.INPUT_MEAN) / wdata.INPUT_STD
    m = codec.decode_mask(rows["mask"][j]).astype(np.float32) / 255
    d = codec.decode_depth(rows["depth"][j])
    if flip:
        x, m, d = x[..., ::-1], m[:, ::-1], d[:, ::-1]
    return x, m, d


def test_a_batch_holds_each_sample_decoded_flipped_and_scaled(rows):
    """Breaks if decode, flip or scaling of any of the three tensors drifts from the codec's images."""
    samples = ChunkSamples(rows, SIZE, _describe, hflip=0.5, flip_key=(1, 2, 3))
    batch = samples.__getitems__(list(range(N)))
    assert isinstance(batch, RawBatch) and 0 < int(batch.flip.sum()) < N
    x, m, d = prepare_batch(batch, "cpu")
    assert x.shape == (N, 6, SIZE, SIZE) and m.shape == d.shape == (N, 1, SIZE, SIZE)
    # batch untouched
    assert all(torch.equal(a, b) for a, b in zip((x, m, d), prepare_batch(batch, "cpu"), strict=True))
    for j in range(N):
        rx, rm, rd = _reference(rows, j, bool(batch.flip[j]))
        assert np.abs(x[j].numpy() - rx).max() < 1e-5
        assert np.array_equal(m[j, 0].numpy(), rm) and np.array_equal(d[j, 0].numpy(), rd)
    # flips depend on the key and the sample only: the same batch again, and sample by sample
    again = samples.__getitems__(list(range(N)))
    assert all(torch.equal(a, b) for a, b in zip(batch, again, strict=True))
    one_by_one = torch.utils.data.default_collate([samples[i] for i in range(N)])
    assert all(torch.equal(a, b) for a, b in zip(batch, one_by_one, strict=True))


def test_both_ways_of_flipping_give_the_same_batch(rows):
    """Breaks if the accelerator's static-shape flip and the CPU's per-sample one disagree."""
    batch = ChunkSamples(rows, SIZE, _describe, hflip=0.5, flip_key=(7,)).__getitems__(list(range(N)))
    kept = [t.clone() for t in batch]
    x = batch.rgb.permute(0, 1, 4, 2, 3).reshape(N, 6, SIZE, SIZE)
    a = wdata.mirror(x.clone(), batch.mask, batch.depth, batch.flip, static_shapes=False)
    b = wdata.mirror(x, batch.mask, batch.depth, batch.flip, static_shapes=True)
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not torch.equal(a[0], x) and torch.equal(a[0][~batch.flip], x[~batch.flip])
    assert torch.equal(a[1][batch.flip], batch.mask[batch.flip].flip(-1))
    assert all(torch.equal(p, q) for p, q in zip(batch, kept, strict=True))  # the batch itself is untouched


def test_worker_processes_give_the_same_batches(rows):
    """Breaks if decode_workers > 0 changes a batch (the Ray path and the local one must agree)."""
    samples = ChunkSamples(rows, SIZE, _describe, hflip=0.5, flip_key=(0, 1))
    order = [[3, 1, 2], [9, 8, 7, 6], [0, 5]]
    here = list(make_loader(samples, batch_sampler=order))
    there = list(make_loader(samples, batch_sampler=order, num_workers=2))
    for a, b in zip(here, there, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_png_masks_and_depth_make_the_same_batch_as_the_raw_format(rows):
    """Breaks if a dataset packed before the raw format trains on other values."""
    old = dict(rows)
    old["mask"] = [codec.encode_mask_png(codec.decode_mask(b)) for b in rows["mask"]]
    old["depth"] = [codec.encode_depth_png(codec.decode_depth(b)) for b in rows["depth"]]
    for res in (SIZE, 40):
        new_b = ChunkSamples(rows, res, _describe, hflip=0.5).__getitems__(list(range(N)))
        old_b = ChunkSamples(old, res, _describe, hflip=0.5).__getitems__(list(range(N)))
        assert all(torch.equal(a, b) for a, b in zip(new_b, old_b, strict=True))


def test_pillow_decodes_the_same_pixels_when_simplejpeg_is_missing(rows, monkeypatch):
    """Breaks if the fallback decoder changes the inputs at full size."""
    fast = ChunkSamples(rows, SIZE, _describe).__getitems__(list(range(N)))
    monkeypatch.setattr(workers.data, "simplejpeg", None)
    slow = ChunkSamples(rows, SIZE, _describe).__getitems__(list(range(N)))
    assert torch.equal(fast.rgb, slow.rgb)
    small = ChunkSamples(rows, 24, _describe).__getitems__([0])
    assert small.rgb.shape == (1, 2, 24, 24, 3)


def test_a_smaller_stage_resizes_every_image(rows):
    """Breaks if a stage below the stored size gets wrong shapes, a blended mask or depth off scale."""
    x, m, d = prepare_batch(ChunkSamples(rows, 24, _describe, hflip=0.5).__getitems__(list(range(N))), "cpu")
    assert x.shape == (N, 6, 24, 24) and m.shape == d.shape == (N, 1, 24, 24)
    assert set(torch.unique(m).tolist()) == {0.0, 1.0}
    full = np.stack([codec.decode_depth(b) for b in rows["depth"]])
    assert abs(float(d.mean()) - float(full.mean())) < 0.01


def test_bad_images_fail_naming_the_sample(rows):
    """Breaks if a corrupt JPEG, a truncated depth map or a mask of the wrong size trains, or the
    error does not say which sample and what."""
    bad = {k: list(v) if isinstance(v, list) else v for k, v in rows.items()}
    bad["fg_bg"][2] = b"\xff\xd8\xff\xe0 this is not a jpeg"
    bad["depth"][4] = bad["depth"][4][:-3]
    bad["mask"][6] = codec.encode_mask(np.zeros((SIZE - 8, SIZE), np.uint8))
    samples = ChunkSamples(bad, SIZE, _describe)
    for i, words in ((2, ("sample 2", "fg_bg JPEG cannot be decoded")), (4, ("sample 4", "depth", "truncated")),
                     (6, ("sample 6", "mask is 40x48", "same size"))):
        with pytest.raises(DataError) as err:
            samples.__getitems__([0, i])
        assert all(w in str(err.value) for w in words), str(err.value)
