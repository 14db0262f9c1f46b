"""Markdown for the figures of each benchmark's record, and the headline figures.

A benchmark script registers, by its file name, a formatter in :data:`FORMATTERS`
(``record -> Markdown blocks``); scripts without one get :func:`generic`, which turns
scalars, lists of records and maps of records into tables. :data:`HEADLINES` picks, by
record name, the few figures the README's headline table shows. Both read the records
only: ``benchmarks/report.py`` runs without the library.
"""

from __future__ import annotations

import math
from typing import Callable

Record = dict
Blocks = list[str]


def number(value) -> str:
    """A figure as text: 4 significant digits, whole numbers from 1000 up, lists comma-separated."""
    if isinstance(value, float):
        if not math.isfinite(value) or value == 0:
            return "0" if value == 0 else str(value)
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(number(v) for v in value)
    return "-" if value is None else str(value)


def table(rows: list[dict], columns: dict[str, str] | None = None) -> str:
    """A Markdown table, one line per row; ``columns`` maps keys to headers (default: every key, as is)."""
    if columns is None:
        columns = {key: key for row in rows for key in row}
    lines = ["| " + " | ".join(columns.values()) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(number(row.get(key)).replace("|", "\\|") for key in columns) + " |")
    return "\n".join(lines)


def flatten(data: dict, prefix: str = "") -> dict:
    """Nested dicts as one level, keys joined by dots."""
    flat = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        flat.update(flatten(value, name + ".") if isinstance(value, dict) else {name: value})
    return flat


def _scalar(value) -> bool:
    return not isinstance(value, (dict, list, tuple)) or all(not isinstance(v, (dict, list, tuple)) for v in value)


def _records(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value) and all(
        _scalar(v) for row in value for v in flatten(row).values())


def _record_map(value) -> bool:
    return isinstance(value, dict) and bool(value) and _records(list(value.values()))


def generic(figures: dict, title: str = "") -> Blocks:
    """Scalars as one ``figure | value`` table; lists and maps of records as tables; other dicts recursively."""
    scalars = [{"figure": key, "value": value} for key, value in figures.items() if _scalar(value)]
    blocks = [table(scalars)] if scalars else []
    for key, value in figures.items():
        name = f"{title}.{key}" if title else str(key)
        if _records(value):
            blocks += [f"**{name}**", table([flatten(row) for row in value])]
        elif _record_map(value):
            blocks += [f"**{name}**", table([{"": row_key, **flatten(row)} for row_key, row in value.items()])]
        elif isinstance(value, dict):
            blocks += generic(value, name)
        elif not _scalar(value):
            blocks.append(f"**{name}**: {value}")
    return blocks


def _percent(value: float) -> str:
    return f"{value:+.1%}"


def cosine_accuracy(result: Record) -> Blocks:
    """Worst std cell per estimator, worst std error per MAP cosine, worst mean error (not every cell)."""
    figures = result["figures"]
    worst = [{**row, "std_relative_error": _percent(row["std_relative_error"])} for row in figures["worst_std_cell"]]
    by_cosine = [{key: value if key == "cosine" else f"{value:.1%}" for key, value in row.items()}
                 for row in figures["max_abs_std_relative_error_by_cosine"]]
    mean_errors = [{"estimator": name, "max abs mean error": value}
                   for name, value in figures["max_abs_mean_error"].items()]
    return [f"Default estimator: `{figures['default_estimator']}`. "
            f"{len(figures['cells'])} cells (estimator x setting x activation scale x cosine) in the JSON.",
            "**Worst cell per estimator** (std of the cosine relative to Monte Carlo)", table(worst),
            "**Max |std error| by MAP cosine** (over settings and scales)", table(by_cosine),
            table(mean_errors)]


SEARCH_COLUMNS = {"mode": "mode", "qps": "q/s", "ms_per_batch": "ms/batch", "ratio": "ratio (best)",
                  "ratio_median": "ratio of medians", "ratio_paired": "paired ratio median",
                  "ratio_paired_quartiles": "paired quartiles", "candidates_mean": "candidates mean",
                  "needed_mean": "needed mean", "certified_fraction": "certified", "exact_fraction": "exact"}


