"""Benchmark sizes. ``full`` is what docs/results.md shows; ``ci`` runs every stage on tiny
data in a few minutes (the numbers mean nothing) and is what ``make test`` runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from quality_bench.bench import SearchConfig
from quality_bench.rows import BASELINES, SEARCH_ROWS, method_names

JOINT = "multi-task (joint training)"
from quality_bench.tracks import TrackConfig
from quality_bench.training import Recipe
from quality_bench.vit import PretrainRecipe, ViTConfig

#: fortune_language and chatterbot_topic (docs/results.md's first round) are left out: a linear probe on the
#: frozen MiniLM came within 2 and 5 points of their fine-tunes, so they measure no merging loss
TEXT_TASKS = ["wordnet_noun", "wordnet_verb", "wordnet_pos", "fortune_category", "bigram_shift", "word_replaced",
              "word_shuffle", "gloss_length"]
IMAGE_TASKS = ["fashion", "mnist", "digits", "mnist_rotated", "fashion_turns", "fashion_same", "mnist_sum", "fashion_coarse"]

#: rows run on every fine-tuning seed (the others on seed 0): the baselines and the methods the page's
#: conclusions rest on, among them every method FusionBench reports
MAIN_ROWS = [*BASELINES, "linear", "task_arithmetic", "ties", "fisher", "regmean", "regmean_plus_plus", "iso_c", "iso_cts",
             "tsv_m", "wudi", "emr", "adamerging_task", "adamerging_layer", "evolve", "evolve_6", "task_arithmetic_64"]


@dataclass
class Preset:
    tracks: dict[str, TrackConfig]
    #: None: every baseline, every registered method and every search row
    rows: list[str] | None = None
    seeded_rows: list[str] = field(default_factory=lambda: list(MAIN_ROWS))
    search: dict[str, SearchConfig] = field(default_factory=dict)
    curve: dict[str, list[str]] = field(default_factory=dict)
    curve_ks: dict[str, list[int]] = field(default_factory=dict)
    #: AdaMerging study: inputs per task (None: all) and the step interval of the path checkpoints, per track
    study: dict[str, tuple[int | None, int]] = field(default_factory=dict)
    #: rows left to seed 0 on a track although in ``seeded_rows`` (cost)
    seed0_only: dict[str, list[str]] = field(default_factory=dict)

    #: with --jobs 2, these rows of a track (and its AdaMerging study) run in a second process, which
    #: shares the fine-tune cache with the first and writes results-PRESET-TRACK.part2.json
    parts: dict[str, list[str]] = field(default_factory=dict)

    def seeded(self, track: str) -> list[str]:
        return [r for r in self.seeded_rows if r not in self.seed0_only.get(track, [])]

    def all_rows(self) -> list[str]:
        """The preset's rows; the joint-training baseline last (the costliest training, not needed by the others)."""
        rows = self.rows if self.rows is not None else [*BASELINES, *method_names(), *SEARCH_ROWS]
        return [r for r in rows if r != JOINT] + [r for r in rows if r == JOINT]


PRESETS = {
    "full": Preset(
        tracks={
            "text": TrackConfig(tasks=TEXT_TASKS, recipe=Recipe(steps=400, batch_size=16, lr=1e-4, head_lr=2e-3, max_len=32,
                                                                freeze=("word_embeddings",)),
                                joint_steps=1600, n_test=500, n_val=100, n_probe=2000, n_stats=256),
            "image": TrackConfig(tasks=IMAGE_TASKS, recipe=Recipe(steps=500, batch_size=64, lr=5e-4, head_lr=5e-3,
                                                                  weight_decay=0.01, decay="cosine"),
                                 joint_steps=2000, n_test=1000, n_val=200, n_probe=4000, n_stats=256,
                                 pretrain=PretrainRecipe(epochs=5), vit=ViTConfig(dim=96, depth=4, heads=4, mlp=192)),
        },
        search={"text": SearchConfig(), "image": SearchConfig()},
        curve={"text": ["task_arithmetic", "ties", "iso_cts", "regmean"], "image": ["task_arithmetic", "ties", "iso_cts", "regmean"]},
        curve_ks={"text": [2, 4, 6, 8], "image": [2, 3, 4, 5, 6, 7, 8]},
        study={"text": (200, 100), "image": (None, 25)},
        # AdaMerging on MiniLM costs about 40 CPU-minutes a run (500 steps, 8 x 16 texts forward and backward),
        # joint training 1600 steps (about 12 CPU-minutes), and each of the budget rows 64 validation passes over
        # 8 x 100 texts: seed 0 only on the text track, so that the track finishes on a 2-core machine in an afternoon
        seed0_only={"text": ["adamerging_task", "adamerging_layer", JOINT, "evolve", "evolve_6", "task_arithmetic_64"]},
        parts={"text": ["adamerging_task", "adamerging_layer"]},
    ),
    "ci": Preset(
        tracks={
            "text": TrackConfig(tasks=["wordnet_pos", "fortune_language"],
                                recipe=Recipe(steps=12, batch_size=8, lr=2e-4, head_lr=3e-2, max_len=24, freeze=("word_embeddings",)),
                                seeds=(0, 1), joint_steps=12, n_test=40, n_val=24, n_train=64, n_probe=64, n_stats=16),
            "image": TrackConfig(tasks=["digits", "mnist_rotated"],
                                 recipe=Recipe(steps=30, batch_size=32, lr=1e-3, head_lr=1e-2, decay="cosine"),
                                 seeds=(0, 1), joint_steps=30, n_test=60, n_val=40, n_train=300, n_probe=300, n_stats=16,
                                 pretrain=PretrainRecipe(epochs=1, batch_size=64, max_images=1024),
                                 vit=ViTConfig(dim=32, depth=2, heads=2, mlp=64)),
        },
        rows=[*BASELINES, "linear", "task_arithmetic", "regmean", "emr", "adamerging_task", "greedy_soup", "slerp", "smile", "wemoe"],
        seeded_rows=[*BASELINES, "task_arithmetic"],
        search={"text": SearchConfig(steps=4, record_every=2), "image": SearchConfig(steps=6, record_every=2)},
        curve={"text": ["task_arithmetic"], "image": ["task_arithmetic"]},
        curve_ks={"text": [2], "image": [2]},
        study={"text": (16, 2), "image": (None, 2)},
        parts={"text": ["adamerging_task"]},
    ),
}
