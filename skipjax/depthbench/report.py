"""results.md (one table, the winners at fixed depth) and the two Pareto figures."""
import os
from typing import Any, Dict, List, Optional

from skipjax import plots

WINNER_DEPTHS = (0.75, 0.5)
TOLERANCE = 0.02  # a point counts at depth D when it runs at most D + 2 % of the layers
REFERENCES = ("oracle_simulated", "oracle_applied")  # need R(x) of every block: no compute saved


def _f(x, fmt: str = ".3g") -> str:
  return "–" if x is None else format(x, fmt)


def _ratio(x: Optional[float], ref: Optional[float]) -> str:
  return "–" if x is None or not ref else f"{x:.3g} ({x / ref:.2f}×)"


def curves(results: Dict[str, Any]) -> Dict[str, List[Dict[str, Any]]]:
  return {m: pts for fam in results["families"].values() for m, pts in fam.get("methods", {}).items()}


def winners(results: Dict[str, Any]) -> List[Dict[str, Any]]:
  """Per depth D in WINNER_DEPTHS: the lowest-perplexity point with depth ≤ D·L (+ tolerance) and
  the best agreement, among the methods that save compute (the oracles compute every block to
  decide, so they are reported beside the winners as references, not as candidates)."""
  L = results["model"]["num_layers"]
  out = []
  pts = [p for ps in curves(results).values() for p in ps if p.get("depth") is not None]
  for d in WINNER_DEPTHS:
    ok = [p for p in pts if p["depth"] <= (d + TOLERANCE) * L]
    real = [p for p in ok if p["method"] not in REFERENCES]
    if real:
      refs = [p for p in ok if p["method"] in REFERENCES]
      out.append({"depth_fraction": d, "best_ppl": min(real, key=lambda p: p["nll"]),
                  "best_agreement": max(real, key=lambda p: p["agreement"]),
                  "best_reference": min(refs, key=lambda p: p["nll"]) if refs else None,
                  "ranking": [dict(method=p["method"], knob=p["knob"], ppl=p["ppl"], depth=p["depth"])
                              for p in sorted(real, key=lambda p: p["nll"])]})
  return out


def at_depth(results: Dict[str, Any], d: float) -> List[Dict[str, Any]]:
  """Each method's point closest to a budget of d·L layers from below (+ tolerance), by perplexity."""
  L = results["model"]["num_layers"]
  out = []
  for pts in curves(results).values():
    ok = [p for p in pts if p["depth"] <= (d + TOLERANCE) * L]
    if ok:
      out.append(max(ok, key=lambda p: (p["depth"], -p["nll"])))
  return sorted(out, key=lambda p: p["nll"])


def _row(p: Dict[str, Any], full: Dict[str, Any], L: int) -> str:
  return (f"| {p['method']} | {p['knob']} | {p['depth']:.2f} | {p['depth'] / L:.0%} | "
          f"{_f(p.get('flops'), '.3g')} ({p['flops'] / full['flops']:.2f}×) | {p['ppl']:.4g} | "
          f"{p['agreement']:.3f} | {_ratio(p.get('prefill_ms'), full['prefill_ms'])} | "
          f"{_ratio(p.get('decode_ms'), full['decode_ms'])} |")


def markdown(results: Dict[str, Any]) -> str:
  full = results["full"]
  L = results["model"]["num_layers"]
  lines = [f"# Depth bench: {results['model']['label']}", "",
           f"- data: {results['data']['label']} — eval {results['data']['eval_tokens']} tokens; agreement on "
           f"{results['data']['prompts']} prompts × {results['data']['new_tokens']} greedy tokens of the full model",
           f"- machine: {results['machine']}",
           f"- full model: {L} layers, perplexity {full['ppl']:.4g}, prefill {full['prefill_ms']:.3g} ms "
           f"([1, {results['timing']['prefill_len']}]), decode {full['decode_ms']:.3g} ms/token (batch 1)", "",
           "| method | knob | layers run | % depth | FLOPs/token (× full) | ppl | agreement | prefill ms (× full) "
           "| decode ms/token (× full) |", "|---|---|---|---|---|---|---|---|---|"]
  header = lines[-2:]
  lines += [_row(p, full, L) for p in [full] + [p for ps in curves(results).values() for p in ps]]
  skipped = {f: fam["reason"] for f, fam in results["families"].items() if "reason" in fam}
  if skipped:
    lines += ["", "Not applicable here:", ""] + [f"- **{f}**: {r}" for f, r in skipped.items()]
  for w in results.get("winners") or winners(results):
    b, a, r = w["best_ppl"], w["best_agreement"], w["best_reference"]
    lines += ["", f"At ≤ {w['depth_fraction']:.0%} of the layers: lowest perplexity **{b['method']}** ({b['knob']}, "
              f"{b['depth']:.2f} layers, ppl {b['ppl']:.4g}); best agreement **{a['method']}** ({a['knob']}, "
              f"{a['agreement']:.3f}). Next: " + ", ".join(f"{x['method']} {x['ppl']:.4g}"
                                                           for x in w["ranking"][1:4]) + "."
              + ("" if r is None else f" Reference (computes every block): {r['method']} {r['ppl']:.4g} at "
                 f"{r['depth']:.2f} layers."), "",
              f"Each method at ≤ {w['depth_fraction']:.0%} of the layers (its point closest to the budget):", ""]
    lines += header + [_row(p, full, L) for p in at_depth(results, w["depth_fraction"])]
  return "\n".join(lines) + "\n"


def figures(results: Dict[str, Any], workdir: str) -> List[str]:
  L = results["model"]["num_layers"]
  ref = results["full"]
  rel = lambda p, k: None if p.get(k) is None or not ref.get(k) else p[k] / ref[k]
  with_x = lambda p: dict(p, depth_fraction=p["depth"] / L, decode_x=rel(p, "decode_ms"),
                          prefill_x=rel(p, "prefill_ms"))
  cs = {m: [with_x(p) for p in pts] for m, pts in curves(results).items()}
  families = {m: f for f, fam in results["families"].items() for m in fam.get("methods", {})}
  full = with_x(ref)
  title = f"{results['model']['label']} — {results['data']['label']} — {results['machine']}"
  plot_dir = os.path.join(workdir, "plots")
  ppl = ("perplexity (eval text)", True)
  return [
      plots.depth_pareto(cs, families, full, os.path.join(plot_dir, "pareto_depth.png"), (
          ("depth_fraction", "executed depth (layers run per token / L)", "ppl") + ppl,
          ("depth_fraction", "executed depth (layers run per token / L)", "agreement",
           "top-1 agreement with the full model's greedy continuation", False)), title, xmax=1.1),
      plots.depth_pareto(cs, families, full, os.path.join(plot_dir, "pareto_time.png"), (
          ("decode_x", "batch-1 decode time per token (× full model, measured)", "ppl") + ppl,
          ("prefill_x", f"prefill time, [1, {results['timing']['prefill_len']}] tokens (× full model, measured)",
           "ppl") + ppl), title),
  ]