def search_speed(result: Record) -> Blocks:
    """Per index: every mode against plain FAISS, the engine's stage times and the mean-fetch bound."""
    blocks = []
    for label in ("flat", "ivf"):
        timing = result["figures"].get(label)
        if timing is None:
            continue
        modes = {name: value for name, value in timing.items() if "qps" in value}
        stages = [{"mode": name, **value["stage_ms_per_batch"]} for name, value in modes.items()
                  if "stage_ms_per_batch" in value]
        fetch = timing["mean_fetch"]
        blocks += [f"**{label}**", table([{"mode": name, **value} for name, value in modes.items()], SEARCH_COLUMNS),
                   "Engine stages, ms per batch (fastest runs):", table(stages),
                   f"Fetching a fresh batch's top-{result['config']['k']} means from `means.npy` after its plain "
                   f"search: {number(fetch['means_ms'])} ms, so an exact rerank reaches at most "
                   f"{number(fetch['ratio_bound'])} of plain FAISS."]
    return blocks


def world_recall(result: Record) -> Blocks:
    """Per model, Recall@k over all queries and over the shifted images' queries, per condition."""
    blocks = []
    for model in result["figures"]["models"]:
        rows = [{"shift": row["shift"] or "clean", "severity": row["severity"], "queries": row["queries"],
                 **{f"R@{k}": v for k, v in row["recall"].items()},
                 **{f"R@{k} shifted": v for k, v in (row["recall_shifted"] or {}).items()},
                 "shifted": row["n_shifted"]} for row in model["rows"]]
        blocks += [f"**{model['size']}** (`{model['model_name']}`)", table(rows)]
    return blocks


def _interval(entry: dict, key: str = "auroc", ci: str = "ci", signed: bool = False) -> str:
    """``0.612 [0.571, 0.655]`` (signed: ``+0.012 [-0.020, +0.041]``)."""
    spec = "+.3f" if signed else ".3f"
    low, high = entry[ci]
    return f"{entry[key]:{spec}} [{low:{spec}}, {high:{spec}}]"


def stratum_table(partition: dict, signals: list[str]) -> str:
    """One row per stratum (and the pooled weighted mean): n, failures, each signal's AUROC with interval."""
    rows = []
    for name, entry in [*partition["strata"].items(), ("pooled (weighted mean)", partition["pooled"])]:
        row = {"stratum": name, "n": entry["queries"], "failures": entry["failures"]}
        for signal in signals:
            values = (entry.get("signals") or {}).get(signal)
            row[signal] = "too few" if values is None else _interval(values)
        row["best baseline"] = entry.get("best_baseline")
        rows.append(row)
    return table(rows)


def verdict_table(partition: dict, signals: list[str]) -> str:
    """Per stratum: each Bayesian signal minus the stratum's best baseline, with interval; * marks useful."""
    rows = []
    for name, entry in [*partition["strata"].items(), ("pooled (weighted mean)", partition["pooled"])]:
        if not entry.get("signals"):
            continue
        row = {"stratum": name, "best baseline": entry["best_baseline"]}
        for signal in signals:
            v = entry["signals"][signal]
            row[signal] = _interval(v, "minus_best_baseline", "minus_best_baseline_ci", True) + (
                " *" if v["useful"] else "")
        rows.append(row)
    return table(rows)


HEADLINE_SIGNALS = ("std", "query_variance", "item_scale")
"""The Bayesian signals of the README's compact per-stratum table (the JSON has all of them)."""


