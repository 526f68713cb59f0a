"""Helpers for tests that build tiny HF PyTorch models as references (imports torch)."""
import torch


def randomize(model, seed: int = 0):
  """Perturb every parameter (N(0, 0.1²) added) so norms, biases and tied weights all matter; eval mode."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn(p.shape, generator=gen))
  return model.eval()
