"""Differentiable text encoding with spliced embedding vectors, over the hosts' own modules.

Two module layouts are supported:

* transformers ``CLIPTextModel`` (A1111 SD1 and SDXL CLIP-L; Forge CLIP-L and CLIP-G),
* an open_clip text tower (A1111 SD2 OpenCLIP-H and SDXL CLIP-G): ``token_embedding``,
  ``positional_embedding``, ``transformer.resblocks``, ``ln_final``, ``text_projection``, ``attn_mask``.

The prompt's token embeddings come from the real table; each embedding name's placeholder rows are
replaced by its vectors (the tokenizer and the table never change); then the transformer runs to the
layer the host conditions on. The hosts wrap ``token_embedding`` in their own splicing module
(``.wrapped`` holds the real one in A1111): we look through it and never call it, so the host's
splice is not triggered. All weights stay frozen; gradients reach only the vectors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from lib_ti.text.prompt import Chunk, EmbeddingIndex, TokenizerInfo, chunk_prompt, empty_chunk
from lib_ti.text.vocab import bpe_to_text

logger = logging.getLogger(__name__)

Tokenize = Callable[[Sequence[str]], list[list[int]]]


def unwrap_embedding(module: nn.Module) -> nn.Embedding:
    """The real ``nn.Embedding`` inside the hosts' wrappers (A1111 ``EmbeddingsWithFixes.wrapped``)."""
    seen = 0
    while not isinstance(module, nn.Embedding):
        inner = getattr(module, "wrapped", None)
        if not isinstance(inner, nn.Module) or seen > 8:
            msg = f"cannot find the token-embedding table inside {type(module).__name__}"
            raise TypeError(msg)
        module, seen = inner, seen + 1
    return module


@dataclass
class EncoderSettings:
    """Which hidden state the host conditions on.

    ``skip``: number of final transformer blocks not run (0 = last layer, 1 = penultimate).
    ``final_norm``: apply the final layer norm to that state (SD1 with CLIP skip, SD2) or not (SDXL).
    ``pooled``: also return the pooled vector (SDXL CLIP-G): the end-of-text token of the LAST layer,
    through the final norm and the text projection.
    ``id_pad``: the id after the first end-of-text token (49407 CLIP-L; 0 open_clip).
    """

    skip: int = 0
    final_norm: bool = True
    pooled: bool = False
    id_pad: int | None = None


