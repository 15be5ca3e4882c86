"""
curriculum.py: the dual-level dynamic curriculum of DCRL (pure Python, no torch, no I/O outside the CLI).

Outer level (the paper): overlap bins in order, advanced when the 20-step moving average of r_match on the
current bin exceeds 0.8, mastered bins dropped. Inner level (our schedule): (L1, sparse) -> (L2, moderate) ->
(L3, dense) unlocked one by one by the same rule, steps drawn uniformly from the unlocked stages. Modes
"uniform", "easy", "hard" are the paper's ablations. One update() = one optimisation step.

Usage (library; grpo.py drives it):
    cur = Curriculum(bins=[1, 2, 3, 5], mode="dcrl")          # bins present in the training pool
    b, level, spatial = cur.sample(rng)                          # rng: numpy Generator or random.Random
    events = cur.update(b, level, spatial, mean_match_acc)       # e.g. ["unlock L2/moderate (bin 1, ...)"]
    ckpt["curriculum"] = cur.state_dict()                        # JSON-serialisable; load_state_dict restores
Simulation (no torch, no model):
    python curriculum.py --simulate --acc 'L3/dense=0.75,*=0.85' --noise 0.05 --steps 1000 --seed 0

In: per-step match accuracy. Out: which (bin, level, spatial) to train on, events, a JSON state.
Details (the state machine written out, --acc syntax, carry / restart, max_steps_per_bin, replay, old
checkpoints): docs/curriculum.md.
"""
import argparse
import random
from collections import deque

LEVELS = ("L1", "L2", "L3")
SPATIAL = ("sparse", "moderate", "dense")
STAGES = {
    "joint": [("L1", "sparse"), ("L2", "moderate"), ("L3", "dense")],
    "grid": [(lv, sp) for lv in LEVELS for sp in SPATIAL],
}
MODES = ("dcrl", "uniform", "easy", "hard")
INNER_ON_NEW_BIN = ("carry", "restart")
STATE_VERSION = 2


def _randint(rng, k):
    """Uniform int in [0, k) from a numpy Generator or a random.Random."""
    return int(rng.integers(k)) if hasattr(rng, "integers") else rng.randrange(k)


def _mean(values):
    return sum(values) / len(values) if values else 0.0


