"""The readable summary printed at the end of a retrain."""

from __future__ import annotations

from imageclf.retrain import RetrainResult


def retrain_summary(result: RetrainResult) -> str:
    counts = result.split_counts
    lines = [
        "",
        f"Done in {result.seconds:.1f} s.",
        *_rejection(result),
        f"  graph        {result.graph}  ({len(result.labels)} classes: {', '.join(result.labels)})",
        f"  labels       {result.labels_file}",
        f"  metadata     {result.sidecar}  (accuracies, class counts, confusion matrix)",
    ]
    if result.manifest_file:
        lines.append(f"  manifest     {result.manifest_file}  ({result.data['images']:,} images, "
                     f"data {result.data['fingerprint']})")
    if result.saved_model:
        lines.append(f"  saved model  {result.saved_model}")
    lines.append(f"  images       {sum(counts.values()):,} used: train {counts['train']:,}, "
                 f"validation {counts['validation']:,}, test {counts['test']:,}")
    lines.append(f"  bottlenecks  {result.bottlenecks.summary()}")
    if result.evaluation:
        lines.append(f"  test         accuracy {100 * result.evaluation['accuracy']:.1f}% "
                     f"(N={result.evaluation['n']})")
    if result.validation_accuracy is not None:
        lines.append(f"  validation   accuracy {100 * result.validation_accuracy:.1f}% (N={counts['validation']})")
    if result.bottlenecks.skipped:
        lines.append(f"  skipped      {len(result.bottlenecks.skipped):,} file(s): {result.bottlenecks.reasons_line()}")
        lines.extend(f"                 {message}" for message in result.bottlenecks.skipped)
    lines += _data_changes(result) + _blessing(result)
    lines.append(f"Try it:  python label_image.py --graph {result.graph} --image <picture>")
    return "\n".join(lines)


def _rejection(result: RetrainResult) -> list[str]:
    if not result.rejected:
        return []
    return [f"NOT REPLACED: the candidate is clearly worse than {result.replaces}, which stays in place "
            "(--force replaces it anyway). The candidate was kept aside:"]


def _data_changes(result: RetrainResult) -> list[str]:
    """What changed in the data against the graph replaced, by image content."""
    if result.data_diff is not None:
        return ["  data         " + line if i == 0 else "               " + line
                for i, line in enumerate(result.data_diff.lines())]
    if result.data_note:
        return [f"  data         no comparison: {result.data_note}"]
    return []


def _blessing(result: RetrainResult) -> list[str]:
    verdict = result.verdict
    if verdict is None:
        return []
    outcome = "REJECTED" if result.rejected else "replaced anyway (--force)" if verdict.forced else "blessed"
    return [f"  blessing     {outcome}: {verdict.line()}"]
