"""Claims on synthetic analysis tables whose truth is known (metric = formula + noise)."""

from __future__ import annotations

import math
import textwrap
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featsweep.analysis.claims import (
    RESULT_COLUMNS,
    Claim,
    ClaimsError,
    claim_problems,
    evaluate,
    group_table,
    load_claims,
    notes_claims_path,
    paired_frame,
    validate_claims,
)
from featsweep.analysis.columns import RESERVED_PREFIXES, RESULT_COLUMNS as OUTCOMES, config_columns

WDS = (0.0, 1e-5, 1e-3, 1e-1)


def sweep(
    rng: np.random.Generator,
    *,
    seeds: int = 2,
    channels: int = 8,
    wds: tuple[float, ...] = WDS,
    clamps: tuple[bool, ...] = (True, False),
    wd_slope: float = 0.0,
    clamp_off_shift: float = 0.0,
    offset_sd: float = 1.0,
    noise_sd: float = 1.0,
) -> pd.DataFrame:
    """A table shaped like ``collect``'s: one row per job, config leaves, status, metrics.

    brightness = per-(seed, channel) offset + wd_slope·log10(wd + 1e-6)
                 + clamp_off_shift·[clamp off] + noise.
    """
    rows = []
    for seed in range(seeds):
        for channel in range(channels):
            offset = rng.normal(0.0, offset_sd)
            for wd in wds:
                for clamp in clamps:
                    value = (offset + wd_slope * math.log10(wd + 1e-6)
                             + clamp_off_shift * (not clamp) + rng.normal(0.0, noise_sd))
                    rows.append({
                        "job.num": len(rows), "job.dir": f"/sweep/{len(rows)}",
                        "seed": seed, "target.channel": channel, "target.layer": "_blocks.10",
                        "optimizer.name": "sgd", "optimizer.lr": 0.01, "optimizer.momentum": 0.9,
                        "optimizer.weight_decay": wd, "regularizer.clamp": clamp, "blur.k": 3,
                        "choice.optimizer": "sgd", "status": "ok", "activation": 10.0 + value,
                        "result.seconds": 1.0, "trace.act@50%": 5.0,
                        "display.brightness": value, "raw.brightness": value / 10,
                    })
    return pd.DataFrame(rows)


WD_DARKER = Claim("More weight decay, darker", "optimizer.weight_decay", "display.brightness", "decrease")
CLAMP_OFF_DARKER = Claim("Clamp off, darker", "regularizer.clamp", "display.brightness", "decrease",
                         levels=(True, False))


def one(df: pd.DataFrame, claim: Claim, **kwargs) -> pd.Series:
    return evaluate(df, [claim], **kwargs).iloc[0]


# ---------------------------------------------------------------------------------- columns


def test_config_columns_are_the_leaves_in_table_order():
    df = sweep(np.random.default_rng(0), seeds=1, channels=1)
    cols = config_columns(df)
    assert cols == ["seed", "target.channel", "target.layer", "optimizer.name", "optimizer.lr",
                    "optimizer.momentum", "optimizer.weight_decay", "regularizer.clamp", "blur.k"]
    assert not any(c.startswith(RESERVED_PREFIXES) or c in OUTCOMES for c in cols)


# ---------------------------------------------------------------------------------- spearman


def test_planted_decrease_is_supported_with_effect_in_metric_units():
    df = sweep(np.random.default_rng(1), wd_slope=-0.5)
    row = one(df, WD_DARKER)
    assert row["test"] == "spearman" and row["verdict"] == "supported"
    assert row["n_groups"] == 2 * 8 * 2 and row["n_jobs"] == len(df)
    assert row["unit"] == "target.channel" and row["n_units"] == 8
    assert row["ci_low"] <= row["statistic"] <= row["ci_high"] < 0
    # effect = metric at wd 0.1 minus at wd 0: −0.5·(log10(0.100001) − log10(1e-6)) ≈ −2.5
    assert row["effect"] == pytest.approx(-0.5 * (math.log10(0.1 + 1e-6) + 6), abs=0.4)
    assert row["levels"] == "0 < 1e-05 < 0.001 < 0.1"


def test_reversed_effect_is_contradicted():
    df = sweep(np.random.default_rng(2), wd_slope=+0.5)
    assert one(df, WD_DARKER)["verdict"] == "contradicted"
    increase = Claim("wd brighter", "optimizer.weight_decay", "display.brightness", "increase")
    assert one(df, increase)["verdict"] == "supported"
    two_sided = Claim("wd matters", "optimizer.weight_decay", "display.brightness", "any")
    assert one(df, two_sided)["verdict"] == "differs (+)"
    assert one(sweep(np.random.default_rng(2), wd_slope=-0.5), two_sided)["verdict"] == "differs (−)"


def test_spearman_equals_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    rows = []
    for seed in range(5):
        for wd in (0.0, 0.0, 1e-3, 1e-2, 1e-1, 1e-1, 1.0):  # tied factor values
            rows.append({"seed": seed, "optimizer.weight_decay": wd, "status": "ok",
                         "display.brightness": float(rng.integers(0, 4))})  # tied metric values
    df = pd.DataFrame(rows)
    table = group_table(df, WD_DARKER)
    assert list(table["group"]) == [f"seed={s}" for s in range(5)]
    for seed, rho in zip(range(5), table["statistic"]):
        part = df[df["seed"] == seed]
        expected = stats.spearmanr(part["optimizer.weight_decay"], part["display.brightness"])
        assert rho == pytest.approx(expected.statistic, abs=1e-12)


