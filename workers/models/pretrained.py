"""`model.init_from: PATH`: start a model from saved weights (no downloads: a local file).

Two kinds of file are accepted, both loaded with `torch.load(weights_only=True)`, as a plain
state_dict or one held under "state_dict" or "model" (a "module." prefix, from
DistributedDataParallel, is dropped):
  - a checkpoint of the whole model: its keys equal the model's; loaded strictly;
  - a checkpoint that holds every key of the model's `encoder` (torchvision's names, as a
    torchvision resnet18 or mobilenet_v2 state_dict does, or the same keys under "encoder.", as
    another model of this zoo with the same encoder has): the encoder is loaded strictly and the
    rest of the file (fc.*, classifier.*, another decoder) is ignored.
BatchNorm's `num_batches_tracked` may be absent (older torchvision files lack it). Anything else
is a ValueError that names the file and says what did not match.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from storage.checkpoints import STATE_FILE

OPTIONAL_SUFFIX = "num_batches_tracked"


def _examples(keys: set[str], n: int = 3) -> str:
    shown = sorted(keys)[:n]
    more = "" if len(keys) <= n else ", ..."
    return ", ".join(shown) + more


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise ValueError(
            f"model.init_from: {path} does not exist; give the path of a saved state_dict"
        )
    if not path.is_file():
        raise ValueError(
            f"model.init_from: {path} is not a file; give the path of a saved state_dict "
            f"(of a run checkpoint folder, its {STATE_FILE})"
        )
    try:
        obj: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle, zip or weights-only error: all mean "not a checkpoint"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"model.init_from: {path} is not a torch checkpoint that loads with weights_only=True "
            f"({type(exc).__name__}: {reason[:160]})"
        ) from exc
    for key in ("state_dict", "model"):
        if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    if (
        not isinstance(obj, Mapping)
        or not obj
        or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    ):
        raise ValueError(
            f"model.init_from: {path} holds no state_dict (a non-empty mapping of names to "
            f"tensors, plain or under 'state_dict' or 'model'); got {type(obj).__name__}"
        )
    sd = dict(obj)
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


def _missing(wanted: Mapping[str, Tensor], have: Mapping[str, Tensor]) -> set[str]:
    return {k for k in wanted if k not in have and not k.endswith(OPTIONAL_SUFFIX)}


def _load(module: nn.Module, sd: dict[str, Tensor], path: Path, what: str) -> None:
    own = module.state_dict()
    bad = {k for k in sd if k in own and tuple(sd[k].shape) != tuple(own[k].shape)}
    if bad:
        first = sorted(bad)[0]
        raise ValueError(
            f"model.init_from: {path} fits the {what} by name but {len(bad)} tensor(s) differ in "
            f"shape (e.g. {first}: file {tuple(sd[first].shape)}, "
            f"model {tuple(own[first].shape)}); "
            f"check the model's options (in_channels, width, num_classes) against the file's"
        )
    module.load_state_dict(sd, strict=True)


def init_from(model: nn.Module, path: str | os.PathLike[str]) -> str:
    """Load weights from `path` into `model` (see the module doc); returns "model" or "encoder",
    what was loaded. Raises ValueError naming the path when the file does not fit."""
    path = Path(path)
    sd = _read_state_dict(path)
    own = model.state_dict()
    missing, unexpected = _missing(own, sd), set(sd) - set(own)
    if not missing and not unexpected:
        _load(model, sd, path, "model")
        return "model"

    encoder = getattr(model, "encoder", None)
    if isinstance(encoder, nn.Module):
        enc_keys = encoder.state_dict()
        for prefix in ("", "encoder."):
            picked = {k: sd[prefix + k] for k in enc_keys if prefix + k in sd}
            if picked and not _missing(enc_keys, picked):
                _load(encoder, picked, path, "encoder")
                return "encoder"
        enc_missing = _missing(enc_keys, sd)
        if len(enc_missing) < len(missing):
            missing, unexpected = enc_missing, set(sd) - set(enc_keys)

    target = f"{type(model).__name__}" + (
        " or its encoder" if isinstance(encoder, nn.Module) else ""
    )
    raise ValueError(
        f"model.init_from: {path} does not fit {target}: {len(missing)} key(s) missing "
        f"(e.g. {_examples(missing) or '-'}), {len(unexpected)} unexpected "
        f"(e.g. {_examples(unexpected) or '-'}); give a checkpoint of this model, or one holding "
        f"every encoder key under the torchvision names"
    )
