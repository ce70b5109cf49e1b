"""DiT/SiT-style transformer: ``net(x: (B, C, H, W), c_noise: (B, num_times), cond=None) -> (B, C, H, W)``.

The architecture of DiT (Peebles & Xie, "Scalable Diffusion Models with Transformers"; facebookresearch/DiT
``models.py``), which SiT and the Mean Flow paper reuse:

* patchify: ``x_embedder.proj``, a ``Conv2d(C, hidden, kernel=stride=patch_size)`` (timm's ``PatchEmbed``), giving
  ``T = (H / p) (W / p)`` tokens of width ``hidden``, plus fixed 2-D sin-cos position embeddings (DiT's
  ``get_2d_sincos_pos_embed``, MAE's convention: the first half of the channels encodes the column index, the
  second half the row index; each half is ``[sin, cos]``);
* ``depth`` blocks (``DiTBlock``) with adaLN-Zero: ``SiLU + Linear(hidden, 6 hidden)`` of the conditioning vector
  ``c`` gives shift/scale/gate for attention and for the MLP; LayerNorms without affine parameters (eps 1e-6);
  multi-head self-attention with a fused ``qkv`` linear (bias) and ``proj`` (timm's ``Attention``), MLP ratio 4 with
  GELU(tanh) (timm's ``Mlp``);
* final layer: adaLN (shift, scale) + ``Linear(hidden, p * p * C)``, then unpatchify (DiT's ``unpatchify``);
* initialisation as DiT's ``initialize_weights``: Xavier-uniform linears with zero biases, the patch convolution
  Xavier-uniform on its flattened weight, every adaLN modulation linear and the final linear zero, so that the
  network outputs exactly zero at initialisation and every block starts as the identity.

The parameter names follow DiT's (``x_embedder.proj``, ``blocks.i.attn.qkv``, ``blocks.i.mlp.fc1``,
``blocks.i.adaLN_modulation.1``, ``final_layer.linear``, ...), so a DiT state dict maps onto this one directly except
for the embeddings listed below.

Deliberate differences from DiT:

* No learned sigma: ``out_channels = C`` (DiT's ``learn_sigma=False``); the repository's objectives need one output.
* Time embedding: the repository's ``TimeEmbedding(hidden, num_times, features=256)`` (256 sinusoidal features of
  ``c_noise`` times 250, then ``Linear + SiLU + Linear``, weights normal(0.02) as DiT's). With ``c_noise = t / 250``
  the features equal DiT's ``timestep_embedding(t, 256)`` (cos first, then sin), so DiT's and SiT's
  ``t_embedder.mlp`` are ours (``time.mlps.0``) unchanged. It gives the two-time interface the other raw networks
  share: each further time (a flow map's second time) adds a ``LaterTimeMLP`` whose last layer starts at zero, so a
  two-time DiT initialised from a one-time DiT computes the same function.
* Class embedding (``label_dim > 0``): ``label``, a ``Linear(label_dim, hidden)`` of ``label_input(cond, ...)``
  (``cond["class_labels"]``, float one-hot rows times ``sqrt(label_dim)``), added to the time embedding, instead of
  DiT's ``LabelEmbedder`` table of ``num_classes + 1`` rows whose last row is the null class. Why: the repository's
  conditioning is float one-hot rows with an all-zero row as the unconditional class (``cmt_core.conditioning``),
  shared by every network, teacher and sampler, so there are no integer labels and no null index to look up. The
  two are reparameterisations of each other: class ``k`` embeds to ``sqrt(label_dim) label.weight[:, k] + bias``
  and the all-zero row to ``bias``, which plays the part of DiT's null row (``label_dim + 1`` free vectors either
  way). Initialisation: weight normal with standard deviation ``0.02 / sqrt(label_dim)`` (so the class rows are
  DiT's normal(0.02)), bias zero (DiT's null row is normal(0.02)). No label dropout here: the training loop drops
  labels for whole batches, as for the other networks.
* ``dropout`` (default 0, as DiT) is applied as timm's ``Mlp(drop=...)`` does, after the GELU and after ``fc2``.
* Non-square inputs are allowed (the position grid is ``(H / p, W / p)``); DiT's is square.

Sizes (``DIT_SIZES``: hidden, depth, heads) as DiT, SiT and the Mean Flow paper use them; ``"XL"`` with patch 2 on
``4 x 32 x 32`` SD-VAE latents is DiT-XL/2 (about 675M parameters). ``"tiny"`` is for tests.
``forward_from_c(x, c)`` runs the transformer body on a given conditioning vector ``c: (B, hidden)`` (the sum of the
time and class embeddings, before the adaLN SiLU), for comparisons with DiT.
"""

from collections.abc import Sequence

import torch
from torch import nn

from cmt_core.conditioning import CLASS_LABELS, Cond, check_known
from cmt_core.networks.embedding import TimeEmbedding, label_input

