"""Omniglot (Lake et al. 2015) as episodic N-way K-shot classification.

Layout read (what torchvision's download produces, and the copy in ``../shared/omniglot``)::

    root/omniglot-py/images_background/<Alphabet>/characterNN/*.png   (30 alphabets, 964 characters)
    root/omniglot-py/images_evaluation/<Alphabet>/characterNN/*.png   (20 alphabets, 659 characters)

Every image is decoded once (PIL, LANCZOS resize to ``image_size``, as the iMAML/MAML code) into one uint8
tensor [num_images, 1, S, S], kept in memory for the process and optionally cached on disk as a ``.pt``
file in ``cache_dir`` (default ``$IMAML_CACHE_DIR`` or ``~/.cache/lightning_imaml``; never next to the data,
which may be read-only). Polarity: the PNGs are black strokes on white; we invert so stroke = 1.0 and
background = 0.0 (zero background keeps zero-padding in the conv net neutral).

Splits (class = character):
* ``"paper"``: the 1623 characters in a permutation seeded by ``split_seed``; the first 1100 meta-train,
  the next 100 validation (held out of the paper's 1200 meta-training characters), the last 423 meta-test.
* ``"alphabets"``: background alphabets for meta-train and validation, evaluation alphabets for meta-test;
  ``val_alphabets`` background alphabets (chosen by a ``split_seed`` permutation) are held out whole for
  validation, so validation measures transfer to unseen alphabets like the test split does.

With ``rotations=True`` every meta-training character also appears rotated by 90/180/270 degrees as three
new classes (Santoro et al. 2016); validation and test use unrotated characters only.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from datamodules.episodic import ClassificationTaskSampler, EpisodicDataModule, check_positive
from lightning_imaml.errors import DataNotFoundError, InvalidSettingError

FOLDER = "omniglot-py"
BACKGROUND, EVALUATION = "images_background", "images_evaluation"
# Same source and checksums as torchvision.datasets.Omniglot.
URL_PREFIX = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
ZIPS_MD5 = {BACKGROUND: "68d2efa1b9178cc56df9314c21c6e718", EVALUATION: "6b91aef0f799c5bb55b94e3f2daec811"}
PAPER_TRAIN, PAPER_VAL = 1100, 100  # + the rest (423 of 1623) for meta-test

# Decoded tensors per (root, image_size) for this process, so a second data module does not decode again.
_MEMO: dict[tuple[str, int], tuple[Tensor, Tensor, Tensor, list[str]]] = {}
_INDEX_MEMO: dict[str, tuple[list[str], list[bool], list[list[Path]]]] = {}


def default_root() -> str:
    """``$IMAML_OMNIGLOT_ROOT``, else ``../shared/omniglot`` relative to the repository root."""
    env = os.environ.get("IMAML_OMNIGLOT_ROOT")
    if env:
        return env
    return str(Path(__file__).resolve().parents[1].parent / "shared" / "omniglot")


def default_cache_dir() -> str:
    return os.environ.get("IMAML_CACHE_DIR") or str(Path.home() / ".cache" / "lightning_imaml")


def missing_message(root: Path) -> str:
    return (
        f"Omniglot not found under root={str(root)!r}: expected {root / FOLDER / BACKGROUND}/<Alphabet>/"
        f"characterNN/*.png and {root / FOLDER / EVALUATION}/... . Set IMAML_OMNIGLOT_ROOT or root= to a "
        f"folder with that layout, or pass download=True to fetch {BACKGROUND}.zip and {EVALUATION}.zip "
        f"from {URL_PREFIX}."
    )


def download_omniglot(root: str | Path) -> None:
    """Fetch and unpack the two official zips (md5-checked) into ``root/omniglot-py``."""
    from torchvision.datasets.utils import download_and_extract_archive

    root = Path(root).expanduser()
    for name, md5 in ZIPS_MD5.items():
        if (root / FOLDER / name).is_dir():
            continue
        try:
            download_and_extract_archive(
                f"{URL_PREFIX}/{name}.zip", download_root=str(root / FOLDER), filename=f"{name}.zip", md5=md5
            )
        except Exception as err:  # network, checksum or extraction failure: say what to do instead
            raise RuntimeError(f"Downloading {name}.zip failed ({err}). {missing_message(root)}") from err


def index_characters(root: str | Path) -> tuple[list[str], list[bool], list[list[Path]]]:
    """Sorted character ids "Alphabet/characterNN", whether each is a background character, and its PNGs.

    Memoised per resolved root for the process: listing 32k files costs ~1 s, and every data module
    instance (tests, CLI, benchmarks) would otherwise list again.
    """
    key = str(Path(root).expanduser().resolve())
    if key not in _INDEX_MEMO:
        _INDEX_MEMO[key] = _list_characters(Path(root).expanduser())
    return _INDEX_MEMO[key]


def _list_characters(root: Path) -> tuple[list[str], list[bool], list[list[Path]]]:
    base = root / FOLDER
    for name in (BACKGROUND, EVALUATION):
        if not (base / name).is_dir():
            raise DataNotFoundError(missing_message(root))
    entries = []
    for name in (BACKGROUND, EVALUATION):
        for alphabet in sorted(p for p in (base / name).iterdir() if p.is_dir()):
            for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
                files = sorted(char.glob("*.png"))
                if files:
                    entries.append((f"{alphabet.name}/{char.name}", name == BACKGROUND, files))
    if not entries:
        raise DataNotFoundError(
            f"root={str(root)!r} holds no Omniglot images (*.png). {missing_message(root)}"
        )
    entries.sort(key=lambda e: e[0])
    return [e[0] for e in entries], [e[1] for e in entries], [e[2] for e in entries]


def decode_image(path: Path, image_size: int) -> np.ndarray:
    """uint8 [S, S], stroke 255 / background 0, LANCZOS-resized. ValueError naming the file if unreadable."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("L").resize((image_size, image_size), Image.LANCZOS)
            return 255 - np.asarray(im, dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError) as err:
        raise ValueError(f"cannot read Omniglot image {path}: {err}") from err


