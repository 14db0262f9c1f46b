r"""Retrieval-calibration metrics on COCO 5k and Flickr30k 1k (text-to-image), for users with the data.

The same numbers as ``benchmarks/retrieval_calibration.py`` (Recall@1/5/10, precision@10
and mAP per score; Recall@1 in 10 equal-count uncertainty bins with Spearman and R^2;
top-1 failure AUROC and AURC per signal against the cosine / margin / softmax baselines;
ECE, Brier and NLL of the probit match probability on held-out queries), on the Karpathy
test split: 5,000 COCO images with their first 5 captions each (25,000 queries), or
1,000 Flickr30k images (5,000 queries). A caption's only relevant image is its own.

Input, one of:

- ``--root DIR``: the dataset folder, holding Karpathy's ``dataset_coco.json`` or
  ``dataset_flickr30k.json`` (``images`` with ``filepath``, ``filename``, ``split`` and
  ``sentences[].raw``) and the images at ``DIR/<filepath>/<filename>`` (COCO:
  ``val2014/...``) or ``DIR/flickr30k-images/<filename>``, ``DIR/images/<filename>`` or
  ``DIR/<filename>``; the images and captions are encoded with the open_clip model
  (``--save-embeddings FILE.npz`` keeps the encodings for later runs);
- ``--embeddings FILE.npz``: precomputed open_clip outputs: ``image_embeds`` (N, D),
  ``image_activations`` (N, h_I), ``text_embeds`` (M, D), ``text_activations`` (M, h_T)
  (the pre-projection activations, docs/math.md section 1), ``text_image`` (M,) the image
  row of each caption, ``logit_scale`` (scalar).

The model defaults to open_clip ``ViT-B-32`` / ``laion2b_s34b_b79k`` and the posterior
to BayesVLM's published one for it (``--posterior DIR`` takes a local BayesVLM hessian
directory, a BayesVLM-Base file or a posterior saved by this project).

Reference numbers to reproduce (open_clip's published zero-shot text-to-image retrieval
of ViT-B-32 laion2b_s34b_b79k, the mean-only model, i.e. the ``map`` score here):
Recall@1/5/10 = 39.3 / 65.4 / 75.6 on COCO 5k and 66.8 / 88.4 / 93.1 on Flickr30k 1k.
The script prints its ``map`` recalls next to them, writes
``benchmarks/results/real_<dataset>.json`` and its plots into ``--plots``.

    .venv/bin/python benchmarks/real_benchmarks.py --dataset coco --root ~/data/coco
    .venv/bin/python benchmarks/real_benchmarks.py --dataset flickr30k --root ~/data/flickr30k \
        --posterior ~/bayesvlm-hessians/ViT-B-32-laion2B-s34B-b79K
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import record
import torch
from PIL import Image
from tqdm import tqdm

from bayesretrieval.encoders import ClipEncoder, Encoded, ModelIdentity
from bayesretrieval.evaluation import evaluate, query_relative_variance, split_queries, sweep
from bayesretrieval.evaluation.plots import plot_evaluation
from bayesretrieval.indexing.embeddings_input import build_index_from_embeddings
from bayesretrieval.posterior import PosteriorPair, load_posterior, posterior_for_model
from bayesretrieval.posterior.hub import load_published_posterior
from bayesretrieval.queries import Searcher
from bayesretrieval.queries.uncertainty import QuerySide
from bayesretrieval.similarity import CosineEstimator
from bayesretrieval.store import IndexReader

IMAGE_FOLDERS = ("", "flickr30k-images", "images")
"""Where an image without a ``filepath`` is looked for, relative to the dataset folder."""


class Dataset(str, Enum):
    """The benchmark datasets (Karpathy splits)."""

    COCO = "coco"
    """MS-COCO 5k test images (``dataset_coco.json``); open_clip reference R@1/5/10 39.3/65.4/75.6."""
    FLICKR30K = "flickr30k"
    """Flickr30k 1k test images (``dataset_flickr30k.json``); open_clip reference R@1/5/10 66.8/88.4/93.1."""

    @property
    def karpathy_file(self) -> str:
        """The Karpathy split file name."""
        return f"dataset_{self.value}.json"


REFERENCE_RECALL = {Dataset.COCO: (39.3, 65.4, 75.6), Dataset.FLICKR30K: (66.8, 88.4, 93.1)}
"""open_clip's published text-to-image Recall@1/5/10 (%) for ViT-B-32 laion2b_s34b_b79k."""


