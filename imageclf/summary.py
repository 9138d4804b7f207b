"""The readable summary printed at the end of a retrain."""

from __future__ import annotations

from imageclf.retrain import RetrainResult


def retrain_summary(result: RetrainResult) -> str:
    counts = result.split_counts
    lines = [
        "",
        f"Done in {result.seconds:.1f} s.",
        f"  graph        {result.graph}  ({len(result.labels)} classes: {', '.join(result.labels)})",
        f"  labels       {result.labels_file}",
        f"  metadata     {result.sidecar}  (accuracies, class counts, confusion matrix)",
    ]
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
    lines.append(f"Try it:  python label_image.py --graph {result.graph} --image <picture>")
    return "\n".join(lines)
