"""
curriculum.py: the dual-level dynamic curriculum of DCRL (pure Python, no torch, no I/O).

Usage (library; grpo.py drives it). One update() = one "step" of the paper's 20-step moving average: call it
once per optimisation step with the mean r_match of that step's prompts drawn from current() (calling it once
per prompt makes the window 20 prompts instead, a shorter horizon than the paper's):
    cur = Curriculum(bins=[1, 2, 3, 5], mode="dcrl")          # bins present in the training pool
    b, level, spatial = cur.sample(rng)                          # rng: numpy Generator or random.Random
    ... draw tasks with make_tasks.make_task(pair in bin b, level, spatial), roll out, score ...
    events = cur.update(b, level, spatial, mean_match_acc)       # e.g. ["advance inner -> L2/moderate"]
    ckpt["curriculum"] = cur.state_dict()                        # JSON-serialisable; load_state_dict restores

State machine of mode "dcrl" (written out):
    state  = (bin_pos, stage_pos, recent, finished): bin_pos indexes the sorted available bins (bins not given
             are empty and simply never visited), stage_pos indexes the inner stages, recent holds the last
             <= `window` match accuracies reported for the CURRENT (bin, stage).
    start    bin_pos = 0, stage_pos = 0, recent = [], finished = False.
    update(b, level, spatial, acc):
        if (b, level, spatial) != current(): ignore (replay samples never count) -> [].
        append acc to recent (keep the last `window`).
        if finished or len(recent) < window or mean(recent) <= threshold: -> [].   (a full window is needed)
        recent = []
        if stage_pos < last stage:  stage_pos += 1                                 -> ["advance inner ..."]
        elif bin_pos < last bin:    bin_pos += 1; stage_pos = 0 if restart_inner   -> ["advance bin ..."]
                                    (bins before bin_pos are mastered and dropped for good)
        else:                       finished = True; stay on the last bin and last stage, keep training there
                                                                                    -> ["mastered all ..."]
    sample(rng): with probability `replay` (default 0, the paper) a uniformly drawn (mastered bin, stage);
                 otherwise current().
Outer level (the paper): overlap bins in order, advance when the 20-step moving average of r_match on the
current bin exceeds 0.8, mastered bins dropped. Inner level (the paper names the stages, not the schedule; OUR
design): an ordered list of point configurations, default "joint" = (L1, sparse) -> (L2, moderate) ->
(L3, dense), option "grid" = all 9 in level-major order (L1 sparse, L1 moderate, ..., L3 dense), advanced by the
same moving-average rule; a bin counts as mastered when its last inner stage is, and the inner stages restart
for the next bin (restart_inner=True; False keeps the last stage). Replay > 0 is our departure from the paper.
Other modes (the paper's ablations; no progression, update() only tracks, returns []):
    "uniform": uniform over all given bins x all stages;  "easy": the easiest third of the given bins (by
    sorted order, at least one) x all stages;  "hard": the hardest third likewise.
    For these, current() is the easiest (bin, stage) they sample from (informational only).
"""
from collections import deque

LEVELS = ("L1", "L2", "L3")
SPATIAL = ("sparse", "moderate", "dense")
STAGES = {
    "joint": [("L1", "sparse"), ("L2", "moderate"), ("L3", "dense")],
    "grid": [(lv, sp) for lv in LEVELS for sp in SPATIAL],
}
MODES = ("dcrl", "uniform", "easy", "hard")


def _randint(rng, k):
    """Uniform int in [0, k) from a numpy Generator or a random.Random."""
    return int(rng.integers(k)) if hasattr(rng, "integers") else rng.randrange(k)


