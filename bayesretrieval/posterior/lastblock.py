"""The image tower's last transformer block as a small network of linear layers (docs/math.md section 13).

In an open_clip ViT with class-token pooling, the image embedding reads only the class
token after the last block, and the last block's attention output projection and MLP act
token by token after the attention has mixed the tokens. So, from the class token's
residual ``r`` entering the last block and its attention context ``c`` (the heads' output
before ``out_proj``), the embedding is a plain feed-forward function:

    x  = r + ls_1(W_o c + b_o)                   (attn.out_proj)
    z1 = W_fc ln_2(x) + b_fc                     (mlp.c_fc)
    z2 = W_cp gelu(z1) + b_cp                    (mlp.c_proj)
    a  = ln_post(x + ls_2(z2))
    g  = P^T a                                   (proj, the image projection)

Each linear layer is ``s = W a~`` with ``a~`` its input, followed by a 1 when it has a bias.
:class:`LastBlockHead` computes ``r`` and ``c`` from images (the tower's forward pass), and
for given ``(r, c)`` the embedding, every layer's input ``a~`` and the Jacobians
``dg/ds`` of the embedding with respect to every layer's output (``torch.func``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

from bayesretrieval.encoders import ClipEncoder, UnsupportedModelError
from bayesretrieval.options import BlockScope


@dataclass
class HeadInputs:
    """What the last block's class token starts from, for ``N`` images.

    Attributes:
        residual: the class token entering the last block, ``(N, w)``.
        context: its attention context before ``out_proj`` (heads concatenated), ``(N, w)``.
    """

    residual: torch.Tensor
    context: torch.Tensor

    def __len__(self) -> int:
        return int(self.residual.shape[0])

    def split(self, size: int) -> list["HeadInputs"]:
        """Consecutive parts of at most ``size`` rows."""
        return [HeadInputs(r, c) for r, c in zip(self.residual.split(size), self.context.split(size))]

    def split_at(self, index: int) -> tuple["HeadInputs", "HeadInputs"]:
        """Rows ``[:index]`` and ``[index:]``."""
        return (HeadInputs(self.residual[:index], self.context[:index]),
                HeadInputs(self.residual[index:], self.context[index:]))

    @classmethod
    def concat(cls, parts: list["HeadInputs"]) -> "HeadInputs":
        """Stack parts row-wise."""
        return cls(torch.cat([p.residual for p in parts]), torch.cat([p.context for p in parts]))


@dataclass
class HeadLinearisation:
    """The head at its MAP weights for ``N`` images.

    Attributes:
        embeds: unnormalised embeddings ``g``, ``(N, D)``.
        inputs: per layer, its input ``a~`` (with a trailing 1 for a bias), ``(N, in)``.
        jacobians: per layer, ``dg/ds`` with respect to its output ``s``, ``(N, D, out)``.
    """

    embeds: torch.Tensor
    inputs: dict[str, torch.Tensor]
    jacobians: dict[str, torch.Tensor]


def _check_supported(visual: nn.Module, model_name: str) -> nn.Module:
    """Return the last residual block, or raise if the head above is not the documented one."""
    blocks = getattr(getattr(visual, "transformer", None), "resblocks", None)
    if blocks is None or len(blocks) == 0:
        raise UnsupportedModelError(f"model {model_name!r}: image tower has no transformer.resblocks")
    block = blocks[-1]
    attn = getattr(block, "attn", None)
    reasons = []
    if getattr(visual, "attn_pool", None) is not None or getattr(visual, "pool_type", None) != "tok":
        reasons.append(f"pooling is {getattr(visual, 'pool_type', None)!r} (needs the class token, 'tok')")
    if not isinstance(attn, nn.MultiheadAttention) or attn.in_proj_weight is None or attn.bias_k is not None:
        reasons.append(f"attention is {type(attn).__name__} (needs nn.MultiheadAttention with packed qkv)")
    elif attn.add_zero_attn:
        reasons.append("attention adds a zero key")
    if not hasattr(block, "mlp") or not hasattr(block.mlp, "c_fc") or hasattr(block, "ln_1_kv"):
        reasons.append(f"block is {type(block).__name__} (needs a ResidualAttentionBlock with mlp.c_fc/c_proj)")
    if reasons:
        raise UnsupportedModelError(f"model {model_name!r}: last-block posterior unsupported: " + "; ".join(reasons))
    return block


def _with_one(values: torch.Tensor) -> torch.Tensor:
    return torch.cat([values, values.new_ones(values.shape[:-1] + (1,))], dim=-1)


class LastBlockHead:
    """The class token's path from the last block's input to the image embedding.

    Args:
        encoder: an open_clip ViT encoder with class-token pooling.
        scope: which layers count as parameters (the others are fixed functions).

    Raises:
        UnsupportedModelError: for attention pooling, average pooling or custom blocks.
    """

    def __init__(self, encoder: ClipEncoder, scope: BlockScope | str = BlockScope.MLP):
        self.encoder = encoder
        self.scope = BlockScope(scope)
        self.visual = encoder.model.visual
        self.block = _check_supported(self.visual, encoder.identity.model_name)

    def weights(self) -> dict[str, torch.Tensor]:
        """Per covered layer, its MAP weight as an ``(in, out)`` matrix (bias as the last row)."""
        linears = {"attn.out_proj": self.block.attn.out_proj, "mlp.c_fc": self.block.mlp.c_fc,
                   "mlp.c_proj": self.block.mlp.c_proj}
        weights = {name: torch.cat([layer.weight.T, layer.bias[None, :]]).detach()
                   for name, layer in linears.items()}
        weights["proj"] = self.visual.proj.detach()
        return {name: weights[name] for name in self.scope.layers}

    @torch.no_grad()
    def inputs(self, images: torch.Tensor) -> HeadInputs:
        """Run the tower on preprocessed images ``(N, 3, H, W)`` and return the class token's start."""
        captured = []
        hook = self.block.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
        try:
            self.visual(images.to(self.encoder.device, self.encoder.dtype))
        finally:
            hook.remove()
        tokens = captured[0] if self.visual.transformer.batch_first else captured[0].transpose(0, 1)
        return HeadInputs(tokens[:, 0], self._class_context(tokens))

    def _class_context(self, tokens: torch.Tensor) -> torch.Tensor:
        """The class token's multi-head attention output before ``out_proj``, ``(N, w)``."""
        attn = self.block.attn
        count, length, width = tokens.shape
        heads = attn.num_heads
        query, key, value = F.linear(self.block.ln_1(tokens), attn.in_proj_weight, attn.in_proj_bias).split(width, -1)

        def split_heads(x: torch.Tensor) -> torch.Tensor:
            return x.reshape(count, x.shape[1], heads, width // heads).transpose(1, 2)

        context = F.scaled_dot_product_attention(split_heads(query[:, :1]), split_heads(key), split_heads(value))
        return context.transpose(1, 2).reshape(count, width)

    def forward(self, shifts: dict[str, torch.Tensor], residual: torch.Tensor, context: torch.Tensor):
        """Embedding of one class token with ``shifts[name]`` added to each covered layer's output.

        Args:
            shifts: per covered layer, a shift of its output ``s`` (zeros give the MAP head).
            residual: ``(w,)``.
            context: ``(w,)``.

        Returns:
            ``(g (D,), {layer: a~})``.
        """
        block, inputs = self.block, {}

        def linear(name: str, layer_input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
            inputs[name] = layer_input if bias is None else _with_one(layer_input)
            output = layer_input @ weight.T if bias is None else F.linear(layer_input, weight, bias)
            return output + shifts[name] if name in shifts else output

        out_proj, c_fc, c_proj = block.attn.out_proj, block.mlp.c_fc, block.mlp.c_proj
        x = residual + block.ls_1(linear("attn.out_proj", context, out_proj.weight, out_proj.bias))
        hidden = block.mlp.gelu(linear("mlp.c_fc", block.ln_2(x), c_fc.weight, c_fc.bias))
        x = x + block.ls_2(linear("mlp.c_proj", hidden, c_proj.weight, c_proj.bias))
        embed = linear("proj", self.visual.ln_post(x), self.visual.proj.T, None)
        return embed, {name: inputs[name] for name in self.scope.layers}

    def linearise(self, inputs: HeadInputs) -> HeadLinearisation:
        """Embeddings, layer inputs and Jacobians ``dg/ds`` for ``N`` class tokens (``torch.func``)."""
        weights = self.weights()
        shifts = {name: weights[name].new_zeros(weights[name].shape[1]) for name in self.scope.layers}

        def embed_and_aux(*args):
            embed, layer_inputs = self.forward(*args)
            return embed, (embed, layer_inputs)

        jacobian = jacrev(embed_and_aux, argnums=0, has_aux=True)
        jacobians, (embeds, layer_inputs) = vmap(jacobian, in_dims=(None, 0, 0))(
            shifts, inputs.residual, inputs.context)
        return HeadLinearisation(embeds.detach(), {n: v.detach() for n, v in layer_inputs.items()},
                                 {n: v.detach() for n, v in jacobians.items()})
