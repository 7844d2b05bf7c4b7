"""Render the benchmark JSON files under ``benchmarks/results/`` as Markdown tables.

The README's benchmark section is this script's output (so every number there traces back
to a JSON file written by a benchmark run, with its machine and load average):

    python benchmarks/report.py [--results benchmarks/results] [--only forms ladder ...]

Missing files are reported as "not run" rather than skipped silently.
"""
from __future__ import annotations

import argparse
import json
import os


def _f(x, nd=0):
    if x is None:
        return "—"
    if isinstance(x, (int, float)):
        return f"{x:,.{nd}f}"
    return str(x)


def _table(header, rows):
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def _load1(x):
    """1-minute load average from a machine record: ``benchmarks/_timing.machine`` stores
    ``os.getloadavg()`` (1, 5, 15 min) as a list, older files stored the 1-minute value alone."""
    return x[0] if isinstance(x, (list, tuple)) and x else x


def _machine(m):
    """'2 CPUs, malloc tuned, load average 1.2→1.4' from a shared ``_timing.machine`` record
    or an older file's ad-hoc fields (``cpus`` instead of ``cpu_count``; no ``malloc``; only
    the end load average as ``loadavg_1_5_15``; no load average at all: shown as —)."""
    parts = [f"{m.get('cpu_count', m.get('cpus'))} CPUs"]
    if "malloc" in m:
        parts.append("malloc tuned" if m["malloc"]["tuned"] else "glibc default malloc")
    end = m.get("loadavg_end", m.get("loadavg_1_5_15"))
    parts.append(f"load average {_f(_load1(m.get('loadavg_start')), 1)}→{_f(_load1(end), 1)}")
    return ", ".join(parts)


def forms(d):
    c, m = d["config"], d["machine"]
    rows = [[_f(r["T"]), r["impl"], _f(r.get("fwd_s") and 1e3 * r["fwd_s"], 1),
             _f(r.get("fwdbwd_s") and 1e3 * r["fwdbwd_s"], 1), _f(r.get("fwdbwd_gflops"), 1)]
            for r in d["rows"]]
    head = (f"`tt.linear_attention` forms — B={c['B']}, H={c['H']}, K=V={c['K']}, float32, chunk "
            f"{c['chunk_size']}; {_machine(m)}; measured 2-D matmul "
            f"{_f(d.get('matmul_gflops'), 0)} GFLOP/s")
    return head, _table(["T", "impl", "fwd ms", "fwd+bwd ms", "fwd+bwd GFLOP/s"], rows)


def delta_rule(d):
    c, m = d["config"], d["machine"]
    rows = [[_f(r["T"]), r["impl"] + (f" C={r['chunk_size']}" if r.get("chunk_size") else ""),
             _f(1e3 * r["fwd_s"], 1), _f(1e3 * r["fwdbwd_s"], 1), _f(r.get("fwdbwd_gflops"), 1)]
            for r in d["rows"]]
    head = (f"`tt.delta_rule` (gated) — B={c['B']}, H={c['H']}, K=V={c['K']}, {c['dtype']}; "
            f"{_machine(m)}")
    return head, _table(["T", "impl", "fwd ms", "fwd+bwd ms", "fwd+bwd GFLOP/s"], rows)


def ladder(d):
    c = d["config"]
    m = d.get("machine", c)  # older files kept cpu_count and the load average in config
    v0 = {r["chunk_size"]: r["recurrent_tok_s"] for r in d["rows"] if r["variant"] == "v0"}
    rows = [[r["variant"], _f(r["chunk_size"]), _f(r["recurrent_tok_s"]), _f(r.get("parallel_tok_s")),
             _f(r.get("ratio"), 2) + (f" ({r['ratio_rounds'][0]:.2f}–{r['ratio_rounds'][1]:.2f})"
                                       if r.get("ratio_rounds") else ""),
             _f(r.get("parallel_associative_tok_s")), _f(r.get("associative_ratio"), 2),
             _f(r.get("paper_ratio"), 2),
             _f(r["parallel_tok_s"] / v0[r["chunk_size"]], 1)
             if r["variant"] == "v6" and r.get("parallel_tok_s") and r["chunk_size"] in v0 else ""]
            for r in d["rows"]]
    head = (f"LaCT ladder (paper Table 2 throughput columns) — forward, B={c['B']}, T={c['T']}, "
            f"H={c['H']}, head dim {c['dk']}, {c['dtype']}; {_machine(m)}")
    return head, _table(["variant", "chunk", "recurrent tok/s", "parallel (chunked) tok/s", "chunked/recurrent (range over rounds)",
                         "parallel (associative) tok/s", "associative/recurrent", "paper (GPU) par/rec",
                         "V6 parallel / V0 recurrent (paper 29x)"], rows)


