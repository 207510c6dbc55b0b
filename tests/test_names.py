from __future__ import annotations

import pytest

from lib_ti.errors import InvalidNameError
from lib_ti.names import path_in_folder, validate_name


@pytest.mark.parametrize("name", ["cat", "my-style_v2", "Ünïcode 猫", "a.b", "x" * 100])
def test_valid_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("", "empty"),
        ("x" * 101, "limit is 100"),
        ("../evil", "path separator"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        ("a/b", "path separator"),
        ("a\\b", "path separator"),
        ("nul\x00byte", "control character"),
        ("tab\tname", "control character"),
        ("half\ud800", "half of a UTF-16 surrogate pair"),
        ("what?", "not allowed in file names"),
        (" padded", "white space"),
        (".hidden", "starts or ends with '.'"),
        ("CON", "reserved device name"),
        (42, "must be text"),
    ],
)
def test_invalid_names_say_which_rule(name, rule):
    with pytest.raises(InvalidNameError, match=rule.replace("?", r"\?").replace(".", r"\.")):
        validate_name(name)


def test_path_in_folder_stays_inside(tmp_path):
    assert path_in_folder(tmp_path, "cat", ".safetensors") == tmp_path.resolve() / "cat.safetensors"
    with pytest.raises(InvalidNameError):
        path_in_folder(tmp_path, "../cat", ".safetensors")


def test_path_in_folder_refuses_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    inside = tmp_path / "emb"
    inside.mkdir()
    (inside / "cat.safetensors").symlink_to(outside / "cat.safetensors")
    with pytest.raises(InvalidNameError, match="outside"):
        path_in_folder(inside, "cat", ".safetensors")