def decode_all(
    files: list[list[Path]], image_size: int, threads: int | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Decode every PNG once: images uint8 [n, 1, S, S], class_table int64 [classes, max] (-1 pad), counts."""
    flat = [p for group in files for p in group]
    threads = threads or min(4, os.cpu_count() or 1)
    # PIL releases the GIL while decoding/resampling, so threads help a little without process start-up cost.
    with ThreadPoolExecutor(threads) as pool:
        arrays = list(pool.map(lambda p: decode_image(p, image_size), flat, chunksize=256))
    images = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
    counts = torch.tensor([len(g) for g in files], dtype=torch.int64)
    table = torch.full((len(files), int(counts.max())), -1, dtype=torch.int64)
    start = 0
    for c, n in enumerate(counts.tolist()):
        table[c, :n] = torch.arange(start, start + n)
        start += n
    return images, table, counts


def load_images(
    root: str | Path, image_size: int, cache_dir: str | None, use_cache: bool
) -> tuple[Tensor, Tensor, Tensor, list[str]]:
    """(images, class_table, counts, characters) for every character, via memo, disk cache, or decoding."""
    root = Path(root).expanduser().resolve()
    key = (str(root), image_size)
    if key in _MEMO:
        return _MEMO[key]
    characters, _, files = index_characters(root)
    n_files = sum(len(f) for f in files)
    cache_path = None
    if use_cache:
        digest = hashlib.sha1(f"{root}|{image_size}|{n_files}|{len(characters)}".encode()).hexdigest()[:16]
        cache_path = (
            Path(cache_dir or default_cache_dir()).expanduser() / f"omniglot_{image_size}_{digest}.pt"
        )
        if cache_path.is_file():
            try:
                blob = torch.load(cache_path, weights_only=True)
                if blob["characters"] == characters and blob["images"].shape[0] == n_files:
                    _MEMO[key] = (blob["images"], blob["class_table"], blob["counts"], characters)
                    return _MEMO[key]
            except Exception:  # stale or corrupt cache: decode again and overwrite it
                pass
    images, table, counts = decode_all(files, image_size)
    if cache_path is not None:
        try:
            cache_path.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache_path.with_suffix(f".tmp{os.getpid()}")
            torch.save(
                {"images": images, "class_table": table, "counts": counts, "characters": characters}, tmp
            )
            os.replace(tmp, cache_path)  # atomic: concurrent ranks never read a half-written file
        except OSError:
            pass  # an unwritable cache only costs a re-decode next time
    _MEMO[key] = (images, table, counts, characters)
    return _MEMO[key]


class OmniglotDataModule(EpisodicDataModule):
    """Episodic Omniglot: batches of N-way K-shot tasks, images float32 [B, N*K, 1, S, S] in [0, 1].

    Args:
        root: folder holding ``omniglot-py/``; default ``$IMAML_OMNIGLOT_ROOT`` or ``../shared/omniglot``.
        split: "paper" (1100/100/423 characters, seeded) or "alphabets" (background/evaluation alphabets).
        rotations: add 90/180/270-degree rotations as new classes to meta-training only.
        download: fetch the official zips when the folders are missing (never needed for ../shared).
        image_size: side of the square LANCZOS-resized images (28 as the paper).
        split_seed: seed of the character (paper) or alphabet (alphabets) permutation; independent of
            ``seed`` so that changing the task seed keeps the class split.
        val_alphabets: background alphabets held out for validation with split="alphabets".
        cache_dir: where to cache the decoded tensor; default ``$IMAML_CACHE_DIR`` or
            ``~/.cache/lightning_imaml``.
        use_cache: read/write that cache (decoding the 32,460 PNGs takes ~10 s on one core).
        Remaining arguments: see :class:`EpisodicDataModule`.
    """

    def __init__(
        self,
        root: str | None = None,
        n_way: int = 5,
        k_shot: int = 1,
        k_query: int = 15,
        meta_batch_size: int = 32,
        num_workers: int = 0,
        seed: int = 0,
        val_tasks: int = 600,
        test_tasks: int = 600,
        eval_meta_batch_size: int | None = None,
        split: Literal["paper", "alphabets"] = "paper",
        rotations: bool = True,
        download: bool = False,
        image_size: int = 28,
        split_seed: int = 0,
        val_alphabets: int = 5,
        cache_dir: str | None = None,
        use_cache: bool = True,
    ) -> None:
        super().__init__(
            n_way,
            k_shot,
            k_query,
            meta_batch_size,
            num_workers,
            seed,
            val_tasks,
            test_tasks,
            eval_meta_batch_size,
        )
        check_positive(image_size=image_size, val_alphabets=val_alphabets)
        if split not in ("paper", "alphabets"):
            raise ValueError(f"split must be 'paper' or 'alphabets', got split={split!r}")
        self.root = root if root is not None else default_root()
        self.split, self.rotations, self.download = split, rotations, download
        self.image_size, self.split_seed, self.val_alphabets = image_size, split_seed, val_alphabets
        self.cache_dir, self.use_cache = cache_dir, use_cache
        self._split_ids: dict[str, list[int]] | None = None

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def prepare_data(self) -> None:
        root = Path(self.root).expanduser()
        if self.download and not all((root / FOLDER / n).is_dir() for n in ZIPS_MD5):
            download_omniglot(root)

    def _ensure_root(self) -> None:
        root = Path(self.root).expanduser()
        if not all((root / FOLDER / n).is_dir() for n in ZIPS_MD5):
            if self.download:
                download_omniglot(root)
            else:
                raise DataNotFoundError(missing_message(root))

    def _splits(self) -> dict[str, list[int]]:
        """Character indices (into the sorted character list) of each split, before rotations."""
        if self._split_ids is None:
            self._ensure_root()
            characters, background, _ = index_characters(self.root)
            generator = torch.Generator().manual_seed(self.split_seed)
            if self.split == "paper":
                if len(characters) <= PAPER_TRAIN + PAPER_VAL:
                    raise InvalidSettingError(
                        f"split='paper' needs more than {PAPER_TRAIN + PAPER_VAL} characters, "
                        f"root={self.root!r} has {len(characters)}"
                    )
                perm = torch.randperm(len(characters), generator=generator).tolist()
                ids = {
                    "train": perm[:PAPER_TRAIN],
                    "val": perm[PAPER_TRAIN : PAPER_TRAIN + PAPER_VAL],
                    "test": perm[PAPER_TRAIN + PAPER_VAL :],
                }
            else:
                alphabets = sorted(
                    {c.split("/")[0] for c, bg in zip(characters, background, strict=True) if bg}
                )
                if self.val_alphabets >= len(alphabets):
                    raise InvalidSettingError(
                        f"val_alphabets={self.val_alphabets} but there are only {len(alphabets)} background "
                        f"alphabets (at least one must stay for meta-training)"
                    )
                order = torch.randperm(len(alphabets), generator=generator).tolist()
                val_set = {alphabets[i] for i in order[: self.val_alphabets]}
                ids = {"train": [], "val": [], "test": []}
                for i, (c, bg) in enumerate(zip(characters, background, strict=True)):
                    ids["test" if not bg else "val" if c.split("/")[0] in val_set else "train"].append(i)
            self._split_ids = {k: sorted(v) for k, v in ids.items()}
            self._characters = characters
        return self._split_ids

    def characters(self, split: str) -> list[str]:
        """Sorted "Alphabet/characterNN" ids of "train", "val" or "test" (before rotations)."""
        if split not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {split!r}")
        ids = self._splits()[split]
        return sorted(self._characters[i] for i in ids)

    def build_sampler(self, split: str) -> ClassificationTaskSampler:
        ids = self._splits()[split]
        images, table, counts, characters = load_images(
            self.root, self.image_size, self.cache_dir, self.use_cache
        )
        assert characters == self._characters, "character listing changed between indexing and decoding"
        sel = torch.tensor(ids, dtype=torch.int64)
        return ClassificationTaskSampler(
            images,
            table[sel],
            counts[sel],
            self.n_way,
            self.k_shot,
            self.k_query,
            rotations=self.rotations and split == "train",
            split=split,
        )
