"""Embedding math in prompts on a real host, one flow for every host (A1111, Forge, Forge Neo).

Each check generates with a fixed seed and compares pixels: a prompt with ``<'…'>`` must give the
same image as the same prompt with an embedding saved from the same expression in the Merge view.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import time
import urllib.error

import pytest
from PIL import Image, PngImagePlugin

SIZE = 64
TEMP_PREFIX = "tiinline"


def unique() -> str:
    return str(time.time_ns() % 10**9)


def txt2img(host, prompt, negative="", seed=7, **extra) -> dict:
    body = {"prompt": prompt, "negative_prompt": negative, "steps": 2, "width": SIZE, "height": SIZE,
            "seed": seed, "sampler_name": "Euler", "cfg_scale": 7, **extra}  # fmt: skip
    return host.post("/sdapi/v1/txt2img", body, timeout=900)


def pixels(res: dict, i: int = 0) -> str:
    img = Image.open(io.BytesIO(base64.b64decode(res["images"][i]))).convert("RGB")
    return hashlib.sha256(img.tobytes()).hexdigest()


def info(res: dict, i: int = 0) -> str:
    return json.loads(res["info"])["infotexts"][i]


def saved(host, expression: str, tag: str) -> str:
    """An embedding saved from ``expression`` through the Merge view's route; returns its name."""
    name = f"em{tag}{unique()}"
    host.post("/ti/v1/merge", {"expression": expression, "name": name})
    return name


def no_temporary_names(host) -> None:
    listed = host.get("/sdapi/v1/embeddings")
    names = set(listed["loaded"]) | set(listed["skipped"])
    ours = host.get("/ti/v1/embeddings")
    names |= {e.get("name", "") for e in ours["embeddings"]} | set(ours["loaded"]) | set(ours["skipped"])
    assert not [n for n in names if n.startswith(TEMP_PREFIX)], names
    assert not [p for p in host.embeddings.rglob("*") if p.name.startswith(TEMP_PREFIX)]


def check_same_image(host, tag: str) -> dict:
    """Positive and negative prompts: inline expression == saved embedding, pixel for pixel."""
    salt = unique()  # a fresh prompt text: the host's conditioning cache cannot answer
    cat_dog = saved(host, "'cat'+'dog'", tag)
    blur = saved(host, "'blurry'*0.5+'cropped'", tag)
    inline = txt2img(host, f"a photo of <'cat'+'dog'>, {salt}", negative="{'blurry'*0.5+'cropped'}, ugly")
    named = txt2img(host, f"a photo of {cat_dog}, {salt}", negative=f"{blur}, ugly")
    assert pixels(inline) == pixels(named)
    text = info(inline)
    assert text.startswith(
        f"a photo of <'cat'+'dog'>, {salt}\nNegative prompt: {{'blurry'*0.5+'cropped'}}, ugly\n"
    )
    assert "EmbeddingMerge: \"<'EM_1'>=<'cat'+'dog'>, {'EM_2'}={'blurry'*0.5+'cropped'}\"" in text, text
    assert TEMP_PREFIX not in text
    plain = txt2img(host, f"a photo of cat, {salt}", negative="ugly")
    assert pixels(plain) != pixels(inline)  # the expression changed the image
    assert "EmbeddingMerge" not in info(plain)
    no_temporary_names(host)
    return inline


def check_hires(host, tag: str) -> None:
    salt = unique()
    name = saved(host, "'sky'*1.5", tag)
    # The API's hires fails on Forge Neo without hr_additional_modules and on Forge Classic without
    # hr_cfg_scale (the UI always sends both; hosts that do not know a field ignore it)
    hr = {"enable_hr": True, "hr_scale": 1.5, "hr_upscaler": "Latent", "hr_second_pass_steps": 1,
          "denoising_strength": 0.5, "hr_additional_modules": ["Use same choices"], "hr_cfg_scale": 7}  # fmt: skip
    inline = txt2img(host, f"a field {salt}", hr_prompt=f"a field <'sky'*1.5> {salt}", **hr)
    named = txt2img(host, f"a field {salt}", hr_prompt=f"a field {name} {salt}", **hr)
    assert pixels(inline) == pixels(named)
    text = info(inline)
    assert (
        f"Hires prompt: \"a field <'sky'*1.5> {salt}\"" in text
        or f"Hires prompt: a field <'sky'*1.5> {salt}" in text
    )
    assert "EmbeddingMerge: <'EM_1'>=<'sky'*1.5>" in text, text