class Curriculum:

    def __init__(self, bins, mode="dcrl", stages="joint", window=20, threshold=0.8, replay=0.0,
                 inner_on_new_bin="carry", max_steps_per_bin=0):
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
        if inner_on_new_bin not in INNER_ON_NEW_BIN:
            raise ValueError(f"Curriculum: inner_on_new_bin {inner_on_new_bin!r} not in {INNER_ON_NEW_BIN}")
        if max_steps_per_bin < 0:
            raise ValueError(f"Curriculum: max_steps_per_bin must be >= 0 (got {max_steps_per_bin})")
        self.mode, self.window, self.threshold = mode, int(window), float(threshold)
        self.replay, self.inner_on_new_bin = float(replay), inner_on_new_bin
        self.max_steps_per_bin = int(max_steps_per_bin)
        third = max(1, round(len(self.bins) / 3))
        self.pool = {"dcrl": self.bins, "uniform": self.bins, "easy": self.bins[:third],
                     "hard": self.bins[-third:]}[mode]  # bins a static mode samples from
        self.bin_pos, self.unlocked, self.finished, self.steps, self.bin_start = 0, 1, False, 0, 0
        self._clear_windows()

    def _clear_windows(self):
        self.stage_windows = [deque(maxlen=self.window) for _ in self.stages]
        self.bin_window = deque(maxlen=self.window)

    # -- queries --

    def current(self):
        """(bin, level, spatial): the current bin and its newest unlocked stage."""
        if self.mode == "dcrl":
            return (self.bins[self.bin_pos], *self.stages[self.unlocked - 1])
        return (self.pool[0], *self.stages[0])

    def moving_average(self):
        """The current bin's moving average (what the paper's bin rule compares with the threshold)."""
        return _mean(self.bin_window)

    def sample(self, rng):
        """(bin, level, spatial) for the next task."""
        if self.mode != "dcrl":
            return (self.pool[_randint(rng, len(self.pool))], *self.stages[_randint(rng, len(self.stages))])
        if self.replay > 0 and self.bin_pos > 0 and rng.random() < self.replay:
            return (self.bins[_randint(rng, self.bin_pos)], *self.stages[_randint(rng, len(self.stages))])
        k = _randint(rng, self.unlocked) if self.unlocked > 1 else 0  # one stage: no draw (same stream as before)
        return (self.bins[self.bin_pos], *self.stages[k])

    def describe(self):
        if self.mode != "dcrl":
            return f"{self.mode}: bins {self.pool} x {len(self.stages)} stages"
        b, lv, sp = self.current()
        newest = self.stage_windows[self.unlocked - 1]
        return (f"dcrl bin {b} ({self.bin_pos + 1}/{len(self.bins)}) ma {self.moving_average():.2f} "
                f"n {len(self.bin_window)}/{self.window}; stages 1..{self.unlocked}/{len(self.stages)} unlocked, "
                f"newest {lv}/{sp} ma {_mean(newest):.2f} n {len(newest)}/{self.window}"
                + (" finished" if self.finished else ""))

    # -- the state machine --

    def update(self, bin, level, spatial, match_acc):
        """Report one step's mean match accuracy for (bin, level, spatial); returns a list of event strings."""
        self.steps += 1
        if self.mode != "dcrl" or int(bin) != self.bins[self.bin_pos]:
            return []
        stage = (level, spatial)
        if stage not in self.stages[:self.unlocked]:
            return []
        i = self.stages.index(stage)
        self.stage_windows[i].append(float(match_acc))
        self.bin_window.append(float(match_acc))
        events = []
        sw = self.stage_windows[i]
        if i == self.unlocked - 1 < len(self.stages) - 1 and len(sw) == self.window and _mean(sw) > self.threshold:
            self.unlocked += 1
            events.append(f"unlock {'/'.join(self.stages[i + 1])} (bin {bin}, {level}/{spatial} ma {_mean(sw):.3f})")
        if self.finished:  # on the last bin for good; stages still unlock there
            return events
        ma = self.moving_average()
        passed = len(self.bin_window) == self.window and ma > self.threshold
        forced = not passed and 0 < self.max_steps_per_bin <= self.steps - self.bin_start
        if not (passed or forced):
            return events
        why = (f"ma {ma:.3f}" if passed else
               f"forced after {self.steps - self.bin_start} steps, ma {ma:.3f} n {len(self.bin_window)}")
        if self.bin_pos == len(self.bins) - 1:
            self.finished = True
            return events + [f"mastered all (bin {bin}, {why}); staying on the last bin"]
        self.bin_pos += 1
        self.bin_start = self.steps
        self.bin_window.clear()
        if self.inner_on_new_bin == "restart":
            self.unlocked = 1
            self._clear_windows()
        return events + [f"advance bin -> {self.bins[self.bin_pos]} (bin {bin} {'forced' if forced else 'mastered'}, "
                         f"{why}; stages 1..{self.unlocked} unlocked)"]

    # -- checkpointing --

    def _config(self):
        return dict(bins=self.bins, mode=self.mode, stages=[list(s) for s in self.stages], window=self.window,
                    threshold=self.threshold, replay=self.replay, inner_on_new_bin=self.inner_on_new_bin,
                    max_steps_per_bin=self.max_steps_per_bin)

    def state_dict(self):
        return dict(version=STATE_VERSION, config=self._config(), bin_pos=self.bin_pos, unlocked=self.unlocked,
                    finished=self.finished, steps=self.steps, bin_start=self.bin_start,
                    stage_windows=[list(w) for w in self.stage_windows], bin_window=list(self.bin_window))

    def load_state_dict(self, d):
        """Restore a state_dict; a version-1 state (the earlier one-stage-at-a-time rule) is migrated (see the
        usage card). Returns a list of notes (empty unless something was migrated). A checkpoint made with
        another configuration is refused."""
        version = d.get("version", 1)
        if version not in (1, STATE_VERSION):
            raise ValueError(f"Curriculum.load_state_dict: unknown curriculum state version {version}")
        mine = self._config()
        if version == 1:  # its config had restart_inner instead of the two new settings
            mine = {k: v for k, v in mine.items() if k not in ("inner_on_new_bin", "max_steps_per_bin")}
            theirs = {k: v for k, v in d["config"].items() if k != "restart_inner"}
        else:
            theirs = d["config"]
        if theirs != mine:
            raise ValueError(f"Curriculum.load_state_dict: checkpoint config {d['config']} differs from "
                             f"this run's {self._config()}")
        self.bin_pos, self.finished, self.steps = int(d["bin_pos"]), bool(d["finished"]), int(d["steps"])
        self._clear_windows()
        if version == 1:
            self.unlocked, self.bin_start = int(d["stage_pos"]) + 1, self.steps
            self.stage_windows[self.unlocked - 1].extend(float(v) for v in d["recent"])
            return [f"migrated a version-1 curriculum state (bin {self.bins[self.bin_pos]}, stages "
                    f"1..{self.unlocked} unlocked, the old window kept as that stage's, bin window empty)"]
        self.unlocked, self.bin_start = int(d["unlocked"]), int(d["bin_start"])
        for w, vals in zip(self.stage_windows, d["stage_windows"]):
            w.extend(float(v) for v in vals)
        self.bin_window.extend(float(v) for v in d["bin_window"])
        return []

