"""Execution plans (DESIGN.md, "Static decisions are plans; per-token decisions are gates").

A plan is a static, hashable tuple with one `PlanEntry` per depth position: the parameter slot
(`block_{slot}`) that runs there and which of its residual branches run (attention, FFN). The
stack walks the plan, so a branch that is off is never traced. The taxonomy of static depth
methods (layer pruning, layer skipping, reordering, repetition and sharing; Aussie AI survey,
`layer_pruning_survey_aussieai.txt`; Sun et al. 2024 "Transformer Layers as Painters" §3) are all
plans built by the constructors below. The empty plan means the identity plan of the model.

String form (`--config.model.plan=...`): comma-separated entries, each a slot with an optional
branch suffix; `i:j` is the slots i … j−1 in order (the suffix applies to each):

    0,1,2,2,3      repeat layer 2          0:3,5:8    drop layers 3 and 4 (of 8)
    0:3,3a,4:8     layer 3 attention only  0:4,4f,5:8 layer 4 FFN only       2-  a position that runs nothing
"""
import dataclasses
import re
from typing import Iterable, Optional, Sequence, Tuple, Union

FIELD = "config.model.plan"


@dataclasses.dataclass(frozen=True)
class PlanEntry:
  """One depth position: run parameter slot `slot`, its attention and/or FFN branch."""
  slot: int
  attn: bool = True
  ffn: bool = True

  @property
  def runs(self) -> bool:
    return self.attn or self.ffn

  @property
  def branches(self) -> Tuple[bool, bool]:
    return (self.attn, self.ffn)


Plan = Tuple[PlanEntry, ...]
PlanLike = Union[str, Sequence[PlanEntry], Sequence[int]]

_SUFFIX = {"": (True, True), "a": (True, False), "f": (False, True), "-": (False, False)}
_ENTRY = re.compile(r"^(\d+)(?::(\d+))?([af-]?)$")


def _error(message: str) -> ValueError:
  return ValueError(f"{FIELD}: {message}")


def identity(num_layers: int) -> Plan:
  """Every layer once, in order, both branches: the model itself."""
  return tuple(PlanEntry(i) for i in range(num_layers))


def from_slots(slots: Iterable[int]) -> Plan:
  """Positions running these slots (both branches) in this order: reorder / repeat / share."""
  return tuple(PlanEntry(int(s)) for s in slots)


def _layers(num_layers: int, layers: Iterable[int]) -> set:
  layers = {int(i) for i in layers}
  bad = sorted(i for i in layers if not 0 <= i < num_layers)
  if bad:
    raise _error(f"layer {bad[0]} is not in 0..{num_layers - 1}")
  return layers


def keep(num_layers: int, layers: Iterable[int]) -> Plan:
  """Static layer pruning: only `layers` run, in depth order."""
  layers = _layers(num_layers, layers)
  return _nonempty(tuple(PlanEntry(i) for i in range(num_layers) if i in layers))


def drop(num_layers: int, layers: Iterable[int]) -> Plan:
  """Static layer pruning: every layer but `layers` (a listed set)."""
  layers = _layers(num_layers, layers)
  return _nonempty(tuple(PlanEntry(i) for i in range(num_layers) if i not in layers))


def skip_range(num_layers: int, start: int, stop: int) -> Plan:
  """Skip the contiguous layers start … stop−1 (early / middle / late ranges)."""
  if not 0 <= start <= stop <= num_layers:
    raise _error(f"range {start}:{stop} is not within 0:{num_layers}")
  return drop(num_layers, range(start, stop))


def every_k(num_layers: int, k: int, offset: int = 0) -> Plan:
  """Skip every k-th layer: layers offset, offset+k, offset+2k, …"""
  if k < 1 or not 0 <= offset < num_layers:
    raise _error(f"every_k needs k >= 1 and 0 <= offset < {num_layers}, got k={k}, offset={offset}")
  return drop(num_layers, range(offset, num_layers, k))


def _nonempty(plan: Plan) -> Plan:
  if not plan:
    raise _error("the plan has no positions left (the empty plan means the identity)")
  return plan


def _positions(plan: Plan, positions: Iterable[int]) -> set:
  positions = {int(p) for p in positions}
  bad = sorted(p for p in positions if not 0 <= p < len(plan))
  if bad:
    raise _error(f"position {bad[0]} is not in 0..{len(plan) - 1}")
  return positions


def drop_branches(plan: Plan, attn: Iterable[int] = (), ffn: Iterable[int] = ()) -> Plan:
  """Branch pruning: attention off at positions `attn`, FFN off at positions `ffn`."""
  attn, ffn = _positions(plan, attn), _positions(plan, ffn)
  return tuple(dataclasses.replace(e, attn=e.attn and p not in attn, ffn=e.ffn and p not in ffn)
               for p, e in enumerate(plan))