def check_img2img(host, tag: str) -> None:
    """img2img: the same image from the same init image, inline and saved."""
    salt = unique()
    name = saved(host, "'forest'*0.5+'river'", tag)
    buf = io.BytesIO()
    Image.new("RGB", (SIZE, SIZE), (90, 140, 60)).save(buf, format="PNG")
    init = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    def img2img(prompt: str) -> dict:
        body = {"prompt": prompt, "init_images": [init], "denoising_strength": 0.6, "steps": 2, "width": SIZE,
                "height": SIZE, "seed": 5, "sampler_name": "Euler", "cfg_scale": 7}  # fmt: skip
        return host.post("/sdapi/v1/img2img", body, timeout=900)

    img2img(f"warm up {salt}")  # A1111's first img2img after start differs from the next (any prompt)
    inline = img2img(f"a <'forest'*0.5+'river'> {salt}")
    assert pixels(inline) == pixels(img2img(f"a {name} {salt}"))
    assert "EmbeddingMerge: <'EM_1'>=<'forest'*0.5+'river'>" in info(inline)


def check_batch(host, tag: str) -> None:
    """Two images in one batch, each with its own expression; each infotext lists only its own."""
    salt = unique()
    a, b = saved(host, "'cat'*2", tag), saved(host, "'dog'+'wolf'", tag)
    inline = host.post("/ti/v1/_checks/batch", {"prompts": [f"<'cat'*2> {salt}", f"<'dog'+'wolf'> {salt}"]})
    named = host.post("/ti/v1/_checks/batch", {"prompts": [f"{a} {salt}", f"{b} {salt}"]})
    assert inline["pixels"] == named["pixels"]
    assert inline["pixels"][0] != inline["pixels"][1]
    first, second = inline["infotexts"]
    assert "EmbeddingMerge: <'EM_1'>=<'cat'*2>" in first and "dog" not in first.split("EmbeddingMerge")[1]
    assert (
        "EmbeddingMerge: \"<'EM_1'>=<'dog'+'wolf'>\"" in second
        or "EmbeddingMerge: <'EM_1'>=<'dog'+'wolf'>" in second
    )


def png_with(text: str, res: dict | None = None) -> str:
    img = Image.open(io.BytesIO(base64.b64decode(res["images"][0]))) if res else Image.new("RGB", (8, 8))
    meta = PngImagePlugin.PngInfo()
    meta.add_text("parameters", text)
    buf = io.BytesIO()
    img.save(buf, format="PNG", pnginfo=meta)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def regenerate(host, params: dict) -> dict:
    """Generate again from pasted parameters (what Send to txt2img fills in)."""
    return txt2img(
        host, params["Prompt"], negative=params.get("Negative prompt", ""), seed=int(params["Seed"])
    )


def check_paste_round_trip(host, first: dict) -> None:
    text = info(first)
    params = host.post("/sdapi/v1/png-info", {"image": png_with(text, first)})["parameters"]
    assert params["Prompt"] == text.split("\nNegative prompt:")[0]
    assert pixels(regenerate(host, params)) == pixels(first)


def check_em_infotext(host, first: dict) -> None:
    """An infotext as EM writes it (placeholders in the prompts) pastes into the expressions."""
    prompt = info(first).split("\n")[0]
    em_prompt = prompt.replace("<'cat'+'dog'>", "<'EM_1'>")
    em = (f"{em_prompt}\nNegative prompt: {{'EM_2'}}, ugly\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 7, "
          "Size: 64x64, EmbeddingMerge: \"<'EM_1'>=<'cat'+'dog'>, {'EM_2'}={'blurry'*0.5+'cropped'}\"")  # fmt: skip
    params = host.post("/sdapi/v1/png-info", {"image": png_with(em)})["parameters"]
    assert params["Prompt"] == prompt
    assert params["Negative prompt"] == "{'blurry'*0.5+'cropped'}, ugly"
    assert pixels(regenerate(host, params)) == pixels(first)


def check_bad_expression(host) -> None:
    before = len(host.get("/sdapi/v1/embeddings")["loaded"])
    with pytest.raises(urllib.error.HTTPError) as e:
        txt2img(host, f"a photo of <'cat' + > {unique()}")
    body = e.value.read().decode(errors="replace")
    assert e.value.code >= 400
    assert "embedding math <'cat' +> in the prompt" in body and "column 7" in body, body[:2000]
    assert len(host.get("/sdapi/v1/embeddings")["loaded"]) == before


def check_token_counter(host) -> None:
    """The prompt's token counter (the UI's own event) counts an expression as its vectors."""

    def count(text: str) -> str:
        out = host.call(["txt2img_prompt", "txt2img_steps", "txt2img_styles"], [text, 20, []],
                        outputs_first="txt2img_token_counter")  # fmt: skip
        return out[0]

    assert ">6/75<" in count("a <'a photo of a cat'>")  # 1 + 5 vectors
    assert ">2/75<" in count("a <'bad anatomy, ugly':0> cat")
