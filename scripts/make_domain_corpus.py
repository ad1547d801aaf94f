"""Write the demo's domain corpus: shipping bulletins for a fictional sea, in a fixed house format.

    python -m scripts.make_domain_corpus OUTDIR [--seed 0] [--train 64] [--calibration 8] [--heldout 8]

Why this domain: a 135M model has never seen these sea areas, coastal stations or this bulletin
layout, so its perplexity on them starts high and a few minutes of LoRA training on 2 cores lowers
it a lot (the fine-tune has a large, measurable effect); and the bulletins are drawn from a
weather model (a pressure system whose position sets each area's wind, a gale-warning list that
agrees with the area forecasts, a coastal report that agrees with the synopsis), so the held-out
bulletins are new combinations of a learnable structure, not text the model could memorise.

Writes three disjoint splits of plain UTF-8 text, bulletins separated by a blank line:
train.txt (the fine-tune's data), calibration.txt (~16 x 256 tokens, for an importance matrix)
and heldout.txt (>= 8 x 256 tokens, the compare stage's domain evaluation text). Each bulletin
has a serial number unique across the splits, and every split draws from its own random stream
(seed, split), so adding bulletins to one split changes no other. The same seed writes the same
bytes on every machine: only Python's `random.Random` (a documented, stable generator) is used."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

SPLITS = {"train": 0, "calibration": 1, "heldout": 2}
# Serial numbers per split start here, so no two splits share a bulletin number.
_SERIAL_BASE = {"train": 1000, "calibration": 6000, "heldout": 8000}

# The fictional sea, west to east in three rows; a system's neighbourhood is by grid distance.
AREAS = [
    ["Fennick", "Dunmore Deep", "Outer Skerrow", "Calloway", "Brannoch"],
    ["Westmere", "Harrow Bank", "Tallis", "Inner Skerrow", "Corran"],
    ["Lissel", "Greyhaven", "South Tallis", "Mardle", "Eastwick Rise"],
]
STATIONS = ["Calder Point", "Ravenscar Light", "Holm Fiord", "Skerrow Buoy", "Tallis Head", "Port Ennis", "Mardle Automatic"]
DIRECTIONS = ["north", "northeast", "east", "southeast", "south", "southwest", "west", "northwest"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
SEA = ["smooth", "slight", "moderate", "rough", "very rough", "high"]
WEATHER_CALM = ["fair", "mainly fair", "fog patches", "drizzle at times", "haze"]
WEATHER_WET = ["rain", "showers", "rain then showers", "occasional rain", "thundery showers", "squally showers", "sleet showers"]
VIS = ["good", "moderate", "poor", "very poor"]
_GALES = {8: "gale 8", 9: "severe gale 9", 10: "storm 10", 11: "violent storm 11"}
TENDENCY = ["rising slowly", "rising", "rising quickly", "steady", "falling slowly", "falling", "falling quickly"]


@dataclass
class System:
    kind: str  # "low" or "high"
    row: int
    col: int
    pressure: int
    heading: str
    depth_change: int


def _cells() -> list[tuple[int, int]]:
    return [(r, c) for r in range(len(AREAS)) for c in range(len(AREAS[0]))]


def _force(rng: random.Random, system: System, r: int, c: int) -> int:
    """Beaufort force: strongest next to a low's centre, light under a high."""
    d = abs(r - system.row) + abs(c - system.col)
    if system.kind == "low":
        strength = max(2, 7 - d + (1006 - system.pressure) // 10)
    else:
        strength = 2 + d // 2
    return max(1, min(11, strength + rng.choice([-1, 0, 0, 1])))


def _wind(rng: random.Random, system: System, r: int, c: int) -> tuple[str, int, str]:
    # Winds circle a low anticlockwise and a high clockwise: the direction follows from the bearing.
    dr, dc = r - system.row, c - system.col
    if dr == 0 and dc == 0:
        direction = "cyclonic" if system.kind == "low" else "variable"
    else:
        # Bearing from the centre (row grows southward), rotated a quarter turn for the circulation.
        octant = {(-1, 0): 0, (-1, 1): 1, (0, 1): 2, (1, 1): 3, (1, 0): 4, (1, -1): 5, (0, -1): 6, (-1, -1): 7}
        sr, sc = (dr > 0) - (dr < 0), (dc > 0) - (dc < 0)
        turn = 2 if system.kind == "low" else -2
        direction = DIRECTIONS[(octant[(sr, sc)] + turn) % 8]
    f = _force(rng, system, r, c)
    change = rng.choice(["", "", "", " later", " for a time", " at first"])
    if f >= 8:
        text = f"{direction} {_GALES[f]}" if f > 8 or rng.random() < 0.5 else f"{direction} 7 to gale 8"
    elif rng.random() < 0.5:
        text = f"{direction} {f} to {min(f + 2, 7)}" if f < 7 else f"{direction} {f}"
    else:
        veer = rng.choice(["backing", "veering", "becoming"])
        other = DIRECTIONS[(DIRECTIONS.index(direction) + (1 if veer == "veering" else -1)) % 8] if direction in DIRECTIONS else "west"
        text = f"{direction} {f}, {veer} {other} {min(f + rng.choice([0, 1, 2]), 7)}{change}"
    return text[0].upper() + text[1:], f, direction


def _sea(f: int, rng: random.Random) -> str:
    i = max(0, min(len(SEA) - 1, (f - 1) // 2 + rng.choice([0, 0, 1])))
    if rng.random() < 0.35 and i + 1 < len(SEA):
        return f"{SEA[i]} or {SEA[i + 1]}".capitalize()
    return SEA[i].capitalize()


def _weather(f: int, kind: str, rng: random.Random) -> tuple[str, str]:
    wet = kind == "low" and f >= 5
    w = rng.choice(WEATHER_WET if wet else WEATHER_CALM)
    vis_i = 0 if w in ("fair", "mainly fair") else rng.choice([0, 1, 1, 2])
    if w == "fog patches":
        vis_i = rng.choice([2, 3])
    vis = VIS[vis_i]
    if vis_i < 2 and rng.random() < 0.4:
        vis += f", occasionally {VIS[vis_i + 1]}"
    return w.capitalize(), vis.capitalize()


def bulletin(rng: random.Random, serial: int) -> str:
    """One bulletin: header, synopsis, gale warnings, area forecasts, coastal reports, outlook."""
    kind = rng.choice(["low", "low", "low", "high"])
    row, col = rng.randrange(len(AREAS)), rng.randrange(len(AREAS[0]))
    pressure = rng.randint(962, 1004) if kind == "low" else rng.randint(1018, 1041)
    system = System(kind, row, col, pressure, rng.choice(DIRECTIONS), rng.choice([-12, -8, -4, 0, 4, 8]))
    day, month, date = rng.randrange(7), rng.randrange(12), rng.randint(1, 28)
    hour = rng.choice(["0015", "0520", "1130", "1725"])

    lines = [f"MARROW SEA SHIPPING BULLETIN {serial}"]
    lines.append(f"Issued by the Harbour Office at Calder Point at {hour} UTC on {DAYS[day]} {date} {MONTHS[month]}.")
    lines.append("")

    # Synopsis: where the system is and where it goes (the next row/column along its heading).
    di = DIRECTIONS.index(system.heading)
    step = [(-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1), (0, -1), (-1, -1)][di]
    nr = min(len(AREAS) - 1, max(0, row + step[0]))
    nc = min(len(AREAS[0]) - 1, max(0, col + step[1]))
    later = pressure + system.depth_change
    pace = rng.choice(["slowly", "steadily", "quickly"])
    # What the central pressure does: a low deepens (falls) or fills, a high builds or declines.
    trend = (system.depth_change > 0) - (system.depth_change < 0)
    verb = {"low": ["deepening", "losing its identity", "filling"], "high": ["declining", "slow-moving", "building"]}[kind][trend + 1]
    lines.append(
        f"General synopsis at {hour[:2]}00: {kind.capitalize()}, {AREAS[row][col]}, {pressure}, "
        f"moving {pace} {system.heading}, {verb}, expected {AREAS[nr][nc]} {later} by {hour[:2]}00 {DAYS[(day + 1) % 7]}."
    )
    lines.append("")

    # Area forecasts, neighbouring areas grouped when their forecast words agree.
    forecasts: list[tuple[list[str], str, int]] = []
    for r, c in _cells():
        wind, f, _ = _wind(rng, system, r, c)
        sea = _sea(f, rng)
        weather, vis = _weather(f, kind, rng)
        body = f"{wind}. {sea}. {weather}. {vis}."
        if forecasts and forecasts[-1][1] == body:
            forecasts[-1][0].append(AREAS[r][c])
        else:
            forecasts.append(([AREAS[r][c]], body, f))

    gales = [a for names, _, f in forecasts if f >= 8 for a in names]
    if gales:
        lines.append(f"Gale warnings in force: {', '.join(gales)}.")
    else:
        lines.append("There are no warnings of gales.")
    lines.append("")
    lines.append("Area forecasts for the next 24 hours:")
    for names, body, _ in forecasts:
        lines.append(f"{', '.join(names)}: {body}")
    lines.append("")

    # Coastal reports: a subset of stations, in the fixed station order.
    lines.append(f"Coastal station reports at {hour[:2]}00:")
    for st in sorted(rng.sample(STATIONS, rng.randint(3, 5)), key=STATIONS.index):
        d = rng.choice(DIRECTIONS)
        f = rng.randint(1, 8) if kind == "low" else rng.randint(1, 5)
        miles = rng.choice([2, 5, 8, 12, 15, 20, 25, 30])
        p = pressure + rng.randint(4, 22) if kind == "low" else pressure - rng.randint(1, 12)
        tend = rng.choice(TENDENCY[4:] if kind == "low" and system.depth_change < 0 else TENDENCY)
        lines.append(f"{st}: {d} {f}, {miles} miles, {p}, {tend}.")
    lines.append("")
    outlook = rng.choice(
        [
            f"Outlook for the following 24 hours: {'unsettled' if kind == 'low' else 'settled'}, with winds {'decreasing' if system.depth_change > 0 else 'increasing'} in the {['north', 'centre', 'south'][row]}.",
            f"Outlook for the following 24 hours: the {kind} moves away {system.heading}; winds {rng.choice(['moderating', 'freshening', 'little changed'])}.",
        ]
    )
    lines.append(outlook)
    lines.append(f"End of bulletin {serial}.")
    return "\n".join(lines)


def split_text(seed: int, split: str, count: int) -> str:
    rng = random.Random(f"marrow-sea/{seed}/{SPLITS[split]}")
    return "\n\n".join(bulletin(rng, _SERIAL_BASE[split] + i) for i in range(count)) + "\n"


def write_corpus(outdir: Path | str, seed: int = 0, train: int = 64, calibration: int = 8, heldout: int = 8) -> dict[str, Path]:
    if max(train, calibration, heldout) > 2000:
        raise ValueError("at most 2000 bulletins per split (their serial numbers must not overlap)")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for split, n in (("train", train), ("calibration", calibration), ("heldout", heldout)):
        path = out / f"{split}.txt"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(split_text(seed, split, n), encoding="utf-8")
        tmp.replace(path)  # a half-written split never looks finished to make
        paths[split] = path
    return paths


def bulletins(text: str) -> list[str]:
    """A split's bulletins (each starts with its header line; blank lines also occur inside one)."""
    out: list[str] = []
    for block in text.split("MARROW SEA SHIPPING BULLETIN ")[1:]:
        out.append("MARROW SEA SHIPPING BULLETIN " + block.strip())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--train", type=int, default=64)
    ap.add_argument("--calibration", type=int, default=8)
    ap.add_argument("--heldout", type=int, default=8)
    a = ap.parse_args()
    for split, path in write_corpus(a.outdir, a.seed, a.train, a.calibration, a.heldout).items():
        print(f"{split}: {path}")


if __name__ == "__main__":
    main()
