"""Query-conditioned CLIP relevance maps for the ``api_prompt`` visual prompt (appendix C.1).

Following attention prompting (Yu et al., 2024), for each key frame f with its sample's query q:

    z      = hidden_states[layer][:, 1:]                       patch tokens of an intermediate layer
    v_fn   = visual_projection(post_layernorm(z_fn))           each patch into the joint space
    t_q    = text_projection(pooled text features of q)
    s_fn   = cos(v_fn, t_q)                                    [F, g, g], g = image_size / patch
    m_f    = (s_f - min s_f) / (max s_f - min s_f)             per frame, 0 where s_f is constant

The paper uses CLIP ViT-L/14-336; nothing is downloaded here: ``ClipRelevance.from_pretrained``
loads a ``transformers`` CLIPModel and its tokenizer from a local directory
(``local_files_only=True``; config ``vp.clip_path``). Frames are squashed (no crop) to the
model's square input size, so the map covers the whole frame; ``render_vp(..., "api_prompt",
heatmap=m)`` upsamples it back to the frame and blends it in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

__all__ = ["ClipRelevance", "clip_heatmap_fn", "OPENAI_CLIP_MEAN", "OPENAI_CLIP_STD"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ClipRelevance:
    """Per-frame relevance maps [F, g, g] in [0, 1] from a CLIP model (module docstring).

    ``layer`` indexes the vision tower's ``hidden_states`` (index 0 is the embedding output,
    i is the output of encoder layer i; negative counts from the end, default -2: the
    penultimate layer).
    """

    def __init__(self, model, tokenizer=None, *, layer: int = -2,
                 image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
                 image_std: Sequence[float] = OPENAI_CLIP_STD, batch_size: int = 32):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.layer = layer
        self.batch_size = max(1, int(batch_size))
        vcfg = model.config.vision_config
        self.image_size = int(vcfg.image_size)
        self.grid = self.image_size // int(vcfg.patch_size)
        n_states = int(vcfg.num_hidden_layers) + 1
        if not -n_states <= layer < n_states:
            raise ValueError(f"layer {layer} out of range for {n_states} hidden states")
        self.max_text_len = int(model.config.text_config.max_position_embeddings)
        self._mean = torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, layer: int = -2,
                        batch_size: int = 32) -> "ClipRelevance":
        """Load CLIPModel + tokenizer (+ image mean/std from preprocessor_config.json when
        present) from a local directory; never touches the network."""
        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"CLIP checkpoint directory not found: {path}")
        model = CLIPModel.from_pretrained(path, local_files_only=True, dtype=dtype).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            cfg = json.loads(pre.read_text())
            mean = tuple(cfg.get("image_mean", mean))
            std = tuple(cfg.get("image_std", std))
        return cls(model, tokenizer, layer=layer, image_mean=mean, image_std=std,
                   batch_size=batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def tokenize(self, queries: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tokenizer is None:
            raise ValueError("no tokenizer: pass input_ids (and attention_mask) instead of text")
        enc = self.tokenizer(list(queries), padding=True, truncation=True,
                             max_length=self.max_text_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    @torch.no_grad()
    def text_embeddings(self, queries: Optional[Sequence[str]] = None, *,
                        input_ids: Optional[torch.Tensor] = None,
                        attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[T, D] unit-norm fp32 projected text embeddings of T queries."""
        if input_ids is None:
            if queries is None:
                raise ValueError("pass queries or input_ids")
            input_ids, attention_mask = self.tokenize(queries)
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.model.text_model(input_ids=input_ids, attention_mask=attention_mask.to(self.device))
        t = self.model.text_projection(out.pooler_output)
        return F.normalize(t.float(), dim=-1)

    def pixel_values(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> normalised [B, 3, S, S] in the model's dtype and device."""
        x = frames.to(self.device).permute(0, 3, 1, 2).to(torch.float32) / 255.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                          align_corners=False, antialias=True)
        x = (x - self._mean.to(x.device)) / self._std.to(x.device)
        return x.to(self.dtype)

    @torch.no_grad()
    def patch_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """[B, g*g, D] unit-norm fp32 patch features of the chosen layer in the joint space."""
        vm = self.model.vision_model
        out = vm(pixel_values=self.pixel_values(frames), output_hidden_states=True)
        z = out.hidden_states[self.layer][:, 1:]                      # drop CLS
        v = self.model.visual_projection(vm.post_layernorm(z))
        return F.normalize(v.float(), dim=-1)

    @torch.no_grad()
    def __call__(self, frames: torch.Tensor, queries: Optional[Sequence[str]] = None, *,
                 input_ids: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 query_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Relevance maps [F, g, g] fp32 in [0, 1] on the frames' device.

        frames: uint8 [F, H, W, 3] key frames (of any number of samples); queries: T strings
        (or pre-tokenized ``input_ids`` [T, L]); query_index [F]: the query of each frame
        (default: all frames use the one query when T == 1, frame i uses query i when T == F).
        """
        if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {tuple(frames.shape)}")
        t = self.text_embeddings(queries, input_ids=input_ids, attention_mask=attention_mask)
        n_f, n_t = frames.shape[0], t.shape[0]
        if query_index is None:
            if n_t == 1:
                query_index = torch.zeros(n_f, dtype=torch.long)
            elif n_t == n_f:
                query_index = torch.arange(n_f)
            else:
                raise ValueError(f"{n_t} queries for {n_f} frames: pass query_index")
        query_index = query_index.to(device=t.device, dtype=torch.long)
        if query_index.shape != (n_f,):
            raise ValueError(f"query_index must be [F={n_f}], got {tuple(query_index.shape)}")
        maps = []
        for s in range(0, n_f, self.batch_size):
            v = self.patch_embeddings(frames[s:s + self.batch_size])          # [B, N, D]
            sim = torch.einsum("bnd,bd->bn", v, t[query_index[s:s + self.batch_size]])
            maps.append(sim)
        sim = torch.cat(maps) if maps else torch.zeros(0, self.grid * self.grid, device=t.device)
        sim = sim.view(n_f, self.grid, self.grid)
        lo = sim.amin(dim=(1, 2), keepdim=True) if n_f else sim
        hi = sim.amax(dim=(1, 2), keepdim=True) if n_f else sim
        span = hi - lo
        rel = torch.where(span > 0, (sim - lo) / torch.where(span > 0, span, 1.0), 0.0)
        return rel.clamp(0.0, 1.0).to(frames.device)


def clip_heatmap_fn(clip_path: str | Path, device: str | torch.device = "cpu"):
    """A ``vp.render.HeatmapFn`` from a local CLIP checkpoint: (frames [K, H, W, 3], query) ->
    relevance maps [K, g, g] of every frame for the one query."""
    rel = ClipRelevance.from_pretrained(clip_path, device=device)
    return lambda frames, query: rel(frames, [query])
