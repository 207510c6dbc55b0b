"""With ``--api-auth``, our routes refuse requests without the credentials (real web UI)."""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request

import pytest

from .conftest import running_host

pytestmark = pytest.mark.host


def test_our_routes_use_the_hosts_api_auth(host_paths, tmp_path):
    webui, python, _ = host_paths
    emb = tmp_path / "embeddings"
    emb.mkdir()
    port = int(os.environ.get("SD_WEBUI_PORT", "7861")) + 1
    with running_host(webui, python, emb, tmp_path / "webui.log", port, ["--api-auth", "ti:secret"]) as (
        host,
        _,
    ):
        url = host.base + "/ti/v1/embeddings"
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(url, timeout=60)
        assert refused.value.code == 401
        bad = urllib.request.Request(
            url, headers={"Authorization": "Basic " + base64.b64encode(b"ti:wrong").decode()}
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(bad, timeout=60)
        assert refused.value.code == 401
        good = urllib.request.Request(
            url, headers={"Authorization": "Basic " + base64.b64encode(b"ti:secret").decode()}
        )
        with urllib.request.urlopen(good, timeout=60) as r:
            assert json.loads(r.read())["embeddings"] == []
