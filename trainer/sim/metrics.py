"""Episode metrics from SUMO's tripinfo and statistic outputs, with RESCO's delay definition.

RESCO's average delay charges every vehicle of the episode: Σ timeLoss + Σ departDelay over
arrived and still-running vehicles, plus, for vehicles that were never inserted, the time from
their scheduled depart to the end (SUMO writes exactly that as their ``departDelay`` with
``--tripinfo-output.write-undeparted``), divided by the number of vehicles.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

from edge_runtime.errors import RELEDError

METRIC_LABELS = {
    "avg_delay": "delay (s)",
    "avg_travel_time": "travel time (s)",
    "avg_waiting_time": "waiting (s)",
    "throughput": "arrived",
    "vehicles": "vehicles",
    "teleports": "teleports",
}


@dataclass(frozen=True)
class EpisodeMetrics:
    vehicles: int  # every vehicle scheduled in the episode: arrived, running and never inserted
    throughput: int  # vehicles that arrived
    avg_delay: float  # RESCO: (Σ timeLoss + Σ departDelay) / vehicles
    avg_travel_time: float  # mean duration of inserted vehicles (running ones until the end)
    avg_waiting_time: float  # mean waiting time (speed < 0.1 m/s) of inserted vehicles
    teleports: int
    never_inserted: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def read_episode_metrics(tripinfo: Path, statistics: Path) -> EpisodeMetrics:
    """Metrics of one finished episode (SUMO must have been closed so the files are complete)."""
    total_loss = total_depart_delay = total_duration = total_wait = 0.0
    vehicles = arrived = inserted = 0
    try:
        for _, el in ET.iterparse(tripinfo):
            if el.tag != "tripinfo":
                continue
            vehicles += 1
            total_loss += float(el.get("timeLoss", 0.0))
            total_depart_delay += float(el.get("departDelay", 0.0))
            if float(el.get("depart", -1)) >= 0:
                inserted += 1
                total_duration += float(el.get("duration", 0.0))
                total_wait += float(el.get("waitingTime", 0.0))
            arrived += float(el.get("arrival", -1)) >= 0
            el.clear()
    except (ET.ParseError, FileNotFoundError) as exc:
        raise RELEDError(f"SUMO's trip output {tripinfo} is incomplete ({exc}): the simulation did not "
                         "finish cleanly") from exc
    return EpisodeMetrics(
        vehicles=vehicles, throughput=arrived,
        avg_delay=(total_loss + total_depart_delay) / vehicles if vehicles else math.nan,
        avg_travel_time=total_duration / inserted if inserted else math.nan,
        avg_waiting_time=total_wait / inserted if inserted else math.nan,
        teleports=read_teleports(statistics), never_inserted=vehicles - inserted,
    )


def read_teleports(statistics: Path) -> int:
    try:
        node = ET.parse(statistics).getroot().find("teleports")
    except (ET.ParseError, FileNotFoundError) as exc:
        raise RELEDError(f"SUMO's statistics {statistics} are missing or incomplete ({exc})") from exc
    return int(node.get("total", 0)) if node is not None else 0