def compact_table(partition: dict, signals=HEADLINE_SIGNALS) -> str:
    """Per stratum: n, failures, the headline Bayesian signals, the best baseline, and std minus it."""
    rows = []
    for name, entry in [*partition["strata"].items(), ("pooled (weighted mean)", partition["pooled"])]:
        row = {"stratum": name, "n": entry["queries"], "failures": entry["failures"]}
        values = entry.get("signals")
        for signal in signals:
            row[signal] = "too few" if values is None else _interval(values[signal])
        if values is not None:
            best = entry["best_baseline"]
            row["best baseline"] = f"{best} {_interval(values[best])}"
            row["std - best baseline"] = _interval(values["std"], "minus_best_baseline", "minus_best_baseline_ci",
                                                   True)
        rows.append(row)
    return table(rows)


def stratified_blocks(stratified: dict) -> Blocks:
    """Per-stratum AUROC tables (both label views), the verdicts against the best baseline, failure kinds."""
    signals = stratified["signals"]
    bayesian = [name for name, s in signals.items() if not s["baseline"]]
    blocks = []
    for view, partitions in stratified["views"].items():
        for part, result in partitions.items():
            label = {"query": "query strata", "top1": "top-1 result clean or shifted, by family"}[part]
            blocks += [f"Failure AUROC, {view} labels, {label} (held-out queries, 95% bootstrap intervals):",
                       stratum_table(result, list(signals))]
            if view == "visible":
                blocks += [f"Bayesian signal minus the best baseline, {view} labels, {label} "
                           "(* = interval above zero: useful):", verdict_table(result, bayesian)]
    failures = stratified["failures"]
    blocks += [f"Held-out failures by kind ({failures['failures']}; knowable share "
               f"{failures['knowable_share']:.1%}):",
               table([{"kind": kind, **value} for kind, value in failures["kinds"].items()])]
    return blocks


def evaluation(summary: dict) -> Blocks:
    """Retrieval, failure detection and calibration tables of one estimator's evaluation summary."""
    retrieval = [{"score": name, **value} for name, value in summary["retrieval"].items()]
    links = [{"link": name, **summary["calibration"][name]} for name in ("probit", "logistic_map")]
    if "stratified" in summary:
        detection = stratified_blocks(summary["stratified"])
    else:
        detection = [table([{"signal": name, "baseline": s["baseline"], "failure AUROC": s["failure_auroc"],
                             "stderr": s["failure_auroc_stderr"], "AURC": s["aurc"],
                             "Spearman bin vs R@1": s["binned_recall@1"]["spearman"],
                             "R^2": s["binned_recall@1"]["r2"]} for name, s in summary["signals"].items()])]
    gains = ranking_gain_blocks(summary["ranking_gain"]) if "ranking_gain" in summary else []
    return [table(retrieval), *gains, *detection, "Calibration of the top pairs, held-out queries:", table(links)]


def ranking_gain_blocks(gains: dict) -> Blocks:
    """Held-out precision@10 of each risk-averse score minus ``expected``'s, per query stratum."""
    rows = []
    for family, gain in gains.items():
        for name, entry in [*gain["strata"].items(), ("pooled (weighted mean)", gain["pooled"])]:
            rows.append({"score (kappa chosen on held-in)": gain["label"], "stratum": name,
                         "queries": entry["queries"], "P@10 difference": _interval(entry, "difference", "ci", True)})
    return ["Precision@10 of the risk-averse scores minus `expected`, held-out queries (95% paired bootstrap "
            "intervals):", table(rows)]


