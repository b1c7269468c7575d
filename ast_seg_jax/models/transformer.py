"""Transformer encoder over the K object tokens of one image (ast_model.md section 1.5).

Same function as PyTorch's ``nn.TransformerEncoder`` of ``nn.TransformerEncoderLayer`` at its
defaults: post-norm (x <- LN(x + SA(x)); x <- LN(x + FF(x))), ReLU feed-forward, LayerNorm
eps 1e-5, dropout in four places (attention probabilities, after attention, after the ReLU,
after the feed-forward), no masks, no positional encoding, no final extra LayerNorm. LayerNorm uses the two-pass
variance (``use_fast_variance=False``) like PyTorch.

Initialisation follows PyTorch: the query/key/value projections are drawn as PyTorch draws
its packed [3d, d] in-projection (Xavier-uniform over the packed matrix, bias 0), the
attention output projection and the feed-forward layers use nn.Linear's default
U(+-1/sqrt(fan_in)) (the output-projection bias is 0).

Deviation: PyTorch deep-copies one layer, so all layers of the official model start from
identical weights; here every layer is initialised independently (Flax's default). The
architecture and the distribution of every single weight are unchanged.

Submodule names follow PyTorch for easy weight mapping: ``layers_{i}`` each with
``self_attn`` (query/key/value/out), ``linear1``, ``linear2``, ``norm1``, ``norm2``.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

# nn.Linear's default kernel init, U(+-1/sqrt(fan_in)).
torch_linear_kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# Xavier-uniform over PyTorch's packed [3d, d] in-projection, drawn per [d, d] block:
# bound^2 = 6 / (d + 3d) = 3 * 0.5 / d.
_packed_in_proj_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


def torch_linear_bias_init(fan_in: int):
    """nn.Linear's default bias init, U(+-1/sqrt(fan_in)).

    Args:
      fan_in: input width of the layer.

    Returns:
      A Flax initializer.
    """
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


def torch_dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
    """nn.Dense initialised like PyTorch's nn.Linear(fan_in, features)."""
    return nn.Dense(
        features,
        kernel_init=torch_linear_kernel_init,
        bias_init=torch_linear_bias_init(fan_in),
        name=name,
    )


class TransformerEncoderLayer(nn.Module):
    """One post-norm encoder layer.

    Attributes:
      dim: token width.
      heads: number of attention heads (must divide dim).
      mlp_dim: feed-forward hidden width.
      dropout: dropout rate used in all four places.
    """

    dim: int = 256
    heads: int = 8
    mlp_dim: int = 512
    dropout: float = 0.1

    @nn.compact
    def __call__(
        self, x: Float[Array, "b n d"], *, train: bool
    ) -> Float[Array, "b n d"]:
        """Applies the layer; dropout is active only when train=True ('dropout' rng)."""
        deterministic = not train
        attended = nn.MultiHeadDotProductAttention(
            num_heads=self.heads,
            qkv_features=self.dim,
            out_features=self.dim,
            dropout_rate=self.dropout,
            broadcast_dropout=False,  # PyTorch drops every probability independently.
            kernel_init=_packed_in_proj_init,
            out_kernel_init=torch_linear_kernel_init,
            bias_init=nn.initializers.zeros,
            name="self_attn",
        )(x, deterministic=deterministic)
        attended = nn.Dropout(self.dropout)(attended, deterministic=deterministic)
        x = nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm1")(
            x + attended
        )

        hidden = nn.relu(torch_dense(self.mlp_dim, self.dim, name="linear1")(x))
        hidden = nn.Dropout(self.dropout)(hidden, deterministic=deterministic)
        hidden = torch_dense(self.dim, self.mlp_dim, name="linear2")(hidden)
        hidden = nn.Dropout(self.dropout)(hidden, deterministic=deterministic)
        return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="norm2")(
            x + hidden
        )


class TransformerEncoder(nn.Module):
    """A stack of post-norm encoder layers over [b, n, d] tokens (no positional encoding).

    Attributes:
      num_layers: number of layers.
      dim: token width.
      heads: attention heads.
      mlp_dim: feed-forward hidden width.
      dropout: dropout rate (needs a 'dropout' rng when train=True).
    """

    num_layers: int = 6
    dim: int = 256
    heads: int = 8
    mlp_dim: int = 512
    dropout: float = 0.1

    @nn.compact
    def __call__(
        self, x: Float[Array, "b n d"], *, train: bool
    ) -> Float[Array, "b n d"]:
        """Runs the stack.

        Args:
          x: [b, n, d] tokens; attention runs across the n tokens of each batch entry.
          train: enables dropout.

        Returns:
          [b, n, d], the output of the last layer's LayerNorm.
        """
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"TransformerEncoder(dim={self.dim}) got tokens {x.shape}."
            )
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} is not divisible by heads={self.heads}.")
        for i in range(self.num_layers):
            x = TransformerEncoderLayer(
                self.dim, self.heads, self.mlp_dim, self.dropout, name=f"layers_{i}"
            )(x, train=train)
        return x