def test_group_without_two_factor_values_or_with_constant_metric_is_dropped():
    df = sweep(np.random.default_rng(4), seeds=3, channels=1, clamps=(True,), wd_slope=-1.0)
    df.loc[df["seed"] == 0, "display.brightness"] = 0.5  # constant metric: ρ undefined
    df = df[~((df["seed"] == 1) & (df["optimizer.weight_decay"] > 0))]  # one factor value left
    table = group_table(df, WD_DARKER)
    assert list(table["group"]) == ["seed=2"]


# ---------------------------------------------------------------------------------- difference


def test_two_level_difference_with_levels():
    df = sweep(np.random.default_rng(5), clamp_off_shift=-2.0, noise_sd=0.5)
    row = one(df, CLAMP_OFF_DARKER)
    assert row["test"] == "difference" and row["levels"] == "false − true"
    assert row["verdict"] == "supported" and row["n_groups"] == 2 * 8 * 4
    assert row["statistic"] == pytest.approx(-2.0, abs=0.15)
    assert row["effect"] == pytest.approx(row["statistic"])
    # Levels the other way round flip the sign; an unordered bool factor is false → true.
    flipped = Claim("clamp on", "regularizer.clamp", "display.brightness", "increase", levels=(False, True))
    assert one(df, flipped)["statistic"] == pytest.approx(2.0, abs=0.15)
    auto = Claim("clamp auto", "regularizer.clamp", "display.brightness", "increase")
    auto_row = one(df, auto)
    assert auto_row["levels"] == "true − false" and auto_row["statistic"] == pytest.approx(2.0, abs=0.15)


def test_non_numeric_two_valued_factor_uses_sorted_levels():
    df = sweep(np.random.default_rng(6), seeds=1, channels=8, clamps=(True,), wds=(0.0,))
    adam = df.assign(**{"optimizer.name": "adam", "display.brightness": df["display.brightness"] + 1})
    both = pd.concat([df, adam], ignore_index=True)
    row = one(both, Claim("adam brighter", "optimizer.name", "display.brightness", "decrease"))
    assert row["levels"] == "sgd − adam" and row["verdict"] == "supported"
    assert row["statistic"] == pytest.approx(-1.0)


def test_pairing_cancels_large_group_offsets():
    """Offsets between seeds/channels (sd 100) dwarf the effect (1); paired, they cancel exactly."""
    rng = np.random.default_rng(7)
    exact = sweep(rng, clamp_off_shift=-1.0, offset_sd=100.0, noise_sd=0.0)
    table = group_table(exact, CLAMP_OFF_DARKER)
    assert np.allclose(table["statistic"], -1.0)
    noisy = sweep(rng, clamp_off_shift=-1.0, offset_sd=100.0, noise_sd=0.3)
    # (The seed-to-seed spread is ~100 here, so the default floor would call a shift of 1
    # negligible; this test is about pairing, so no floor.)
    floorless = Claim("clamp off darker", "regularizer.clamp", "display.brightness", "decrease",
                      levels=(True, False), min_effect=0)
    row = one(noisy, floorless)
    assert row["verdict"] == "supported" and row["ci_high"] - row["ci_low"] < 0.5
    # Unpaired, the spread of the offsets swamps the effect: the two levels' job means cannot be
    # told apart (the difference of means is −1 ± ~30).
    on = noisy.loc[noisy["regularizer.clamp"], "display.brightness"]
    off = noisy.loc[~noisy["regularizer.clamp"], "display.brightness"]
    unpaired_se = math.sqrt(on.var() / len(on) + off.var() / len(off))
    assert unpaired_se > 5
    # Spearman pairs too: within each group ρ = −1 exactly, though offsets are 100× the slope.
    slope = sweep(rng, wd_slope=-0.1, offset_sd=100.0, noise_sd=0.0)
    assert np.allclose(group_table(slope, WD_DARKER)["statistic"], -1.0)


def test_groups_lacking_a_level_are_dropped_not_compared_unpaired():
    df = sweep(np.random.default_rng(8), seeds=4, channels=1, wds=(0.0,), clamp_off_shift=-1.0)
    df = df[~((df["seed"] == 0) & ~df["regularizer.clamp"])]
    table = group_table(df, CLAMP_OFF_DARKER)
    assert list(table["group"]) == ["seed=1", "seed=2", "seed=3"]
    assert set(paired_frame(df, CLAMP_OFF_DARKER)["seed"]) == {1, 2, 3}


# ---------------------------------------------------------------------------------- filters, ignore