def calibration_benchmark(result: Record) -> Blocks:
    """Every estimator's evaluation, after the run's own scalars (gallery, queries, model)."""
    figures = result["figures"]
    blocks = generic({key: value for key, value in figures.items()
                      if key not in ("estimators", "task_prior", "lastblock", "image_shift_detection", "aleatoric")})
    for name, summary in figures["estimators"].items():
        blocks.append(f"**{name}**")
        if name == TASK_PRIOR:
            prior = figures["task_prior"]
            blocks.append(f"n x {prior['n_factor']:g}, lambda x {prior['lambda_factor']:g} of the evidence's, chosen "
                          f"on {prior['pairs']} held-out training pairs by the retrieval log-likelihood: "
                          f"{prior['log_likelihood']:.3f} against {prior['evidence_log_likelihood']:.3f}.")
        if name == LAST_BLOCK:
            block = figures["lastblock"]
            blocks.append(f"Posterior over the last block's {block['scope']} layers and the projection (lambda "
                          f"{block['lambda']:.3g}); each item's embedding covariance stored as its diagonal, "
                          f"{1000 * block['seconds_per_item']:.1f} ms per item to compute.")
        blocks += evaluation(summary)
    if "aleatoric" in figures:
        head = figures["aleatoric"]
        blocks.append(f"Aleatoric head, fitted on {head['pairs']} held-out pairs: temperature "
                      f"{head['temperature']:.3g}, |w| {head['weight_norm']:.3g}, item std quartiles "
                      + ", ".join(f"{q:.2g}" for q in head["item_std_quartiles"]) + ".")
    if "image_shift_detection" in figures:
        blocks += image_shift_blocks(figures["image_shift_detection"])
    return blocks


def image_shift_blocks(detection: dict) -> Blocks:
    """Per family, the AUROC of each per-image score for shifted (top severity) against clean images."""
    rows = []
    for family, entry in detection["strata"].items():
        if not entry.get("signals"):
            continue
        rows.append({"family": family, "images": entry["queries"],
                     **{name: _interval(signal) for name, signal in entry["signals"].items()},
                     "useful": ", ".join(detection["useful"].get(family, [])) or "-"})
    return [f"Image-side shift detection: AUROC of each per-image score for images at severity "
            f"{detection['severity']} against clean ones (95% bootstrap intervals; the activation distances "
            "are the baselines):", table(rows)]


TASK_PRIOR = "second_order, task prior"
"""The retrieval benchmark's record key of the task-prior posterior's evaluation."""
LAST_BLOCK = "second_order, last block"
"""Its record key of the last-block posterior's index (per-item diagonal covariance)."""


def calibration_summary(result: Record, estimator: str = "second_order") -> str:
    """The README's calibration table: per stratum, the headline signals' AUROC and the useful ones."""
    stratified = result["figures"]["estimators"][estimator]["stratified"]
    blocks = []
    for part in ("query", "top1"):
        partition = stratified["views"]["visible"][part]
        blocks.append(compact_table(partition))
    useful = {stratum: names for part in stratified["views"]["visible"].values()
              for stratum, names in part["useful"].items() if names}
    failures = stratified["failures"]
    lines = ["Useful Bayesian signals (beat the stratum's best baseline, interval above zero): "
             + ("; ".join(f"{s}: {', '.join(n)}" for s, n in useful.items()) or "none") + ".",
             f"Held-out failures: {failures['failures']}, knowable {failures['knowable_share']:.0%} ("
             + ", ".join(f"{k} {v['share']:.0%}" for k, v in failures["kinds"].items()) + ")."]
    return "\n\n".join([*blocks, *lines])


def query_warnings(result: Record) -> Blocks:
    """Query-warning AUROC for unseen-word queries per slot and kind, vs the better max-cosine baseline.

    Beside it the query-activation Mahalanobis reference, the warning rates (hits) and the false alarms.
    """
    figures = result["figures"]
    rates, percentile = figures["warning_rates"], figures["percentile"]
    rows = []
    for name, entry in figures["auroc"].items():
        signals = entry.get("signals")
        if not signals:
            continue
        best = entry["best_baseline"]
        rows.append({"slot": name, "unseen queries": entry["failures"],
                     "query warning": _interval(signals["query_percentile"]),
                     "best max-cosine baseline": f"{best} {_interval(signals[best])}",
                     "warning - baseline": _interval(signals["query_percentile"], "minus_best_baseline",
                                                     "minus_best_baseline_ci", True),
                     "query Mahalanobis": _interval(signals["query_mahalanobis"]),
                     f"warned at {percentile:g}th": _interval(rates[name], "rate")})
    alarms = rates["in_distribution"]
    kept = {kind: ", ".join(w for w, c in words.items() if c["kept"]) for kind, words in figures["words"].items()}
    return [f"AUROC for unseen-word vs in-distribution queries ({figures['model']}, "
            f"{figures['queries']['in_distribution']} in-distribution captions, 95% bootstrap intervals):",
            table(rows),
            f"False alarms (in-distribution captions warned at the {percentile:g}th percentile): "
            f"{_interval(alarms, 'rate')} ({alarms['warned']} of {alarms['queries']}).",
            "Replacement words (unseen in the fitting captions, as words and as BPE tokens): "
            + "; ".join(f"{kind}: {words}" for kind, words in kept.items()) + "."]


