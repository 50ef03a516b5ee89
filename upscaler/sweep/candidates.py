"""The candidate plans of a sweep: given ones (--slices, --config, --preset) and generated families.

Families, as frankenmerge authors name them:

- ``--overlap A..B``: the seed's family. Three slices as in karakuri-lm-chat-upscaled-103b
  (``[0,40] + [20,60] + [40,80]`` of 80 layers), each consecutive pair sharing K layers, the
  middle slice centred: depth n + 2K. K = n/4 is the seed (preset overlap-halves); K = 0 is the
  source itself cut in three, a control that must score like the source.
- ``--solar-drop A..B``: SOLAR depth up-scaling ``[0, n-m] + [m, n]``: depth 2n - 2m.

A range is ``A..B`` (both ends included), ``A..B:STEP``, or one number.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import RecipeError

__all__ = ["Candidate", "dedupe", "given", "overlap_slices", "overlap_family", "parse_range", "solar_family",
           "solar_slices"]


@dataclass(frozen=True)
class Candidate:
    """One plan to build and score: exactly one of `slices`, `config`, `preset`."""

    label: str
    slices: str | None = None
    config: str | None = None
    preset: str | None = None


def parse_range(text: str, option: str) -> list[int]:
    """``A..B``, ``A..B:STEP`` or ``K`` as the integers it names (both ends included)."""
    spec, _, step_text = text.strip().partition(":")
    lo_text, dots, hi_text = spec.partition("..")
    try:
        lo = int(lo_text)
        hi = int(hi_text) if dots else lo
        step = int(step_text) if step_text else 1
    except ValueError:
        raise RecipeError(f"{option} {text!r}: expected A..B, A..B:STEP or a number, e.g. 4..12:2") from None
    if step < 1 or lo < 0 or hi < lo:
        raise RecipeError(f"{option} {text!r}: expected 0 <= A <= B and STEP >= 1")
    return list(range(lo, hi + 1, step))


def overlap_slices(n: int, k: int) -> str:
    """Three slices of an n-layer model, consecutive ones sharing k layers: depth n + 2k."""
    total = n + 2 * k
    q, r = divmod(total, 3)
    if k >= q:
        most = max((j for j in range(n) if j < (n + 2 * j) // 3), default=None)
        raise RecipeError(f"--overlap {k}: three slices of a {n}-layer model can share at most "
                          f"{most} layers" if most is not None else f"--overlap: a {n}-layer model is too shallow")
    mid_start = q - k
    return f"0:{q},{mid_start}:{mid_start + q + r},{n - q}:{n}"


def solar_slices(n: int, m: int) -> str:
    """SOLAR's two copies: the first without its last m layers, the second without its first m."""
    if not 0 < m < n:
        raise RecipeError(f"--solar-drop {m}: must be between 1 and {n - 1} for a {n}-layer model")
    return f"0:{n - m},{m}:{n}"


def overlap_family(n: int, spec: str) -> list[Candidate]:
    return [Candidate(f"overlap {k}", slices=overlap_slices(n, k)) for k in parse_range(spec, "--overlap")]


def solar_family(n: int, spec: str) -> list[Candidate]:
    return [Candidate(f"solar drop {m}", slices=solar_slices(n, m)) for m in parse_range(spec, "--solar-drop")]


def given(slices: list[str] | None, configs: list[str] | None, presets: list[str] | None) -> list[Candidate]:
    out = [Candidate(s, slices=s) for s in slices or []]
    names = [c.rsplit("/", 1)[-1] for c in configs or []]
    # a file's name, or the path as given when two configs share a name (a/x.yaml, b/x.yaml)
    out += [Candidate(c if names.count(n) > 1 else n, config=c) for c, n in zip(configs or [], names)]
    out += [Candidate(p, preset=p) for p in presets or []]
    return out


def dedupe(cands: list[Candidate], keys: list[str]) -> tuple[list[Candidate], list[str]]:
    """Keep the first of candidates whose plans are equal (`keys`: each one's plan, as YAML)."""
    seen: dict[str, str] = {}
    kept, notes = [], []
    for c, key in zip(cands, keys):
        if key in seen:
            notes.append(f"{c.label} is the same plan as {seen[key]}; scored once")
            continue
        seen[key] = c.label
        kept.append(c)
    return kept, notes