def test_filters_select_rows():
    rng = np.random.default_rng(9)
    df = sweep(rng, noise_sd=0.5)
    # Weight decay darkens only clamped images.
    clamped = df["regularizer.clamp"].to_numpy()
    df.loc[clamped, "display.brightness"] -= 0.5 * np.log10(df.loc[clamped, "optimizer.weight_decay"] + 1e-6)
    on = Claim("wd darker, clamped", WD_DARKER.factor, WD_DARKER.metric, "decrease",
               filters={"regularizer.clamp": True})
    off = Claim("wd darker, unclamped", WD_DARKER.factor, WD_DARKER.metric, "decrease",
                filters={"regularizer.clamp": "false"})  # a string from a command line matches too
    both = Claim("wd, any clamp", WD_DARKER.factor, WD_DARKER.metric, "increase",
                 filters={"regularizer.clamp": [True, False], "optimizer.weight_decay": [0.0, "0.1"]})
    result = evaluate(df, [on, off, both]).set_index("claim")
    assert result.loc[on.name, "verdict"] == "supported"
    assert result.loc[off.name, "verdict"] == "negligible"  # no effect, well inside the seed spread
    assert result.loc[on.name, "n_jobs"] == result.loc[off.name, "n_jobs"] == len(df) // 2
    assert result.loc[both.name, "levels"] == "0 < 0.1"
    assert result.loc[both.name, "n_jobs"] == len(df) // 2


def adam_vs_sgd(rng: np.random.Generator, shift: float) -> pd.DataFrame:
    """SGD has momentum and no betas; Adam has betas and no momentum (NaN in the table)."""
    sgd = sweep(rng, seeds=1, channels=8, wds=(1e-2,), clamps=(True,))
    adam = sgd.assign(**{"optimizer.name": "adam", "optimizer.momentum": np.nan,
                         "optimizer.betas": "[0.9, 0.999]",
                         "display.brightness": sgd["display.brightness"] + shift})
    sgd = sgd.assign(**{"optimizer.betas": None})
    return pd.concat([sgd, adam], ignore_index=True)


def test_ignore_pairs_across_settings_that_exist_for_one_level_only():
    df = adam_vs_sgd(np.random.default_rng(10), shift=+3.0)
    strict = Claim("adam differs, strict", "optimizer.name", "display.brightness", "any", levels=("sgd", "adam"))
    loose = Claim("adam differs", "optimizer.name", "display.brightness", "any", levels=("sgd", "adam"),
                  ignore=("optimizer.momentum", "optimizer.betas"))
    with pytest.warns(UserWarning, match="no group has both levels"):
        result = evaluate(df, [strict, loose]).set_index("claim")
    assert result.loc[strict.name, "verdict"] == "no data"  # momentum/betas split every pair
    assert result.loc[loose.name, "verdict"] == "differs (+)"
    assert result.loc[loose.name, "n_groups"] == 8 and result.loc[loose.name, "n_jobs"] == 16
    assert result.loc[loose.name, "statistic"] == pytest.approx(3.0)


def test_missing_values_in_group_columns_do_not_drop_rows():
    df = adam_vs_sgd(np.random.default_rng(11), shift=0.0)
    later = df.assign(**{"optimizer.weight_decay": 0.1, "display.brightness": df["display.brightness"] + 1})
    df = pd.concat([df, later], ignore_index=True)
    table = group_table(df, Claim("wd", "optimizer.weight_decay", "display.brightness", "any"))
    assert len(table) == 16  # 8 channels × {sgd, adam}; the Adam groups (momentum NaN) are kept
    assert any("optimizer.momentum=null" in g for g in table["group"])


# ---------------------------------------------------------------------------------- rows used


def test_failed_rows_and_nonfinite_metrics_are_excluded():
    df = sweep(np.random.default_rng(12), wd_slope=-0.5)
    bad = df.sample(n=10, random_state=0).index
    df.loc[bad, "status"] = ["diverged", "failed"] * 5
    df.loc[bad, "display.brightness"] = 1e6 * df.loc[bad, "optimizer.weight_decay"]  # would flip it
    nan_rows = df.index.difference(bad)[:3]
    df.loc[nan_rows, "display.brightness"] = [np.nan, np.inf, -np.inf]
    row = one(df, WD_DARKER)
    assert row["verdict"] == "supported"
    assert row["n_jobs"] <= len(df) - 13
    used = paired_frame(df, WD_DARKER)
    assert (used["status"] == "ok").all() and np.isfinite(used["display.brightness"]).all()


