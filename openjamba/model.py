"""JambaForCausalLM: embedding -> decoder layers (attention or Mamba mixer, then MLP or MoE) -> norm -> lm_head.

Parameter names are the transformers / released-checkpoint names (model.layers.i.mamba.in_proj.weight,
...), except that the experts of an MoE layer live in two 3-D tensors (see layers/moe.py);
checkpoint.py converts to and from the per-expert layout on disk.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .cache import HybridCache
from .config import JambaConfig
from .layers.attention import Attention
from .layers.mamba import MambaMixer
from .layers.mlp import MLP
from .layers.moe import SparseMoE, load_balancing_loss
from .layers.norm import RMSNorm


@dataclass
class JambaOutput:
    logits: torch.Tensor  # (B, T, V), or (B, num_logits_to_keep, V)
    loss: torch.Tensor | None = None  # CE + router_aux_loss_coef * aux (+ activation loss), with labels
    aux_loss: torch.Tensor | None = None  # load-balancing loss (None without MoE layers)
    cache: HybridCache | None = None
    activation_loss: torch.Tensor | None = None  # mean square of layer outputs, when asked for


class DecoderLayer(nn.Module):
    """h = x + mixer(input_layernorm(x));  out = h + ffn(pre_ff_layernorm(h))."""

    def __init__(self, config: JambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.is_attention = config.is_attention(layer_idx)
        self.is_moe = config.is_moe(layer_idx)
        if self.is_attention:
            self.self_attn = Attention(config, layer_idx)
        else:
            self.mamba = MambaMixer(config, layer_idx)
        self.feed_forward = SparseMoE(config) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, mask=None, key_mask=None, cache=None):
        """x: (B, T, H); mask: (B, T) bool for the new tokens; key_mask: (B, S) bool for all keys.
        Returns (out, router stats or None)."""
        h = self.input_layernorm(x)
        h = self.self_attn(h, key_mask, cache) if self.is_attention else self.mamba(h, mask, cache)
        x = x + h
        h = self.pre_ff_layernorm(x)
        stats = None
        if self.is_moe:
            h, probs, idx = self.feed_forward(h)
            stats = (probs, idx)
        else:
            h = self.feed_forward(h)
        return x + h, stats


class JambaModel(nn.Module):
    def __init__(self, config: JambaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.final_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class JambaForCausalLM(nn.Module):
    def __init__(self, config: JambaConfig):
        super().__init__()
        if not isinstance(config, JambaConfig):
            raise TypeError(f"JambaForCausalLM needs a JambaConfig, got {type(config).__name__}")
        self.config = config
        self.model = JambaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.tie_weights()
        self.tokenizer = None  # a tokenizers.Tokenizer, set by from_pretrained when tokenizer.json is present
        self.tokenizer_config = None  # tokenizer_config.json contents (chat template...), written back on save
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Make lm_head share the embedding when config.tie_word_embeddings (again after to_empty())."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, initializer_range) weights; projections into the residual stream scaled by
        1/sqrt(2 * layers) (GPT-2) so the residual variance does not grow with depth; Mamba's own init
        for A_log, D and the dt projection."""
        std = self.config.initializer_range
        resid_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                last = name.rsplit(".", 1)[-1]
                module.weight.normal_(0.0, resid_std if last in ("o_proj", "out_proj", "down_proj") else std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, SparseMoE):
                module.experts.gate_up_proj.normal_(0.0, std)
                module.experts.down_proj.normal_(0.0, resid_std)
        for module in self.modules():
            if isinstance(module, MambaMixer):
                module.conv1d.reset_parameters()
                module.dt_proj.weight.uniform_(-module.dt_rank ** -0.5, module.dt_rank ** -0.5)
                module.reset_ssm_parameters()

    # ------------------------------------------------------------------ forward
    def forward(self, input_ids, attention_mask=None, labels=None, cache: HybridCache | None = None,
                num_logits_to_keep: int = 0, activation_loss_coef: float = 0.0) -> JambaOutput:
        """input_ids: (B, T) token ids. attention_mask: (B, T) (or (B, cached + T)) with 1 for tokens and
        0 for (left) padding. labels: (B, T), -100 ignored; the loss shifts them by one. cache: a
        HybridCache from `new_cache`, continued from and advanced by T. num_logits_to_keep: compute logits
        for the last n positions only (0 = all)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be a 2-D (batch, seq) tensor, got "
                             f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids)}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        mask = self._new_token_mask(attention_mask, B, T, past)
        if cache is not None:
            if cache.batch_size != B:
                raise ValueError(f"cache was made for batch size {cache.batch_size}, input has {B}")
            cache.check_room(T)
            key_mask = cache.record_mask(mask, T)
        else:
            key_mask = mask
        h = self.model.embed_tokens(input_ids)
        stats, act_sq = [], []
        for layer in self.model.layers:
            h, st = layer(h, mask, key_mask, cache)
            if st is not None:
                stats.append(st)
            if activation_loss_coef:
                act_sq.append(h.float().pow(2).mean())
        if cache is not None:
            cache.advance(T)
        h = self.model.final_layernorm(h)
        if num_logits_to_keep:
            h = h[:, -num_logits_to_keep:]
        logits = self.lm_head(h)
        aux = load_balancing_loss(stats, self.config.num_experts, mask)
        act = torch.stack(act_sq).mean() if act_sq else None
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {tuple(input_ids.shape)}")
            if num_logits_to_keep:
                raise ValueError("labels need logits at every position: leave num_logits_to_keep at 0")
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                   labels[:, 1:].reshape(-1), ignore_index=-100)
            if aux is not None:
                loss = loss + self.config.router_aux_loss_coef * aux
            if act is not None:
                loss = loss + activation_loss_coef * act
        return JambaOutput(logits=logits, loss=loss, aux_loss=aux, cache=cache, activation_loss=act)

    @staticmethod
    def _new_token_mask(attention_mask, B, T, past):
        """The (B, T) bool mask of the new tokens, or None when nothing is padding."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 2 or attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past + T):
            raise ValueError(f"attention_mask must be (batch, {T}) or (batch, {past + T}), got "
                             f"{tuple(attention_mask.shape)}")
        mask = attention_mask[:, -T:].bool()
        return None if bool(mask.all()) else mask

    # ------------------------------------------------------------------ conveniences
    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, batch_size: int, max_length: int) -> HybridCache:
        """An empty preallocated cache for `batch_size` sequences of up to `max_length` positions."""
        return HybridCache(self.config, batch_size, max_length, device=self.device, dtype=self.dtype)

    def num_parameters(self) -> dict[str, int]:
        return self.config.param_counts()

    def generate(self, input_ids, attention_mask=None, engine: str = "auto", **kwargs):
        """Prompt followed by new tokens, (B, prompt + new).

        engine: "eager" (openjamba.generation.generate: the model's forward step by step), "fast"
        (openjamba.inference.generate: chunked prefill, static cache step captured in a CUDA graph,
        on-device sampling) or "auto" (fast on CUDA, eager elsewhere). Greedy tokens agree (tested in fp32;
        bf16 rounding can part them after a near-tie)."""
        if engine not in ("auto", "eager", "fast"):
            raise ValueError(f"engine must be 'auto', 'eager' or 'fast', got {engine!r}")
        if engine == "fast" or (engine == "auto" and self.device.type == "cuda"):
            from .inference import generate
        else:
            from .generation import generate
        return generate(self, input_ids, attention_mask=attention_mask, **kwargs)

    def generate_stream(self, input_ids, attention_mask=None, **kwargs):
        """Yields each step's new tokens (B,) as they are produced. See openjamba.generation.stream."""
        from .generation import stream

        return stream(self, input_ids, attention_mask=attention_mask, **kwargs)

    @classmethod
    def from_pretrained(cls, directory, dtype=None, device=None) -> "JambaForCausalLM":
        """Load config.json + safetensors (single or sharded, per-expert or fused MoE layout)."""
        from .checkpoint import load_pretrained

        return load_pretrained(directory, dtype=dtype, device=device)

    def save_pretrained(self, directory, max_shard_size: int | str | None = None) -> None:
        """Write config.json + safetensors in the per-expert layout every Jamba tool reads."""
        from .checkpoint import save_pretrained

        save_pretrained(self, directory, max_shard_size=max_shard_size)
