"""The caption editor's core: listing, tag frequency, bulk edits, single edits, path checks and undo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lib_ti.errors import WriteFailed
from lib_ti.prepare import caption_edit as ce
from lib_ti.prepare.caption_edit import (
    UNDO_FILE,
    CaptionEntry,
    add_tags,
    join_tags,
    list_captions,
    remove_tag,
    rename_tag,
    replace_text,
    set_caption,
    set_captions,
    sort_tags,
    split_tags,
    tag_frequency,
    undo,
)
from lib_ti.prepare.errors import PrepareError

from .conftest import ROOT


def _png(path: Path, color: tuple[int, int, int] = (200, 40, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)


def _folder(tmp_path: Path, captions: dict[str, bytes | str | None]) -> Path:
    """A training folder: an image per key, its caption file from the value (None: no caption file)."""
    folder = tmp_path / "data"
    folder.mkdir(exist_ok=True)
    for image, caption in captions.items():
        _png(folder / image)
        if caption is not None:
            data = caption.encode("utf-8") if isinstance(caption, str) else caption
            (folder / image).with_suffix(".txt").write_bytes(data)
    return folder


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (the undo record left out) with its bytes."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != UNDO_FILE
    }


def _inodes(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_ino for p in folder.rglob("*.txt")}


def _captions(folder: Path) -> dict[str, str]:
    return {e.image: e.caption for e in list_captions(str(folder))}


# ---------------------------------------------------------------- listing and tags


def test_list_captions_reads_like_training_and_lists_only_images(tmp_path):
    folder = _folder(
        tmp_path,
        {
            "b.png": "\ufeffred hair,\r\n  smile \r\n\r\n",  # BOM, CRLF, several lines
            "a.jpg": None,
            "sub/deep/c.webp": "1girl",
        },
    )
    Image.new("RGB", (8, 8)).save(folder / "a.jpg", "JPEG")
    (folder / "notes.txt").write_text("not a caption")
    _png(folder / ".hidden.png")
    (folder / ".hidden.txt").write_text("hidden")

    entries = list_captions(str(folder))

    assert entries == [
        CaptionEntry("a.jpg", "", False),
        CaptionEntry("b.png", "red hair, smile", True),
        CaptionEntry("sub/deep/c.webp", "1girl", True),
    ]


def test_list_captions_refuses_a_missing_folder(tmp_path):
    with pytest.raises(PrepareError, match="does not exist"):
        list_captions(str(tmp_path / "nope"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(PrepareError, match="is not a folder"):
        list_captions(str(tmp_path / "file"))
    with pytest.raises(PrepareError, match="no training image folder"):
        list_captions("  ")


def test_split_and_join_tags():
    assert split_tags(" 1girl ,red hair,, ,smile ") == ["1girl", "red hair", "smile"]
    assert split_tags("") == []
    assert join_tags(["1girl", "red hair"]) == "1girl, red hair"


def test_tag_frequency_counts_once_per_caption_most_frequent_first():
    entries = [
        CaptionEntry("1.png", "b, a, b, b", True),
        CaptionEntry("2.png", "c, b", True),
        CaptionEntry("3.png", "d, c, b", True),
        CaptionEntry("4.png", "", False),
    ]
    assert tag_frequency(entries) == [("b", 3), ("c", 2), ("a", 1), ("d", 1)]


# ---------------------------------------------------------------- bulk operations and undo


def test_replace_text_plain_then_undo_restores_exact_bytes(tmp_path):
    folder = _folder(
        tmp_path,
        {
            "a.png": b"\xef\xbb\xbfred hair,\r\nsmile\r\n",
            "b.png": "blue hair, red hair",
            "c.png": "green eyes",
        },
    )
    before, inodes = _snapshot(folder), _inodes(folder)

    result = replace_text(str(folder), "red", "crimson")

    assert result.changed == 2
    assert result.files == ["a.txt", "b.txt"]
    assert "2 captions" in result.message
    assert (folder / "a.txt").read_bytes() == b"crimson hair, smile"  # one line, no BOM
    assert (folder / "b.txt").read_bytes() == b"blue hair, crimson hair"
    assert _inodes(folder)["c.txt"] == inodes["c.txt"]  # unchanged file not rewritten
    record = json.loads((folder / UNDO_FILE).read_text())
    assert [f["path"] for f in record["files"]] == ["a.txt", "b.txt"]

    restored = undo(str(folder))

    assert restored.changed == 2
    assert sorted(restored.files) == ["a.txt", "b.txt"]
    assert _snapshot(folder) == before
    assert not (folder / UNDO_FILE).exists()


def test_replace_text_regex(tmp_path):
    folder = _folder(tmp_path, {"a.png": "red hair, blue eyes", "b.png": "long hair"})

    result = replace_text(str(folder), r"(\w+) hair", r"\1-hair", regex=True)

    assert result.changed == 2
    assert _captions(folder) == {"a.png": "red-hair, blue eyes", "b.png": "long-hair"}
    # a plain replace does not treat the text as a pattern
    assert replace_text(str(folder), r"(\w+)-hair", "x").changed == 0


@pytest.mark.parametrize(
    ("find", "replace", "message"),
    [
        ("(unclosed", "x", r"regular expression '\(unclosed' is not valid"),
        ("[a-", "x", r"regular expression '\[a-' is not valid"),
        ("hair", r"\2", r"replacement '\\\\2' does not fit"),
        ("", "x", "nothing to find"),
    ],
)
def test_replace_text_refuses_bad_input_without_writing(tmp_path, find, replace, message):
    folder = _folder(tmp_path, {"a.png": "red hair"})
    before = _snapshot(folder)

    with pytest.raises(PrepareError, match=message):
        replace_text(str(folder), find, replace, regex=True)

    assert _snapshot(folder) == before
    assert not (folder / UNDO_FILE).exists()


def test_replace_text_writes_one_line(tmp_path):
    folder = _folder(tmp_path, {"a.png": "a, b"})
    replace_text(str(folder), ", ", "\n\n, ")
    assert (folder / "a.txt").read_bytes() == b"a , b"


def test_remove_tag_exact_and_case_sensitive_then_undo(tmp_path):
    folder = _folder(
        tmp_path,
        {"a.png": "smile, Smile, smiles", "b.png": "1girl,smile", "c.png": "1girl", "d.png": None},
    )
    before = _snapshot(folder)

    result = remove_tag(str(folder), " smile ")

    assert (result.changed, result.files) == (2, ["a.txt", "b.txt"])
    assert _captions(folder) == {"a.png": "Smile, smiles", "b.png": "1girl", "c.png": "1girl", "d.png": ""}
    assert not (folder / "d.txt").exists()
    undo(str(folder))
    assert _snapshot(folder) == before


def test_remove_tag_refuses_an_empty_tag_or_a_list(tmp_path):
    folder = _folder(tmp_path, {"a.png": "a, b"})
    with pytest.raises(PrepareError, match="no tag to remove"):
        remove_tag(str(folder), "  ")
    with pytest.raises(PrepareError, match="holds a comma"):
        remove_tag(str(folder), "a, b")
    assert (folder / "a.txt").read_text() == "a, b"


def test_rename_tag_merges_duplicates_then_undo(tmp_path):
    folder = _folder(
        tmp_path,
        {"a.png": "girl, 1girl, smile", "b.png": "girl, smile", "c.png": "smile, 1girl", "d.png": "girls"},
    )
    before = _snapshot(folder)

    result = rename_tag(str(folder), "girl", "1girl")

    assert result.files == ["a.txt", "b.txt"]
    assert _captions(folder) == {
        "a.png": "1girl, smile",  # no duplicate
        "b.png": "1girl, smile",
        "c.png": "smile, 1girl",
        "d.png": "girls",
    }
    with pytest.raises(PrepareError, match="renamed to itself"):
        rename_tag(str(folder), "smile", "smile")
    undo(str(folder))
    assert _snapshot(folder) == before


def test_sort_tags_by_folder_frequency_ties_keep_order(tmp_path):
    folder = _folder(
        tmp_path,
        {
            "a.png": "x, rare, common, y",
            "b.png": "common, mid",
            "c.png": "mid, common",
            "d.png": "common, mid, z",
        },
    )
    inodes = _inodes(folder)

    result = sort_tags(str(folder))

    # common 4, mid 3, then x, rare, y, z once each: they keep their order (not alphabetical)
    assert _captions(folder) == {
        "a.png": "common, x, rare, y",
        "b.png": "common, mid",
        "c.png": "common, mid",
        "d.png": "common, mid, z",
    }
    assert result.files == ["a.txt", "c.txt"]
    assert _inodes(folder)["b.txt"] == inodes["b.txt"]
    assert sort_tags(str(folder)).changed == 0


def test_add_tags_at_start_creates_missing_files_and_undo_deletes_them(tmp_path):
    folder = _folder(tmp_path, {"a.png": "smile", "b.png": "mytoken, smile", "sub/c.png": None})
    before = _snapshot(folder)

    result = add_tags(str(folder), "mytoken, mytoken, style")

    assert result.files == ["a.txt", "b.txt", "sub/c.txt"]
    assert _captions(folder) == {
        "a.png": "mytoken, style, smile",
        "b.png": "style, mytoken, smile",  # only the missing tag is added
        "sub/c.png": "mytoken, style",
    }
    assert (folder / "sub" / "c.txt").read_bytes() == b"mytoken, style"
    undo(str(folder))
    assert _snapshot(folder) == before
    assert not (folder / "sub" / "c.txt").exists()


def test_add_tags_at_end_and_refuses_nothing(tmp_path):
    folder = _folder(tmp_path, {"a.png": "smile", "b.png": "smile, mytoken"})
    result = add_tags(str(folder), "mytoken", at_start=False)
    assert result.files == ["a.txt"]
    assert _captions(folder) == {"a.png": "smile, mytoken", "b.png": "smile, mytoken"}
    with pytest.raises(PrepareError, match="no tags to add"):
        add_tags(str(folder), " , ")


def test_operations_touch_only_captions_of_listed_images(tmp_path):
    folder = _folder(tmp_path, {"a.png": "hair", "sub/b.png": "hair"})
    (folder / "notes.txt").write_text("hair")
    (folder / "sub" / "readme.txt").write_text("hair")
    _png(folder / ".hidden.png")
    (folder / ".hidden.txt").write_text("hair")
    _png(folder / ".cache" / "d.png")
    (folder / ".cache" / "d.txt").write_text("hair")
    before = _snapshot(folder)

    for run in (
        lambda: replace_text(str(folder), "hair", "fur"),
        lambda: add_tags(str(folder), "token"),
        lambda: rename_tag(str(folder), "fur", "wool"),
        lambda: sort_tags(str(folder)),
    ):
        run()
        changed = {k for k, v in _snapshot(folder).items() if before.get(k) != v}
        assert changed == {"a.txt", "sub/b.txt"}

    assert _captions(folder) == {"a.png": "token, wool", "sub/b.png": "token, wool"}


# ---------------------------------------------------------------- single edits


def test_set_caption_in_a_sub_folder_one_line_then_undo(tmp_path):
    folder = _folder(tmp_path, {"a.png": "old", "sub/b.png": None})
    before = _snapshot(folder)

    result = set_caption(str(folder), "sub/b.png", "  first line\r\nsecond line \n")

    assert (result.changed, result.files) == (1, ["sub/b.txt"])
    assert "sub/b.png" in result.message
    assert (folder / "sub" / "b.txt").read_bytes() == b"first line second line"
    assert set_caption(str(folder), "a.png", " old ").changed == 0  # unchanged: nothing written
    undo(str(folder))
    assert _snapshot(folder) == before


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("../x.png", "leaves the folder"),
        ("/etc/passwd", "absolute path"),
        (str(Path("/tmp", "x.png")), "absolute path"),
        ("C:\\x.png", "absolute path"),
        ("sub/../../x.png", "leaves the folder"),
        ("sub/../a.png", "leaves the folder"),
        ("notes.txt", "not an image"),
        ("a.txt", "not an image"),
        ("sub/missing.png", "not an image"),
        ("", "no image"),
    ],
)
def test_set_caption_refuses_path_tricks_and_writes_nothing(tmp_path, image, message):
    _png(tmp_path / "x.png")  # an image just outside the folder
    folder = _folder(tmp_path, {"a.png": "a", "sub/b.png": "b"})
    (folder / "notes.txt").write_text("notes")
    before = _snapshot(tmp_path)

    with pytest.raises(PrepareError, match=message):
        set_caption(str(folder), image, "pwned")
    with pytest.raises(PrepareError, match=message):
        set_captions(str(folder), {"a.png": "fine", image: "pwned"})

    assert _snapshot(tmp_path) == before
    assert not (folder / UNDO_FILE).exists()


def test_set_captions_is_one_undoable_change_and_undo_keeps_one_level(tmp_path):
    folder = _folder(tmp_path, {"a.png": "a", "b.png": "b", "c.png": "c"})
    original = _snapshot(folder)

    first = replace_text(str(folder), "c", "see")
    assert first.files == ["c.txt"]
    after_first = _snapshot(folder)
    result = set_captions(str(folder), {"a.png": "alpha", "b.png": "beta", "c.png": "see"})

    assert (result.changed, result.files) == (2, ["a.txt", "b.txt"])
    assert _captions(folder) == {"a.png": "alpha", "b.png": "beta", "c.png": "see"}

    restored = undo(str(folder))
    assert restored.changed == 2
    assert _snapshot(folder) == after_first  # the earlier change is not undone: one level only
    assert _snapshot(folder) != original
    with pytest.raises(PrepareError, match="nothing to undo"):
        undo(str(folder))


def test_set_captions_refuses_two_texts_for_one_shared_caption_file(tmp_path):
    folder = _folder(tmp_path, {"a.png": "x"})
    Image.new("RGB", (8, 8)).save(folder / "a.jpg", "JPEG")  # a.png and a.jpg share a.txt
    with pytest.raises(PrepareError, match=r"share the caption file a\.txt"):
        set_captions(str(folder), {"a.png": "one", "a.jpg": "two"})
    assert (folder / "a.txt").read_text() == "x"
    assert set_captions(str(folder), {"a.png": "same", "a.jpg": "same"}).files == ["a.txt"]


# ---------------------------------------------------------------- undo


def test_nothing_to_undo(tmp_path):
    folder = _folder(tmp_path, {"a.png": "a"})
    with pytest.raises(PrepareError, match="nothing to undo"):
        undo(str(folder))


def test_a_change_that_changes_nothing_keeps_the_last_undo(tmp_path):
    folder = _folder(tmp_path, {"a.png": "a, b"})
    remove_tag(str(folder), "b")

    none = remove_tag(str(folder), "zzz")

    assert (none.changed, none.files) == (0, [])
    assert "no caption changed" in none.message
    undo(str(folder))
    assert (folder / "a.txt").read_text() == "a, b"


def test_undo_after_a_restart(tmp_path):
    folder = _folder(tmp_path, {"a.png": "a", "sub/b.png": None})
    before = _snapshot(folder)
    add_tags(str(folder), "token")
    assert [e.caption for e in list_captions(str(folder))] == ["token, a", "token"]

    # a new process knows only what is on disk
    code = "import sys; from lib_ti.prepare.caption_edit import undo; print(undo(sys.argv[1]).changed)"
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder)], cwd=ROOT, capture_output=True, text=True, check=True
    )

    assert done.stdout.strip() == "2"
    assert _snapshot(folder) == before
    assert [e.caption for e in list_captions(str(folder))] == ["a", ""]
    with pytest.raises(PrepareError, match="nothing to undo"):
        undo(str(folder))


def test_a_write_failing_half_way_can_be_undone(tmp_path, monkeypatch):
    folder = _folder(tmp_path, {"a.png": "hair", "b.png": "hair", "c.png": None})
    before = _snapshot(folder)
    real = ce.atomic_write_bytes
    captions_written: list[str] = []

    def failing(path, data, *, overwrite=True):
        if Path(path).suffix == ".txt":
            captions_written.append(Path(path).name)
            if len(captions_written) == 2:
                raise WriteFailed(str(path), "No space left on device")
        return real(path, data, overwrite=overwrite)

    monkeypatch.setattr(ce, "atomic_write_bytes", failing)
    with pytest.raises(PrepareError, match="1 of 3 captions were changed") as info:
        add_tags(str(folder), "token")
    assert "No space left on device" in str(info.value)
    assert (folder / "a.txt").read_text() == "token, hair"
    assert (folder / "b.txt").read_text() == "hair"
    monkeypatch.setattr(ce, "atomic_write_bytes", real)

    restored = undo(str(folder))

    assert restored.files == ["a.txt"]  # the files that were never written are left alone
    assert _snapshot(folder) == before


def test_a_first_write_failing_keeps_the_previous_undo(tmp_path, monkeypatch):
    folder = _folder(tmp_path, {"a.png": "a", "b.png": "b"})
    set_caption(str(folder), "a.png", "alpha")
    real = ce.atomic_write_bytes

    def failing(path, data, *, overwrite=True):
        if Path(path).suffix == ".txt":
            raise WriteFailed(str(path), "Read-only file system")
        return real(path, data, overwrite=overwrite)

    monkeypatch.setattr(ce, "atomic_write_bytes", failing)
    with pytest.raises(PrepareError, match="no caption was changed"):
        set_caption(str(folder), "b.png", "beta")
    monkeypatch.setattr(ce, "atomic_write_bytes", real)

    assert undo(str(folder)).files == ["a.txt"]
    assert _captions(folder) == {"a.png": "a", "b.png": "b"}


def test_undo_restores_non_utf8_bytes(tmp_path):
    raw = b"caf\xe9, smile\n"  # latin-1, not UTF-8
    folder = _folder(tmp_path, {"a.png": raw})
    remove_tag(str(folder), "smile")
    assert (folder / "a.txt").read_text(encoding="utf-8") == "caf\ufffd"
    undo(str(folder))
    assert (folder / "a.txt").read_bytes() == raw


@pytest.mark.parametrize("path", ["../outside.txt", "/tmp/outside.txt", "a.png", ".hidden/a.txt", 3])
def test_undo_refuses_a_record_naming_other_files(tmp_path, path):
    folder = _folder(tmp_path, {"a.png": "a"})
    record = {"version": 1, "message": "x", "files": [{"path": path, "previous": "evil"}]}
    (folder / UNDO_FILE).write_text(json.dumps(record))
    before = _snapshot(tmp_path)

    with pytest.raises(PrepareError, match="not a caption file of the folder"):
        undo(str(folder))

    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "outside.txt").exists()


def test_undo_refuses_a_damaged_record(tmp_path):
    folder = _folder(tmp_path, {"a.png": "a"})
    (folder / UNDO_FILE).write_text("{not json")
    with pytest.raises(PrepareError, match="is damaged"):
        undo(str(folder))
    assert (folder / "a.txt").read_text() == "a"
