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
from statistics import mean

from molt_kernels.tools.studies.replacement_aware import GOAL_GAP_CLOSED, GOAL_OWN_CE_INCREASE


def settings(report: dict) -> dict[str, tuple[dict, dict | None]]:
    """{setting: (arm result, comparison with (a) or None for (a) itself)} of one report."""
    arms, comparison = report["arms"], report["comparison"]
    found = {
        "posthoc (a)": (arms["posthoc"], None),
        "aware (b)": (arms["aware"], comparison["aware"]),
        "aware_finetune (c)": (arms["aware_finetune"], comparison["aware_finetune"]),
    }
    for name, variant in report.get("finetune_variants", {}).items():
        found[f"(c) {name}"] = (variant["arm"], variant["comparison"])
    return found


def merge(paths: list[str]) -> dict[int, dict[str, tuple[dict, dict | None]]]:
    """{seed: settings} over the reports, checking that a seed's arms reproduce across them."""
    by_seed: dict[int, dict[str, tuple[dict, dict | None]]] = {}
    for path in paths:
        with open(path) as f:
            report = json.load(f)
        seed = report["config"]["seed"]
        found = settings(report)
        if seed in by_seed:
            for arm in ("posthoc (a)", "aware (b)", "aware_finetune (c)"):
                if by_seed[seed][arm][0]["test"] != found[arm][0]["test"]:
                    sys.exit(f"{path}: seed {seed}'s {arm} differs from an earlier report's")
        by_seed.setdefault(seed, {}).update(found)
    return by_seed


def main() -> None:
    by_seed = merge(sys.argv[1:])
    seeds = sorted(by_seed)
    names = [name for name in by_seed[seeds[0]] if all(name in by_seed[s] for s in seeds)]
    print(
        "| setting | test: closed per seed | test: own CE vs (a) per seed | test mean closed / "
        "own | val mean closed / own | goal (test mean) | spliced CE - (a)'s (mean) | "
        "open gates | dead |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    chosen, best = "aware_finetune (c)", None
    for name in names:
        runs = [by_seed[s][name] for s in seeds]
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
            arm["test"]["ce_spliced_all"] - by_seed[s]["posthoc (a)"][0]["test"]["ce_spliced_all"]
            for s, (arm, _) in zip(seeds, runs, strict=True)
        )
        met = mean(closed) >= GOAL_GAP_CLOSED and mean(own) <= GOAL_OWN_CE_INCREASE
        print(
            f"| {name} | {' / '.join(f'{x:+.1%}' for x in closed)} | "
            f"{' / '.join(f'{x:+.1%}' for x in own)} | {mean(closed):+.1%} / {mean(own):+.2%} | "
            f"{val_closed:+.1%} / {val_own:+.2%} | {'met' if met else 'not met'} | "
            f"{spliced:+.3f} | {gates:.2f} | {dead:.2f} |"
        )
        is_finetune = name.startswith("(c)") or name == "aware_finetune (c)"
        if is_finetune and val_own <= GOAL_OWN_CE_INCREASE and (best is None or val_closed > best):
            chosen, best = name, val_closed
    print(f"\nseeds {seeds}; default fine-tune by the rule: {chosen}")


if __name__ == "__main__":
    main()