class TextEncoder:
    """One text encoder of a model: tokenize, look up, splice, encode."""

    key: str
    width: int
    settings: EncoderSettings
    tokenizer: TokenizerInfo

    #: run the encoder in this dtype whatever the table's storage dtype (Forge: fp16 tables, fp32 compute)
    compute_dtype: torch.dtype | None = None

    def __init__(self, key: str, tokenizer: TokenizerInfo, settings: EncoderSettings) -> None:
        self.key = key
        self.tokenizer = tokenizer
        self.settings = settings

    # -- implemented per layout
    @property
    def table(self) -> nn.Embedding:
        raise NotImplementedError

    def run(self, embeds: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings [B, 77, D] (before positions) -> (hidden state, pooled or None)."""
        raise NotImplementedError

    # -- shared
    @property
    def device(self) -> torch.device:
        return self.table.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.table.weight.dtype

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.tokenize([text])[0]

    @property
    def table_weight(self) -> torch.Tensor:
        return self.table.weight.detach()

    def decode_token(self, token_id: int) -> str:
        return self.tokenizer.decode(token_id) if self.tokenizer.decode else str(token_id)

    def token_vectors(self, ids: Sequence[int]) -> torch.Tensor:
        """Rows of the token-embedding table for these ids (no gradient): [len(ids), D]."""
        with torch.no_grad():
            t = torch.as_tensor(list(ids), dtype=torch.long, device=self.device)
            return self.table(t).detach()

    @property
    def pad_id(self) -> int:
        """The id after the first end-of-text token (49407 CLIP-L; 0 open_clip and the hosts' CLIP-G)."""
        return self.tokenizer.id_end if self.settings.id_pad is None else self.settings.id_pad

    def text_vectors(self, text: str) -> torch.Tensor:
        """The token embeddings of a text (the init-text lookup): [tokens, D]."""
        return self.token_vectors(self.tokenize(text))

    def chunk_ids(self, chunk: Chunk) -> list[int]:
        ids = list(chunk.tokens)
        pad = self.settings.id_pad
        if pad is not None and pad != self.tokenizer.id_end and self.tokenizer.id_end in ids:
            first_end = ids.index(self.tokenizer.id_end)
            ids[first_end + 1 :] = [pad] * (len(ids) - first_end - 1)
        return ids

    def encode_chunks(
        self, batch: Sequence[Chunk], vectors: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Encode one chunk per batch item, splicing ``vectors[name]`` at each fix."""
        ids = torch.tensor([self.chunk_ids(c) for c in batch], dtype=torch.long, device=self.device)
        with torch.no_grad():
            base = self.table(ids)
            if self.compute_dtype is not None:
                base = base.to(self.compute_dtype)
        rows = []
        for chunk, item in zip(batch, base):
            if not chunk.fixes:
                rows.append(item)
                continue
            pieces, cursor = [], 0
            for offset, name in sorted(chunk.fixes):
                vec = vectors[name].to(device=item.device, dtype=item.dtype)
                start = offset + 1  # after the start token
                n = min(item.shape[0] - start - 1, vec.shape[0])
                pieces += [item[cursor:start], vec[:n]]
                cursor = start + n
            pieces.append(item[cursor:])
            rows.append(torch.cat(pieces))
        embeds = torch.stack(rows)
        return self.run(embeds, ids)


class HFClipEncoder(TextEncoder):
    """Over a transformers ``CLIPTextModel`` (or ``CLIPTextModelWithProjection`` for pooled output)."""

    def __init__(
        self,
        key: str,
        model: nn.Module,
        tokenizer: TokenizerInfo,
        settings: EncoderSettings,
        projection: nn.Module | torch.Tensor | None = None,
    ) -> None:
        super().__init__(key, tokenizer, settings)
        #: transformers' CLIPTextTransformer (duck-typed: its attributes differ across versions)
        self.text_model: Any = getattr(model, "text_model", model)
        self.projection = projection if projection is not None else getattr(model, "text_projection", None)
        self.width = int(self.table.weight.shape[1])

    @property
    def table(self) -> nn.Embedding:
        return unwrap_embedding(self.text_model.embeddings.token_embedding)

    def run(self, embeds: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        tm = self.text_model
        b, t = ids.shape
        positions = tm.embeddings.position_embedding(torch.arange(t, device=embeds.device).unsqueeze(0))
        h = embeds + positions.to(embeds.dtype)
        mask = torch.full((t, t), torch.finfo(h.dtype).min, device=h.device, dtype=h.dtype).triu_(1)
        mask = mask[None, None].expand(b, 1, t, t)
        layers = tm.encoder.layers
        stop = len(layers) - self.settings.skip
        state = None
        for i, layer in enumerate(layers):
            if i == stop:
                state = h
                if not self.settings.pooled:
                    break
            h = layer(h, None, mask)[0]
        if state is None:
            state = h
        if self.settings.final_norm:
            state = tm.final_layer_norm(state)
        pooled = None
        if self.settings.pooled:
            last = tm.final_layer_norm(h)
            pooled = last[torch.arange(b, device=h.device), ids.argmax(dim=-1)]
            if self.projection is not None:
                pooled = (
                    self.projection(pooled)
                    if isinstance(self.projection, nn.Module)
                    else pooled @ self.projection
                )
        return state, pooled


class OpenClipEncoder(TextEncoder):
    """Over an open_clip text tower (sequence-first transformer in open_clip 2.20)."""

    def __init__(
        self, key: str, model: nn.Module, tokenizer: TokenizerInfo, settings: EncoderSettings
    ) -> None:
        super().__init__(key, tokenizer, settings)
        #: open_clip's text tower (duck-typed: its attributes differ across versions)
        self.model: Any = model
        self.width = int(self.table.weight.shape[1])

    @property
    def table(self) -> nn.Embedding:
        return unwrap_embedding(self.model.token_embedding)

    def run(self, embeds: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.model
        b = ids.shape[0]
        h = embeds + m.positional_embedding.to(embeds.dtype)
        batch_first = bool(getattr(m.transformer, "batch_first", False))
        if not batch_first:
            h = h.permute(1, 0, 2)
        blocks = m.transformer.resblocks
        stop = len(blocks) - self.settings.skip
        state = None
        for i, block in enumerate(blocks):
            if i == stop:
                state = h
                if not self.settings.pooled:
                    break
            h = block(h, attn_mask=m.attn_mask)
        if state is None:
            state = h
        if not batch_first:
            state, h = state.permute(1, 0, 2), h.permute(1, 0, 2)
        if self.settings.final_norm:
            state = m.ln_final(state)
        pooled = None
        if self.settings.pooled:
            last = m.ln_final(h)
            pooled = last[torch.arange(b, device=h.device), ids.argmax(dim=-1)] @ m.text_projection
        return state, pooled


@dataclass
class Conditioning:
    """What the UNet gets: cross-attention context [B, 77k, sum of widths]; SDXL also pooled [B, 1280]."""

    crossattn: torch.Tensor
    pooled: torch.Tensor | None = None


EmphasisMode = Literal["Original", "No norm", "Ignore", "None"]


@dataclass
class PromptSettings:
    comma_padding_backtrack: int = 20
    emphasis: EmphasisMode = "Original"


def apply_emphasis(z: torch.Tensor, weights: torch.Tensor, mode: EmphasisMode) -> torch.Tensor:
    """A1111's emphasis: scale by the weights; "Original" then restores the chunk's mean."""
    if mode in ("Ignore", "None"):
        return z
    original_mean = z.mean()
    z = z * weights.reshape((*weights.shape, 1)).expand(z.shape)
    if mode == "Original":
        z = z * (original_mean / z.mean())
    return z


class PromptEncoder:
    """Encode prompts with embeddings spliced in, for one model's text encoders (1 or 2)."""

    def __init__(self, encoders: Sequence[TextEncoder], settings: PromptSettings | None = None) -> None:
        if not encoders:
            msg = "at least one text encoder is needed"
            raise ValueError(msg)
        self.encoders = list(encoders)
        self.settings = settings or PromptSettings()

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.encoders]

    def chunks(
        self, prompt: str, lengths: Mapping[str, int], encoder: TextEncoder | None = None
    ) -> list[Chunk]:
        enc = encoder or self.encoders[0]
        # The hosts find names with the first encoder's tokenizer (SDXL: CLIP-L's).
        index = EmbeddingIndex(lengths, self.encoders[0].tokenizer.tokenize) if lengths else None
        chunks, _ = chunk_prompt(
            prompt,
            enc.tokenizer,
            index,
            comma_padding_backtrack=self.settings.comma_padding_backtrack,
            emphasis=self.settings.emphasis != "None",
        )
        return chunks

    def encode(
        self, prompts: str | Sequence[str], embeddings: Mapping[str, Mapping[str, torch.Tensor]] | None = None
    ) -> Conditioning:
        """Conditioning for prompts; ``embeddings`` maps a name to per-encoder vectors ``{key: [N, D]}``."""
        if isinstance(prompts, str):
            prompts = [prompts]
        embeddings = embeddings or {}
        lengths = {name: int(next(iter(v.values())).shape[0]) for name, v in embeddings.items()}
        outs, pooled = [], None
        for enc in self.encoders:
            batch = [self.chunks(p, lengths, enc) for p in prompts]
            count = max(len(c) for c in batch)
            vectors = {name: v[enc.key] for name, v in embeddings.items() if enc.key in v}
            missing = {n for c in batch for ch in c for _, n in ch.fixes} - set(vectors)
            if missing:
                msg = f"embedding {sorted(missing)[0]!r} has no {enc.key} vectors"
                raise ValueError(msg)
            zs = []
            for i in range(count):
                chunk_batch = [c[i] if i < len(c) else empty_chunk(enc.tokenizer) for c in batch]
                z, p = enc.encode_chunks(chunk_batch, vectors)
                weights = torch.tensor([c.weights for c in chunk_batch], device=z.device, dtype=z.dtype)
                zs.append(apply_emphasis(z, weights, self.settings.emphasis))
                if i == 0 and p is not None:
                    pooled = p
            outs.append(torch.cat(zs, dim=1))
        crossattn = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        return Conditioning(crossattn, pooled)


def freeze(module: nn.Module) -> nn.Module:
    """Turn off gradients for every weight (the trainer only optimizes embedding vectors)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module


_CACHED = "_lib_ti_tokenizer_info"


def _cached(tokenizer: Any, make: Callable[[], TokenizerInfo]) -> TokenizerInfo:
    """One TokenizerInfo per tokenizer object, kept on it (the model parts are rebuilt at each use)."""
    info = getattr(tokenizer, _CACHED, None)
    if isinstance(info, TokenizerInfo):
        return info
    info = make()
    try:
        setattr(tokenizer, _CACHED, info)
    except AttributeError:
        logger.debug("cannot cache the tokenizer info on %s", type(tokenizer).__name__)
    return info


def hf_tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    """TokenizerInfo for a transformers CLIPTokenizer, called as A1111 does (no truncation, no specials)."""

    def make() -> TokenizerInfo:
        def tokenize(texts: Sequence[str]) -> list[list[int]]:
            return tokenizer(list(texts), truncation=False, add_special_tokens=False)["input_ids"]

        vocab = tokenizer.get_vocab()
        by_id = {i: t for t, i in vocab.items()}
        byte_decoder = getattr(tokenizer, "byte_decoder", None)

        def decode(token_id: int) -> str:
            return bpe_to_text(by_id.get(token_id, "?"), byte_decoder)

        return TokenizerInfo(
            tokenize, tokenizer.bos_token_id, tokenizer.eos_token_id, vocab.get(",</w>"), decode
        )

    return _cached(tokenizer, make)


def open_clip_tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    """TokenizerInfo for open_clip's ``SimpleTokenizer`` (``open_clip.tokenizer._tokenizer``)."""

    def make() -> TokenizerInfo:
        def tokenize(texts: Sequence[str]) -> list[list[int]]:
            return [tokenizer.encode(t) for t in texts]

        enc = tokenizer.encoder
        byte_decoder = getattr(tokenizer, "byte_decoder", None)

        def decode(token_id: int) -> str:
            return bpe_to_text(tokenizer.decoder.get(token_id, "?"), byte_decoder)

        return TokenizerInfo(tokenize, enc["<start_of_text>"], enc["<end_of_text>"], enc.get(",</w>"), decode)

    return _cached(tokenizer, make)