def test_no_data_never_raises():
    df = sweep(np.random.default_rng(13), seeds=2, channels=1)
    claims = [
        Claim("filtered away", WD_DARKER.factor, WD_DARKER.metric, "decrease", filters={"blur.k": 99}),
        Claim("missing metric", WD_DARKER.factor, "display.nothing", "decrease"),
        Claim("missing factor", "optimizer.nothing", WD_DARKER.metric, "decrease"),
        Claim("absent level", "regularizer.clamp", WD_DARKER.metric, "any", levels=(True, "maybe")),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = evaluate(df, claims)
        failed = evaluate(df.assign(status="failed"), [WD_DARKER])
    assert len(caught) == 5
    assert list(result["verdict"]) == ["no data"] * 4 and failed["verdict"][0] == "no data"
    assert (result["n_groups"] == 0).all() and result["statistic"].isna().all()
    assert "display.nothing" in result.attrs["notes"]["missing metric"]
    assert list(result["test"]) == ["spearman", "spearman", "spearman", "difference"]
    assert group_table(df, claims[0]).empty and paired_frame(df, claims[0]).empty


def test_output_columns_and_determinism():
    df = sweep(np.random.default_rng(14), wd_slope=-0.1, clamp_off_shift=0.3)
    claims = [WD_DARKER, CLAMP_OFF_DARKER]
    result = evaluate(df, claims, n_boot=300)
    assert tuple(result.columns) == RESULT_COLUMNS
    assert tuple(evaluate(df, []).columns) == RESULT_COLUMNS
    # Row order, neighbouring claims and repeated calls do not change a claim's numbers.
    shuffled = df.sample(frac=1.0, random_state=1)
    alone = evaluate(shuffled, [CLAMP_OFF_DARKER], n_boot=300)
    own = [c for c in RESULT_COLUMNS if c not in ("p_holm", "verdict_holm")]  # Holm: the family's
    pd.testing.assert_frame_equal(result.iloc[[1]].reset_index(drop=True)[own], alone[own])
    pd.testing.assert_frame_equal(result, evaluate(df, claims, n_boot=300))
    assert not evaluate(df, claims, n_boot=300, seed=1).equals(result)


def test_too_few_groups_is_inconclusive():
    df = sweep(np.random.default_rng(15), seeds=1, channels=2, clamps=(True,), wd_slope=-1.0, noise_sd=0.01)
    row = one(df, WD_DARKER)
    assert row["n_units"] == 2 and row["ci_high"] < 0 and row["verdict"] == "inconclusive"
    assert row["reason"] == "2 unit(s) < 8 needed"
    assert one(df, WD_DARKER, min_groups=2)["verdict"] == "supported"


def test_group_columns_override():
    df = sweep(np.random.default_rng(16), seeds=4, channels=2, clamps=(True,), wd_slope=-1.0)
    table = group_table(df, WD_DARKER, group_columns=["seed"])
    assert list(table["group"]) == ["seed=0", "seed=1", "seed=2", "seed=3"]
    assert (table["n_jobs"] == 2 * len(WDS)).all()


# ---------------------------------------------------------------------------------- claims files


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "claims.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_load_claims_reads_the_schema(tmp_path):
    path = write(tmp_path, """
        claims:
          - name: Clamp off, darker
            factor: regularizer.clamp
            levels: [true, false]
            metric: display.brightness
            direction: decrease
            filters: {blur.k: [3, 5], optimizer.name: sgd}
            ignore: [optimizer.momentum]
          - {name: wd, factor: optimizer.weight_decay, metric: raw.brightness, direction: any}
        """)
    first, second = load_claims(path)
    assert first == Claim("Clamp off, darker", "regularizer.clamp", "display.brightness", "decrease",
                          levels=(True, False), filters={"blur.k": (3, 5), "optimizer.name": ("sgd",)},
                          ignore=("optimizer.momentum",))
    assert second.levels is None and second.filters == {} and second.ignore == ()
    hash(first)  # frozen and hashable despite the filters dict


@pytest.mark.parametrize(
    "body, expected",
    [
        ("- {name: a, factor: blur.k, metric: display.hf_energy, direction: down}",
         "claim 1 ('a'): key 'direction' is 'down'; allowed: 'increase', 'decrease' or 'any'."),
        ("- {name: a, factor: blur.k, metric: display.hf_energy, direction: any, level: [1, 3]}",
         "claim 1 ('a'): unknown key 'level' (did you mean 'levels'?)"),
        ("- {name: a, factor: blur.k, direction: any}",
         "claim 1 ('a'): missing key(s) 'metric'"),
        ("- {name: a, factor: blur.k, metric: display.hf_energy, direction: any, levels: [1, 3, 5]}",
         "key 'levels' is [1, 3, 5]; allowed: a list of two factor values [A, B]"),
        ("- {name: a, factor: blur.k, metric: display.hf_energy, direction: any, levels: [3, '3']}",
         "key 'levels' is [3, '3']; allowed: two different factor values"),
        ("- {name: a, factor: display.brightness, metric: display.hf_energy, direction: any}",
         "key 'factor' is 'display.brightness'; allowed: a config leaf"),
        ("- {name: a, factor: blur.k, metric: optimizer.lr, direction: any}",
         "key 'metric' is 'optimizer.lr'; allowed: an outcome column"),
        ("- {name: a, factor: blur.k, metric: activation, direction: any, filters: {seed: {a: 1}}}",
         "key 'filters.seed' is {'a': 1}; allowed: a scalar"),
        ("- {name: a, factor: blur.k, metric: activation, direction: any, ignore: [blur.k]}",
         "key 'ignore' is ['blur.k']; allowed: config columns other than the factor itself"),
        ("- {name: a, factor: blur.k, metric: activation, direction: any}\n"
         "- {name: a, factor: seed, metric: activation, direction: any}",
         "claim 2 ('a'): key 'name' is 'a', already used by claim 1"),
        ("- just a sentence", "claim 1 is 'just a sentence'; allowed: a mapping with keys"),
    ],
)
def test_load_claims_errors_name_claim_key_value_and_allowed(tmp_path, body, expected):
    path = write(tmp_path, "claims:\n" + textwrap.indent(body, "  ") + "\n")
    with pytest.raises(ClaimsError) as info:
        load_claims(path)
    assert expected in str(info.value)
    assert str(info.value).startswith(str(path))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)


