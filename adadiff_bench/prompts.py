"""Text prompts of a text-to-image network as precomputed CLIP token features: `[sampling] prompts = "PATH.npz"`.

The file holds two float arrays (read with `np.load(allow_pickle=False)`):

    contexts        N x 77 x 768   one prompt's CLIP ViT-L/14 token features per row (the preset's
                                   num_clip_token x clip_dim)
    empty_context   77 x 768       the empty prompt's tokens: guidance's unconditional pass (needed
                                   only when guidance > 1)

U-ViT's scripts write the same arrays one per file (`scripts/extract_mscoco_feature.py`: a folder
of `{image}_{caption}.npy`, each 77 x 768 float32; `scripts/extract_empty_feature.py`:
`empty_context.npy`); `pack_feature_folder` (or `python -m adadiff_bench.prompts FOLDER OUT.npz`)
packs such a folder into one file, the first caption of each image in image order.

Sample i takes prompt i mod N, so the prompts a sample sees depend on its index alone (never on
the batch size or the process count). U-ViT's evaluation draws one caption at random per image
from a shuffled loader instead; over 30,000 or 50,000 samples both cover the validation prompts.
"""
from __future__ import annotations

import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .results import ARCHIVE_ERRORS

CONTEXTS = "contexts"
EMPTY_CONTEXT = "empty_context"
ZIP_MAGIC = b"PK\x03\x04"  # how an .npz (a zip archive) starts
HOW_TO_MAKE = ("pack U-ViT's extract_mscoco_feature.py / extract_empty_feature.py output with "
               "`python -m adadiff_bench.prompts FOLDER OUT.npz`")


@dataclass(frozen=True)
class PromptSet:
    """Every prompt's context tokens (N x L x D, as stored: float16 halves the memory) and the empty prompt's
    (L x D, or None)."""
    contexts: torch.Tensor
    empty_context: torch.Tensor | None

    def for_rows(self, rows: Sequence[int]) -> torch.Tensor:
        """The context tokens of samples `rows` (float32): sample i takes prompt i mod N."""
        return self.contexts[torch.as_tensor(np.asarray(rows, dtype=np.int64) % len(self.contexts))].float()


def require_prompt_file(path: str | Path, where: str = "") -> None:
    """The prompt file is there (checked with the other files a run names, before any is loaded)."""
    if not Path(path).is_file():
        raise UserError(f"{where + ': ' if where else ''}[sampling] prompts {str(path)!r} not found; "
                        f"{HOW_TO_MAKE} and point the config at it")


def read_prompt_file(path: str | Path) -> dict[str, np.ndarray]:
    """The arrays of a prompt file, never unpickling; one line naming the file when it is missing or damaged."""
    path = Path(path)
    require_prompt_file(path)
    try:
        archive = np.load(path, allow_pickle=False)
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise UserError(f"[sampling] prompts {str(path)!r} is a single .npy array, not an .npz with "
                            f"{CONTEXTS} and {EMPTY_CONTEXT}; {HOW_TO_MAKE}")
        with archive:
            return {key: archive[key] for key in archive.files}
    except ValueError as exc:  # (numpy takes any file that is neither a zip nor an .npy for a pickle)
        pickled = "allow_pickle" in str(exc) and path.read_bytes()[:4] == ZIP_MAGIC
        what = "holds pickled objects (never loaded)" if pickled else "is not a readable .npz (ValueError)"
        raise UserError(f"[sampling] prompts {str(path)!r} {what}; {HOW_TO_MAKE}") from None
    except ARCHIVE_ERRORS as exc:
        raise UserError(f"[sampling] prompts {str(path)!r} is not a readable .npz ({type(exc).__name__}); "
                        f"{HOW_TO_MAKE}") from None


def checked_tokens(array: np.ndarray, shape: tuple[int, ...], key: str, path: str) -> torch.Tensor:
    """A float array of exactly `shape` (None: any length) as a tensor (float16 kept, wider floats as float32), else
    one line saying what differs."""
    expected = "x".join("N" if n is None else str(n) for n in shape)
    if array.ndim != len(shape) or any(n is not None and n != m for n, m in zip(shape, array.shape)):
        raise UserError(f"[sampling] prompts {path!r}: {key} has shape {'x'.join(map(str, array.shape)) or '()'}, "
                        f"but this network reads {expected} (tokens x clip_dim); extract them with its text encoder")
    if not np.issubdtype(array.dtype, np.floating):
        raise UserError(f"[sampling] prompts {path!r}: {key} holds {array.dtype}; expected float features")
    if array.size == 0 or not np.isfinite(array).all():
        raise UserError(f"[sampling] prompts {path!r}: {key} is empty or holds NaN or Inf; extract the features again")
    return torch.from_numpy(array if array.dtype == np.float16 else array.astype(np.float32))


