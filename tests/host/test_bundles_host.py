"""Embeddings bundled in a LoRA file on real hosts: the LoRA folder lists the file, extraction writes
standalone files the host loads at once (used in the next prompt), and Forge says it does not load
bundles itself. The LoRA is built here the way the bundle packers write it (tests/test_bundles.py)."""

from __future__ import annotations

import time
import urllib.error
from pathlib import Path

import pytest
from safetensors.torch import save_file

from ..test_bundles import KOHYA_META, kohya_lora_weights, vec

pytestmark = pytest.mark.host
MARKER = {
    "a1111": "TI hashes",
    "forge": "TI: ",
    "neo": "TI: ",
    "classic": "TI hashes",
    "reforge": "TI hashes",
}


@pytest.fixture(scope="module", params=list(MARKER))
def host(request):
    return request.getfixturevalue(request.param), request.param


@pytest.fixture(scope="module")
def lora(host):
    h, _ = host
    folder = Path(h.get("/ti/v1/bundles")["folder"])
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.time_ns() % 10**6
    sd = kohya_lora_weights()
    sd[f"bundle_emb.bchar{stamp}.string_to_param.*"] = vec(2, 768, 1)
    sd[f"bundle_emb.boutfit{stamp}.emb_params"] = vec(3, 768, 2).half()
    path = folder / f"ti-test-bundle-{stamp}.safetensors"
    save_file(sd, str(path), KOHYA_META)
    yield path, stamp
    path.unlink(missing_ok=True)


def test_extracted_bundles_are_usable_in_the_next_prompt(host, lora):
    h, which = host
    path, stamp = lora
    listing = h.get("/ti/v1/bundles")
    assert path.name in listing["files"]
    assert ("does not load" in listing["note"]) == (which in ("forge", "neo"))
    found = h.get(f"/ti/v1/bundles?file={path.name}")
    assert sorted(b["name"] for b in found["embeddings"]) == [f"bchar{stamp}", f"boutfit{stamp}"]
    done = h.post(
        "/ti/v1/bundles",
        {"file": path.name, "names": [f"bchar{stamp}"], "rename": {f"bchar{stamp}": f"xchar{stamp}"}},
    )
    assert done["names"] == [f"xchar{stamp}"]
    out = h.post(
        "/sdapi/v1/txt2img",
        {"prompt": f"a portrait of xchar{stamp}, {stamp}", "steps": 1, "width": 64, "height": 64},
    )
    assert MARKER[which] in out["info"] and f"xchar{stamp}" in out["info"], out["info"]
    # (Forge loads its model, and reads the folder, on first use: asked after the generation)
    status = {e["name"]: e for e in h.get("/ti/v1/embeddings")["embeddings"]}
    assert status[f"xchar{stamp}"]["host"] == "loaded", status
    with pytest.raises(urllib.error.HTTPError) as e:  # the file exists now
        h.post(
            "/ti/v1/bundles",
            {"file": path.name, "names": [f"bchar{stamp}"], "rename": {f"bchar{stamp}": f"xchar{stamp}"}},
        )
    assert e.value.code == 409