@dataclass
class Benchmark:
    """Encoded test split.

    Attributes:
        images: ``N`` image encodings.
        texts: ``M`` caption encodings.
        text_image: ``(M,)`` the image row of each caption.
        logit_scale: ``s`` of the model.
    """

    images: Encoded
    texts: Encoded
    text_image: np.ndarray
    logit_scale: float

    def save(self, path: Path) -> Path:
        """Write the ``--embeddings`` npz layout."""
        np.savez(path, image_embeds=self.images.embeds.numpy(), image_activations=self.images.activations.numpy(),
                 text_embeds=self.texts.embeds.numpy(), text_activations=self.texts.activations.numpy(),
                 text_image=self.text_image, logit_scale=self.logit_scale)
        return path

    @classmethod
    def load(cls, path: Path) -> "Benchmark":
        """Read the ``--embeddings`` npz layout (see the module docstring)."""
        with np.load(path) as data:
            missing = {"image_embeds", "image_activations", "text_embeds", "text_activations", "text_image",
                       "logit_scale"} - set(data.files)
            if missing:
                raise ValueError(f"{path} lacks arrays {sorted(missing)}")
            tensor = lambda name: torch.from_numpy(data[name]).to(torch.float32)  # noqa: E731
            bench = cls(Encoded(tensor("image_embeds"), tensor("image_activations")),
                        Encoded(tensor("text_embeds"), tensor("text_activations")),
                        data["text_image"].astype(np.int64), float(data["logit_scale"]))
        if not (0 <= bench.text_image.min() and bench.text_image.max() < len(bench.images.embeds)):
            raise ValueError(f"{path}: text_image must index the {len(bench.images.embeds)} images")
        return bench


def read_karpathy(root: Path, dataset: Dataset, split: str, captions_per_image: int) -> tuple[list, list, np.ndarray]:
    """Image paths, captions and caption-to-image rows of one Karpathy split.

    Raises:
        FileNotFoundError: without the JSON file or with an image found in none of the
            expected places (the message names where it looked).
    """
    file = root / dataset.karpathy_file
    if not file.is_file():
        raise FileNotFoundError(f"no {dataset.karpathy_file} in {root}")
    entries = [e for e in json.loads(file.read_text())["images"] if e["split"] == split]
    if not entries:
        raise ValueError(f"{file} has no images in split {split!r}")
    paths, captions, text_image = [], [], []
    for row, entry in enumerate(entries):
        paths.append(_image_path(root, entry))
        for sentence in entry["sentences"][:captions_per_image]:
            captions.append(sentence["raw"].strip())
            text_image.append(row)
    return paths, captions, np.asarray(text_image, dtype=np.int64)


def _image_path(root: Path, entry: dict) -> Path:
    places = [Path(entry["filepath"])] if entry.get("filepath") else [Path(f) for f in IMAGE_FOLDERS]
    for place in places:
        if (root / place / entry["filename"]).is_file():
            return root / place / entry["filename"]
    tried = ", ".join(str(root / place / entry["filename"]) for place in places)
    raise FileNotFoundError(f"image {entry['filename']} not found; looked at {tried}")