def load_prompts(path: str | Path, num_tokens: int, clip_dim: int, need_empty: bool) -> PromptSet:
    """A prompt file for a network reading `num_tokens` x `clip_dim` contexts, checked (`need_empty`: under guidance)."""
    arrays, name = read_prompt_file(path), str(path)
    if CONTEXTS not in arrays or (need_empty and EMPTY_CONTEXT not in arrays):
        missing = CONTEXTS if CONTEXTS not in arrays else EMPTY_CONTEXT
        why = " (guidance's unconditional pass)" if missing == EMPTY_CONTEXT else ""
        raise UserError(f"[sampling] prompts {name!r} has no {missing} array{why} (found "
                        f"{', '.join(arrays) or 'none'}); {HOW_TO_MAKE}")
    contexts = checked_tokens(arrays[CONTEXTS], (None, num_tokens, clip_dim), CONTEXTS, name)
    empty = arrays.get(EMPTY_CONTEXT)
    return PromptSet(contexts, None if empty is None else
                     checked_tokens(empty, (num_tokens, clip_dim), EMPTY_CONTEXT, name))


def attach_prompts(model, path: str, guidance_on: bool, where: str) -> None:
    """Give a text-to-image network its prompts (`model.prompts`) and guidance's empty prompt (`model.null_context`);
    a text-to-image network without prompts, or prompts for a network that reads none, is one line."""
    reads_text = bool(getattr(model, "clip_dim", None))
    if reads_text and not path:
        raise UserError(f"{where}: [sampling] this is a text-to-image network; set prompts = \"PATH.npz\" (its "
                        f"prompts' CLIP token features); {HOW_TO_MAKE}")
    if path and not reads_text:
        raise UserError(f"{where}: [sampling] prompts are for a text-to-image network (a preset with clip_dim); "
                        "this one reads none: remove prompts")
    if not path:
        return
    try:
        prompts = load_prompts(path, model.num_clip_token, model.clip_dim, guidance_on)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    model.prompts = prompts
    model.null_context = prompts.empty_context


def prompt_condition(model, rows: Sequence[int]) -> torch.Tensor | None:
    """The condition of samples `rows` when `model` reads prompts (their context tokens), else None (labels are drawn)."""
    prompts = getattr(model, "prompts", None)
    return None if prompts is None else prompts.for_rows(rows)


# ---- packing U-ViT's feature folder -----------------------------------------------------------------------

def pack_feature_folder(folder: str | Path, out: str | Path) -> int:
    """One prompt file from U-ViT's feature folder: `{image}_0.npy` of each image, in image order, as `contexts`,
    and `empty_context.npy` (in the folder or its parent) as `empty_context`; returns the number of prompts."""
    folder, out = Path(folder), Path(out)
    if out.suffix != ".npz":
        raise UserError(f"{str(out)!r}: the prompt file is an .npz; name it OUT.npz")
    first_captions = sorted((int(m.group(1)), p) for p in folder.glob("*_0.npy")
                            if (m := re.fullmatch(r"(\d+)_0\.npy", p.name)))
    if not first_captions:
        raise UserError(f"{str(folder)!r} holds no {{image}}_0.npy caption features; point at U-ViT's "
                        "coco256_features/val folder")
    contexts = np.stack([np.load(p, allow_pickle=False) for _, p in first_captions]).astype(np.float32)
    arrays = {CONTEXTS: contexts}
    empty = next((p for p in (folder / "empty_context.npy", folder.parent / "empty_context.npy") if p.is_file()), None)
    if empty is not None:
        arrays[EMPTY_CONTEXT] = np.load(empty, allow_pickle=False).astype(np.float32)
    partial = out.with_name(f".{out.name}.partial")  # written whole, then renamed: never half a file under `out`
    with open(partial, "wb") as stream:
        np.savez(stream, **arrays)
    os.replace(partial, out)
    return len(contexts)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m adadiff_bench.prompts FEATURE_FOLDER OUT.npz")
    try:
        print(f"{pack_feature_folder(sys.argv[1], sys.argv[2])} prompts written to {sys.argv[2]}")
    except UserError as exc:
        sys.exit(f"error: {exc}")
