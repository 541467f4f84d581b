"""MNIST, Fashion-MNIST and CIFAR-10 read with HF ``datasets``, with block-masked near-duplicates.

The data is looked for, in order: a local ``source`` path, the folder ``$UNLEARN_FAST_DATA/<name>``,
the HF hub cache (offline), and, only with ``download=True``, the hub itself. Nothing is fetched
unless asked for, so tests and air-gapped machines never wait on the network.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch

from ..validation import check_bool, check_int_in
from .blockmask import make_blockmask_dataset
from .similar_dataset import SimilarDataset

DATA_ENV = "UNLEARN_FAST_DATA"
SPLITS = ("train", "test")
# A local path (folder or file) or a mapping split → data file(s).
Source = Union[str, os.PathLike, Mapping[str, Any]]


@dataclass(frozen=True)
class HFSource:
    """Where a dataset lives on the HF hub and how its columns are named."""

    hub_id: str
    image_column: str
    label_column: str
    num_classes: int
    channels: int


HF_SOURCES: dict[str, HFSource] = {
    "mnist-blockmask": HFSource("ylecun/mnist", "image", "label", 10, 1),
    "fashion-mnist-blockmask": HFSource("zalando-datasets/fashion_mnist", "image", "label", 10, 1),
    "cifar10-blockmask": HFSource("uoft-cs/cifar10", "img", "label", 10, 3),
}


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:
        raise ImportError('the HF-backed datasets need the `datasets` package: pip install "unlearn-fast[hf]"') from err
    return datasets


def _load_local(datasets: Any, source: Source) -> Any:
    """A DatasetDict (or whatever ``datasets`` returns) from a local folder, file or split → file(s) map."""
    # Data files go through load_dataset(<local folder>, data_files=...), never a builder name such as
    # "parquet": datasets pings the hub to count loads of named builders, even for local files.
    if isinstance(source, Mapping):
        files = {split: [str(p) for p in ([f] if isinstance(f, (str, os.PathLike)) else f)] for split, f in source.items()}
        missing = [p for paths in files.values() for p in paths if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(f"source files do not exist: {missing}")
        folder = os.path.commonpath([str(Path(p).resolve().parent) for paths in files.values() for p in paths])
        return datasets.load_dataset(folder, data_files=files)
    path = Path(source).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"source={str(source)!r} does not exist")
    if path.is_file():
        return datasets.load_dataset(str(path.resolve().parent), data_files=str(path))
    # save_to_disk output must go through load_from_disk: load_dataset would read its arrow shards as one split.
    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return datasets.load_from_disk(str(path))
    return datasets.load_dataset(str(path))


def _cached_snapshot(hub_id: str) -> str | None:
    """The hub-cache snapshot folder of ``hub_id`` if it was fetched before; never goes online."""
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(hub_id, repo_type="dataset", local_files_only=True)
    except (ImportError, OSError, ValueError):  # LocalEntryNotFoundError is an OSError
        return None


def _find(name: str, spec: HFSource, source: Source | None, download: bool, datasets: Any) -> tuple[Any, str]:
    """(loaded splits, where they came from) following the lookup order of the module docstring."""
    if source is None and os.environ.get(DATA_ENV):
        candidate = Path(os.environ[DATA_ENV]).expanduser() / name
        if candidate.exists():
            source = candidate
    if source is not None:
        return _load_local(datasets, source), str(dict(source) if isinstance(source, Mapping) else source)
    snapshot = _cached_snapshot(spec.hub_id)
    if snapshot is not None:
        return _load_local(datasets, snapshot), snapshot
    if download:
        return datasets.load_dataset(spec.hub_id), spec.hub_id
    raise FileNotFoundError(
        f"no local copy of {name} ({spec.hub_id}) was found and download=False. Provide the data by one of:\n"
        f"  - source=DIR: a folder written by datasets.DatasetDict.save_to_disk, or a folder of parquet files "
        f"with columns {spec.image_column!r}/{spec.label_column!r} and splits train/test "
        f"(e.g. DIR/data/train-00000-of-00001.parquet, DIR/data/test-00000-of-00001.parquet);\n"
        f"  - the environment variable {DATA_ENV}=ROOT with the data in ROOT/{name};\n"
        f"  - download=True to fetch {spec.hub_id} from the HF hub once (it is then reused from the hub cache).\n"
        "On the command line: unlearn-fast study --dataset NAME --source DIR, or --download."
    )


def _check_splits(data: Any, spec: HFSource) -> None:
    splits = list(data.keys()) if hasattr(data, "keys") else []
    missing = [s for s in SPLITS if s not in splits]
    if missing:
        found = splits or f"a single {type(data).__name__} (no named splits)"
        raise ValueError(f"{spec.hub_id} data needs splits {list(SPLITS)}; missing {missing}, found {found}")
    for split in SPLITS:
        columns = data[split].column_names
        absent = [c for c in (spec.image_column, spec.label_column) if c not in columns]
        if absent:
            raise ValueError(f"split {split!r} lacks column(s) {absent}; its columns are {columns}")


def _subset(n: int, size: int | None, option: str, generator: torch.Generator) -> list[int] | None:
    """Sorted random indices of ``size`` of ``n`` rows, or None for all of them."""
    if size is None:
        return None
    check_int_in(size, option, 1, n, hint="or None for the whole split")
    # Sorted so the rows are read in file order, which is faster for arrow tables.
    return sorted(torch.randperm(n, generator=generator)[:size].tolist())


def _decode(split: Any, spec: HFSource, indices: list[int] | None, datasets: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [N, C, H, W] float32 in [0, 1] and labels [N] int64 of one split."""
    split = split.select_columns([spec.image_column, spec.label_column])
    if indices is not None:
        split = split.select(indices)
    # Decoding with a fixed PIL mode makes every image one shape, so numpy stacks them in one pass.
    mode = "L" if spec.channels == 1 else "RGB"
    try:
        split = split.cast_column(spec.image_column, datasets.Image(mode=mode))
    except (TypeError, ValueError, NotImplementedError) as err:
        raise ValueError(f"column {spec.image_column!r} does not hold images: {split.features[spec.image_column]}") from err
    arrays = split.with_format("numpy")[:]
    images, labels = arrays[spec.image_column], np.asarray(arrays[spec.label_column])
    if images.dtype == object or images.ndim != (3 if spec.channels == 1 else 4):
        raise ValueError(f"images of {spec.hub_id} differ in size or mode; got an array of shape {images.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise ValueError(f"labels must lie in [0, {spec.num_classes - 1}]; found [{labels.min()}, {labels.max()}]")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).div_(255.0)
    x = x.unsqueeze(1) if spec.channels == 1 else x.permute(0, 3, 1, 2).contiguous()
    return x, torch.from_numpy(labels.astype(np.int64))


def hf_blockmask(
    name: str,
    *,
    source: Source | None = None,
    download: bool = False,
    train_size: int | None = None,
    test_size: int | None = None,
    targets: int,
    copies: int,
    block: int,
    fraction: float,
    seed: int,
) -> SimilarDataset:
    """Build ``name`` (a key of :data:`HF_SOURCES`) with ``copies`` block-masked copies of ``targets`` images.

    Args:
        source: a ``save_to_disk`` folder, a folder of data files (parquet, arrow, ...), one data file,
            or a mapping split → file(s); see the module docstring for the fallbacks when None.
        download: allow fetching from the HF hub when no local copy is found.
        train_size, test_size: a seeded random subset of that many rows (None = the whole split).
        targets, copies, block, fraction, seed: as in :func:`make_blockmask_dataset`.

    Returns:
        A SimilarDataset with train inputs [N + targets·copies, C, H, W] and test inputs [M, C, H, W],
        float32 in [0, 1] (C = 1 for MNIST / Fashion-MNIST, 3 for CIFAR-10), labels int64.
    """
    if name not in HF_SOURCES:
        raise ValueError(f"unknown HF dataset {name!r}; valid names: {', '.join(HF_SOURCES)}")
    spec = HF_SOURCES[name]
    download = check_bool(download, "download")
    datasets = _import_datasets()
    data, origin = _find(name, spec, source, download, datasets)
    _check_splits(data, spec)
    generator = torch.Generator().manual_seed(int(seed))
    train_idx = _subset(len(data["train"]), train_size, "train_size", generator)
    test_idx = _subset(len(data["test"]), test_size, "test_size", generator)
    tr_x, tr_y = _decode(data["train"], spec, train_idx, datasets)
    te_x, te_y = _decode(data["test"], spec, test_idx, datasets)
    return make_blockmask_dataset(
        name, tr_x, tr_y, te_x, te_y,
        targets=targets, copies=copies, block=block, fraction=fraction, seed=seed, num_classes=spec.num_classes,
        extra_info={"source": origin, "hub_id": spec.hub_id, "train_size": train_size, "test_size": test_size},
    )
