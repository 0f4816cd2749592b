"""A selector that was tried and not built into the product (issue 18, docs/SELECTION.md):
does the FORWARD model's likelihood of a user's visible history with a candidate as its
predecessor, ``log p_fwd(h_1..h_m | c, ...)``, add signal to the reverse model's order?

Runs on a finished ``bench/selection_benchmark.py`` workdir with the benchmark's own arguments
(the same flags give the same simulated users, truth, candidate pool and splits), trains the
forward model on the truncated data set with the product's pretrain stage, scores every
candidate, fuses it with the collaborative score by z-scores (weight chosen on the benchmark's
tune split) and prints recall@12 with intervals.

    PYTHONPATH=. .venv/bin/python bench/selection_consistency.py --workdir ../runs18/selbench50 \\
        --epochs 40 --patience 5 --threads 1 --set augment.num_candidates=50 \\
        --out ../runs18/consistency.json
"""

import json
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import selection_benchmark as sb  # noqa: E402

from llmser_ray.augment.selection import bootstrap_ci, bootstrap_ratio, fuse, recall_ndcg, top_n  # noqa: E402
from llmser_ray.models.checkpoint import load_trained  # noqa: E402
from llmser_ray.stages.pretrain import forward_model  # noqa: E402

torch.set_num_threads(1)
ap = sb.arg_parser()  # the benchmark's own options: the same flags give the same users and pool
ap.description = __doc__.split("\n")[0]
ap.set_defaults(out=None)
args = ap.parse_args()
if not args.out:
    ap.error("--out is required (a JSON path for this script's result)")
out = Path(args.workdir)
sim = sb.build_truncated(args, out)
cfg, users, truth = sim["cfg"], sim["users"], sim["truth"]
rng = np.random.default_rng(args.seed)
tune_split = set(rng.choice(users, size=len(users) // 2, replace=False).tolist())
t0 = time.time()
fdir = forward_model(cfg, "selbench-consistency")
print("forward model", fdir, round(time.time() - t0), "s", flush=True)
model, meta = load_trained(fdir)
model.eval()
cand = pq.read_table(out / "sim" / "candidates" / "candidates.parquet").to_pydict()
wanted = set(users)
rows = {u: (np.asarray(h), np.asarray(c), np.asarray(s, dtype=np.float64))
        for u, h, c, s in zip(cand["user_id"], cand["history"], cand["candidates"], cand["scores"],
                              strict=True) if u in wanted}
table = model.item_embeddings().detach()
cons = {}
t1 = time.time()
with torch.no_grad():
    for u, (h, c, _) in rows.items():
        h = h[:model.max_len - 1]  # c must stand right before the first item
        seqs = torch.as_tensor(np.concatenate([c[:, None], np.repeat(h[None, :], len(c), 0)], 1),
                               dtype=torch.long)
        hid = model(seqs)[:, :-1]  # position t predicts item t+1
        logp = torch.log_softmax(hid @ table.T, -1)
        tgt = seqs[:, 1:]
        cons[u] = logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).sum(-1).numpy().astype(np.float64)
print("scored", len(cons), "users in", round(time.time() - t1), "s", flush=True)

def recall(w: float, us: list[int]) -> np.ndarray:
    return np.array([recall_ndcg(top_n(rows[u][1], fuse(rows[u][2], cons[u], w), 12, tiebreak=rows[u][2]),
                                 set(truth[u]), 12)[0] for u in us])
grid = [round(0.1 * i, 1) for i in range(11)]
tune_us = sorted(u for u in users if u in tune_split)
rep_us = sorted(u for u in users if u not in tune_split)
search = {w: float(np.nanmean(recall(w, tune_us))) for w in grid}
best = max(search, key=search.get)
res = {"grid_tune_split_recall@12": search, "best_weight": best}
for name, us in (("report_split", rep_us), ("all", sorted(users))):
    fused, coll, only = recall(best, us), recall(1.0, us), recall(0.0, us)
    res[name] = {"fused": bootstrap_ci(fused, 0), "collaborative": bootstrap_ci(coll, 0),
                 "consistency_only": bootstrap_ci(only, 0),
                 "fused/collaborative": bootstrap_ratio(fused, coll, 0),
                 "consistency_only/collaborative": bootstrap_ratio(only, coll, 0)}
res["forward_model"] = {k: meta.get(k) for k in ("epoch",)}
print(json.dumps(res, indent=1), flush=True)
Path(args.out).write_text(json.dumps(res, indent=1))