def zero_shot_calibration(result: Record) -> Blocks:
    """Zero-shot ECE, NLPD and accuracy per task and set: temperature vs probit and Monte Carlo per prior.

    ECE and NLPD tables add the paired differences probit - temperature (and, for ECE, the ablations
    mean_only and variance_only - temperature); a last table per task holds the probit's diagnostics.
    """
    figures = result["figures"]
    priors = list(figures["posterior"])
    lambdas = "; ".join(f"{p}: n = {e['pseudo_data_count']:g}, lambda image {e['lambda'][0]:.4g}, "
                        f"text {e['lambda'][1]:.4g}" for p, e in figures["posterior"].items())
    blocks = [f"Zero-shot classification of single-object scenes ({figures['model']}, shifts at severity "
              f"{figures['severity']}, ECE with {figures['ece_bins']} bins, 95% bootstrap intervals over images). "
              f"Temperature (fitted on held-in clean images): "
              + ", ".join(f"{t} {v:.3g}" for t, v in figures["temperature"].items()) + f". Posteriors: {lambdas}."]
    methods = ["temperature", *(f"{p}/{m}" for p in priors for m in ("probit", "montecarlo"))]
    for task, sets in figures["sets"].items():
        for metric, extra in (("ece", ("probit", "mean_only", "variance_only")), ("nlpd", ("probit",)),
                              ("accuracy", ())):
            rows = []
            for name, entry in sets.items():
                row = {"set": name, "n": entry["images"]}
                row.update({m: _interval(entry["methods"][m][metric], "value") for m in methods})
                for prior in priors:
                    for ablation in extra:
                        diff = entry["minus_temperature"][f"{prior}/{ablation}"][metric]
                        row[f"{prior}/{ablation} - T"] = _interval(diff, "value", signed=True)
                rows.append(row)
            blocks += [f"**{task}**, {metric}:", table(rows)]
        rows = [{"set": name, "prior": prior, "logit std": d["logit_std_median"],
                 "MC std / probit std": d["sampled_over_estimated_std_median"], "divisor": d["divisor_median"],
                 "divisor p5-p95": d["divisor_p5_p95"], "top E[cos]/cos": d["top_mean_shrinkage_median"]}
                for name, entry in sets.items() for prior, d in entry["diagnostics"].items()]
        blocks += [f"**{task}**, probit diagnostics (medians over image-class pairs; "
                   f"T = {figures['temperature'][task]:.3g}):", table(rows)]
    return [*blocks, figures["analysis"]]


def _spread(entry: dict, digits: int = 1) -> str:
    """``median (q1-q3)`` of a :func:`serve_load.quartiles` entry."""
    return f"{entry['median']:.{digits}f} ({entry['q1']:.{digits}f}-{entry['q3']:.{digits}f})"