# -----------------------------------------------------------------------------
# simulation: the state machine under made-up per-stage accuracies (no model)

def parse_acc(spec):
    """'L3/dense=0.75,*=0.85,4:L1/sparse=0.9' -> acc(bin, level, spatial); the most specific key wins
    (BIN:STAGE, then STAGE, then BIN:*, then *). A stage with no matching key is an error at lookup."""
    table = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        key, sep, value = item.partition("=")
        b, _, stage = key.strip().rpartition(":")
        try:
            acc = float(value)
            b = int(b) if b else None
        except ValueError:
            raise ValueError(f"--acc: bad item {item!r} (want KEY=number, KEY = [BIN:]LEVEL/SPATIAL or [BIN:]*)")
        if not sep or not 0 <= acc <= 1:
            raise ValueError(f"--acc: bad item {item!r} (want KEY=accuracy in [0, 1])")
        if stage != "*" and tuple(stage.split("/")) not in {(lv, sp) for lv in LEVELS for sp in SPATIAL}:
            raise ValueError(f"--acc: bad stage {stage!r} in {item!r} (want LEVEL/SPATIAL like L3/dense, or *)")
        table[(b, stage)] = acc

    def acc(bin, level, spatial):
        for key in ((bin, f"{level}/{spatial}"), (None, f"{level}/{spatial}"), (bin, "*"), (None, "*")):
            if key in table:
                return table[key]
        raise ValueError(f"--acc {spec!r} gives no accuracy for bin {bin} {level}/{spatial} (add *=...)")
    return acc