def test_load_claims_file_errors(tmp_path):
    with pytest.raises(ClaimsError, match="does not exist"):
        load_claims(tmp_path / "missing.yaml")
    with pytest.raises(ClaimsError, match="not valid YAML"):
        load_claims(write(tmp_path, "claims: [\n"))
    with pytest.raises(ClaimsError, match="must be a mapping with one key 'claims'"):
        load_claims(write(tmp_path, "- name: a\n"))
    with pytest.raises(ClaimsError, match=r"unknown top-level key\(s\) \['claim'\]"):
        load_claims(write(tmp_path, "claims: []\nclaim: []\n"))


def test_claim_built_in_code_is_checked_too():
    with pytest.raises(ClaimsError, match="claim 'x': key 'direction' is 'up'"):
        Claim("x", "blur.k", "activation", "up")


def test_validate_claims_suggests_close_names():
    df = sweep(np.random.default_rng(17), seeds=1, channels=1)
    good = [WD_DARKER, CLAMP_OFF_DARKER]
    validate_claims(good, df)
    assert claim_problems(good, df) == []
    typo = [
        Claim("t1", "optimizer.weight_decy", "display.brightnes", "decrease", filters={"blurk": 3}),
        Claim("t2", "regularizer.clamp", "activation", "any", levels=(True, "ture")),
        Claim("t3", "target.layer", "activation", "any", filters={"optimizer.name": "adam"}),
    ]
    with pytest.raises(ClaimsError) as info:
        validate_claims(typo, df)
    text = str(info.value)
    assert "factor column 'optimizer.weight_decy' is not in the analysis table; did you mean 'optimizer.weight_decay'" in text
    assert "metric column 'display.brightnes' is not in the analysis table; did you mean 'display.brightness'" in text
    assert "filter column 'blurk'" in text and "'blur.k'" in text
    assert "level(s) ['ture'] of factor regularizer.clamp never occur" in text and "values are false, true" in text
    assert "filter optimizer.name allows ['adam'], which the table never has; its values are sgd" in text
    three = pd.concat([df.assign(**{"target.layer": v}) for v in ("a", "b", "c")], ignore_index=True)
    assert "give 'levels: [A, B]'" in claim_problems([typo[2]], three.assign(**{"optimizer.name": "adam"}))[0]


def test_shipped_notes_claims_load_fit_and_evaluate():
    claims = load_claims(notes_claims_path())
    assert len(claims) >= 10 and len({c.name for c in claims}) == len(claims)
    # A one-factor-at-a-time sweep over every key the notes' claims use.
    base = {"target.relu": "post", "optimizer.name": "sgd", "optimizer.momentum": 0.9,
            "optimizer.weight_decay": 1e-5, "regularizer.clamp": True, "blur.kind": "box", "blur.k": 3}
    variants = [{}, {"target.relu": "pre"}, {"optimizer.momentum": 0.0}, {"optimizer.momentum": 0.99},
                {"optimizer.weight_decay": 1e-1}, {"regularizer.clamp": False}, {"blur.k": 1},
                {"blur.k": 7}, {"optimizer.name": "adam", "optimizer.momentum": None},
                {"blur.kind": "gaussian", "blur.k": 3}, {"blur.kind": "gaussian", "blur.k": 7}]
    rng = np.random.default_rng(18)
    metrics = ["display.dominance", "display.brightness", "display.checkerboard", "display.hf_energy",
               "display.sharpness", "display.contrast", "raw.brightness"]
    rows = [{"seed": s, "target.channel": c, **base, **v, "status": "ok",
             **{m: rng.uniform() for m in metrics}}
            for s in range(3) for c in range(3) for v in variants]
    df = pd.DataFrame(rows)
    validate_claims(claims, df)
    result = evaluate(df, claims, n_boot=200)
    assert (result["n_groups"] == 9).all()
    assert set(result["verdict"]) <= {"supported", "contradicted", "inconclusive", "differs (+)", "differs (−)"}


# ---------------------------------------------------------------------------------- statistics


def test_hierarchical_bootstrap_with_one_group_per_unit_matches_scipy() -> None:
    """One group per unit is the ordinary bootstrap: scipy's percentile CI at the expanded level."""
    stats = pytest.importorskip("scipy.stats")
    from featsweep.analysis.stats import expanded_tail, hierarchical_bootstrap

    values = np.random.default_rng(20).normal(1.0, 2.0, size=10)
    ours = hierarchical_bootstrap(values, np.arange(10), n_boot=20_000, rng=np.random.default_rng(0))
    tail = expanded_tail(10)
    assert tail == pytest.approx(stats.norm.cdf(-math.sqrt(10 / 9) * stats.t.ppf(0.975, 9)))
    ref = stats.bootstrap((values,), np.mean, n_resamples=20_000, method="percentile",
                          confidence_level=1 - 2 * tail, random_state=np.random.default_rng(1))
    assert ours.estimate[0] == pytest.approx(values.mean())
    assert ours.low[0] == pytest.approx(ref.confidence_interval.low, abs=0.05)
    assert ours.high[0] == pytest.approx(ref.confidence_interval.high, abs=0.05)
    # p < 0.05 exactly when the CI excludes 0; p near 1 for a centred sample.
    assert (ours.p[0] < 0.05) == (ours.low[0] > 0 or ours.high[0] < 0)
    centred = hierarchical_bootstrap(values - values.mean(), np.arange(10), n_boot=4000,
                                     rng=np.random.default_rng(2))
    assert centred.p[0] > 0.9


