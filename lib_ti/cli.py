"""The command line: ``python -m lib_ti inspect|diff|convert|extract`` (file tools) and ``train``
(training without a web UI, :mod:`lib_ti.headless`).

Exit codes: 0 success, 2 bad input (one line on stderr, never a traceback); ``train`` also 1 (the run
failed) and 130 (stopped by Ctrl-C after saving).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from lib_ti import __version__
from lib_ti.embedding import KIND_LABELS, Embedding
from lib_ti.errors import TIError, WriteFailed
from lib_ti.headless.command import train_command
from lib_ti.headless.options import add_arguments as add_train_arguments
from lib_ti.io.bundles import (
    FORGE_BUNDLE_NOTE,
    PRODUCER_LABELS,
    BundledInfo,
    extract_bundled,
    has_bundled,
    list_bundled,
)
from lib_ti.io.convert import CONVERT_TO, convert_to, to_sd1, to_sdxl_l
from lib_ti.io.formats import (
    T5_FILE_KEYS,
    WRITE_SUFFIX,
    check_convention,
    read_diffusers_pair,
    read_embedding,
    write_embedding,
)
from lib_ti.stats import compare, embedding_stats

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_BAD_INPUT = 2


def _describe(path: str, emb: Embedding) -> dict[str, object]:
    return {
        "file": path,
        "name": emb.name,
        "kind": emb.kind,
        "vectors": emb.num_vectors,
        "counts": emb.vector_counts,
        "widths": {k: int(v.shape[1]) for k, v in emb.vectors.items()},
        "convention": emb.convention,
        "step": emb.step,
        "sd_checkpoint": emb.sd_checkpoint,
        "sd_checkpoint_name": emb.sd_checkpoint_name,
        "source": emb.source,
        "metadata": emb.metadata,
        "stats": {k: [asdict(s) for s in v] for k, v in embedding_stats(emb).items()},
    }


def _describe_bundles(path: str, infos: list[BundledInfo]) -> dict[str, object]:
    return {"file": path, "lora": True, "bundled": [b.to_dict() for b in infos], "note": FORGE_BUNDLE_NOTE}


def _print_bundles(path: str, infos: list[BundledInfo]) -> None:
    print(f"{path}: a LoRA with {len(infos)} bundled embedding(s)")
    for b in infos:
        what = f"{b.dtype}, {PRODUCER_LABELS[b.producer]}"
        if b.kind:
            t5 = f" (t5: {b.counts['t5']})" if b.counts.get("t5", b.vectors) != b.vectors else ""
            what = f"{KIND_LABELS[b.kind]}, {b.vectors} vector(s){t5}, {what}"
        print(f"  {b.name}: {what}")
        if b.ignored:
            print(f"    left out: {', '.join(b.ignored)}")
        if b.problem:
            print(f"    cannot be extracted: it {b.problem}")
        elif b.name_problem:
            print(f"    {b.name_problem}: extract it with --name {b.name!r} --as NEW_NAME")
    print(f"  note: {FORGE_BUNDLE_NOTE}")


def _print_description(d: dict[str, object]) -> None:
    counts = dict(d["counts"])  # type: ignore[call-overload]
    t5 = f" (t5: {counts['t5']})" if counts.get("t5", d["vectors"]) != d["vectors"] else ""
    print(f"{d['file']}")
    print(
        f"  name: {d['name']}  kind: {KIND_LABELS[str(d['kind'])]}  vectors: {d['vectors']}{t5}  step: {d['step']}"
    )
    if d["sd_checkpoint"] or d["sd_checkpoint_name"]:
        print(f"  checkpoint: {d['sd_checkpoint']} ({d['sd_checkpoint_name']})")
    if d["source"]:
        print(f"  stored as: {d['source']}")
    for k, v in dict(d["metadata"]).items():  # type: ignore[call-overload]
        print(f"  {k}: {v}")
    for enc, rows in dict(d["stats"]).items():  # type: ignore[call-overload]
        print(f"  {enc:7} {'vec':>4} {'norm':>9} {'min':>9} {'max':>9} {'mean':>9} {'std':>9}")
        for s in rows:
            print(
                f"  {'':7} {s['index']:>4} {s['norm']:9.4f} {s['min']:9.4f} {s['max']:9.4f} "
                f"{s['mean']:9.4f} {s['std']:9.4f}"
            )


def cmd_inspect(args: argparse.Namespace) -> int:
    """Embedding files, and LoRA files with bundled embeddings (their header only)."""
    out: list[tuple[dict[str, object], list[BundledInfo] | None]] = []
    for f in args.files:
        if has_bundled(f):
            infos = list_bundled(f)
            out.append((_describe_bundles(f, infos), infos))
        else:
            out.append((_describe(f, read_embedding(f)), None))
    if args.json:
        found = [d for d, _ in out]
        print(json.dumps(found if len(found) > 1 else found[0], indent=2))
        return EXIT_OK
    for (d, bundled), f in zip(out, args.files):
        if bundled is None:
            _print_description(d)
        else:
            _print_bundles(f, bundled)
    return EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    a, b = read_embedding(args.a), read_embedding(args.b)
    result = compare(a, b)
    if args.json:
        print(json.dumps({"a": args.a, "b": args.b, **result.to_dict()}, indent=2))
        return EXIT_OK
    print(f"A: {args.a} ({a.kind}, {a.num_vectors} vectors)")
    print(f"B: {args.b} ({b.kind}, {b.num_vectors} vectors)")
    for note in result.notes:
        print(f"note: {note}")
    for part in result.encoders:
        print(f"  {part.encoder:7} {'vec':>4} {'cosine':>9} {'mean|d|':>9}")
        for i, (c, d) in enumerate(zip(part.cosine, part.mean_abs_diff)):
            print(f"  {'':7} {i:>4} {c:9.5f} {d:9.5f}")
        print(f"  {part.encoder} mean |A-B|: {part.mean_abs_diff_all:.6f}")
    print(f"mean |A-B| overall: {result.mean_abs_diff:.6f}")
    return EXIT_OK


def cmd_convert(args: argparse.Namespace) -> int:
    out = Path(args.output)
    name = args.name or out.name.split(".")[0]
    if args.to_sd1 and (args.to_sdxl_l or args.g_from or args.g_zeros):
        msg = "--to-sd1 cannot be combined with --to-sdxl-l, --g-from or --g-zeros"
        raise TIError(msg)
    if args.g_from and args.g_zeros:
        msg = "give either --g-from FILE or --g-zeros, not both"
        raise TIError(msg)
    if args.to and (args.to_sd1 or args.to_sdxl_l or args.g_from or args.g_zeros):
        msg = "--to cannot be combined with --to-sd1, --to-sdxl-l, --g-from or --g-zeros"
        raise TIError(msg)
    emb = read_embedding(args.input, name=name)
    if args.to:
        emb = convert_to(emb, args.to, name)
    elif args.to_sd1:
        emb = to_sd1(emb, name)
    elif args.to_sdxl_l or args.g_from or args.g_zeros:
        if args.g_from:
            g_file = read_embedding(args.g_from)
            if emb.kind == "sd1" and g_file.kind == "sdxl_refiner" and not args.to_sdxl_l:
                emb = read_diffusers_pair(args.input, args.g_from, name=name)
            else:
                emb = to_sdxl_l(emb, g_file, name)
        elif args.g_zeros:
            emb = to_sdxl_l(emb, "zeros", name)
        else:
            msg = "--to-sdxl-l needs the CLIP-G half: --g-from FILE, or --g-zeros to fill it with zeros"
            raise TIError(msg)
    else:
        emb.name = name
    path = write_embedding(emb, out, overwrite=args.overwrite)
    print(f"wrote {path} ({emb.kind}, {emb.num_vectors} vectors)")
    return EXIT_OK


def cmd_extract(args: argparse.Namespace) -> int:
    if args.as_name is not None and len(args.name or ()) != 1:
        msg = "--as renames one embedding: give exactly one --name with it"
        raise TIError(msg)
    rename = {args.name[0]: args.as_name} if args.as_name is not None else None
    convention = check_convention(args.convention) if args.convention else None
    paths = extract_bundled(
        args.lora,
        args.out,
        names=args.name,
        overwrite=args.overwrite,
        fmt=args.format,
        rename=rename,
        convention=convention,
    )
    for path in paths:
        print(f"wrote {path}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m lib_ti", description="Textual-inversion embedding file tools."
    )
    p.add_argument("--version", action="version", version=f"lib_ti {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser(
        "inspect",
        help="kind, vectors, norms and statistics of embedding files; the embeddings bundled in a LoRA file",
    )
    s.add_argument("files", nargs="+")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s.set_defaults(func=cmd_inspect)

    s = sub.add_parser("diff", help="per-vector cosine and mean absolute difference of two embeddings")
    s.add_argument("a")
    s.add_argument("b")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_diff)

    s = sub.add_parser(
        "convert",
        help="convert between formats (.safetensors, .pt, .png), kinds and SD3/Flux key conventions",
    )
    s.add_argument("input")
    s.add_argument("output", help="format from the suffix: .safetensors, .pt (A1111) or .png")
    s.add_argument("--name", help="embedding name stored in the file (default: output file name)")
    s.add_argument("--to-sdxl-l", action="store_true", help="make an SD1 embedding the CLIP-L half of SDXL")
    s.add_argument(
        "--g-from", metavar="FILE", help="CLIP-G vectors from this file (SDXL, refiner or diffusers _2)"
    )
    s.add_argument("--g-zeros", action="store_true", help="fill the CLIP-G half with zeros (explicitly)")
    s.add_argument(
        "--to-sd1", action="store_true", help="take the CLIP-L part of an SDXL, SD3 or Flux embedding"
    )
    s.add_argument(
        "--to",
        choices=[t for t in CONVERT_TO if t != "sd1"],  # SD1 is --to-sd1: one flag per thing
        help="sdxl: SD3 without its T5 vectors; "
        f"onetrainer / comfyui: an SD3/Flux file with the T5 key {' / '.join(T5_FILE_KEYS.values())}",
    )
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.set_defaults(func=cmd_convert)

    s = sub.add_parser("extract", help="write the embeddings bundled in a LoRA file into a folder")
    s.add_argument("lora", help="a .safetensors LoRA file with bundled embeddings")
    s.add_argument("--out", required=True, metavar="DIR", help="the folder to write into (made if missing)")
    s.add_argument(
        "--name", action="append", help="extract only this bundled embedding (repeat for more; default: all)"
    )
    s.add_argument("--as", dest="as_name", metavar="NEW", help="write the one --name under this name")
    s.add_argument("--format", choices=tuple(WRITE_SUFFIX), default="safetensors")
    s.add_argument(
        "--convention", choices=tuple(T5_FILE_KEYS), help="SD3/Flux keys (default: the LoRA's, OneTrainer)"
    )
    s.add_argument("--overwrite", action="store_true", help="replace existing files")
    s.set_defaults(func=cmd_extract)

    s = sub.add_parser(
        "train",
        help="train an embedding on a checkpoint file, or a queue of them (torchrun for many GPUs)",
        description="Train a textual-inversion embedding without a web UI, with the tab's engine and recipe. "
        "Needs: pip install -r requirements-headless.txt. Exit codes: 0 done, 1 failed, 2 bad input, "
        "130 stopped by Ctrl-C (after saving; a second Ctrl-C aborts).",
    )
    add_train_arguments(s)
    s.set_defaults(func=train_command)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except WriteFailed as e:  # a file could not be written: the run failed, the input was fine
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILED
    except (TIError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return EXIT_BAD_INPUT
