"""The blessing gate: a retrain replaces the served graph only if it is not clearly worse.

Both graphs answer the same held-out images: the new run's test split, restricted to classes
both graphs know, less every image (by content hash) that the previous graph trained or was
validated on, according to its manifest. The candidate answers from the run's bottlenecks; the
previous graph is run on the image files themselves (it may have another base model).

Rule: an exact one-sided McNemar test on the images where exactly one of the two is right
(metrics.mcnemar_worse_p). The candidate is *rejected* when it gets fewer of them right and the
one-sided p-value is below ALPHA (0.05): a regression that chance alone would make less than 5%
of the time. Anything else is blessed, with a note when there is nothing to compare: no previous
graph, no manifest beside it (its training images are unknown, so no image is surely held out),
a previous graph that cannot be run, or fewer than MIN_SHARED held-out images.
A candidate that adds classes is judged on the shared ones only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imageclf.dataset import ImageFile
from imageclf.errors import BadImageError, UserError
from imageclf.image_files import FileRules, read_image_bytes
from imageclf.images import DEFAULT_MAX_PIXELS, decode_image
from imageclf.manifest import learned_hashes
from imageclf.metrics import mcnemar_worse_p

#: One-sided significance level at which a worse candidate is rejected.
ALPHA = 0.05
#: Fewer shared held-out images than this: blessed without a test (say so).
MIN_SHARED = 10
_BATCH = 32


@dataclass
class Verdict:
    blessed: bool
    note: str                           # one line: why
    n: int = 0                          # shared held-out images compared
    candidate_correct: int = 0
    previous_correct: int = 0
    only_candidate: int = 0             # discordant pairs the candidate wins
    only_previous: int = 0              # ... and loses
    p_value: float | None = None        # one-sided McNemar, "the candidate is worse"
    forced: bool = False                # rejected, but --force replaced the graph anyway

    def to_json(self) -> dict:
        return {"blessed": self.blessed, "forced": self.forced, "note": self.note, "n": self.n,
                "candidate_correct": self.candidate_correct, "previous_correct": self.previous_correct,
                "only_candidate": self.only_candidate, "only_previous": self.only_previous,
                "p_value": None if self.p_value is None else round(self.p_value, 6), "alpha": ALPHA}

    def line(self) -> str:
        if not self.n or self.p_value is None:
            return self.note
        return (f"{self.note}: on {self.n} shared held-out images the candidate got {self.candidate_correct} right, "
                f"the previous graph {self.previous_correct} (only the candidate {self.only_candidate}, only the "
                f"previous {self.only_previous}; one-sided McNemar p = {self.p_value:.3g}, rejected below {ALPHA})")


def decide(candidate_correct: Sequence[bool], previous_correct: Sequence[bool]) -> Verdict:
    """The rule applied to paired answers (see the module doc)."""
    n = len(candidate_correct)
    only_candidate = sum(c and not p for c, p in zip(candidate_correct, previous_correct, strict=True))
    only_previous = sum(p and not c for c, p in zip(candidate_correct, previous_correct, strict=True))
    p_value = mcnemar_worse_p(candidate_correct, previous_correct)
    worse = only_previous > only_candidate and p_value < ALPHA
    return Verdict(blessed=not worse, note="clearly worse than the previous graph" if worse else
                   "not worse than the previous graph", n=n, candidate_correct=int(sum(candidate_correct)),
                   previous_correct=int(sum(previous_correct)), only_candidate=only_candidate,
                   only_previous=only_previous, p_value=p_value)


def judge(previous_graph: Path, previous_manifest: list[dict] | None, manifest_note: str | None,
          test_files: Sequence[ImageFile], keys: dict[Path, str], candidate_labels: Sequence[str],
          candidate_predicted: np.ndarray, rules: FileRules, max_pixels: int = DEFAULT_MAX_PIXELS,
          log: Callable[[str], None] = print) -> Verdict:
    """Compare the candidate's answers (``candidate_predicted``: class ids for ``test_files``) with
    the previous graph's, on the shared held-out images."""
    if previous_manifest is None:
        return Verdict(True, f"blessed without a comparison: {manifest_note}")
    try:
        previous = _load(previous_graph)
    except (UserError, OSError, ValueError) as e:
        return Verdict(True, f"blessed without a comparison: the previous graph cannot be run ({e})")
    try:
        learned = learned_hashes(previous_manifest)
        shared = set(previous.labels) & set(candidate_labels)
        chosen = [i for i, f in enumerate(test_files) if f.label in shared and keys[f.path] not in learned]
        if len(chosen) < MIN_SHARED:
            return Verdict(True, f"blessed without a test: {len(chosen)} shared held-out image(s), fewer than "
                                 f"{MIN_SHARED} (add images, or raise --testing_percentage)", n=len(chosen))
        log(f"Comparing with the previous graph on {len(chosen)} shared held-out images")
        previous_answers = _answers(previous, [test_files[i].path for i in chosen], rules, max_pixels)
    finally:
        previous.close()
    candidate_ok, previous_ok = [], []
    for i, answer in zip(chosen, previous_answers, strict=True):
        if answer is None:
            continue  # unreadable now (changed since its bottleneck was computed): no pair to compare
        truth = test_files[i].label
        candidate_ok.append(candidate_labels[int(candidate_predicted[i])] == truth)
        previous_ok.append(answer == truth)
    return decide(candidate_ok, previous_ok)


def _load(graph: Path):
    from imageclf.runtimes import RuntimeOptions, load_classifier

    return load_classifier(graph, options=RuntimeOptions("tf"), decode_in_graph=False)


def _answers(model, paths: list[Path], rules: FileRules, max_pixels: int) -> list[str | None]:
    """The previous graph's top label for each file, decoded as the service decodes uploads."""
    answers: list[str | None] = []
    for start in range(0, len(paths), _BATCH):
        pixels, where = [], []
        for j, path in enumerate(paths[start:start + _BATCH]):
            try:
                _, data = read_image_bytes(path, rules)
                pixels.append(decode_image(data, max_pixels=max_pixels, name=str(path), size=model.input_size))
                where.append(j)
            except BadImageError:
                continue  # changed since the bottlenecks were computed
        batch: list[str | None] = [None] * len(paths[start:start + _BATCH])
        if pixels:
            for j, row in zip(where, model.predict(pixels), strict=True):
                batch[j] = model.labels[int(np.argmax(row))]
        answers += batch
    return answers
