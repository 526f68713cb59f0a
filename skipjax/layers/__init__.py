"""Pure linen layers: attention, FFN, embeddings, norms."""
from skipjax.layers.attention import MultiHeadAttention, causal_mask, dot_product_attention
from skipjax.layers.embeddings import LearnedPositions, SinusoidalPositions, token_embedding
from skipjax.layers.mlp import ACTIVATIONS, MLP, get_activation
from skipjax.layers.norms import layer_norm
