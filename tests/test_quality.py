"""featsweep.quality: each metric on a case with a known answer, then on real job directories."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.singleton import Singleton
from omegaconf import OmegaConf

from featsweep.quality import (
    SKIMAGE_PHOTOS,
    add_quality,
    natural_pool,
    natural_ratio,
    random_views,
    robustness,
    seed_diversity,
)

CONF = Path(__file__).resolve().parents[1] / "src" / "featsweep" / "conf"


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


def centre_pixel(x: torch.Tensor) -> torch.Tensor:
    h, w = x.shape[-2:]
    return x[..., h // 2:h // 2 + 1, w // 2:w // 2 + 1]


def test_robustness_is_one_for_a_constant_image_and_for_no_moves() -> None:
    constant = torch.full((2, 3, 32, 32), 0.4)
    assert robustness(identity, constant, [0, 2]) == pytest.approx([1.0, 1.0], abs=1e-6)
    noise = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    still = robustness(centre_pixel, noise, [0, 1, 2], jitter=0.0, scale=(1.0, 1.0), degrees=0.0)
    assert still == pytest.approx([1.0] * 3, abs=1e-5)


def test_robustness_of_a_one_pixel_pattern_is_small() -> None:
    """A channel that reads one pixel, maximized by a one-pixel dot: moves of up to ±2 px miss it."""
    dot = torch.zeros(1, 3, 32, 32)
    dot[..., 16, 16] = 1.0
    value = robustness(centre_pixel, dot, [0])[0]
    assert 0.0 <= value < 0.35
    # Seeded: the same draws every time; another seed, other draws.
    assert robustness(centre_pixel, dot, [0])[0] == value
    views = random_views(dot, 4, seed=0)
    assert views.shape == (4, 3, 32, 32) and not torch.equal(views, random_views(dot, 4, seed=1))


def test_natural_ratio_known_answers() -> None:
    pool = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    best = int(pool[:, 1].mean(dim=(-2, -1)).argmax())
    ratio, acts = natural_ratio(identity, pool[[best]], [1], pool)
    assert ratio[0] == pytest.approx(1.0)  # the pool's own top crop
    ratio, _ = natural_ratio(identity, 2 * pool[[best]], [1], pool)
    assert ratio[0] == pytest.approx(2.0)  # twice the top crop, with a linear channel
    assert acts[1].shape == (5,) and acts[1].max() == pytest.approx(float(pool[best, 1].mean()))


def test_seed_diversity_known_answers() -> None:
    a = np.array([1.0, 0.0, 0.0])
    assert seed_diversity(np.stack([a, a])) == pytest.approx(0.0)
    assert seed_diversity(np.stack([a, [0.0, 2.0, 0.0]])) == pytest.approx(1.0)  # orthogonal
    assert seed_diversity(np.stack([a, -a])) == pytest.approx(2.0)  # opposite
    # three seeds: pairs (a,a) 0, (a,b) 1, (a,b) 1 -> 2/3
    assert seed_diversity(np.stack([a, a, [0.0, 0.0, 5.0]])) == pytest.approx(2 / 3)
    assert np.isnan(seed_diversity(a[None]))


def test_natural_pool_is_bundled_photos_in_range(tmp_path: Path) -> None:
    pool, labels = natural_pool(24)
    assert pool.shape == (len(SKIMAGE_PHOTOS) * 10, 3, 24, 24) and len(labels) == len(pool)
    assert float(pool.min()) >= 0.0 and float(pool.max()) <= 1.0
    from PIL import Image

    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "grey.png")
    own, names = natural_pool(8, tmp_path, grid=2)
    assert own.shape == (5, 3, 8, 8) and names[0] == "grey.png centre"
    assert torch.allclose(own, torch.full_like(own, 200 / 255))
    from featsweep.errors import UserError

    with pytest.raises(UserError, match="is not a directory"):
        natural_pool(8, tmp_path / "missing")


@pytest.fixture()
def tiny_sweep(tmp_path: Path) -> Path:
    """Three finished jobs of the tiny CNN at 32 px: seeds 0 and 1 of channel 3 with the same
    image (a natural crop), and channel 5."""
    from featsweep.artifacts import write_job
    from featsweep.engine import JobOutcome

    state = Singleton.get_state()
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfgs = [compose("config", overrides=["model=tiny", "image.size=32", "device=cpu",
                                                  f"seed={seed}", f"target.channel={channel}"])
                    for seed, channel in ((0, 3), (1, 3), (0, 5))]
    finally:
        Singleton.set_state(state)
    pool, _ = natural_pool(32)
    image = pool[7].permute(1, 2, 0).numpy()
    root = tmp_path / "sweep"
    for num, cfg in enumerate(cfgs):
        job = root / str(num)
        (job / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, job / ".hydra" / "config.yaml")
        (job / ".hydra" / "overrides.yaml").write_text("[]\n")
        write_job(job, JobOutcome(
            status="ok", activation=1.0, activation_start=0.0, steps_done=2,
            trace=np.array([[0.0, 0.0], [2.0, 1.0]]), optimized=image, before_blur=image,
            pixels=image, seconds=0.1, device="cpu", info={"batch_size": 3}))
    return root


def test_add_quality_on_real_job_directories(tiny_sweep: Path, tmp_path: Path) -> None:
    from featsweep.analysis import collect
    from featsweep.quality import _network_features, _spec_of

    df = collect(tiny_sweep)
    out, examples = add_quality(df, out_dir=tmp_path / "out", n_draws=4)
    assert out["quality.robustness"].notna().all()
    # Seeds 0 and 1 of channel 3 hold the same image: diversity exactly 0; channel 5 has one seed.
    assert out.loc[:1, "quality.seed_diversity"].tolist() == pytest.approx([0.0, 0.0], abs=1e-12)
    assert np.isnan(out.loc[2, "quality.seed_diversity"])
    # natural_ratio = the image's activation ÷ the pool's best, computed independently here.
    spec = _spec_of(df.loc[0, "job.dir"])
    layer = spec.target.layer  # target.layer=null resolves to the model's default, block3
    assert layer == "block3"
    features, _ = _network_features(spec)
    pool, _ = natural_pool(32)
    with torch.no_grad():
        acts = features(pool)[:, 3].mean(dim=(-2, -1))
    assert out.loc[0, "quality.natural_ratio"] == pytest.approx(float(acts[7] / acts.max()), rel=1e-5)
    assert set(examples) == {(layer, "post", 3), (layer, "post", 5)}
    ex = examples[(layer, "post", 3)]
    assert ex.crop_acts[0] == pytest.approx(float(acts.max()), rel=1e-5) and len(ex.job_dirs) == 2
    assert sorted(p.name for p in (tmp_path / "out").glob("examples_*.png")) == [
        f"examples_{layer}_post_{c}.png" for c in (3, 5)]


def test_report_with_quality_shows_dataset_examples_and_convergence(tiny_sweep: Path, tmp_path: Path) -> None:
    from featsweep.analysis.report import write_report

    out = tmp_path / "report"
    text = write_report(tiny_sweep, out_dir=out, n_boot=200, quality=True).read_text()
    assert "## Dataset examples" in text
    assert "![block3 post channel 3](examples_block3_post_3.png)" in text
    assert (out / "examples_block3_post_3.png").stat().st_size > 0
    # Each trace rises from 0 to 1 over its last step: none converged, and the report says so.
    assert "Convergence: 0 of 3 job(s) with a trace converged" in text
    runs = __import__("pandas").read_csv(out / "runs.csv")
    assert runs["quality.robustness"].notna().all() and runs["quality.natural_ratio"].notna().all()
