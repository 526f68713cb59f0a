"""Pure linen layers: attention, FFN, embeddings, norms."""
from skipjax.layers.attention import MultiHeadAttention, causal_mask, dot_product_attention
from skipjax.layers.embeddings import LearnedPositions, SinusoidalPositions, rotary_embedding, token_embedding
from skipjax.layers.mlp import (ACTIVATIONS, MLP, TiedDense, TiedKernels, block_norms, block_sparsity_penalty,
                                get_activation, make_ffn)
from skipjax.layers.norms import NORM_TYPES, RMSNorm, layer_norm, make_norm