def simulate(cur, acc, steps, noise=0.0, seed=0):
    """Run `steps` sample + update rounds, acc(bin, level, spatial) + Gaussian noise (clipped to [0, 1]) as the
    reported accuracy. -> dict: reached {bin: step}, left {bin: (step, "mastered"|"forced")} (the last bin: when
    it was passed; the run stays on it), unlocked
    {bin: {"L/S": step}} (stages available on a bin, carried ones at the bin's first step), events [(step, text)]."""
    rng = random.Random(seed)
    first = cur.bins[cur.bin_pos]
    reached, left, events = {first: 0}, {}, []
    unlocked = {first: {"/".join(s): 0 for s in cur.stages[:cur.unlocked]}}
    for step in range(1, steps + 1):
        b, level, spatial = cur.sample(rng)
        a = min(1.0, max(0.0, acc(b, level, spatial) + rng.gauss(0.0, noise)))
        before = cur.bins[cur.bin_pos]
        for e in cur.update(b, level, spatial, a):
            events.append((step, e))
            if e.startswith("unlock"):
                unlocked[before][e.split()[1]] = step  # "unlock L2/moderate (...)"
            elif e.startswith(("advance bin", "mastered all")):
                left[before] = (step, "forced" if "forced" in e else "mastered")
        now = cur.bins[cur.bin_pos]
        if now != before:
            reached[now] = step
            unlocked[now] = {"/".join(s): step for s in cur.stages[:cur.unlocked]}
    return dict(reached=reached, left=left, unlocked=unlocked, events=events, final=cur.current(),
                finished=cur.finished)


def simulation_table(cur, result):
    """Markdown table of simulate's result: one row per bin."""
    names = ["/".join(s) for s in cur.stages]
    lines = ["| bin | reached at step | " + " | ".join(f"{n} unlocked" for n in names) + " | passed at step |",
             "|" + "---|" * (len(names) + 3)]
    for b in cur.bins:
        if b not in result["reached"]:
            lines.append(f"| {b} | - | " + " | ".join("-" for _ in names) + " | - |")
            continue
        u = result["unlocked"][b]
        step, how = result["left"].get(b, (None, None))
        lines.append(f"| {b} | {result['reached'][b]} | " + " | ".join(str(u.get(n, "-")) for n in names)
                     + f" | {'-' if step is None else f'{step} ({how})'} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--simulate", action="store_true", help="run the state machine on made-up accuracies")
    ap.add_argument("--acc", default="*=0.85", help="per-stage accuracies, e.g. 'L3/dense=0.75,*=0.85'")
    ap.add_argument("--noise", type=float, default=0.05, help="std of the Gaussian noise on each step's accuracy")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bins", type=int, default=10, help="bins 1..BINS (the paper: S = 10)")
    ap.add_argument("--mode", default="dcrl", choices=MODES)
    ap.add_argument("--stages", default="joint", choices=sorted(STAGES))
    ap.add_argument("--window", type=int, default=20)
    ap.add_argument("--threshold", type=float, default=0.8)
    ap.add_argument("--inner-on-new-bin", default="carry", choices=INNER_ON_NEW_BIN)
    ap.add_argument("--max-steps-per-bin", type=int, default=0, help="0 = off")
    args = ap.parse_args(argv)
    if not args.simulate:
        ap.error("curriculum.py is a library; the only command is --simulate")
    try:
        acc = parse_acc(args.acc)
    except ValueError as e:
        ap.error(str(e))
    cur = Curriculum(range(1, args.bins + 1), mode=args.mode, stages=args.stages, window=args.window,
                     threshold=args.threshold, inner_on_new_bin=args.inner_on_new_bin,
                     max_steps_per_bin=args.max_steps_per_bin)
    result = simulate(cur, acc, args.steps, args.noise, args.seed)
    print(f"curriculum.py --simulate: acc {args.acc!r}, noise {args.noise}, {args.steps} steps, seed {args.seed}, "
          f"{args.mode}, inner on new bin: {args.inner_on_new_bin}, max steps per bin: {args.max_steps_per_bin}\n")
    print(simulation_table(cur, result))
    b, lv, sp = result["final"]
    print(f"\nafter {args.steps} steps: bin {b} ({cur.bin_pos + 1}/{len(cur.bins)}), newest stage {lv}/{sp}"
          + (", last bin passed (the run stays there)" if result["finished"] else ""))


if __name__ == "__main__":
    main()
