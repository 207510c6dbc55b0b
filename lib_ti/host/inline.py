"""Embedding math in prompts (``<'cat'+'dog'>``) on every A1111-family host, in one place.

:func:`install` hooks the host once per process:

- ``StableDiffusionProcessing.get_conds_with_caching`` (the one door every txt2img, img2img, hires,
  batch, X/Y/Z and dynamic-prompts prompt passes on its way to the text encoder, on A1111, Forge,
  Forge Neo, Forge Classic and reForge): the expressions are evaluated (all prompts of the job first,
  so a bad one stops it before any image), the prompts handed to the encoder name temporary embeddings
  instead, and the adapter's ``temporary`` registers those for the call only. The names are derived
  from the vectors, so the host's cache (keyed by that text) never serves other vectors.
- the infotext: EM's ``EmbeddingMerge`` field per image (a list by image index in the job's
  ``extra_generation_params``); the prompts in it stay as the user wrote them.
- ``on_infotext_pasted``: EM's ``<'EM_1'>`` placeholders become their expressions again.
- ``on_before_token_counter``: an expression counts as its number of vectors.

- with sd-dynamic-prompts, ``{'…'}`` would be read as its variant: :func:`protect_curly` and
  :func:`restore_curly` (an always-on script's ``before_process`` and ``process``, ordered after it by
  ``metadata.ini``) carry it through.

When the Embedding Merge extension itself is enabled, these hooks step aside.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from lib_ti.embedding import Embedding
from lib_ti.inline import infotext
from lib_ti.inline.plan import TEMP_PREFIX
from lib_ti.inline.scan import PromptExpressionError, find_expressions, might_hold

logger = logging.getLogger(__name__)

#: embeddings -> a context in which the host's prompt encoders know them by name
Temporary = Callable[[Mapping[str, Embedding]], AbstractContextManager[None]]

_MARK = "_lib_ti_inline_original"
_STATE: dict[str, Any] = {}
_PROMPT_LISTS = ("all_prompts", "all_negative_prompts", "all_hr_prompts", "all_hr_negative_prompts")


def _extension_with(key: str, relpath: str) -> bool:
    """Whether an enabled extension has the file ``relpath`` (checked once per process, kept as ``key``)."""
    if key not in _STATE:
        found = False
        try:
            from modules import extensions

            found = any((Path(ext.path) / relpath).is_file() for ext in extensions.active())
        except (ImportError, AttributeError, OSError) as e:
            logger.debug("could not list extensions: %s", e)
        _STATE[key] = found
    return bool(_STATE[key])


def em_installed() -> bool:
    """Whether the Embedding Merge extension is enabled (said once in the console)."""
    told = "em" in _STATE
    found = _extension_with("em", "scripts/embedding_merge.py")
    if found and not told:
        print(  # noqa: T201 (once, in the console, like the host's own notes)
            "[-] Textual Inversion tab: the Embedding Merge extension is enabled; it handles <'…'> in prompts."
        )
    return found


def _option(key: str, default: bool) -> bool:
    from modules import shared

    return bool(getattr(shared.opts, key, default))


def enabled() -> bool:
    return _option("ti_inline", True) and not em_installed()


def curly() -> bool:
    return _option("ti_inline_curly", True)


def _job_prompts(p: Any) -> list[str]:
    out: list[str] = []
    for attr in _PROMPT_LISTS:
        seq = getattr(p, attr, None)
        if isinstance(seq, list):
            out.extend(x for x in seq if isinstance(x, str))
    return out


def field_values(p: Any, use_curly: bool) -> list[str | None]:
    """The ``EmbeddingMerge`` value of each image of the job (the host's ``create_infotext`` picks one by
    the image's index). A list, not a callable: Forge Classic's API cannot serialise callables."""
    lists = [seq for seq in (getattr(p, attr, None) for attr in _PROMPT_LISTS) if isinstance(seq, list)]
    count = max((len(seq) for seq in lists), default=0)
    values: list[str | None] = []
    for i in range(count):
        texts = [seq[i] for seq in lists if i < len(seq) and isinstance(seq[i], str)]
        values.append(infotext.format_field(texts, curly=use_curly) or None)
    return values


def _strip_names(params: Any) -> None:
    """Drop temporary names from Forge's ``TI: a, b`` infotext value (in place)."""
    if not isinstance(params, dict) or not isinstance(params.get("TI"), str):
        return
    kept = [n for n in (x.strip() for x in params["TI"].split(",")) if n and not n.startswith(TEMP_PREFIX)]
    if kept:
        params["TI"] = ", ".join(kept)
    else:
        del params["TI"]


def _like(prompts: Any, texts: list[str]) -> Any:
    """``texts`` as the same kind of list as ``prompts`` (the host's SdConditioning keeps width, height
    and whether the prompts are negative)."""
    try:
        from modules import prompt_parser

        if isinstance(prompts, prompt_parser.SdConditioning):
            return prompt_parser.SdConditioning(texts, copy_from=prompts)
    except (ImportError, AttributeError, TypeError) as e:
        logger.debug("no SdConditioning: %s", e)
    return type(prompts)(texts) if isinstance(prompts, list) else texts


def wrap_get_conds(
    original: Callable[..., Any], service: Callable[[], Any], temporary: Temporary
) -> Callable[..., Any]:
    def get_conds_with_caching(
        self: Any,
        function: Any,
        required_prompts: Any,
        steps: Any,
        caches: Any,
        extra_network_data: Any,
        hires_steps: Any = None,
    ) -> Any:
        use_curly = curly()
        if (
            not any(isinstance(x, str) and might_hold(x, curly=use_curly) for x in required_prompts)
            or not enabled()
        ):
            return original(self, function, required_prompts, steps, caches, extra_network_data, hires_steps)
        svc = service()
        ctx = svc.inline_context()
        if not getattr(self, "_lib_ti_inline_checked", False):
            # the whole job first: a bad expression in any prompt stops it before the first image
            svc.inline.check(ctx, _job_prompts(self), curly=use_curly)
            self._lib_ti_inline_checked = True
            self.extra_generation_params[infotext.FIELD] = field_values(self, use_curly)
        plan = svc.inline.plan(ctx, list(required_prompts), curly=use_curly)
        with temporary(plan.embeddings):
            result = original(
                self,
                function,
                _like(required_prompts, plan.prompts),
                steps,
                caches,
                extra_network_data,
                hires_steps,
            )
        from modules import shared

        _strip_names(getattr(shared.sd_model, "extra_generation_params", None))
        for cache in caches:
            if len(cache) > 2:
                _strip_names(cache[2])
        return result

    setattr(get_conds_with_caching, _MARK, original)
    return get_conds_with_caching


def on_pasted(_text: str, params: dict[str, Any]) -> None:
    if not em_installed():
        infotext.on_pasted(params)


def token_counter(service: Callable[[], Any], model_loaded: Callable[[], bool]) -> Callable[[Any], None]:
    def before_token_counter(params: Any) -> None:
        prompt = getattr(params, "prompt", None)
        if not isinstance(prompt, str) or not might_hold(prompt) or not enabled() or not model_loaded():
            return
        svc = service()
        params.prompt = svc.inline.counted(svc.inline_context(), prompt, curly=curly())

    return before_token_counter


def install(service: Callable[[], Any], temporary: Temporary, model_loaded: Callable[[], bool]) -> None:
    """Hook the host (once per process; a Reload UI re-runs the entry script and finds the hooks in place)."""
    from modules import processing, script_callbacks

    cls = processing.StableDiffusionProcessing
    current = cls.get_conds_with_caching
    original = getattr(current, _MARK, current)
    cls.get_conds_with_caching = wrap_get_conds(original, service, temporary)
    # the host clears its callbacks before it re-runs the scripts (Reload UI): register them each time
    script_callbacks.on_infotext_pasted(on_pasted)
    if hasattr(script_callbacks, "on_before_token_counter"):
        script_callbacks.on_before_token_counter(token_counter(service, model_loaded))
    else:
        logger.info("this web UI has no token-counter callback; expressions count as their text there")


def add_check_routes(app: Any, service: Callable[[], Any], temporary: Temporary) -> None:
    """``POST /ti/v1/_checks/inline_cost {prompt, rounds?}``: what the hook adds to one encoding of
    ``prompt`` on the loaded model, in milliseconds (median; self-check routes only)."""
    import statistics
    import time

    def inline_cost(body: dict) -> dict[str, Any]:
        from modules import call_queue

        prompt, rounds = str(body["prompt"]), int(body.get("rounds", 20))
        times: list[float] = []
        with call_queue.queue_lock:
            for _ in range(rounds):
                t0 = time.perf_counter()
                svc = service()
                plan = svc.inline.plan(svc.inline_context(), [prompt], curly=curly())
                with temporary(plan.embeddings):
                    pass
                times.append(time.perf_counter() - t0)
        return {"median_ms": statistics.median(times) * 1000, "first_ms": times[0] * 1000}

    app.add_api_route("/ti/v1/_checks/inline_cost", inline_cost, methods=["POST"])


# ---------------------------------------------------------------- sd-dynamic-prompts

_PROMPT_FIELDS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt", *_PROMPT_LISTS)


def dynamic_prompts_installed() -> bool:
    """Whether sd-dynamic-prompts is enabled: it reads ``{…}`` as its variants."""
    return _extension_with("dp", "scripts/dynamic_prompting.py")


def _map_prompts(p: Any, change: Callable[[str], str]) -> None:
    for attr in _PROMPT_FIELDS:
        value = getattr(p, attr, None)
        if isinstance(value, str):
            setattr(p, attr, change(value))
        elif isinstance(value, list):
            setattr(p, attr, [change(v) if isinstance(v, str) else v for v in value])


def protect_curly(p: Any) -> None:
    """Before sd-dynamic-prompts runs: ``{'…'}`` becomes ``<'…'>``, which it leaves alone (it would read
    the braces as a variant with one choice and drop them). :func:`restore_curly` puts them back."""
    if not (dynamic_prompts_installed() and enabled() and curly()):
        return
    converted: set[str] = set()

    def to_angle(text: str) -> str:
        if "{'" not in text:
            return text
        try:
            found = [f for f in find_expressions(text) if f.curly]
        except PromptExpressionError:
            return text
        out, last = [], 0
        for f in found:
            angle = "<" + text[f.start + 1 : f.end - 1] + ">"
            converted.add(angle)
            out += [text[last : f.start], angle]
            last = f.end
        return "".join([*out, text[last:]])

    _map_prompts(p, to_angle)
    p._lib_ti_curly = converted


def restore_curly(p: Any) -> None:
    """After sd-dynamic-prompts ran: the expressions :func:`protect_curly` turned into ``<'…'>`` get their
    braces back (so the infotext shows them as written)."""
    converted = getattr(p, "_lib_ti_curly", None)
    if not converted:
        return

    def to_curly(text: str) -> str:
        for angle in converted:
            text = text.replace(angle, "{" + angle[1:-1] + "}")
        return text

    _map_prompts(p, to_curly)
    p._lib_ti_curly = None