def test_hierarchical_bootstrap_weighs_units_equally_and_resamples_them() -> None:
    from featsweep.analysis.stats import hierarchical_bootstrap

    # Unit a: four groups at 1; unit b: one group at 3. Unit-weighted mean 2, not 1.4.
    boot = hierarchical_bootstrap(np.array([1.0, 1, 1, 1, 3]), np.array(list("aaaab")),
                                  n_boot=2000, rng=np.random.default_rng(0))
    assert boot.n_units == 2 and boot.estimate[0] == pytest.approx(2.0)
    # Many seeds of few channels: the CI is as wide as the channels' spread says, not narrowed
    # by the number of groups (compare the flat bootstrap over the same 40 groups).
    rng = np.random.default_rng(1)
    channel = rng.normal(0.0, 1.0, size=8)
    values = np.repeat(channel, 5) + rng.normal(0.0, 0.01, size=40)
    nested = hierarchical_bootstrap(values, np.repeat(np.arange(8), 5), n_boot=4000, rng=rng)
    flat = hierarchical_bootstrap(values, np.arange(40), n_boot=4000, rng=rng)
    assert (nested.high - nested.low)[0] > 2 * (flat.high - flat.low)[0]


@pytest.mark.parametrize("groups_per_unit, bound", [(2, 0.06), (1, 0.075)])
def test_false_verdict_rate_at_eight_units(groups_per_unit: int, bound: float) -> None:
    """Pure noise with 8 channels: the CI excludes 0 in ≤ 6 % of trials (2 seeds per channel:
    measured 2.0 % on 1,000 trials; one group per channel: 6.0 %, the expanded interval's rate)."""
    from featsweep.analysis.stats import hierarchical_bootstrap

    trials, wrong = 400, 0
    units = np.repeat(np.arange(8), groups_per_unit)
    for trial in range(trials):
        rng = np.random.default_rng(trial)
        values = (rng.normal(size=(8, 1)) + rng.normal(size=(8, groups_per_unit))).ravel()
        boot = hierarchical_bootstrap(values, units, n_boot=1000, rng=np.random.default_rng(10**6 + trial))
        wrong += bool(boot.low[0] > 0 or boot.high[0] < 0)
    assert wrong / trials <= bound, wrong / trials
    assert wrong > 0  # a CI that never excludes 0 would be useless too


def test_pure_noise_claims_are_rarely_decisive() -> None:
    """End to end through evaluate: 8 channels × 2 seeds of noise, few false verdicts."""
    claim = Claim("noise", "optimizer.weight_decay", "display.brightness", "decrease", min_effect=0)
    decisive = 0
    for trial in range(25):
        df = sweep(np.random.default_rng(1000 + trial), clamps=(True,), wds=(0.0, 1e-3, 1e-1),
                   offset_sd=3.0)
        decisive += one(df, claim, n_boot=500, seed=trial)["verdict"] in ("supported", "contradicted")
    assert decisive <= 1


def clustered(rng: np.random.Generator, *, seeds: int = 6) -> pd.DataFrame:
    """Clamping off brightens 2 of 8 channels strongly (+4) and darkens the other 6 (−0.5)."""
    df = sweep(rng, seeds=seeds, channels=8, wds=(0.0,), noise_sd=0.05)
    shift = np.where(df["target.channel"] < 2, 4.0, -0.5)
    df["display.brightness"] += np.where(df["regularizer.clamp"], 0.0, shift)
    return df


def test_clustered_effect_is_not_declared_general() -> None:
    claim = Claim("clamp off brighter", "regularizer.clamp", "display.brightness", "increase",
                  levels=(True, False), min_effect=0)
    df = clustered(np.random.default_rng(21))
    row = one(df, claim, n_boot=4000)
    assert row["n_units"] == 8 and row["n_groups"] == 48
    assert row["statistic"] == pytest.approx((2 * 4.0 - 6 * 0.5) / 8, abs=0.05)
    assert row["ci_low"] < 0 < row["ci_high"] and row["verdict"] == "inconclusive"
    assert row["reason"] == "CI includes 0"
    # Treating the 48 seed × channel groups as independent would have called it general.
    flat = Claim(claim.name, claim.factor, claim.metric, claim.direction, levels=claim.levels,
                 unit=None, min_effect=0)
    assert one(df, flat, n_boot=4000)["verdict"] == "supported"


def test_planted_effect_below_the_seed_spread_is_negligible() -> None:
    """A consistent shift of 0.02 against a seed-to-seed spread of ~1: negligible, not supported."""
    df = sweep(np.random.default_rng(22), seeds=4, clamp_off_shift=-0.02, noise_sd=0.002,
               wds=(0.0,))
    row = one(df, CLAMP_OFF_DARKER, n_boot=2000)
    # Offsets differ per (seed, channel), so the spread over seeds at fixed settings is ~offset_sd.
    assert 0.6 < row["min_effect"] < 1.5
    assert row["ci_high"] < 0  # the shift itself is certain ...
    assert row["verdict"] == row["verdict_holm"] == "negligible"  # ... and far below seed noise
    assert row["reason"].startswith("effect CI [") and "inside ±" in row["reason"]
    floorless = Claim(CLAMP_OFF_DARKER.name, CLAMP_OFF_DARKER.factor, CLAMP_OFF_DARKER.metric,
                      "decrease", levels=(True, False), min_effect=0.0)
    assert one(df, floorless, n_boot=2000)["verdict"] == "supported"
    explicit = Claim("set floor", CLAMP_OFF_DARKER.factor, CLAMP_OFF_DARKER.metric, "decrease",
                     levels=(True, False), min_effect=0.005)
    assert one(df, explicit, n_boot=2000)["min_effect"] == 0.005


