"""Build time and peak memory of every structure for a V = 262,144 vocabulary (Gemma-sized).

Points: 262,144 x 64 float32, a mixture of 4,096 Gaussian clusters, rows L2-normalised (like a
normalised embedding). Each builder runs in its own subprocess so that its peak resident memory
(``ru_maxrss``) is its own. Writes outputs/geometry_scale.{md,json}; the committed copy is
regenerated with ``--out docs/results/geometry_scale``.

    python experiments/geometry_scale.py [--v 262144] [--dim 64] [--kinds tree,forest,mst,sliced]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "outputs" / "geometry_scale"  # committed copy: docs/results

CHILD = r"""
import json, resource, sys, time
import numpy as np
from tokenmover.geometry import VocabGeometry
v, d, kind = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
rng = np.random.default_rng(0)
centres = rng.normal(size=(4096, d)).astype(np.float32)
x = centres[rng.integers(0, 4096, v)] + 0.3 * rng.normal(size=(v, d)).astype(np.float32)
geom = VocabGeometry.from_array(x)
kwargs = {"forest": {"n_trees": 4}, "sliced": {"n_directions": 16}}.get(kind, {})
t0 = time.perf_counter()
s = geom.build_structure(kind, **kwargs)
seconds = time.perf_counter() - t0
t1 = time.perf_counter()
s.validate()
print(json.dumps({"kind": kind, "seconds": round(seconds, 1), "validate_seconds": round(time.perf_counter() - t1, 1),
                  "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  "members": s.num_members, "edges": s.num_edges}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--v", type=int, default=262_144)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--kinds", default="tree,forest,mst,sliced")
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args()
    rows = []
    for kind in args.kinds.split(","):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, str(args.v), str(args.dim), kind],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            rows.append({"kind": kind, "error": proc.stderr[-500:]})
        else:
            rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        rows[-1]["process_seconds"] = round(time.perf_counter() - t0, 1)
        print(rows[-1], flush=True)
    lines = [f"# Structure build cost at V = {args.v:,}, d = {args.dim}", "",
             f"Command: `python experiments/geometry_scale.py --v {args.v} --dim {args.dim} --kinds {args.kinds}`", "",
             "Synthetic clustered points (4,096 Gaussian clusters, rows L2-normalised). One subprocess per "
             "builder; peak RSS includes Python, torch and the points. Budget: < 10 min and < 8 GB each. "
             "Machine: 2 CPU cores shared with other jobs, so times are upper bounds.", "",
             "| structure | build s | validate s | peak RSS GB | members | edges |", "|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | failed: {r['error'][-120:]!r} | | | | |")
        else:
            lines.append(f"| {r['kind']} | {r['seconds']} | {r['validate_seconds']} | {r['peak_rss_gb']} | "
                         f"{r['members']} | {r['edges']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