def serve_load(result: Record) -> Blocks:
    """Requests per second against in-process search per worker count, then the update phase per version."""
    figures = result["figures"]
    summary = figures["summary"]
    rows = [{"server": f"{workers} worker process{'es' if workers != '1' else ''}",
             "req/s": _spread(entry["rps"]), "/ in-process q/s": _spread(entry["ratio"], 2),
             "p50 ms": _spread(entry["p50_ms"], 0), "p99 ms": _spread(entry["p99_ms"], 0),
             "requests": entry["requests"], "errors": entry["errors"]}
            for workers, entry in summary.items() if workers != "in_process_qps"]
    updates = figures["updates"]
    versions = [{"version": row["version"], "build s": number(row["build_s"]),
                 "first request seeing it, s after publication": number(row["first_seen_s"]),
                 "last request answered by an older version, s after publication": number(row["last_stale_s"])}
                for row in updates["versions"]]
    return [f"{figures['clients']} clients on loopback, `{figures['score']}` k={figures['k']} text queries over "
            f"{figures['items']} items ({figures['model']}, {figures['cpus']} CPUs); in-process, one query at a "
            f"time: {_spread(summary['in_process_qps'])} q/s. Median (quartiles) over {len(figures['rounds'])} "
            "interleaved rounds:", table(rows),
            f"While {len(versions)} updates published ({updates['workers']} worker process): "
            f"{updates['requests']} requests, {updates['errors']} errors, {updates['rps']:.1f} req/s, "
            f"p50 {updates['p50_ms']:.0f} ms, p99 {updates['p99_ms']:.0f} ms.", table(versions)]


def ray_build_speed(result: Record) -> Blocks:
    """The paired runs of both engines, the ratio and where Ray's extra time goes, and the stage costs."""
    figures, config = result["figures"], result["config"]
    ratio = figures["ratio"]
    stages = figures["stages"]
    encode = stages["encode_s_per_image"]
    stage_rows = [
        {"stage": "decode + preprocess, s per image on one core",
         "value": stages["decode_preprocess_s_per_image_one_core"]},
        *({"stage": f"encode {figures['model']}, s per image, torch {name.split('_')[1]} thread(s)", "value": value}
          for name, value in encode.items()),
        {"stage": "posterior scalars, s per image", "value": stages["scalars_s_per_image"]},
        {"stage": f"work shards ({stages['rows_per_shard']} rows each) write + read, s per image",
         "value": stages["shard_write_read_s_per_image"]},
        {"stage": "work shard bytes per image", "value": stages["shard_bytes_per_image"]},
        {"stage": f"assemble + publish a {stages['publish_items']}-item version (Flat), s per item",
         "value": stages["publish_s_per_item"]},
        {"stage": "Ray build of one batch (actors, model load, pipeline start), s",
         "value": figures["ray_fixed_s_per_build"]},
        {"stage": "Ray start-up (ray.init, once per process), s", "value": figures["ray_start_s"]},
    ]
    return [f"{config['images']} JPEGs of {config['image_size'][0]} x {config['image_size'][1]}, {figures['model']}, "
            f"{figures['cpus']} CPUs. Ray / local images per second: **{ratio['median']:.3f}** paired median "
            f"(quartiles {ratio['q1']:.3f}-{ratio['q3']:.3f}); Ray's extra seconds per build "
            f"{figures['extra_s_per_build']['median']:.1f}, of which a one-batch Ray build takes "
            f"{figures['ray_fixed_s_per_build']:.1f}.",
            table(figures["runs"]), "Stage costs, measured alone:", table(stage_rows)]


FORMATTERS: dict[str, Callable[[Record], Blocks]] = {
    "cosine_accuracy": cosine_accuracy,
    "search_speed": search_speed,
    "world_recall": world_recall,
    "retrieval_calibration": calibration_benchmark,
    "real_benchmarks": calibration_benchmark,
    "query_warnings": query_warnings,
    "zero_shot_calibration": zero_shot_calibration,
    "serve_load": serve_load,
    "ray_build_speed": ray_build_speed,
}
"""Formatter per benchmark script (file name without ``.py``); the others use :func:`generic`."""


def search_headline(result: Record) -> list[tuple[str, str]]:
    """``expected`` and ``lcb`` vs plain FAISS per index: paired ratio median (quartiles), ratio of medians."""
    config, rows = result["config"], []
    for label, name in (("flat", "Flat"), ("ivf", f"IVF{result['figures'].get('nlist')} nprobe {config['nprobe']}")):
        for score in ("expected", "lcb") if label in result["figures"] else ():
            t = result["figures"][label][score]
            low, high = t["ratio_paired_quartiles"]
            rows.append((f"search `{score}` / plain FAISS {name}, {config['items']} x {config['dim']}, k={config['k']}",
                         f"{t['ratio_paired']:.3f} paired median (quartiles {low:.3f}-{high:.3f}); "
                         f"{t['ratio_median']:.3f} of medians"))
    return rows