class Curriculum:

    def __init__(self, bins, mode="dcrl", stages="joint", window=20, threshold=0.8, replay=0.0,
                 restart_inner=True):
        self.bins = sorted({int(b) for b in bins})
        if not self.bins:
            raise ValueError("Curriculum: no bins given (is the training split empty?)")
        if mode not in MODES:
            raise ValueError(f"Curriculum: mode {mode!r} not in {MODES}")
        self.stages = [tuple(s) for s in (STAGES[stages] if isinstance(stages, str) else stages)]
        if not self.stages or any(lv not in LEVELS or sp not in SPATIAL for lv, sp in self.stages):
            raise ValueError(f"Curriculum: bad stages {stages!r}")
        if window < 1 or not 0.0 <= replay <= 1.0:
            raise ValueError(f"Curriculum: need window >= 1 and 0 <= replay <= 1 (got {window}, {replay})")
        self.mode, self.window, self.threshold = mode, int(window), float(threshold)
        self.replay, self.restart_inner = float(replay), bool(restart_inner)
        third = max(1, round(len(self.bins) / 3))
        self.pool = {"dcrl": self.bins, "uniform": self.bins, "easy": self.bins[:third],
                     "hard": self.bins[-third:]}[mode]  # bins a static mode samples from
        self.bin_pos, self.stage_pos, self.finished, self.steps = 0, 0, False, 0
        self.recent = deque(maxlen=self.window)

    # -- queries --

    def current(self):
        if self.mode == "dcrl":
            return (self.bins[self.bin_pos], *self.stages[self.stage_pos])
        return (self.pool[0], *self.stages[0])

    def moving_average(self):
        return sum(self.recent) / len(self.recent) if self.recent else 0.0

    def sample(self, rng):
        """(bin, level, spatial) for the next task."""
        if self.mode != "dcrl":
            return (self.pool[_randint(rng, len(self.pool))], *self.stages[_randint(rng, len(self.stages))])
        if self.replay > 0 and self.bin_pos > 0 and rng.random() < self.replay:
            return (self.bins[_randint(rng, self.bin_pos)], *self.stages[_randint(rng, len(self.stages))])
        return self.current()

    def describe(self):
        if self.mode != "dcrl":
            return f"{self.mode}: bins {self.pool} x {len(self.stages)} stages"
        b, lv, sp = self.current()
        return (f"dcrl bin {b} ({self.bin_pos + 1}/{len(self.bins)}) stage {lv}/{sp} "
                f"({self.stage_pos + 1}/{len(self.stages)}) ma {self.moving_average():.2f} "
                f"n {len(self.recent)}/{self.window}" + (" finished" if self.finished else ""))

    # -- the state machine --

    def update(self, bin, level, spatial, match_acc):
        """Report one step's mean match accuracy for (bin, level, spatial); returns a list of event strings."""
        self.steps += 1
        if self.mode != "dcrl" or (int(bin), level, spatial) != self.current():
            return []
        self.recent.append(float(match_acc))
        if self.finished or len(self.recent) < self.window or self.moving_average() <= self.threshold:
            return []
        ma = self.moving_average()
        self.recent.clear()
        if self.stage_pos < len(self.stages) - 1:
            self.stage_pos += 1
            return [f"advance inner -> {'/'.join(self.stages[self.stage_pos])} (bin {bin}, ma {ma:.3f})"]
        if self.bin_pos < len(self.bins) - 1:
            self.bin_pos += 1
            if self.restart_inner:
                self.stage_pos = 0
            return [f"advance bin -> {self.bins[self.bin_pos]} (bin {bin} mastered, ma {ma:.3f}; stage "
                    f"{'/'.join(self.stages[self.stage_pos])})"]
        self.finished = True
        return [f"mastered all (bin {bin}, ma {ma:.3f}); staying on the last bin and stage"]

    # -- checkpointing --

    def _config(self):
        return dict(bins=self.bins, mode=self.mode, stages=[list(s) for s in self.stages], window=self.window,
                    threshold=self.threshold, replay=self.replay, restart_inner=self.restart_inner)

    def state_dict(self):
        return dict(config=self._config(), bin_pos=self.bin_pos, stage_pos=self.stage_pos,
                    finished=self.finished, steps=self.steps, recent=list(self.recent))

    def load_state_dict(self, d):
        if d["config"] != self._config():
            raise ValueError(f"Curriculum.load_state_dict: checkpoint config {d['config']} differs from "
                             f"this run's {self._config()}")
        self.bin_pos, self.stage_pos = int(d["bin_pos"]), int(d["stage_pos"])
        self.finished, self.steps = bool(d["finished"]), int(d["steps"])
        self.recent = deque((float(v) for v in d["recent"]), maxlen=self.window)