def test_holm_adjustment_matches_the_formula_and_can_demote_a_verdict() -> None:
    from featsweep.analysis.stats import holm

    p = np.array([0.01, 0.04, np.nan, 0.03, 0.5])
    # sorted 0.01, 0.03, 0.04, 0.5 with m = 4: 0.04, 0.09, 0.09 (monotone), 0.5
    assert np.allclose(holm(p), [0.04, 0.09, np.nan, 0.09, 0.5], equal_nan=True)
    # A weak effect that is supported alone is not, once 11 null claims join it.
    rng = np.random.default_rng(24)
    df = sweep(rng, seeds=2, wds=(0.0, 1e-1), clamp_off_shift=-0.8, noise_sd=1.0, offset_sd=0.0)
    target = Claim("clamp", "regularizer.clamp", "display.brightness", "decrease",
                   levels=(True, False), min_effect=0)
    for column in range(11):
        df[f"display.null{column}"] = rng.normal(size=len(df))
    nulls = [Claim(f"null {c}", "regularizer.clamp", f"display.null{c}", "any",
                   levels=(True, False), min_effect=0) for c in range(11)]
    result = evaluate(df, [target, *nulls], n_boot=4000).set_index("claim")
    row = result.loc["clamp"]
    assert row["verdict"] == "supported" and 0.005 < row["p_value"] < 0.05
    ranked = np.sort(result["p_value"].to_numpy())
    k = int(np.searchsorted(ranked, row["p_value"]))  # its rank among the 12
    assert row["p_holm"] == pytest.approx(max(min(1.0, (12 - j) * ranked[j]) for j in range(k + 1)))
    assert row["verdict_holm"] == "inconclusive"
    assert (result["p_holm"] >= result["p_value"]).all()


def test_level_table_shows_a_non_monotone_ordered_factor() -> None:
    """hf_energy by box size 1/3/5/7 as in the committed study: 0.727, 0.012, 0.037, 0.027."""
    from featsweep.analysis.claims import level_table

    means = {1: 0.727, 3: 0.012, 5: 0.037, 7: 0.027}
    rng = np.random.default_rng(24)
    rows = [{"seed": s, "target.channel": c, "blur.kind": "box", "blur.k": k, "status": "ok",
             "display.hf_energy": m + rng.normal(0, 0.002)}
            for s in range(2) for c in range(8) for k, m in means.items()]
    df = pd.DataFrame(rows)
    claim = Claim("wider blur, less hf", "blur.k", "display.hf_energy", "decrease")
    row = one(df, claim, n_boot=2000)
    assert row["verdict"] == "supported"  # ρ < 0 overall ...
    assert row["monotone"] == "no: 3→5 rises"  # ... but k = 5 passes more than k = 3
    table = level_table(df, claim, n_boot=2000)
    assert list(table.columns) == ["level", "n_units", "n_groups", "mean", "ci_low", "ci_high",
                                   "step", "step_low", "step_high"]
    assert list(table["level"]) == ["1", "3", "5", "7"]
    assert np.allclose(table["mean"], list(means.values()), atol=0.002)
    assert (table["ci_low"] <= table["mean"]).all() and (table["mean"] <= table["ci_high"]).all()
    assert table["step"].iloc[2] == pytest.approx(0.025, abs=0.002) and table["step_low"].iloc[2] > 0
    assert (table["n_units"] == 8).all() and (table["n_groups"] == 16).all()
    monotone = df.assign(**{"display.hf_energy": 1.0 / df["blur.k"] + rng.normal(0, 0.002, len(df))})
    assert one(monotone, claim, n_boot=1000)["monotone"] == "yes"


def test_dropped_groups_are_counted_with_their_reason() -> None:
    df = sweep(np.random.default_rng(25), clamps=(True,), wd_slope=-1.0, noise_sd=0.1)
    constant = (df["seed"] == 0) & (df["target.channel"] < 3)
    df.loc[constant, "display.brightness"] = 0.5  # ρ undefined in 3 groups
    lonely = (df["seed"] == 1) & (df["target.channel"] == 7) & (df["optimizer.weight_decay"] > 0)
    df = df[~lonely]  # one factor value left in 1 group
    df.loc[df.index[:2], "status"] = "failed"
    row = one(df, WD_DARKER, n_boot=500)
    assert row["n_groups"] == 16 - 4
    assert row["dropped"] == ("4 group(s): metric constant (3), one factor value only (1); "
                              "2 job(s): status not ok (2)")


