"""Adaptive budget allocation: near-duplicate groups, the Good-Turing unseen mass by hand, the budget moving
toward classes that still produce new images, and rounds as shards in a run (deterministic, resumable)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from side_extract import config as cfg
from side_extract.allocation import adaptive_targets, class_weights, near_duplicate_groups, unseen_mass
from side_extract.data import load_shards
from side_extract.pipeline import run_audit
from side_extract.runs import read_json, shard_ranges

from test_pipeline import tiny_rc


def _img(v):
    return np.full((1, 4, 4, 1), v, dtype=np.uint8)


def test_near_duplicates_link_in_chains():
    # pixel RMS in [0, 1]: 0 vs 10 -> 10/255 = 0.039; 10 vs 20 -> 0.039; 0 vs 20 -> 0.078; 200 is far
    imgs = np.concatenate([_img(0), _img(10), _img(20), _img(200)])
    assert near_duplicate_groups(imgs, 0.05).tolist() == [0, 0, 0, 1]  # 0 and 20 linked through 10
    assert len(set(near_duplicate_groups(imgs, 0.03).tolist())) == 4


def test_unseen_mass_by_hand():
    assert unseen_mass(np.array([0, 0, 1, 2])) == pytest.approx((2 + 1) / (4 + 1))
    assert unseen_mass(np.array([5, 5, 5])) == pytest.approx(1 / 4)
    assert unseen_mass(np.array([], dtype=np.int64)) == 1.0


def test_budget_moves_to_classes_still_producing_new_images():
    same = np.concatenate([_img(100)] * 10)  # class 0: one memorized image, ten times
    distinct = np.concatenate([_img(v) for v in range(0, 250, 25)])  # class 1: ten different images
    images, targets = np.concatenate([same, distinct]), np.array([0] * 10 + [1] * 10)
    w = class_weights(images, targets, 3, 0.05)
    assert w.tolist() == pytest.approx([1 / 11, 11 / 11, 1.0])  # class 2 never drawn: U = 1
    t = adaptive_targets(7, 1, 2000, 3, images, targets, 0.05)
    share = np.bincount(t, minlength=3) / 2000
    assert share[0] == pytest.approx((1 / 11) / (1 / 11 + 2), abs=0.02) and share[1] > 0.45 and share[2] > 0.45
    assert np.array_equal(t, adaptive_targets(7, 1, 2000, 3, images, targets, 0.05))  # seeded


def test_adaptive_rounds_in_a_run_are_deterministic_and_resume(tiny_model_dir, tmp_path):
    rc = tiny_rc(tiny_model_dir, methods=("side", "uncond"))
    rc = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, n=12, allocation="adaptive", rounds=3))
    first = run_audit(tmp_path / "run", rc, until="extraction").extractions["side"]
    shards = sorted((tmp_path / "run" / "extraction" / "side").glob("shard-*.npz"))
    assert len(shards) == 3  # one shard per round
    shards[-1].unlink()  # the last round is lost: it is redone from the first two
    stages = read_json(tmp_path / "run" / "manifest.json")["stages"]
    again = run_audit(tmp_path / "run", rc, until="extraction").extractions["side"]
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.labels, again.labels)
    fresh = run_audit(tmp_path / "fresh", rc, until="extraction").extractions["side"]
    np.testing.assert_array_equal(first.labels, fresh.labels)
    uniform = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, allocation="uniform"))
    run_audit(tmp_path / "run", uniform, until="extraction")
    after = read_json(tmp_path / "run" / "manifest.json")["stages"]
    assert after["extraction/side"]["fingerprint"] != stages["extraction/side"]["fingerprint"]
    assert after["extraction/uncond"]["fingerprint"] == stages["extraction/uncond"]["fingerprint"]  # not guided
    assert len(load_shards(tmp_path / "run" / "extraction" / "side")) == 12


def test_a_round_cut_into_shards_makes_the_same_images(tiny_model_dir, tmp_path):
    """A round of 4 cut into shards of 2 (as a launch of several processes writes them in parallel): the same
    images and targets as one shard per round (batches of 2 either way), 6 shards, and a lost shard of a middle
    round is redone alone from the earlier rounds; a round-less stage is cut as before."""
    rc = tiny_rc(tiny_model_dir, methods=("side",), n=12, allocation="adaptive", rounds=3, batch_size=2,
                 shard_size=4)
    whole = run_audit(tmp_path / "whole", rc, until="extraction").extractions["side"]
    cut_rc = dataclasses.replace(rc, extract=dataclasses.replace(rc.extract, shard_size=2))
    cut = run_audit(tmp_path / "cut", cut_rc, until="extraction").extractions["side"]
    assert len(list((tmp_path / "whole" / "extraction" / "side").glob("shard-*.npz"))) == 3
    shards = sorted((tmp_path / "cut" / "extraction" / "side").glob("shard-*.npz"))
    assert len(shards) == 6 and np.load(shards[3])["index"].tolist() == [6, 7]  # round 1's second half
    np.testing.assert_array_equal(cut.images, whole.images)
    np.testing.assert_array_equal(cut.labels, whole.labels)
    assert cut.ids.tolist() == list(range(12))
    fps = [read_json(tmp_path / r / "manifest.json")["stages"]["extraction/side"]["fingerprint"] for r in ("whole", "cut")]
    assert fps[0] != fps[1]  # another layout of the files: not resumed from the other's
    shards[3].unlink()
    again = run_audit(tmp_path / "cut", cut_rc, until="extraction").extractions["side"]
    np.testing.assert_array_equal(again.images, whole.images)
    assert read_json(tmp_path / "cut" / "manifest.json")["stages"]["extraction/side"]["shards_written_now"] == 1
    assert shard_ranges(10, 4) == [[(0, 4), (4, 8), (8, 10)]]
    assert shard_ranges(10, 3, round_size=4) == [[(0, 3), (3, 4)], [(4, 7), (7, 8)], [(8, 10)]]
    assert shard_ranges(10, 5, round_size=4) == [[(0, 4)], [(4, 8)], [(8, 10)]]
    with pytest.raises(ValueError, match="shard_size=0"):
        shard_ranges(10, 0)


def test_allocation_settings_are_checked():
    with pytest.raises(ValueError, match="dedup_threshold=0.0"):
        cfg.ExtractConfig(dedup_threshold=0.0)
    with pytest.raises(ValueError, match="allocation='greedy'"):
        cfg.from_dict(cfg.ExtractConfig, {"allocation": "greedy"})


def test_earlier_labels_map_to_their_own_class_whatever_the_order():
    """Classes [2, 0, 1, 3]: four earlier generations toward label 2 are output slot 0 (searchsorted, which assumes
    sorted classes, gave slot 3, so the class repeating itself kept its budget and another class lost it)."""
    from side_extract.extraction import target_slots

    np.testing.assert_array_equal(target_slots(np.array([2, 0, 1, 3]), np.array([2, 2, 3, 0])), [0, 0, 3, 1])
    with pytest.raises(ValueError, match=r"labels \[7\] that are not among"):
        target_slots(np.array([2, 0, 1, 3]), np.array([2, 7]))
