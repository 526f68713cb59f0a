"""Real weights shipped in pip packages (installed with --no-deps, never imported)."""
import glob
import importlib.util
import os
from typing import Optional


def package_file(package: str, pattern: str) -> Optional[str]:
  """A file shipped in an installed weight package, found without importing the package."""
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    return None
  found = sorted(f for d in spec.submodule_search_locations
                 for f in glob.glob(os.path.join(d, "**", pattern), recursive=True))
  return found[0] if found else None
