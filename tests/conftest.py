"""Test set-up: 8 simulated CPU devices for the sharding tests (must precede the jax import)."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"
WIKITEXT = SHARED / "data" / "wikitext-2"


@pytest.fixture
def wikitext_dir():
  """The shared WikiText-2 folder; tests using it skip when it is absent."""
  if not (WIKITEXT / "valid.txt").exists():
    pytest.skip(f"WikiText-2 not found at {WIKITEXT}")
  return WIKITEXT