def cosine_headline(result: Record) -> list[tuple[str, str]]:
    """Worst std error against Monte Carlo of the default estimator and of BayesVLM's ``published``."""
    figures = result["figures"]
    worst = {row["estimator"]: row["std_relative_error"] for row in figures["worst_std_cell"]}
    names = [figures["default_estimator"], *(["published"] if "published" in worst else [])]
    return [("cosine std, worst error vs Monte Carlo: " + " / ".join(f"`{n}`" for n in names),
             " / ".join(_percent(worst[n]) for n in names))]


def calibration_headline(result: Record) -> list[tuple[str, str]]:
    """ECE of the probit match probability against the logistic-on-cosine baseline, first estimator."""
    estimator = result["config"]["estimators"][0]
    calibration = result["figures"]["estimators"][estimator]["calibration"]
    probit, logistic = calibration["probit"], calibration["logistic_map"]
    rows = [(f"match-probability ECE vs logistic on the cosine (`{estimator}`, small world)",
             f"{probit['ece']:.3f} vs {logistic['ece']:.3f} (Brier {probit['brier']:.3f} vs {logistic['brier']:.3f}; "
             f"probit threshold {probit['threshold']:.3f}, noise std {probit['noise_std']:.3f})")]
    stratified = result["figures"]["estimators"][estimator].get("stratified")
    if stratified:
        pooled = stratified["views"]["visible"]["query"]["pooled"]
        best, std = pooled["best_baseline"], pooled["signals"]["std"]
        rows.append(("wrong top-1 detection, AUROC within query strata (weighted mean): top-1 std vs best "
                     "baseline, small world",
                     f"{_interval(std)} vs {best} {_interval(pooled['signals'][best])}; difference "
                     f"{_interval(std, 'minus_best_baseline', 'minus_best_baseline_ci', True)}"))
    return rows


def build_headline(result: Record) -> list[tuple[str, str]]:
    """build-index end-to-end throughput over encoding the decoded images in memory, per model."""
    return [(f"build-index end to end / in-memory encode, {row['model']}", f"{row['end_to_end_over_in_memory']:.2f}")
            for row in result["figures"]["speed"]]


def serve_headline(result: Record) -> list[tuple[str, str]]:
    """Service throughput under concurrent clients against in-process search, one row per worker count."""
    figures = result["figures"]
    return [(f"service, {figures['clients']} clients: req/s / in-process q/s, {workers} worker(s)",
             f"{entry['ratio']['median']:.2f} (quartiles {entry['ratio']['q1']:.2f}-{entry['ratio']['q3']:.2f}); "
             f"p99 {entry['p99_ms']['median']:.0f} ms; {entry['errors']} errors")
            for workers, entry in figures["summary"].items() if workers != "in_process_qps"]


def ray_build_headline(result: Record) -> list[tuple[str, str]]:
    """Images per second of build-index on a local Ray instance over the local engine, paired."""
    figures, config = result["figures"], result["config"]
    ratio = figures["ratio"]
    return [(f"build-index `--engine ray` / local engine, {figures['model']}, {config['images']} images, "
             f"{figures['cpus']} cores", f"{ratio['median']:.2f} paired median (quartiles {ratio['q1']:.2f}-"
             f"{ratio['q3']:.2f})")]


HEADLINES: dict[str, Callable[[Record], list[tuple[str, str]]]] = {
    "search_speed": search_headline,
    "cosine_accuracy": cosine_headline,
    "retrieval_calibration": calibration_headline,
    "build_index_speed": build_headline,
    "ray_build_speed": ray_build_headline,
    "serve_load": serve_headline,
}
"""Headline ``(figure, value)`` rows per record name, in the README's order."""
