"""A small character-level transformer language model and its data, for the
DiLoCo example and benchmark.

The text is the Python standard library's own source (every machine with
Python has it): the ``.py`` files under ``sysconfig.get_paths()["stdlib"]``
in sorted order, concatenated, cut to a fixed size.  Characters map to a
98-symbol vocabulary (tab, newline, printable ASCII, one "other").  The
last tenth is the validation split.
"""

from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 98  # 0: other, 1: tab, 2: newline, 3..97: ' '..'~'


def encode(text: str) -> torch.Tensor:
    codes = bytearray(len(text))
    for i, ch in enumerate(text):
        o = ord(ch)
        codes[i] = 1 if o == 9 else 2 if o == 10 else o - 29 if 32 <= o <= 126 else 0
    return torch.frombuffer(codes, dtype=torch.uint8).to(torch.int64)


def decode(codes) -> str:
    table = "?\t\n" + "".join(chr(c) for c in range(32, 127))
    return "".join(table[int(c)] for c in codes)


def stdlib_text(max_chars: int = 3_000_000) -> tuple[str, str]:
    """(text, description): the stdlib's .py files in a fixed order, cut to
    ``max_chars`` characters."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames
                             if d not in ("site-packages", "dist-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    files.sort(key=lambda p: os.path.relpath(p, root))
    parts, total = [], 0
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            chunk = f.read()
        parts.append(chunk)
        total += len(chunk)
        if total >= max_chars:
            break
    text = "".join(parts)[:max_chars]
    return text, f"{len(parts)} files of {root}, {len(text) / 1e6:.1f} M chars"


@dataclass
class Corpus:
    train: torch.Tensor
    val: torch.Tensor
    description: str


def load_corpus(max_chars: int = 3_000_000) -> Corpus:
    text, description = stdlib_text(max_chars)
    data = encode(text)
    cut = len(data) * 9 // 10
    return Corpus(train=data[:cut], val=data[cut:], description=description)


class Batches:
    """Random windows of ``context + 1`` characters from ``data``, drawn by
    a generator seeded with ``seed`` (give each peer its own)."""

    def __init__(self, data: torch.Tensor, batch_size: int, context: int, seed: int):
        self.data = data
        self.batch_size = batch_size
        self.context = context
        self.gen = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.data) - self.context - 1, (self.batch_size,),
                               generator=self.gen)
        offsets = torch.arange(self.context + 1)
        windows = self.data[starts[:, None] + offsets]
        return windows[:, :-1], windows[:, 1:]


@dataclass(frozen=True)
class ModelConfig:
    d_model: int = 96
    layers: int = 4
    heads: int = 4
    context: int = 128


SIZES = {
    "tiny": ModelConfig(d_model=64, layers=2, heads=4, context=64),
    "small": ModelConfig(d_model=96, layers=4, heads=4, context=128),
}


class Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then an MLP."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.fc_out = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.fc_out(F.gelu(self.fc(self.norm2(x))))


class CharLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok = nn.Embedding(VOCAB, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.heads) for _ in range(cfg.layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, VOCAB)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                # Small init; residual projections scaled by depth.
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("proj.weight",
                                                                          "fc_out.weight")) \
                    else 0.02
                nn.init.normal_(p, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(t))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))

    def loss(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self(idx)
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def evaluate(model: CharLM, val: torch.Tensor, batches: int = 8, batch_size: int = 16) -> float:
    """Mean loss on a fixed set of validation windows (the same on every
    peer and every call)."""
    was_training = model.training
    model.eval()
    sampler = Batches(val, batch_size, model.cfg.context, seed=12345)
    total = 0.0
    for _ in range(batches):
        x, y = sampler.next()
        total += float(model.loss(x, y))
    model.train(was_training)
    return total / batches
