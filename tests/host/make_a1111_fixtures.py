"""Regenerate tests/data/a1111_*.png with the real AUTOMATIC1111 code (run by hand).

    SD_WEBUI_DIR=~/sd-hosts/a1111/stable-diffusion-webui \
        ~/sd-hosts/a1111/venv/bin/python tests/host/make_a1111_fixtures.py

Uses the host's ``modules.textual_inversion.image_embedding`` exactly as its trainer does when it
saves an embedding into a preview image: the ``sd-ti-embedding`` chunk plus border data.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from PIL import Image, PngImagePlugin
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parents[1] / "data"


def main() -> None:
    sys.path.insert(0, os.path.expanduser(os.environ["SD_WEBUI_DIR"]))
    from modules.textual_inversion import image_embedding as ie  # the host's own code

    vec = torch.randn(2, 768, generator=torch.Generator().manual_seed(7))
    data = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": vec},
        "name": "a1111-img",
        "step": 42,
        "sd_checkpoint": "c77d740a47",
        "sd_checkpoint_name": "tiny-sd1",
    }
    save_file({"vec": vec}, OUT / "a1111_img_vectors.safetensors")
    base = Image.new("RGB", (24, 32), (200, 120, 60))
    info = PngImagePlugin.PngInfo()
    info.add_text("sd-ti-embedding", ie.embedding_to_b64(data))
    bordered = ie.insert_image_data_embed(base, data)
    bordered.save(OUT / "a1111_chunk_and_border.png", "PNG", pnginfo=info)
    bordered.save(OUT / "a1111_border_only.png", "PNG")
    bordered.save(OUT / "a1111_border_only.webp", "WEBP", lossless=True)
    print("wrote fixtures to", OUT)


if __name__ == "__main__":
    main()