TIME_FEATURES = 256  # DiT's frequency_embedding_size
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
    "tiny": (64, 2, 4),
}


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """DiT's ``get_1d_sincos_pos_embed_from_grid``: ``(M,) -> (M, dim)``, ``[sin, cos]``, float64."""
    omega = 1.0 / 10_000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """DiT's ``get_2d_sincos_pos_embed`` for a ``grid_h x grid_w`` grid (row-major tokens): ``(grid_h grid_w, dim)``
    float32; as DiT (and MAE), the first half of the channels encodes the column index, the second the row index."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos position embeddings need a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64),
                                indexing="ij")
    return torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1).float()


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """timm's ``PatchEmbed`` (flatten, no norm): ``(B, C, H, W) -> (B, T, hidden)``."""

    def __init__(self, in_channels: int, hidden: int, patch_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """timm's ``Attention`` (qkv bias, no q/k norm): ``(B, T, D) -> (B, T, D)``."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"hidden width {dim} must be a multiple of the number of heads {heads}")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    """timm's ``Mlp`` with GELU(tanh): ``fc1 -> GELU -> dropout -> fc2 -> dropout``."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(nn.functional.gelu(self.fc1(x), approximate="tanh"))))


class DiTBlock(nn.Module):
    """DiT's block with adaLN-Zero conditioning: ``(x: (B, T, D), c: (B, D)) -> (B, T, D)``."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden, heads)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """DiT's final layer: adaLN (shift, scale) + ``Linear(hidden, p * p * out_channels)``."""

    def __init__(self, hidden: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """DiT: ``net(x: (B, in_channels, H, W), c_noise: (B, num_times), cond) -> (B, in_channels, H, W)``.

    ``input_size``: ``(H, W)`` (or an int for square inputs), each a multiple of ``patch_size``. Class labels
    (``label_dim > 0``): ``cond["class_labels"]`` (float one-hot ``(B, label_dim)``; an all-zero row is the
    unconditional class; missing: all-zero rows) through ``label``; an unconditional network (``label_dim = 0``)
    refuses ``class_labels``. See the module docstring for what is DiT's and what differs."""

    def __init__(self, input_size: int | Sequence[int] = 32, in_channels: int = 4, patch_size: int = 2,
                 hidden: int = 1152, depth: int = 28, heads: int = 16, mlp_ratio: float = 4.0, num_times: int = 1,
                 label_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        h, w = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if h % patch_size or w % patch_size:
            raise ValueError(f"input size {(h, w)} must be a multiple of the patch size {patch_size}")
        if num_times < 1:
            raise ValueError(f"num_times must be >= 1, got {num_times}")
        self.input_size, self.in_channels, self.out_channels = (h, w), in_channels, in_channels
        self.patch_size, self.hidden, self.num_times, self.label_dim = patch_size, hidden, num_times, label_dim
        self.grid = (h // patch_size, w // patch_size)
        self.x_embedder = PatchEmbed(in_channels, hidden, patch_size)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden, *self.grid)[None], persistent=False)
        self.time = TimeEmbedding(hidden, num_times, features=TIME_FEATURES)
        self.label = nn.Linear(label_dim, hidden) if label_dim else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads, mlp_ratio, dropout) for _ in range(depth))
        self.final_layer = FinalLayer(hidden, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's ``initialize_weights``, carried over to the repository's time and label embeddings (see the module
        docstring); the later-time MLPs keep their zero last layers."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for k, mlp in enumerate(self.time.mlps):  # DiT's normal(0.02) time MLP
            nn.init.normal_(mlp[0].weight, std=0.02)
            if k == 0:
                nn.init.normal_(mlp[2].weight, std=0.02)
            else:  # LaterTimeMLP: zero last layer, so a second time starts as a no-op
                nn.init.zeros_(mlp[2].weight)
        if self.label is not None:  # the table label.weight.T * sqrt(label_dim) is normal(0.02), as DiT's
            nn.init.normal_(self.label.weight, std=0.02 / self.label_dim ** 0.5)
        weight = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, T, p * p * C) -> (B, C, H, W)`` (DiT's ``unpatchify``, for a ``grid_h x grid_w`` grid)."""
        (gh, gw), p, c = self.grid, self.patch_size, self.out_channels
        x = x.reshape(x.shape[0], gh, gw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, gh * p, gw * p)

    def forward_from_c(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """The transformer body given the conditioning vector ``c: (B, hidden)``: ``(B, C, H, W) -> (B, C, H, W)``."""
        if tuple(x.shape[1:]) != (self.in_channels, *self.input_size):
            raise ValueError(f"this DiT takes (B, {self.in_channels}, {self.input_size[0]}, {self.input_size[1]}) "
                             f"inputs, got {tuple(x.shape)}")
        h = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            h = block(h, c)
        return self.unpatchify(self.final_layer(h, c))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
        check_known(cond, (CLASS_LABELS,) if self.label_dim else (), "this DiT")
        c = self.time(c_noise)
        if self.label is not None:
            c = c + self.label(label_input(cond, self.label_dim, x.shape[0], x.device))
        return self.forward_from_c(x, c)

