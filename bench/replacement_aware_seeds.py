"""Per-setting table over seeds of ``study replacement-aware`` reports, and the default fine-tune
that the rule written down in bench/RESULTS.md picks: the fine-tune setting with the highest
seed-mean validation gap closed among those whose seed-mean validation own-CE change is at most
+2% (none: the plain fine-tune stays). Test-half numbers are shown and not used for the choice.

    PYTHONPATH=$PWD python bench/replacement_aware_seeds.py REPORT.json [REPORT.json ...]

Reports of the same seed are merged (a later report's fine-tune variants are added to, or
replace, an earlier one's); arms (a), (b) and (c) must then agree exactly, or it stops.
"""

import json
import sys
from dataclasses import asdict, replace
from statistics import mean

from molt_kernels.tools.studies.replacement_aware import (
    GOAL_GAP_CLOSED,
    GOAL_OWN_CE_INCREASE,
    StudyConfig,
)

# The plain fine-tune, which stays the default when no setting qualifies: the mixing weight
# blends each MLP into its MOLT up to 1.
PLAIN_FINETUNE = {"finetune_phase_in_final": 1.0, "finetune_sample_replacement": False}


# A fine-tune is identified by these settings, not by its label: the default fine-tune changed
# between sessions, so one report's (c) can be another's variant.
FINETUNE_SCHEDULE = ("phase_in_start", "phase_in_ramp", "phase_in_final", "sample_replacement",
                     "consistency")  # fmt: skip


def finetune_key(config: dict, overrides: dict) -> tuple:
    """The fine-tune's length, lr and schedule, from a report's config and a variant's overrides
    (reports before the ``finetune_`` schedule fields name them without the prefix)."""

    def value(field: str, fallback: str) -> object:
        for source in (overrides, config):
            for name in (field, fallback):
                if name in source:
                    return source[name]
        raise KeyError(field)

    key = [value("finetune_steps", "finetune_steps"), value("finetune_lr", "finetune_lr")]
    return tuple(key + [value(f"finetune_{field}", field) for field in FINETUNE_SCHEDULE])


def settings(report: dict) -> dict[object, tuple[str, dict, dict | None]]:
    """{setting key: (label, arm result, comparison with (a) or None for (a))} of one report."""
    arms, comparison, config = report["arms"], report["comparison"], report["config"]
    found = {
        "posthoc": ("posthoc (a)", arms["posthoc"], None),
        "aware": ("aware (b)", arms["aware"], comparison["aware"]),
        finetune_key(config, {}): (
            "aware_finetune (c)",
            arms["aware_finetune"],
            comparison["aware_finetune"],
        ),
    }
    for name, variant in report.get("finetune_variants", {}).items():
        key = finetune_key(config, variant["overrides"])
        found[key] = (f"(c) {name}", variant["arm"], variant["comparison"])
    return found


def merge(paths: list[str]) -> tuple[dict[int, dict], dict[object, str]]:
    """({seed: {key: (arm, comparison)}}, {key: label}) over the reports. Arms (a) and (b) of
    one seed must agree exactly between reports (else it stops); a fine-tune that a later
    report ran again replaces the earlier run, with a note on stderr if they differ. A setting
    is labelled as the first report that ran it names it."""
    by_seed: dict[int, dict[object, tuple[dict, dict | None]]] = {}
    labels: dict[object, str] = {}
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        seed = report["config"]["seed"]
        runs = by_seed.setdefault(seed, {})
        for key, (label, arm, cmp) in settings(report).items():
            if key in runs and runs[key][0]["test"] != arm["test"]:
                message = f"{path}: seed {seed}'s {label} differs from an earlier report's"
                if key in ("posthoc", "aware"):
                    sys.exit(message)  # the fine-tunes of different (a)s do not compare
                print(f"{message}; the later one is used", file=sys.stderr)
            labels.setdefault(key, label)
            runs[key] = (arm, cmp)
    return by_seed, labels


def main() -> None:
    by_seed, labels = merge(sys.argv[1:])
    seeds = sorted(by_seed)
    keys = [key for key in labels if all(key in by_seed[s] for s in seeds)]
    # Compared without the length, which --quick and the full run set differently.
    default = finetune_key(asdict(StudyConfig()), {})[1:]
    print(
        "| setting | test: closed per seed | test: own CE vs (a) per seed | test mean closed / "
        "own | val mean closed / own | goal (test mean) | spliced CE - (a)'s (mean) | "
        "open gates | dead |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    plain = finetune_key(asdict(replace(StudyConfig(), **PLAIN_FINETUNE)), {})[1:]
    chosen = next((labels[k] for k in keys if k[1:] == plain), "the plain fine-tune")
    best = None
    for key in keys:
        name = labels[key] + (" (the current default)" if key[1:] == default else "")
        runs = [by_seed[s][key] for s in seeds]
        molts = [m for arm, _ in runs for m in arm["test"]["molts"].values()]
        gates, dead = mean(m["open_gates"] for m in molts), mean(m["dead_fraction"] for m in molts)
        if runs[0][1] is None:
            own = " / ".join(f"{arm['test']['ce_own']:.3f}" for arm, _ in runs)
            spliced = " / ".join(f"{arm['test']['ce_spliced_all']:.3f}" for arm, _ in runs)
            print(f"| {name} | own {own} | all spliced {spliced} | - | - | - | - | {gates:.2f} "
                  f"| {dead:.2f} |")  # fmt: skip
            continue
        closed = [c["gap_closed_all"] for _, c in runs]
        own = [c["own_ce_relative_change"] for _, c in runs]
        val_closed = mean(c["validation"]["gap_closed_all"] for _, c in runs)
        val_own = mean(c["validation"]["own_ce_relative_change"] for _, c in runs)
        spliced = mean(
            arm["test"]["ce_spliced_all"] - by_seed[s]["posthoc"][0]["test"]["ce_spliced_all"]
            for s, (arm, _) in zip(seeds, runs, strict=True)
        )
        met = mean(closed) >= GOAL_GAP_CLOSED and mean(own) <= GOAL_OWN_CE_INCREASE
        print(
            f"| {name} | {' / '.join(f'{x:+.1%}' for x in closed)} | "
            f"{' / '.join(f'{x:+.1%}' for x in own)} | {mean(closed):+.1%} / {mean(own):+.2%} | "
            f"{val_closed:+.1%} / {val_own:+.2%} | {'met' if met else 'not met'} | "
            f"{spliced:+.3f} | {gates:.2f} | {dead:.2f} |"
        )
        is_finetune = key not in ("posthoc", "aware")
        if is_finetune and val_own <= GOAL_OWN_CE_INCREASE and (best is None or val_closed > best):
            chosen, best = labels[key], val_closed
    print(f"\nseeds {seeds}; default fine-tune by the rule: {chosen}")


if __name__ == "__main__":
    main()
