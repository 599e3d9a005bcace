"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"), nanoGPT style.

Pre-LayerNorm decoder blocks, GELU MLP, learned position embeddings, token embedding tied to the
output projection (Press & Wolf 2017), GPT-2 initialisation: N(0, 0.02) everywhere and the residual
projections (``attn.c_proj``, ``mlp.c_proj``) scaled by 1/sqrt(2 * n_layer). Attention is
``F.scaled_dot_product_attention(is_causal=True)``, so CUDA runs use flash attention.

Context: ``dataset.context`` governs the window length the model is trained and evaluated on
(``data.input_shape[0]``). ``model.block_size`` is the size of the position table; null means the
dataset's context, and a block_size shorter than the context is a config error.

Vocabulary: ``data.num_classes``, padded up to a multiple of ``model.pad_vocab_to`` (64: matmul-friendly
shapes, as in nanoGPT's 50257 -> 50304). The padded rows never correspond to a token; the output is
sliced back to the true vocabulary, so the loss and perplexity are exact. Padded rows are parameters
and are counted in ``params``.

Normalization layers are ``nn.LayerNorm`` modules named ``ln_1``, ``ln_2`` (per block) and ``ln_f``,
built by ``norm_factory`` and listed by ``norm_layers()``, so a technique can swap them by name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError


def layer_norm(dim: int, bias: bool = True) -> nn.Module:
    return nn.LayerNorm(dim, bias=bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        if n_embd % n_head:
            raise ConfigError(f"model.n_embd={n_embd} must be divisible by model.n_head={n_head}")
        self.n_head, self.dropout = n_head, dropout
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C)))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU approximation
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool, norm_factory: Callable[[int], nn.Module]):
        super().__init__()
        self.ln_1 = norm_factory(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = norm_factory(n_embd)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        block_size: int = 1024,
        n_layer: int = 12,
        n_head: int = 12,
        n_embd: int = 768,
        dropout: float = 0.0,
        bias: bool = True,
        pad_vocab_to: int = 64,
        train_context: int | None = None,
        norm_factory: Callable[[int], nn.Module] | None = None,
    ):
        super().__init__()
        norm_factory = norm_factory or (lambda d: layer_norm(d, bias))
        self.vocab_size, self.block_size, self.n_layer, self.n_head, self.n_embd = (
            vocab_size,
            block_size,
            n_layer,
            n_head,
            n_embd,
        )
        self.train_context = train_context or block_size  # T of the FLOPs estimate
        m = max(1, int(pad_vocab_to or 1))
        self.padded_vocab = -(-vocab_size // m) * m
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(self.padded_vocab, n_embd),
                wpe=nn.Embedding(block_size, n_embd),
                drop=nn.Dropout(dropout),
                h=nn.ModuleList([Block(n_embd, n_head, dropout, bias, norm_factory) for _ in range(n_layer)]),
                ln_f=norm_factory(n_embd),
            )
        )
        self.lm_head = nn.Linear(n_embd, self.padded_vocab, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied: one tensor, counted once
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # residual projections: GPT-2's 1/sqrt(2 * n_layer)
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def norm_layers(self) -> dict[str, nn.Module]:
        """Every normalization module by its qualified name (``transformer.h.0.ln_1``, ..., ``transformer.ln_f``)."""
        return {n: m for n, m in self.named_modules() if n.rsplit(".", 1)[-1] in ("ln_1", "ln_2", "ln_f")}

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameters counted once (the tied embedding is one tensor); ``non_embedding`` leaves out the
        position table, as nanoGPT does for its FLOPs estimate (the token table is the output matmul)."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n

    def flops_per_sample(self) -> int:
        """Training FLOPs per token: 6·N + 12·L·H·Q·T (PaLM appendix B; nanoGPT's estimate_mfu), with N
        the non-position parameters, Q the head size and T the training context. Per token, not per
        sequence: the record's throughput for LMs is tokens/s."""
        q = self.n_embd // self.n_head
        return 6 * self.num_params(non_embedding=True) + 12 * self.n_layer * self.n_head * q * self.train_context

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.block_size:
            raise ValueError(f"sequence of length {T} exceeds model.block_size={self.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        return logits[..., : self.vocab_size] if self.padded_vocab != self.vocab_size else logits


def gpt(
    data,
    *,
    n_layer: int,
    n_head: int,
    n_embd: int,
    block_size: int | None,
    dropout: float,
    bias: bool,
    pad_vocab_to: int,
) -> GPT:
    """``conf/model/gpt2_*.yaml``: a GPT-2 for the dataset's vocabulary; ``block_size`` null: its context."""
    if data.task != "lm":
        raise ConfigError(
            f"GPT-2 is a language model; dataset {data.name!r} is {data.task!r}, not 'lm' (use e.g. dataset=wikitext2)"
        )
    context = int(data.input_shape[0])
    block_size = context if block_size is None else int(block_size)
    if block_size < context:
        raise ConfigError(
            f"model.block_size={block_size} is shorter than dataset.context={context}; raise block_size or lower dataset.context"
        )
    return GPT(
        vocab_size=int(data.num_classes),
        block_size=block_size,
        n_layer=int(n_layer),
        n_head=int(n_head),
        n_embd=int(n_embd),
        dropout=float(dropout),
        bias=bool(bias),
        pad_vocab_to=int(pad_vocab_to or 1),
        train_context=context,
    )