def encode_dataset(encoder: ClipEncoder, paths: list, captions: list, text_image: np.ndarray,
                   batch_size: int) -> Benchmark:
    """Encode images (in batches, bounded memory) and captions."""
    parts = []
    for start in tqdm(range(0, len(paths), batch_size), desc="encode images", unit="batch"):
        pixels = torch.stack([encoder.preprocess(Image.open(p).convert("RGB"))
                              for p in paths[start:start + batch_size]])
        parts.append(encoder.encode_images(pixels, batch_size))
    images = Encoded(torch.cat([p.embeds for p in parts]), torch.cat([p.activations for p in parts]))
    return Benchmark(images, encoder.encode_texts(captions, batch_size), text_image, encoder.logit_scale)


def build_image_index(bench: Benchmark, posterior: PosteriorPair, model: ModelIdentity, index_dir: Path) -> IndexReader:
    """Index the image encodings (ids = image rows) through the precomputed-embeddings path."""
    table = pa.table({"item_id": np.arange(len(bench.images.embeds), dtype=np.int64),
                      "embedding": bench.images.embeds.numpy().tolist(),
                      "activation": bench.images.activations.numpy().tolist()})
    pq.write_table(table, index_dir.parent / "images.parquet")
    build_index_from_embeddings(index_dir.parent / "images.parquet", index_dir, posterior, model)
    return IndexReader.open(index_dir)