def rules(d):
    c = d["meta"]
    m = d.get("machine", c)  # older files kept cpus and the load average in meta
    rows = [[r["rule"], r["form"], _f(r["fwd_tok_s"]), _f(r["fwd_bwd_tok_s"])] for r in d["rows"]]
    head = (f"Every rule family — B=1, T={c['T']}, H={c['H']}, head dim {c['D']}, {c['dtype']}; "
            f"{_machine(m)}")
    return head, _table(["rule", "form", "fwd tok/s", "fwd+bwd tok/s"], rows)


def kernels(d):
    rows = [[r["chip"], f"{r['K']}×{r['V']}", r["pass_"], _f(r["flops_per_token"] / 1e6, 2),
             _f(r["bytes_per_token"] / 1e3, 1), _f(r["intensity"], 1), r["bound"],
             _f(r["roofline_tokens_per_s"] / 1e6, 1)] for r in d["roofline"]]
    head = (f"Pallas linear-attention kernel: analytic roofline per token (chunk {d['chunk_size']}; "
            f"no GPU/TPU here, so measured rows are the CPU interpret/XLA path only)")
    return head, _table(["chip", "K×V", "pass", "MFLOP/token", "KB/token", "FLOP/byte", "bound",
                         "roofline Mtok/s"], rows)


def lact_lm(d):
    c, m = d["config"], d["machine"]
    rows = [[r["preset"], r.get("impl", r.get("mode")), r["form"], _f(1e3 * r["step_s"], 1), _f(r["tokens_per_s"]),
             _f(r.get("speedup_vs_recurrent"), 2)] for r in d["results"]]
    head = (f"LaCT language model, one training step (forward + backward) — {c['layers']} layers, width "
            f"{c['width']}, {c['heads']} heads of dim {c['width'] // c['heads']}, sequence {c['seq']}, batch "
            f"{c['batch']}, chunk {c['chunk']}, {c['dtype']}; {_machine(m)}")
    return head, _table(["preset", "impl (requested)", "form", "step ms", "tokens/s", "vs recurrent (paper V2: 1.19x)"], rows)


def varlen(d):
    c, m = d["config"], d["machine"]
    rows = [[r.get("op", "linear_attention"), _f(r["N"]), _f(r["longest"]), r["form"], _f(1e3 * r["fwd_s"], 1), _f(1e3 * r["fwdbwd_s"], 1),
             _f(r["token_slots"])] for r in d["rows"]]
    head = (f"Packed sequences (`cu_seqlens`), chunked forms — T={c['T']} tokens in N sequences, "
            f"H={c['H']}, K=V={c['K']}, chunk {c['chunk']}, {c['dtype']}; {_machine(m)}")
    return head, _table(["op", "N", "longest", "form", "fwd ms", "fwd+bwd ms", "token slots computed"], rows)


RENDERERS = {"forms": forms, "delta_rule": delta_rule, "ladder": ladder, "lact_lm": lact_lm, "varlen": varlen,
             "lact_lm_d128": lact_lm, "rules": rules, "kernels": kernels}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default=os.path.join(os.path.dirname(__file__), "results"))
    p.add_argument("--only", nargs="*", default=None, choices=tuple(RENDERERS))
    a = p.parse_args(argv)
    for name, fn in RENDERERS.items():
        if a.only and name not in a.only:
            continue
        d = _load(os.path.join(a.results, f"{name}.json"))
        if d is None:
            print(f"**{name}**: not run (python benchmarks/{name}.py)\n")
            continue
        head, table = fn(d)
        print(f"**{head}**\n\n{table}\n")


if __name__ == "__main__":
    main()