def test_unit_fallbacks_and_unit_errors() -> None:
    df = sweep(np.random.default_rng(26), wd_slope=-0.5).drop(columns="target.channel")
    row = evaluate(df, [WD_DARKER], n_boot=300).iloc[0]
    assert row["unit"] == "group" and row["n_units"] == row["n_groups"] == 4  # 2 seeds × clamp
    assert "each paired group counts as a unit" in evaluate(df, [WD_DARKER], n_boot=300).attrs["remarks"][WD_DARKER.name]
    by_seed = Claim("by seed", WD_DARKER.factor, WD_DARKER.metric, "decrease", unit="seed")
    assert one(sweep(np.random.default_rng(26)), by_seed, n_boot=300)["n_units"] == 2
    with pytest.raises(ClaimsError, match="key 'unit' is 'optimizer.weight_decay'"):
        Claim("x", "optimizer.weight_decay", "activation", "any", unit="optimizer.weight_decay")
    with pytest.raises(ClaimsError, match="key 'min_effect' is -1"):
        Claim("x", "optimizer.weight_decay", "activation", "any", min_effect=-1)
    assert "unit column 'target.chanel'" in claim_problems(
        [Claim("x", "optimizer.weight_decay", "activation", "any", unit="target.chanel")],
        sweep(np.random.default_rng(0), seeds=1, channels=1))[0]


def test_constant_metric_says_so() -> None:
    df = sweep(np.random.default_rng(27), clamps=(True,)).assign(**{"display.brightness": 0.25})
    row = one(df, Claim("const", "optimizer.weight_decay", "display.brightness", "decrease"),
              n_boot=200)
    assert row["verdict"] == "no data"  # ρ is undefined in every group ...
    assert "dropped: metric constant (16)" in row["reason"]
    diff = sweep(np.random.default_rng(27), wds=(0.0,)).assign(**{"display.brightness": 0.25})
    row = one(diff, CLAMP_OFF_DARKER, n_boot=200)  # ... while B − A = 0 is defined
    assert row["verdict"] == row["verdict_holm"] == "inconclusive"
    assert row["reason"] == "metric constant (0.25 in all 32 jobs)"


# ---------------------------------------------------------------------------------- by


def test_by_gives_one_verdict_per_value_and_keeps_a_single_value_whole(tmp_path) -> None:
    """Weight decay darkens under one parameterization only: pooled, the effect is halved; split by
    param.kind, the pixel part is supported and the fft part is not, each on its own rows."""
    from featsweep.analysis.claims import claims_table, expand_by

    rng = np.random.default_rng(31)
    pixel = sweep(rng, wd_slope=-0.6, clamps=(True,)).assign(**{"param.kind": "pixel"})
    fft = sweep(rng, wd_slope=0.0, clamps=(True,)).assign(**{"param.kind": "fft"})
    both = pd.concat([pixel, fft], ignore_index=True)
    claim = Claim(WD_DARKER.name, WD_DARKER.factor, WD_DARKER.metric, "decrease", by=("param.kind",))
    parts = expand_by([claim], both)
    assert [c.name for c in parts] == [f"{claim.name} [param.kind=fft]", f"{claim.name} [param.kind=pixel]"]
    assert all(c.by == () for c in parts) and parts[1].filters["param.kind"] == ("pixel",)
    assert expand_by(parts, both) == parts  # idempotent
    table = claims_table(both, [claim], n_boot=2000).set_index("claim")
    assert table.loc[parts[1].name, "verdict"] == "supported"
    assert table.loc[parts[0].name, "verdict"] != "supported"
    assert table.loc[parts[1].name, "n_jobs"] == len(pixel)  # its own rows only
    # Each part is exactly the claim filtered by hand.
    alone = evaluate(pixel, [replace(parts[1], filters={})], n_boot=2000).iloc[0]
    assert table.loc[parts[1].name, "statistic"] == pytest.approx(alone["statistic"])
    # One value: the claim stays whole, under its own name.
    assert [c.name for c in expand_by([claim], pixel)] == [claim.name]
    assert [c.name for c in expand_by([claim], pixel.drop(columns="param.kind"))] == [claim.name]
    # The file's by is inherited, minus the claim's own factor; a claim may opt out with [].
    path = write(tmp_path, "by: [param.kind]\nclaims:\n"
                 "  - {name: a, factor: optimizer.weight_decay, metric: display.brightness, direction: decrease}\n"
                 "  - {name: b, factor: param.kind, metric: display.brightness, direction: any, levels: [pixel, fft]}\n"
                 "  - {name: c, factor: blur.k, metric: display.brightness, direction: any, by: []}\n")
    assert [c.by for c in load_claims(path)] == [("param.kind",), (), ()]
    with pytest.raises(ClaimsError, match="key 'by' is \\['optimizer.weight_decay'\\]; allowed: config columns other than the factor"):
        Claim("x", "optimizer.weight_decay", "activation", "any", by=("optimizer.weight_decay",))


def test_shipped_notes_claims_split_by_parameterization() -> None:
    from featsweep.analysis.claims import expand_by

    claims = load_claims(notes_claims_path())
    assert all(c.by == ("param.kind",) for c in claims)
    df = pd.DataFrame({"param.kind": ["pixel", "fft"], "optimizer.weight_decay": [0.0, 0.1],
                       "display.brightness": [0.1, 0.2], "raw.brightness": [0.1, 0.2],
                       "regularizer.clamp": [True, True]})
    names = [c.name for c in expand_by(claims, df)]
    assert len(names) == 2 * len(claims) and names[0].endswith("[param.kind=fft]")