def run_estimator(reader: IndexReader, index_dir: Path, bench: Benchmark, estimator: str, fit: np.ndarray,
                  chunk_size: int):
    """Sweep every caption against every image with one estimator and evaluate."""
    searcher = Searcher(reader, None, index_dir, estimator=estimator, logit_scale=bench.logit_scale)
    encoded = searcher.encode(bench.texts, "text")
    engine = searcher.engine("text")
    query = QuerySide.build(encoded.means, encoded.scales, engine.covs)
    variance = query_relative_variance(encoded.means, encoded.scales, searcher.posterior.text)
    nb = len(reader)

    def relevance(rows: np.ndarray) -> np.ndarray:
        relevant = np.zeros((len(rows), nb), dtype=bool)
        relevant[np.arange(len(rows)), bench.text_image[rows]] = True
        return relevant

    bar = tqdm(total=len(bench.text_image), desc=f"sweep {estimator}", unit="query")
    records = sweep(engine, query, variance, np.asarray(reader.item_ids), relevance, bench.logit_scale,
                    top=min(10, nb), chunk_size=chunk_size, progress=lambda done: bar.update(done - bar.n))
    bar.close()
    return evaluate(records, fit, bench.logit_scale)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Parse the dataset and its source (folder or saved encodings), model, posterior, estimators and outputs."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=[d.value for d in Dataset], required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--root", type=Path, help="dataset folder (Karpathy JSON + images)")
    source.add_argument("--embeddings", type=Path, help="precomputed encodings (.npz, see above)")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture (default: %(default)s)")
    parser.add_argument("--pretrained", default="laion2b_s34b_b79k",
                        help="open_clip tag or checkpoint; 'none' for random init (default: %(default)s)")
    parser.add_argument("--posterior", type=Path, help="posterior path (default: BayesVLM's published one)")
    parser.add_argument("--force-posterior", action="store_true",
                        help="use a posterior that does not say it was fitted for --model/--pretrained")
    parser.add_argument("--split", default="test", help="Karpathy split (default: %(default)s)")
    parser.add_argument("--captions-per-image", type=int, default=5)
    parser.add_argument("--estimators", nargs="+", choices=[e.value for e in CosineEstimator],
                        default=[CosineEstimator.SECOND_ORDER.value, CosineEstimator.PUBLISHED.value])
    parser.add_argument("--batch-size", type=int, default=128, help="encoding batch size")
    parser.add_argument("--chunk-size", type=int, default=16, help="queries per sweep step (memory ~ chunk * N * D)")
    parser.add_argument("--split-seed", type=int, default=1, help="seed of the held-in / held-out query split")
    parser.add_argument("--save-embeddings", type=Path, help="write the encodings here (.npz) for later runs")
    parser.add_argument("--output", type=Path, help="result JSON (default: benchmarks/results/real_<dataset>.json)")
    parser.add_argument("--plots", type=Path, default=Path("results"), help="PNG folder (default: %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Encode (or load) the benchmark, index its images, sweep every estimator, then save and print the results."""
    args = parse_args(argv)
    started, dataset = time.perf_counter(), Dataset(args.dataset)
    pretrained = None if args.pretrained.lower() == "none" else args.pretrained
    model = ModelIdentity(args.model, pretrained)
    posterior = (load_posterior(args.posterior) if args.posterior is not None
                 else load_published_posterior(args.model, pretrained))
    if args.root is not None:
        paths, captions, text_image = read_karpathy(args.root, dataset, args.split, args.captions_per_image)
        encoder = ClipEncoder.from_pretrained(args.model, pretrained)
        posterior.check_encoder(encoder)
        bench, model = encode_dataset(encoder, paths, captions, text_image, args.batch_size), encoder.identity
        if args.save_embeddings is not None:
            bench.save(args.save_embeddings)
    else:
        bench = Benchmark.load(args.embeddings)
    posterior = posterior_for_model(posterior, model, args.force_posterior)
    fit = split_queries(len(bench.text_image), args.split_seed)
    results = {"images": len(bench.images.embeds), "queries": len(bench.text_image),
               "logit_scale": bench.logit_scale, "posterior": posterior.source,
               "reference_recall_map": dict(zip(("recall@1", "recall@5", "recall@10"), REFERENCE_RECALL[dataset])),
               "estimators": {}}
    args.plots.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        index_dir = Path(folder) / "index"
        reader = build_image_index(bench, posterior, model, index_dir)
        for estimator in args.estimators:
            evaluation = run_estimator(reader, index_dir, bench, estimator, fit, args.chunk_size)
            evaluation.summary["plots"] = [str(p) for p in plot_evaluation(
                evaluation, args.plots, f"real_{dataset.value}_{estimator}", f"{dataset.value}, {estimator}")]
            results["estimators"][estimator] = evaluation.summary
    results["seconds"] = time.perf_counter() - started
    path = record.save(f"real_{dataset.value}", __file__, args, results, argv, args.output)
    print_summary(results)
    print(f"wrote {path}")
    return results


def print_summary(results: dict) -> None:
    """The key numbers per estimator, with the mean-only reference recalls."""
    ref = results["reference_recall_map"]
    print(f"\n{results['images']} images, {results['queries']} queries; open_clip reference for map: "
          f"R@1/5/10 {ref['recall@1']}/{ref['recall@5']}/{ref['recall@10']}")
    for estimator, summary in results["estimators"].items():
        print(f"\n### {estimator}\n\n| score | R@1 | R@5 | R@10 | P@10 | mAP |\n|---|---|---|---|---|---|")
        for label, r in summary["retrieval"].items():
            print(f"| {label} | {100 * r['recall@1']:.1f} | {100 * r['recall@5']:.1f} | {100 * r['recall@10']:.1f} | "
                  f"{r['precision@10']:.3f} | {r['map']:.3f} |")
        print("\n| signal | failure AUROC | AURC | Spearman | R^2 |\n|---|---|---|---|---|")
        for name, s in summary["signals"].items():
            b = s["binned_recall@1"]
            print(f"| {name} | {s['failure_auroc']:.3f} ± {s['failure_auroc_stderr']:.3f} | {s['aurc']:.3f} | "
                  f"{b['spearman']:+.3f} | {b['r2']:.3f} |")
        c = summary["calibration"]
        print(f"\nprobit ECE {c['probit']['ece']:.4f} Brier {c['probit']['brier']:.4f} NLL {c['probit']['nll']:.4f}; "
              f"logistic on cosine ECE {c['logistic_map']['ece']:.4f}")


if __name__ == "__main__":
    main()