def repeat(plan: Plan, positions: Iterable[int], times: int = 2) -> Plan:
  """Each listed position runs `times` times in a row (same slot: Painters' "repeat")."""
  if times < 1:
    raise _error(f"repeat needs times >= 1, got {times}")
  positions = _positions(plan, positions)
  return tuple(e for p, e in enumerate(plan) for _ in range(times if p in positions else 1))


def reorder(plan: Plan, order: Sequence[int]) -> Plan:
  """Positions in a new order: new[i] = plan[order[i]] (e.g. Painters' reversed middle)."""
  _positions(plan, order)
  return _nonempty(tuple(plan[int(p)] for p in order))


def share(plan: Plan, positions: Iterable[int], slot: Optional[int] = None) -> Plan:
  """Several positions, one slot (weight sharing): the listed positions all run `slot`
  (default: the slot of the first listed position)."""
  positions = sorted(_positions(plan, positions))
  if not positions:
    return plan
  slot = plan[positions[0]].slot if slot is None else int(slot)
  return tuple(dataclasses.replace(e, slot=slot) if p in positions else e for p, e in enumerate(plan))


def occurrences(plan: Plan) -> Tuple[int, ...]:
  """For each position, how many earlier positions run the same slot (0 for the first)."""
  seen = {}
  out = []
  for e in plan:
    out.append(seen.get(e.slot, 0))
    seen[e.slot] = out[-1] + 1
  return tuple(out)


def branch_flags(plan: Sequence[PlanEntry]) -> Tuple[Tuple[float, ...], Tuple[float, ...]]:
  """(attn, ffn): per depth position 1.0 where the plan runs that branch, else 0.0 — what each
  position computes (a repeated slot counts at every position, a dropped one nowhere); e.g. the
  `attn` / `ffn` of `skipjax.routing.flops_per_token`."""
  return tuple(float(e.attn) for e in plan), tuple(float(e.ffn) for e in plan)


def is_identity(plan: Plan, num_layers: int) -> bool:
  return tuple(plan) == identity(num_layers)


def validate(plan: Sequence[PlanEntry], num_layers: int) -> Plan:
  """The plan as a tuple, every slot a parameter slot of a `num_layers` model."""
  plan = _nonempty(tuple(plan))
  for p, e in enumerate(plan):
    if not isinstance(e, PlanEntry):
      raise _error(f"position {p} is {e!r}, not a PlanEntry")
    if not 0 <= e.slot < num_layers:
      raise _error(f"position {p} runs slot {e.slot}, but the model has slots 0..{num_layers - 1}")
  return plan


def parse(text: str, num_layers: Optional[int] = None) -> Plan:
  """The string form (see the module docstring) → Plan; '' is the identity of `num_layers`."""
  if not isinstance(text, str):
    raise _error(f"{text!r} is not a string")
  text = text.replace(" ", "")
  if not text:
    if num_layers is None:
      raise _error("the empty plan needs num_layers")
    return identity(num_layers)
  plan = []
  for item in text.split(","):
    m = _ENTRY.match(item)
    if not m:
      raise _error(f"entry {item!r} of {text!r} is not SLOT, START:STOP, optionally followed by a, f or -")
    start = int(m.group(1))
    stop = int(m.group(2)) if m.group(2) is not None else start + 1
    if stop <= start:
      raise _error(f"range {item!r} of {text!r} is empty")
    attn, ffn = _SUFFIX[m.group(3)]
    plan += [PlanEntry(s, attn, ffn) for s in range(start, stop)]
  return validate(plan, num_layers) if num_layers is not None else tuple(plan)


def _suffix(e: PlanEntry) -> str:
  return {v: k for k, v in _SUFFIX.items()}[e.branches]


def to_string(plan: Sequence[PlanEntry]) -> str:
  """Plan → its compact string form (runs of ≥ 3 consecutive slots with the same branches as
  START:STOP); `parse(to_string(p)) == p`."""
  plan = tuple(plan)
  parts = []
  i = 0
  while i < len(plan):
    j = i + 1
    while j < len(plan) and plan[j].slot == plan[j - 1].slot + 1 and plan[j].branches == plan[i].branches:
      j += 1
    if j - i >= 3:
      parts.append(f"{plan[i].slot}:{plan[j - 1].slot + 1}{_suffix(plan[i])}")
    else:
      parts += [f"{e.slot}{_suffix(e)}" for e in plan[i:j]]
    i = j
  return ",".join(parts)


def resolve(plan: PlanLike, num_layers: int) -> Plan:
  """A plan given as a string, PlanEntries or slot indices → validated Plan (empty: identity)."""
  if isinstance(plan, str):
    return parse(plan, num_layers)
  plan = tuple(plan)
  if not plan:
    return identity(num_layers)
  if all(isinstance(e, int) and not isinstance(e, bool) for e in plan):
    plan = from_slots(plan)
  return validate(plan, num_layers)
