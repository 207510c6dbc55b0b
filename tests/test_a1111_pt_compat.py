"""Our A1111 ``.pt`` passes the safe-unpickle check of stock A1111 v1.10 (its rules copied here as data).

The test host patches that check (it allows the zip records torch >= 2.1 writes), so it cannot prove
this; this test applies the stock rules to the bytes we write.
"""

from __future__ import annotations

import collections
import io
import pickle
import re
import zipfile

import pytest
import torch

from lib_ti.embedding import Embedding
from lib_ti.io.formats import to_a1111_pt_bytes

# modules/safe.py at v1.10.1: the zip record names and globals it allows.
STOCK_V110_ZIP_NAMES = re.compile(
    r"^([^/]+)/((data/\d+)|version|byteorder|.data/serialization_id|(data\.pkl))$"
)
STOCK_V110_DATA_PKL = re.compile(r"^([^/]+)/data\.pkl$")
STOCK_V110_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_device_tensor_from_numpy"),
    *(
        ("torch", n)
        for n in (
            "FloatStorage",
            "HalfStorage",
            "IntStorage",
            "LongStorage",
            "DoubleStorage",
            "ByteStorage",
            "float32",
            "BFloat16Storage",
        )
    ),
    ("torch.nn.modules.container", "ParameterDict"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("_codecs", "encode"),
    ("__builtin__", "set"),
}


class StockChecker(pickle.Unpickler):
    def persistent_load(self, saved_id):
        assert saved_id[0] == "storage"
        return torch.storage.TypedStorage(_internal=True)

    def find_class(self, module, name):
        if (module, name) not in STOCK_V110_GLOBALS:
            msg = f"global '{module}/{name}' is forbidden"
            raise pickle.UnpicklingError(msg)
        if module == "collections":
            return collections.OrderedDict
        if module == "torch._utils":
            return getattr(torch._utils, name)
        if module == "torch":
            return getattr(torch, name)
        if module == "torch.nn.modules.container":
            return torch.nn.ParameterDict
        if module == "__builtin__":
            return set
        pytest.fail(f"embedding pickles should not need {module}.{name}")
        return None


def stock_v110_check(data: bytes) -> None:
    """Raises like A1111 v1.10's ``safe.check_pt`` would (it then refuses to load the file)."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as z:
            for name in z.namelist():
                if not STOCK_V110_ZIP_NAMES.match(name):
                    msg = f"bad file inside: {name}"
                    raise ValueError(msg)
            pkls = [n for n in z.namelist() if STOCK_V110_DATA_PKL.match(n)]
            assert len(pkls) == 1
            with z.open(pkls[0]) as f:
                StockChecker(f).load()
    except zipfile.BadZipFile:
        f = io.BytesIO(data)
        for _ in range(5):
            StockChecker(f).load()


@pytest.mark.parametrize(
    "vectors",
    [
        {"clip_l": torch.randn(3, 768)},
        {"clip_h": torch.randn(2, 1024)},
        {"clip_l": torch.randn(2, 768), "clip_g": torch.randn(2, 1280)},
    ],
)
def test_our_pt_passes_stock_v110_check(vectors):
    emb = Embedding("x", vectors, step=10, sd_checkpoint="abc", metadata={"lr": "0.005"})
    data = to_a1111_pt_bytes(emb)
    stock_v110_check(data)  # does not raise
    loaded = torch.load(io.BytesIO(data), weights_only=False)
    if "string_to_param" in loaded:
        assert torch.equal(loaded["string_to_param"]["*"], next(iter(vectors.values())))
        assert loaded["step"] == 10
    else:
        assert all(isinstance(v, torch.Tensor) for v in loaded.values())  # A1111 .detach()es every value


def test_stock_check_rejects_current_torch_zip_format():
    """The check above is meaningful: a plain torch.save (zip) of the same dict is refused."""
    buf = io.BytesIO()
    torch.save({"string_to_param": {"*": torch.randn(1, 768)}}, buf)
    with pytest.raises(ValueError, match="format_version|storage_alignment"):
        stock_v110_check(buf.getvalue())
