"""Re-make an embedding for another checkpoint from its recipe: Create's init text or seed, or a Merge expression.

Only embeddings made from a recipe can be re-made: the recipe is evaluated again on the other model's
token tables, and a table of differences (per encoder and per vector: cosine and mean absolute
difference against the original) shows how much the model changed them. A trained embedding has no
recipe (its vectors come from images); the comparison grid shows how it behaves on each checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from lib_ti.create import MAX_SEED, CreateArgs, create_embedding
from lib_ti.embedding import Embedding
from lib_ti.errors import EmbeddingFormatError, TIError, short_repr
from lib_ti.merge.evaluator import MergeContext, merge_to_embedding
from lib_ti.names import MAX_NAME_LENGTH, checkpoint_label, validate_name
from lib_ti.stats import Comparison, compare
from lib_ti.text.vocab import Vocabulary

logger = logging.getLogger(__name__)

Recipe = Literal["merge", "text", "random", "zeros"]
#: metadata our trainer writes (``trainer``, ``trained_encoders``, ``val_loss``) or a run's resume state
TRAINING_KEYS = ("trainer", "trained_encoders", "val_loss", "resume")
#: metadata that describes the original file rather than the recipe; not carried into the re-made one
FILE_KEYS = ("stored_name", "ignored_tensors", "transfer", "transfer_fit")
#: longest checkpoint part of a re-made embedding's name
SHORT_NAME_LENGTH = 40
_GRID_HINT = (
    "re-making is not possible for trained embeddings or files without a recipe; the comparison grid "
    "shows how the file behaves on each checkpoint instead"
)


class RemakeError(TIError, ValueError):
    """An embedding cannot be re-made (trained, or no recipe in its metadata)."""


@dataclass
class RemakeResult:
    embedding: Embedding
    recipe: Recipe
    #: per encoder and per vector: cosine and mean |Δ| of the re-made vectors against the original
    #: (None when the two share no encoder, e.g. an SD2 recipe re-made on SDXL)
    delta: Comparison | None
    warnings: list[str] = field(default_factory=list)


def recipe_of(emb: Embedding) -> Recipe:
    """How ``emb`` was made: ``merge``, ``text``, ``random`` (with its seed) or ``zeros``.

    Raises :class:`RemakeError` for a trained embedding (a step above 0, or training metadata) and for
    one whose metadata holds no complete recipe.
    """
    meta = emb.metadata
    trained = [k for k in TRAINING_KEYS if k in meta]
    if (emb.step is not None and emb.step != 0) or trained or "step" in meta:
        why = f"step {emb.step}" if emb.step else f"its metadata has {(trained or ['step'])[0]!r}"
        msg = f"{emb.name} was trained ({why}): {_GRID_HINT}"
        raise RemakeError(msg)
    if meta.get("merge_expression", "").strip():
        return "merge"
    mode = meta.get("init_mode")
    if mode == "text" and meta.get("init_text", "").strip():
        return "text"
    if mode == "random" and "init_seed" in meta:
        _seed(emb)
        return "random"
    if mode == "zeros":
        return "zeros"
    if mode == "random":
        msg = f"{emb.name} has a random init without its seed: {_GRID_HINT}"
    else:
        msg = (
            f"{emb.name} has no recipe (no init text or seed from Create, no Merge expression): {_GRID_HINT}"
        )
    raise RemakeError(msg)


def _seed(emb: Embedding) -> int:
    text = emb.metadata["init_seed"]
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed <= MAX_SEED:
        msg = (
            f"{emb.name}: its init_seed {short_repr(text)} is not a seed Create could have used: {_GRID_HINT}"
        )
        raise RemakeError(msg)
    return seed


def _without(ctx: MergeContext, names: set[str]) -> MergeContext:
    """``ctx`` without the embeddings ``names``: the original did not exist when its expression was first
    evaluated, and a word of the expression must not now be read as the original's (or the target's) name."""
    if not names.intersection(ctx.embeddings):
        return ctx
    kept = {n: e for n, e in ctx.embeddings.items() if n not in names}
    return dataclasses.replace(ctx, embeddings=kept)


def remake(
    emb: Embedding,
    vocabs: Mapping[str, Vocabulary],
    merge_ctx: MergeContext | None,
    new_name: str,
    *,
    checkpoint: str | None = None,
) -> RemakeResult:
    """Evaluate ``emb``'s recipe again on another model: ``vocabs`` (Create's view of it) or ``merge_ctx``
    (Merge's) come from that model.

    The result keeps the original's metadata (less what described the original file) and adds
    ``remade_from`` (the original's name), ``remade_from_checkpoint`` (the checkpoint recorded in the
    original, if any) and ``remade_for`` (``checkpoint``, the target's title, if given). A random init is
    re-made from its recorded seed: the same draw as Create with that seed on the target, so on a model
    of the same kind the directions are the original's and only the norms follow the new vocabulary.
    A recipe of another kind makes the target's kind (an SD1 init text re-made on SDXL gives both halves).
    """
    validate_name(new_name)
    recipe = recipe_of(emb)
    warnings: list[str] = []
    if recipe == "merge":
        if merge_ctx is None:
            msg = f"re-making {emb.name} evaluates its Merge expression and needs the target model's merge context"
            raise RemakeError(msg)
        made = merge_to_embedding(
            emb.metadata["merge_expression"], _without(merge_ctx, {emb.name, new_name}), new_name
        )
    else:
        if not vocabs:
            msg = f"re-making {emb.name} needs the target model's text encoders"
            raise RemakeError(msg)
        args = CreateArgs(
            new_name,
            emb.num_vectors,
            recipe,
            emb.metadata.get("init_text", "*"),
            seed=_seed(emb) if recipe == "random" else None,
        )
        result = create_embedding(args, vocabs)
        made, warnings = result.embedding, result.warnings
    metadata = {k: v for k, v in emb.metadata.items() if k not in FILE_KEYS}
    metadata.update(made.metadata)
    metadata["remade_from"] = emb.name
    origin = emb.sd_checkpoint_name or emb.sd_checkpoint
    if origin:
        metadata["remade_from_checkpoint"] = origin
    if checkpoint:
        metadata["remade_for"] = checkpoint
    out = Embedding(new_name, made.vectors, step=made.step, metadata=metadata)
    try:
        delta: Comparison | None = compare(emb, out)
    except EmbeddingFormatError as e:
        delta = None
        warnings.append(f"no table of differences: {e}")
    logger.info(
        "re-made %s (%s) as %s (%s) from its %s recipe", emb.name, emb.kind, new_name, out.kind, recipe
    )
    return RemakeResult(out, recipe, delta, warnings)


def checkpoint_short_name(title: str) -> str:
    """A checkpoint title as a name part: no folder, model extension or `` [hash]``; characters other
    than letters, digits, ``-``, ``_`` and ``.`` become ``_``; at most ``SHORT_NAME_LENGTH`` long.

    ``"SDXL/juggernautXL_v9 (rundiffusion).safetensors [c9e3e68f89]"`` -> ``"juggernautXL_v9_rundiffusion"``.
    May be empty (a title of symbols only).
    """
    text = "".join(c if c.isalnum() or c in "-_." else "_" for c in checkpoint_label(title))
    text = re.sub(r"\.{2,}", ".", re.sub(r"_{2,}", "_", text))
    return text.strip("._-")[:SHORT_NAME_LENGTH].rstrip("._-")


def remake_name(name: str, checkpoint_title: str) -> str:
    """``<name>-<checkpoint short name>`` (:func:`checkpoint_short_name`), a valid embedding name.

    The name is shortened when both would pass the name length limit; a title with nothing usable gives
    ``<name>-remade``.
    """
    validate_name(name)
    short = checkpoint_short_name(checkpoint_title) or "remade"
    base = name[: MAX_NAME_LENGTH - len(short) - 1].rstrip(" .")
    return validate_name(f"{base}-{short}")
